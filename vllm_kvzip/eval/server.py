"""A `vllm serve` subprocess and what its `/metrics` and log say about the KV cache.

Used by the soak benchmark (`benchmarks/soak.py`) and the server tests:

* `VLLMServer`: starts `python -m vllm.entrypoints.cli.main serve MODEL ...` on
  loopback, waits for `/health`, keeps the log in a file, stops it.
* `EngineSnapshot.read(base_url)`: vLLM's Prometheus gauges and counters that
  matter here.  `blocks_in_use` is exact: vLLM reports `kv_cache_usage_perc =
  1 - free / (num_gpu_blocks - 1)` from the scheduler's block pool (the null
  block is never free), so `usage * (num_gpu_blocks - 1)` is the number of
  blocks requests hold.  With prefix caching off (vllm-kvzip turns it off) a
  drained server holds none.
* `wait_until_drained`: no running or waiting request, then one tiny probe
  request.  vLLM publishes scheduler stats only after an engine step, and
  aborts (client disconnects) free blocks between steps, so the probe makes the
  engine take one more step: its stats are taken after it freed its own blocks.
* `compressions_in_log`: the plugin's "request ... compressed" log lines, by
  request id, with the token count each compression covered (a request
  preempted after its compression is compressed again at prompt + outputs).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _post_json(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read().decode())
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")}


class VLLMServer:
    """`vllm serve` in a subprocess (context manager); `base_url` once healthy."""

    def __init__(
        self,
        model: str,
        args: list[str],
        log_path: str | os.PathLike,
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
    ) -> None:
        self.port = free_port()
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "VLLMServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if _get(f"{self.base_url}/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve was not healthy after {self.startup_timeout:.0f} s:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- Prometheus text format ------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] of every sample in a Prometheus text exposition."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        samples.setdefault(name, []).append((dict(_LABEL.findall(labels or "")), float(value)))
    return samples


@dataclass
class EngineSnapshot:
    running: int
    waiting: int
    kv_cache_usage: float
    num_gpu_blocks: int
    preemptions: int
    generation_tokens: int
    prompt_tokens: int
    finished: dict[str, int] = field(default_factory=dict)

    @property
    def blocks_in_use(self) -> int:
        """Blocks held by requests (exact: see the module docstring)."""
        return round(self.kv_cache_usage * (self.num_gpu_blocks - 1))

    @classmethod
    def read(cls, base_url: str) -> "EngineSnapshot":
        status, text = _get(f"{base_url}/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        metrics = parse_metrics(text)

        def total(name: str) -> float:
            return sum(value for _, value in metrics.get(name, ()))

        info = metrics.get("vllm:cache_config_info") or [({}, 0.0)]
        num_blocks = info[0][0].get("num_gpu_blocks")
        if num_blocks in (None, "None"):
            raise RuntimeError("vllm:cache_config_info has no num_gpu_blocks label")
        finished: dict[str, int] = {}
        for labels, value in metrics.get("vllm:request_success_total", ()):
            reason = labels.get("finished_reason", "?")
            finished[reason] = finished.get(reason, 0) + int(value)
        return cls(
            running=int(total("vllm:num_requests_running")),
            waiting=int(total("vllm:num_requests_waiting")),
            kv_cache_usage=total("vllm:kv_cache_usage_perc"),
            num_gpu_blocks=int(num_blocks),
            preemptions=int(total("vllm:num_preemptions_total")),
            generation_tokens=int(total("vllm:generation_tokens_total")),
            prompt_tokens=int(total("vllm:prompt_tokens_total")),
            finished=finished,
        )


def served_model(base_url: str) -> str:
    status, text = _get(f"{base_url}/v1/models")
    if status != 200:
        raise RuntimeError(f"GET /v1/models answered {status}")
    return json.loads(text)["data"][0]["id"]


def wait_until_drained(base_url: str, timeout: float = 120.0, probe: bool = True) -> EngineSnapshot:
    """Wait for no running / waiting request; then (probe) one 1-token request and fresh stats.

    Returns the snapshot in which the server holds the fewest blocks (0 unless
    something leaked) once idle, polling until `timeout`.
    """
    deadline = time.time() + timeout
    snapshot = EngineSnapshot.read(base_url)
    while (snapshot.running or snapshot.waiting) and time.time() < deadline:
        time.sleep(0.5)
        snapshot = EngineSnapshot.read(base_url)
    if snapshot.running or snapshot.waiting:
        raise TimeoutError(f"server not drained after {timeout:.0f} s: {snapshot}")
    if probe:
        status, body = _post_json(
            f"{base_url}/v1/completions",
            {"model": served_model(base_url), "prompt": "Hi", "max_tokens": 1, "temperature": 0},
            timeout=timeout,
        )
        if status != 200:
            raise RuntimeError(f"probe request answered {status}: {body}")
    # The stats of the probe's step reach the API process just after its reply.
    settle = min(deadline, time.time() + 10)
    snapshot = EngineSnapshot.read(base_url)
    while snapshot.blocks_in_use and time.time() < settle:
        time.sleep(0.5)
        snapshot = EngineSnapshot.read(base_url)
    return snapshot


# -- the plugin's log ------------------------------------------------------------------
# One line per compression (`vllm_kvzip.backend.state.compression_log_line`), in two forms:
# "kept K of T context tokens (ratio ...)" (keep-ratio methods: T is the prompt) and
# "kept K of E context tokens per (layer, head) + D dense tail tokens" (threshold mode: E + D).
# Ratio-mode lines end with ", keep-set XXXXXXXX" (the keep mask's digest).
_LINE_START = r"vllm-kvzip: request (\S+) compressed \([^)]+\): "
_COMPRESSED = re.compile(
    _LINE_START + r"kept [\d.]+ of (\d+) context tokens (?:per \(layer, head\) \+ (\d+) dense tail tokens|\(ratio)"
)
_KEEP_SET = re.compile(_LINE_START + r".*, keep-set ([0-9a-f]{8})")


def _by_request(pairs) -> dict[str, list]:
    """(engine request id, value) pairs in log order -> request id -> its values in order."""
    found: dict[str, list] = {}
    for request_id, value in pairs:
        found.setdefault(request_id, []).append(value)
    return found


def keep_sets_in_log(log: str) -> dict[str, list[str]]:
    """Engine request id -> digests of the keep-sets it was compressed with (ratio mode), in log order."""
    return _by_request(_KEEP_SET.findall(log))


def compressions_in_log(log: str) -> dict[str, list[int]]:
    """Engine request id -> token counts at which it was compressed, in log order."""
    return _by_request(
        (request_id, int(evictable) + int(tail or 0)) for request_id, evictable, tail in _COMPRESSED.findall(log)
    )
