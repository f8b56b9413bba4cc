"""Soak test: `vllm serve --kv-compression ...` under concurrent OpenAI clients, then checks.

What it does:

1. starts `vllm serve MODEL --kv-compression METHOD --kv-compression-ratio R ...` (compression on,
   prefix caching off as vllm-kvzip requires) on loopback and waits for /health;
2. concurrent phase: `--concurrency` async OpenAI clients send `--requests` seeded requests (or fewer
   if `--duration` runs out): the synthetic long-context tasks of `vllm_kvzip.eval.synthetic` at
   varied lengths (some below the window, most above it so they are compressed), chat and
   completions, streaming and not, a share opted out of compression (`vllm_xargs
   {"kv_compression": "none"}`), all greedy (temperature 0).  Every `--disconnect-every`-th request
   is a stream the client closes after a few chunks, every `--invalid-every`-th one is invalid on
   purpose (too long, or a bad per-request ratio) and must be answered with HTTP 400;
3. drain: waits until vLLM runs and queues nothing, sends one 1-token probe (vLLM publishes its
   scheduler stats after a step), then reads `/metrics`: `leaked_pages` = blocks still held =
   `vllm:kv_cache_usage_perc * (num_gpu_blocks - 1)` (exact: see vllm_kvzip/eval/server.py), and
   `preemptions` = `vllm:num_preemptions_total`;
4. sequential phase: every request that completed runs again alone, and its output tokens
   (`return_token_ids`) must equal the concurrent ones.  A request that vLLM preempted after its
   compression is recomputed and compressed again at prompt + generated tokens (docs/design.md);
   the server log says at which token counts each request was compressed, and such a request is
   compared with the same chain run alone (prompt for k tokens, then prompt + those k tokens);
5. prints a summary, writes the JSON (`--output`) and exits 1 if a request failed, a page leaked or
   an output differed.

Token-level equality needs batch-invariant numerics: on a GPU, bf16 kernels choose different
reduction orders for different batch shapes, so greedy outputs can legitimately drift between the
concurrent and the sequential run.  `--dtype float32` (the default) makes that rare; with bf16 read
`mismatched_outputs` as numerics unless the mismatches cluster on preempted or compressed requests
(the JSON lists each mismatch with its first differing position, and the digests of the keep-sets
both runs compressed it with: `same_keep_sets` false means the scores differed at the keep boundary,
true that the outputs diverged while decoding).

CPU (the committed results; a 66-block pool (1056 tokens) and --ignore-eos force preemptions; on a
shared machine add VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1, as these runs did):

    python benchmarks/soak.py --requests 32 --concurrency 8 --max-tokens 96 --ignore-eos \
        --prompt-tokens 64,500 --window 64 --max-model-len 1024 \
        --server-args="--num-gpu-blocks-override 66" --output benchmarks/results/soak_cpu.json
    # the same with --method kvzap-mlp --output benchmarks/results/soak_cpu_kvzap.json

GPU (one H100), the embedded model with its real weights in float32 (prefills through TRITON_ATTN,
FlashAttention has no float32), CUDA graphs and async scheduling on (`tools/device_run.sh soak`).
Run 2026-12-07, `benchmarks/results/soak_h100.json`: 128 requests, 0 failed, 0 leaked pages, 1 of
109 outputs different (a compressed request, from its 4th token), but 0 preemptions: compression
kept the 1000-block pool below full (peak 937).  The device step now uses 600 blocks (SOAK_BLOCKS),
which 32 clients with prompts up to 6000 tokens must overfill:

    python benchmarks/soak.py --method kvzap-mlp --requests 128 --concurrency 32 --max-tokens 128 \
        --ignore-eos --prompt-tokens 64,6000 --max-model-len 8192 --duration 200 \
        --server-args="--num-gpu-blocks-override 600" --output benchmarks/results/soak_h100.json

Load, memory and kernels of a real deployment (Llama-3.1-8B shapes, random weights, bf16; random
weights make greedy ties everywhere, so outputs are not compared):

    python benchmarks/soak.py --model llama-3.1-8b-dummy --dtype bfloat16 --no-compare \
        --requests 200 --concurrency 64 --max-tokens 256 --ignore-eos --prompt-tokens 256,15000 \
        --max-model-len 16384 --duration 400 --output benchmarks/results/soak_h100_llama8b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_kvzip.eval.server import (  # noqa: E402
    EngineSnapshot,
    VLLMServer,
    compressions_in_log,
    keep_sets_in_log,
    wait_until_drained,
)
from vllm_kvzip.eval.synthetic import TASKS, make_example  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SERVED_NAME = "soak"
DUMMY_LLAMA = "llama-3.1-8b-dummy"  # --model value: Llama-3.1-8B shapes, random weights
# vLLM on a small CPU machine (as tests/conftest.py): every core computes (none reserved), 1 GiB KV pool.
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Spec:
    """One seeded request."""

    index: int
    kind: str  # chat | completion
    stream: bool
    opt_out: bool
    task: str
    token_budget: int
    max_tokens: int
    content: str  # chat: the user message; completion: the prompt
    prompt_tokens: int  # with the chat template for chat
    disconnect: bool = False  # a stream the client closes early
    invalid: str | None = None  # "too_long" | "bad_ratio": must be answered with HTTP 400


@dataclass
class Result:
    index: int
    ok: bool
    error: str | None = None
    status: str = ""  # completed | disconnected | rejected
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    latency_s: float = 0.0
    first_token_s: float | None = None


# -- workload -------------------------------------------------------------------------------
def build_specs(args, tokenizer) -> list[Spec]:
    rng = random.Random(args.seed)
    low, high = args.prompt_tokens
    window = args.window if args.window is not None else 128
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    specs = []
    for index in range(args.requests):
        # A quarter short (below the window: never compressed), the rest spread up to `high`.
        if rng.random() < 0.25:
            budget = rng.randint(low, max(low, min(high, window)))
        else:
            budget = rng.randint(min(high, max(low, 2 * window)), high)
        task = TASKS[index % len(TASKS)]
        example = make_example(task, args.seed * 100_000 + index, token_budget=budget, count_tokens=count)
        question = example.questions[0]
        kind = "chat" if rng.random() < 0.5 else "completion"
        content = example.context + "\n\n" + question.text
        if kind == "completion":
            content += "\n" + question.answer_prefix
            prompt_tokens = len(tokenizer.encode(content))
        else:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            prompt_tokens = len(tokenizer.encode(text, add_special_tokens=False))
        spec = Spec(
            index=index, kind=kind, stream=rng.random() < 0.5, opt_out=rng.random() < args.opt_out_fraction,
            task=task, token_budget=budget, max_tokens=args.max_tokens, content=content, prompt_tokens=prompt_tokens,
        )
        if args.invalid_every and index % args.invalid_every == args.invalid_every - 1:
            spec.invalid = "too_long" if (index // args.invalid_every) % 2 == 0 else "bad_ratio"
        elif args.disconnect_every and index % args.disconnect_every == args.disconnect_every - 1:
            spec.stream, spec.disconnect = True, True
        if spec.invalid is None and prompt_tokens + spec.max_tokens > args.max_model_len:
            raise SystemExit(
                f"request {index}: {prompt_tokens} prompt + {spec.max_tokens} output tokens exceed "
                f"--max-model-len {args.max_model_len}; lower --prompt-tokens"
            )
        specs.append(spec)
    return specs


def _extra(obj, name):
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


async def send(client, spec: Spec, request_id: str, args, *, prompt_ids: list[int] | None = None,
               max_tokens: int | None = None, tolerate_disconnect: bool = True) -> Result:
    """One request; `prompt_ids` sends token ids to /v1/completions instead (chain references)."""
    import openai

    extra_body: dict = {"return_token_ids": True, "request_id": request_id}
    if args.ignore_eos:
        extra_body["ignore_eos"] = True
    xargs = {}
    if spec.opt_out:
        xargs["kv_compression"] = "none"
    max_tokens = spec.max_tokens if max_tokens is None else max_tokens
    kind, content = spec.kind, spec.content
    if spec.invalid == "bad_ratio":
        xargs["kv_compression_ratio"] = 1.5
    elif spec.invalid == "too_long":
        max_tokens = args.max_model_len  # prompt + max_tokens > max model length
    if xargs:
        extra_body["vllm_xargs"] = xargs
    common = dict(model=SERVED_NAME, max_tokens=max_tokens, temperature=0, extra_body=extra_body)
    stream = spec.stream and prompt_ids is None
    result = Result(index=spec.index, ok=False)
    started = time.perf_counter()
    try:
        if prompt_ids is not None:
            response = await client.completions.create(prompt=prompt_ids, stream=False, **common)
        elif kind == "chat":
            response = await client.chat.completions.create(
                messages=[{"role": "user", "content": content}], stream=stream, **common
            )
        else:
            response = await client.completions.create(prompt=content, stream=stream, **common)
        if stream:
            chunks = 0
            async for chunk in response:
                for source in (chunk, *chunk.choices):  # chat: on the chunk; completions: on the choice
                    if not result.prompt_token_ids and _extra(source, "prompt_token_ids"):
                        result.prompt_token_ids = list(_extra(source, "prompt_token_ids"))
                for choice in chunk.choices:
                    result.token_ids += list(_extra(choice, "token_ids") or [])
                    result.finish_reason = choice.finish_reason or result.finish_reason
                    if result.first_token_s is None and result.token_ids:
                        result.first_token_s = time.perf_counter() - started
                chunks += 1
                if spec.disconnect and tolerate_disconnect and chunks >= 3:
                    await response.close()  # the client goes away mid-stream
                    result.status = "disconnected"
                    break
        else:
            choice = response.choices[0]
            prompt_ids = _extra(response, "prompt_token_ids") or _extra(choice, "prompt_token_ids")  # chat | completion
            result.prompt_token_ids = list(prompt_ids or [])
            result.token_ids = list(_extra(choice, "token_ids") or [])
            result.finish_reason = choice.finish_reason
        result.status = result.status or "completed"
        if spec.invalid:
            result.error = f"invalid request ({spec.invalid}) was accepted"
        elif not result.token_ids and result.status == "completed":
            result.error = "no output tokens"
        else:
            result.ok = True
    except openai.BadRequestError as error:
        if spec.invalid:
            result.ok, result.status = True, "rejected"
        else:
            result.error = f"HTTP 400: {error}"
    except Exception as error:  # noqa: BLE001 - every failure is counted and reported
        result.error = f"{type(error).__name__}: {error}"
    result.latency_s = time.perf_counter() - started
    return result


async def concurrent_phase(client, specs: list[Spec], args) -> tuple[list[Result], float]:
    results: list[Result] = []
    queue = list(reversed(specs))
    started = time.perf_counter()

    async def worker():
        while queue and time.perf_counter() - started < args.duration:
            spec = queue.pop()
            results.append(await send(client, spec, f"soak-c-{spec.index:05d}", args))
            if len(results) % max(1, len(specs) // 10) == 0:
                print(f"  {len(results)}/{len(specs)} requests done, {time.perf_counter() - started:.0f} s", flush=True)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return sorted(results, key=lambda r: r.index), time.perf_counter() - started


async def watch_metrics(base_url: str, samples: list[EngineSnapshot], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            samples.append(await asyncio.to_thread(EngineSnapshot.read, base_url))
        except Exception:  # noqa: BLE001 - a missed sample is not a failure
            pass
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass


async def sequential_phase(client, specs: dict[int, Spec], results: list[Result], compressions: dict, args):
    """Every completed request again, alone; chains for requests compressed again after preemption."""
    mismatches = []
    compared = 0
    for result in results:
        spec = specs[result.index]
        if not result.ok or result.status != "completed" or spec.invalid:
            continue
        prompt_length = len(result.prompt_token_ids)
        boundaries = sorted({prompt_length, *compressions.get(spec.index, [])})
        if len(boundaries) == 1:
            alone = await send(client, spec, f"soak-s-{spec.index:05d}", args)
            reference = alone.token_ids if alone.ok else None
        else:
            # Compressed again at prompt + k tokens after a preemption: the same chain, alone.
            reference = []
            for position, start in enumerate(boundaries):
                end = boundaries[position + 1] if position + 1 < len(boundaries) else prompt_length + spec.max_tokens
                piece = await send(
                    client, spec, f"soak-s-{spec.index:05d}-{position}",
                    args, prompt_ids=result.prompt_token_ids + reference[: start - prompt_length],
                    max_tokens=end - start,
                )
                if not piece.ok:
                    reference = None
                    break
                reference += piece.token_ids
                if len(reference) < end - prompt_length:
                    break  # the chain stopped early (EOS): nothing to append
        compared += 1
        if reference != result.token_ids:
            first = next(
                (i for i, (a, b) in enumerate(zip(reference or [], result.token_ids)) if a != b),
                min(len(reference or []), len(result.token_ids)),
            )
            mismatches.append({
                "index": spec.index, "kind": spec.kind, "stream": spec.stream, "opt_out": spec.opt_out,
                "prompt_tokens": prompt_length, "compressions": compressions.get(spec.index, []),
                "first_difference": first, "concurrent": result.token_ids, "sequential": reference,
            })
    return compared, mismatches


def compressions_by_index(log: str, phase: str) -> dict[int, list[int]]:
    """Soak request index -> token counts at which it was compressed in `phase` ("c" or "s")."""
    return by_soak_index(compressions_in_log(log), phase)


def by_soak_index(per_request: dict[str, list], phase: str) -> dict[int, list]:
    """Engine request ids of one phase ("soak-c-00017-..." or "soak-s-00017[-k]-...") -> soak index."""
    found: dict[int, list] = {}
    marker = f"soak-{phase}-"
    for request_id, values in per_request.items():
        if marker in request_id:
            index = int(request_id.split(marker, 1)[1][:5])
            found.setdefault(index, []).extend(values)
    return found


def classify_mismatches(mismatches: list[dict], log: str) -> int:
    """Add each mismatch's keep-set digests from both phases; return how many kept the same tokens.

    Same keep-sets: the outputs diverged while decoding (batch-dependent numerics or a decode
    bug).  Different keep-sets: the scores differed at the keep boundary, so the runs evicted
    different tokens (scoring numerics depend on the batch a prefill ran in).
    """
    digests = keep_sets_in_log(log)
    concurrent, sequential = by_soak_index(digests, "c"), by_soak_index(digests, "s")
    same = 0
    for mismatch in mismatches:
        ours, alone = concurrent.get(mismatch["index"], []), sequential.get(mismatch["index"], [])
        mismatch["keep_sets"] = {"concurrent": ours, "sequential": alone}
        mismatch["same_keep_sets"] = bool(ours) and ours == alone
        same += mismatch["same_keep_sets"]
    return same


def device_name() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this client process), else the CPU."""
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n")
        if names and names[0].strip():
            return names[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def server_args(args, on_gpu: bool) -> list[str]:
    command = [
        "--served-model-name", SERVED_NAME, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
        "--block-size", str(args.block_size), "--seed", str(args.seed),
        "--kv-compression", args.method, "--kv-compression-ratio", str(args.ratio),
    ]
    if args.window is not None:
        command += ["--kv-compression-window", str(args.window)]
    if not on_gpu:
        command += ["--enforce-eager"]  # torch.compile costs minutes per start on a small CPU
    return command + shlex.split(args.server_args)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(args) -> dict:
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    from vllm_kvzip.models import ensure_embedded_model

    on_gpu = not device_name().startswith("cpu")
    model = args.model or ensure_embedded_model()
    extra_server_args = []
    if model == DUMMY_LLAMA:
        # Llama-3.1-8B's shapes with random weights (benchmarks/throughput.py) and the embedded
        # model's tokenizer: load, memory and kernels of a real deployment, meaningless text.
        from throughput import make_dummy_model

        embedded = Path(ensure_embedded_model())
        model = make_dummy_model(Path(tempfile.mkdtemp(prefix="soak-llama8b-")), str(embedded))
        for name in ("chat_template.jinja",):
            if (embedded / name).is_file():
                (Path(model) / name).write_bytes((embedded / name).read_bytes())
        extra_server_args = ["--load-format", "dummy"]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model)
    specs = build_specs(args, tokenizer)
    by_index = {spec.index: spec for spec in specs}
    env = {} if on_gpu else {key: value for key, value in CPU_ENV.items() if key not in os.environ}
    log_path = Path(args.log or (Path(args.output).with_suffix(".log")))
    server = VLLMServer(
        model, server_args(args, on_gpu) + extra_server_args, log_path, env=env, startup_timeout=args.startup_timeout
    )
    print(f"starting: {shlex.join(server.command)}", flush=True)
    summary: dict = {}
    with server:
        base = server.base_url
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=args.request_timeout)
        at_start = EngineSnapshot.read(base)
        print(f"healthy; {at_start.num_gpu_blocks} KV blocks; concurrent phase: {len(specs)} requests, "
              f"concurrency {args.concurrency}", flush=True)
        samples: list[EngineSnapshot] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_metrics(base, samples, stop))
        results, duration = await concurrent_phase(client, specs, args)
        stop.set()
        await watcher
        print(f"concurrent phase done in {duration:.0f} s; draining", flush=True)
        drained = await asyncio.to_thread(wait_until_drained, base, 300.0)
        log = server.log()
        compressions = compressions_by_index(log, "c")
        compared, mismatches, same_keep_sets = 0, [], 0
        if not args.no_compare:
            print("sequential phase", flush=True)
            compared, mismatches = await sequential_phase(client, by_index, results, compressions, args)
            same_keep_sets = classify_mismatches(mismatches, server.log())
        final = await asyncio.to_thread(wait_until_drained, base, 300.0)
        alive = server.alive()

    completed = [r for r in results if r.ok and r.status == "completed"]
    failures = [r for r in results if not r.ok]
    output_tokens = sum(len(r.token_ids) for r in results if r.ok)
    recompressed = sum(1 for counts in compressions.values() if len(counts) > 1)
    summary = {
        "requests": len(results),
        "concurrency": args.concurrency,
        "failed_requests": len(failures) + (0 if alive else 1),
        "leaked_pages": max(drained.blocks_in_use, final.blocks_in_use),
        "preemptions": drained.preemptions - at_start.preemptions,
        "mismatched_outputs": len(mismatches),
        "compared_outputs": compared,
        # Of the mismatched compressed requests, those whose two runs kept the same tokens.
        "mismatches_with_same_keep_sets": same_keep_sets,
        "device": device_name(),
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "method": args.method,
        "keep_ratio": args.ratio,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "window": args.window if args.window is not None else 128,
        "duration_s": round(duration, 1),
        "completed": len(completed),
        "disconnected": sum(r.status == "disconnected" for r in results),
        "rejected_as_expected": sum(r.status == "rejected" for r in results),
        "opted_out": sum(by_index[r.index].opt_out for r in completed),
        "compressed_requests": len(compressions),
        "recompressed_after_preemption": recompressed,
        "prompt_tokens": {
            "min": min(s.prompt_tokens for s in specs), "max": max(s.prompt_tokens for s in specs),
            "mean": round(statistics.mean(s.prompt_tokens for s in specs)),
        },
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration, 1) if duration else None,
        "latency_s": {"p50": percentile([r.latency_s for r in completed], 0.5),
                      "p95": percentile([r.latency_s for r in completed], 0.95)},
        "kv_blocks": at_start.num_gpu_blocks,
        "peak_blocks_in_use": max((s.blocks_in_use for s in samples), default=None),
        "peak_running": max((s.running for s in samples), default=None),
        "peak_waiting": max((s.waiting for s in samples), default=None),
        "server_alive_at_end": alive,
        "failures": [{"index": r.index, "error": r.error} for r in failures[:20]],
        "mismatches": mismatches[:20],
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "server_command": shlex.join(["vllm", "serve", *server.command[server.command.index("serve") + 1:]]),
        "server_log": str(log_path),
        "env": {key: value for key, value in {**os.environ, **env}.items()
                if key.startswith(("VLLM_", "OMP_")) and key != "VLLM_API_KEY"},
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"model path or hub id (default: the embedded SmolLM2-135M-Instruct); "
                        f"{DUMMY_LLAMA}: Llama-3.1-8B's shapes with random weights")
    parser.add_argument("--tokenizer", help="tokenizer for sizing the prompts (default: the model's)")
    parser.add_argument("--method", default="streaming", help="--kv-compression method (default streaming)")
    parser.add_argument("--ratio", type=float, default=0.3, help="--kv-compression-ratio (default 0.3)")
    parser.add_argument("--window", type=int, help="--kv-compression-window (default: the plugin's, 128)")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--duration", type=float, default=1800.0,
                        help="seconds after which no new request starts in the concurrent phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every request generates --max-tokens tokens (more decode, more KV pressure)")
    parser.add_argument("--prompt-tokens", default="64,1500",
                        help="LOW,HIGH token budget of the synthetic prompts (default 64,1500)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32",
                        help="model dtype (default float32: bf16 batch variance can change greedy outputs)")
    parser.add_argument("--opt-out-fraction", type=float, default=0.2)
    parser.add_argument("--disconnect-every", type=int, default=10,
                        help="every N-th request is a stream closed after 3 chunks (0: none)")
    parser.add_argument("--invalid-every", type=int, default=16,
                        help="every N-th request is invalid and must get HTTP 400 (0: none)")
    parser.add_argument("--server-args", default="",
                        help='extra `vllm serve` arguments, e.g. "--num-gpu-blocks-override 160"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compare", action="store_true", help="skip the sequential phase")
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--output", default=str(RESULTS / "soak.json"))
    parser.add_argument("--log", help="server log path (default: the output path with .log)")
    args = parser.parse_args(argv)
    low, high = (int(v) for v in args.prompt_tokens.split(","))
    args.prompt_tokens = (low, high)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1) + "\n")
    keys = ("requests", "completed", "disconnected", "rejected_as_expected", "concurrency", "failed_requests",
            "leaked_pages", "preemptions", "compressed_requests", "recompressed_after_preemption",
            "compared_outputs", "mismatched_outputs", "mismatches_with_same_keep_sets", "duration_s",
            "output_tokens_per_s", "peak_blocks_in_use", "kv_blocks")
    print("\n".join(f"{key:>30}: {summary[key]}" for key in keys))
    print(f"written: {output}")
    passed = not summary["failed_requests"] and not summary["leaked_pages"] and not summary["mismatched_outputs"]
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
