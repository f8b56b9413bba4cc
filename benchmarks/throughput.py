"""Serving throughput: vLLM's FLASH_ATTN and TRITON_ATTN vs vllm-kvzip, all in one run.

Llama-3.1-8B-shaped model with random weights (`load_format="dummy"`: speed
and memory do not depend on weight values), bf16, prefix caching off,
`ignore_eos`, vLLM 0.26.0 on one GPU.  Every method runs in its own
subprocess (one engine per process, started once, the workloads in turn; the
GPU memory returns in between), and the parent prints and writes the
comparison:

    python benchmarks/throughput.py                         # 8k and 32k workloads, every method
    python benchmarks/throughput.py --workloads 8k --methods FLASH_ATTN kvzap-mlp
    python benchmarks/throughput.py --workloads 8k --methods FLASH_ATTN kvzip \
        --tokenizer-from ~/.cache/vllm_kvzip/models/SmolLM2-135M-Instruct   # KVzip needs a chat template
    python benchmarks/throughput.py --workloads 8k --methods FLASH_ATTN snapkv

Per point: wall time, output tokens/s, `speedup` = output tokens/s divided by
FLASH_ATTN's in the same run (or on the same warm machine: --baseline-from,
--merge), the maximum concurrency vLLM reports for the uncompressed pool and
the peak number of requests that really ran at once (vLLM's
`vllm:num_requests_running`, sampled), the prefill time (the same prompts
with max_tokens=1) whose ratio to FLASH_ATTN's is the prefill cost added by
scoring, the same with max_tokens=2 (`prefill_2_tokens_s`: that also holds the
keep-ratio compaction's moves, launched in the step after the prefill, and
one decode step), the worker's compression time per request (host, and
device time of the compression's kernels), and
`speedup_bound_if_decoding_were_free`: FLASH_ATTN's wall time over its time
to prefill every prompt, which no method that prefills the same prompts can
beat.  JSON + PNG (speed-ups, and output tokens over time) under
benchmarks/results/.

Concurrency on the CPU (real scheduler, tiny dummy model; speeds there mean nothing):

    python benchmarks/throughput.py --model-config tiny --dtype float32 --workloads conc \
        --methods none kvzap-mlp --block-size 16 --num-gpu-blocks-override 1056 --prefill-requests 4 --tag concurrency_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-3.1-8B's architecture (config.json of meta-llama/Llama-3.1-8B-Instruct).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "torch_dtype": "bfloat16",
}

# A Qwen3-8B-shaped model (config.json of Qwen/Qwen3-8B): the other architecture of the issue.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
# Two layers of Llama-3.1-8B's attention shape with a tiny MLP: a CPU dry run of this script's
# plumbing (`--model-config tiny --dtype float32 --workloads smoke`), not a measurement.
TINY = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=49152, bos_token_id=1, eos_token_id=2)
MODEL_CONFIGS = {"llama-3.1-8b": LLAMA_31_8B, "qwen3-8b": QWEN3_8B, "tiny": TINY}

WORKLOADS = {
    # name: (requests, prompt tokens, output tokens); the baselines of ../shared/device/README.md
    "8k": (128, 8192, 256),
    "32k": (48, 32000, 256),
    "smoke": (4, 600, 16),
    # Long generations (issue: decode-time eviction): the KV grows while decoding.
    "long": (128, 512, 8192),
    # The same at half the output length (fits one 10-minute device call with two engines).
    "long-4k": (128, 512, 4096),
    "long-smoke": (4, 256, 600),
    # Concurrency under a small KV pool (with --num-gpu-blocks-override), runnable on the CPU.
    "conc": (48, 2048, 64),
}
# kvzap-threshold: KVzap-MLP in threshold mode (prefill only); kvzap-dms: the same with
# decode-time eviction (--kv-compression-decode-eviction).
METHODS = ("FLASH_ATTN", "TRITON_ATTN", "kvzap-mlp", "streaming", "kvzap-threshold", "kvzap-dms")
# Also runnable (--methods): KVzip's reconstruction pass needs a tokenizer with a chat
# template (--tokenizer-from, e.g. the embedded SmolLM2 folder).
RECONSTRUCTION_METHODS = ("kvzip", "kvzip-plus")
# Also runnable: SnapKV's observation pass (one extra forward of its 64-token window; no tokenizer needed).
# "none": the platform's default backend without compression, the baseline where FLASH_ATTN
# does not exist (the CPU concurrency run).
CHOICES = METHODS + RECONSTRUCTION_METHODS + ("snapkv", "none")
BASELINES = ("FLASH_ATTN", "none")
KEEP_RATIO = 0.25
# Log-score threshold of the threshold-mode methods: with the benchmark's surrogate
# (make_surrogate) it keeps the tokens of KEEP_RATIO of the (layer, KV head) pairs; the kept
# fraction is measured and reported, not assumed.
DEFAULT_THRESHOLD = 0.0


def make_dummy_model(folder: Path, tokenizer_source: str | None, config: dict = LLAMA_31_8B) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer_source:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            source = Path(tokenizer_source) / name
            if source.is_file():
                (folder / name).write_bytes(source.read_bytes())
    return str(folder)


def make_surrogate(model_dir: str, folder: Path, kept_pair_fraction: float = KEEP_RATIO) -> str:
    """KVzap-MLP weights for the model's shape, with a known share of high-scoring heads.

    A dummy-weight model's hidden states mean nothing, so the scores cannot either; what the
    speed depends on is how many tokens are kept.  Random weights scaled down plus an output
    bias of +8 for `kept_pair_fraction` of the (layer, KV head) pairs and -8 for the others make
    threshold 0 keep those pairs' tokens (and a keep ratio of the same size pick the same pairs),
    so the kept fraction is fixed instead of whatever the random weights happen to give.
    """
    import torch

    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
    from transformers import AutoConfig

    torch.manual_seed(0)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    surrogate = KVzapSurrogate.for_model(shape, "mlp")
    pairs = shape.num_layers * shape.num_kv_heads
    high = torch.zeros(pairs, dtype=torch.bool)
    high[torch.randperm(pairs)[: round(kept_pair_fraction * pairs)]] = True
    high = high.view(shape.num_layers, shape.num_kv_heads)
    with torch.no_grad():
        for layer, module in enumerate(surrogate.layers):
            output = module[-1]
            output.weight.mul_(1e-3)
            output.bias.copy_(torch.where(high[layer], 8.0, -8.0))
    surrogate.to(torch.bfloat16).save(folder)
    return str(folder)


# ---- one engine run (child process) ------------------------------------------------
def run_point(args: argparse.Namespace) -> list[dict]:
    """One engine for `args.method`, every workload of `args.workload` (comma-separated) in turn."""
    from vllm import LLM

    workloads = args.workload.split(",")
    max_model_len = max(WORKLOADS[w][1] + WORKLOADS[w][2] for w in workloads) + 16
    kwargs = dict(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        skip_tokenizer_init=args.method not in RECONSTRUCTION_METHODS,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
        seed=0,
        disable_log_stats=False,  # vLLM's 10-second stats lines (running / waiting, KV usage) in the log
    )
    if args.num_gpu_blocks_override:
        kwargs["num_gpu_blocks_override"] = args.num_gpu_blocks_override
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if args.method in ("FLASH_ATTN", "TRITON_ATTN"):
        kwargs["attention_backend"] = args.method
    elif args.method == "none":
        pass  # vLLM's default backend, no compression (the CPU baseline: CPU_ATTN)
    elif args.method in ("kvzap-threshold", "kvzap-dms"):
        settings = {
            "method": "kvzap-mlp", "threshold": args.threshold, "surrogate": args.surrogate,
            "decode_eviction": args.method == "kvzap-dms",
        }
        kwargs["additional_config"] = {"kv_compression": settings}
    else:
        settings = {"method": args.method, "keep_ratio": KEEP_RATIO}
        if args.method.startswith("kvzap"):
            settings["surrogate"] = args.surrogate
        kwargs["additional_config"] = {"kv_compression": settings}
    started = time.perf_counter()
    llm = LLM(**kwargs)
    engine_seconds = time.perf_counter() - started
    # Warm-up outside every timing: the first compressed request pays one-off costs (Triton
    # kernels' first launch, the scoring pass's first eager run) that would land in the prefill time.
    from vllm import SamplingParams, TokensPrompt

    warm_len = min(2048, max(WORKLOADS[w][1] for w in workloads))
    warm_prompts = [TokensPrompt(prompt_token_ids=[1000 + (i * 7 + j) % 20000 for j in range(warm_len)]) for i in range(2)]
    started = time.perf_counter()
    llm.generate(warm_prompts, SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    warmup_seconds = time.perf_counter() - started
    if args.dump_stacks_after:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()  # this process's dump: the engine started in time
    results = []
    for workload in workloads:
        result = _run_workload(llm, args, workload)
        result["engine_start_s"] = engine_seconds
        result["warmup_s"] = warmup_seconds
        result["device"] = _device_name()
        result["max_model_len"] = max_model_len
        results.append(result)
    return results


def _device_name() -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def _run_workload(llm, args: argparse.Namespace, workload: str) -> dict:
    from vllm import SamplingParams, TokensPrompt

    num_requests, prompt_len, output_len = WORKLOADS[workload]
    cache_config = llm.llm_engine.vllm_config.cache_config
    num_blocks = cache_config.num_gpu_blocks
    block_size = cache_config.block_size
    stats_before = _compression_stats(llm, args.method)

    import random

    rng = random.Random(0)
    prompts = [
        TokensPrompt(prompt_token_ids=[rng.randrange(1000, 30000) for _ in range(prompt_len)])
        for _ in range(num_requests)
    ]
    # Prefill cost: the same prompts, one output token each.
    prefill_params = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    started = time.perf_counter()
    llm.generate(prompts[: args.prefill_requests], prefill_params, use_tqdm=False)
    prefill_seconds = time.perf_counter() - started
    # The same with two output tokens: the requests live into the step after their prefill,
    # where a keep-ratio compaction launches its moves (with one token they finish first and
    # are never compacted), so this one also holds the compaction, and one decode step.
    started = time.perf_counter()
    llm.generate(prompts[: args.prefill_requests], SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    prefill_compaction_seconds = time.perf_counter() - started

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, detokenize=False, temperature=0)
    sampler = MetricsSampler(llm, args.sample_interval)
    started = time.perf_counter()
    sampler.start()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    sampler.finish()
    output_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    # vLLM's own admission bound for this pool (uncompressed requests).
    max_concurrency = num_blocks * block_size / (prompt_len + output_len)
    compression_stats = _compression_stats(llm, args.method)
    if compression_stats is not None:
        # This workload's share of the worker's totals (both generate calls).
        compression_stats = _stats_delta(compression_stats, stats_before)
    return {
        "workload": workload,
        "method": args.method,
        "requests": num_requests,
        "prompt_tokens": prompt_len,
        "output_tokens_per_request": output_len,
        "wall_s": wall,
        "output_tokens": output_tokens,
        "output_tok_per_s": output_tokens / wall,
        "prefill_requests": args.prefill_requests,
        "prefill_s": prefill_seconds,
        "prefill_2_tokens_s": prefill_compaction_seconds,
        "kv_cache_blocks": num_blocks,
        "block_size": block_size,
        "max_concurrency_uncompressed": max_concurrency,
        "keep_ratio": KEEP_RATIO if args.method in ("kvzap-mlp", "streaming", "snapkv", *RECONSTRUCTION_METHODS) else None,
        "threshold": args.threshold if args.method in ("kvzap-threshold", "kvzap-dms") else None,
        "compression_stats": compression_stats,
        **sampler.summary(num_requests * prompt_len, wall),
    }


class MetricsSampler(threading.Thread):
    """Reads vLLM's own Prometheus series every `interval` seconds while a workload runs.

    The peak number of running requests is the concurrency the KV pool really
    allowed (compression frees blocks, so more requests run at once); the
    generated-token count over time is the throughput curve of the PNG.
    """

    SERIES = {
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv_usage",
        "vllm:generation_tokens": "generation_tokens",
        "vllm:prompt_tokens": "prompt_tokens",
    }

    def __init__(self, llm, interval: float) -> None:
        super().__init__(daemon=True)
        self.llm, self.interval = llm, interval
        self.samples: list[dict] = []
        self._stop_event = threading.Event()
        self._base = self._read()

    def _read(self) -> dict:
        values: dict = {}
        for metric in self.llm.get_metrics():
            key = self.SERIES.get(metric.name.removesuffix("_total"))
            if key is not None and hasattr(metric, "value"):
                values[key] = values.get(key, 0) + metric.value
        return values

    def run(self) -> None:
        started = time.perf_counter()
        while not self._stop_event.wait(self.interval):
            sample = self._read()
            for counter in ("generation_tokens", "prompt_tokens"):  # this workload's share
                sample[counter] = sample.get(counter, 0) - self._base.get(counter, 0)
            sample["t"] = round(time.perf_counter() - started, 2)
            self.samples.append(sample)

    def finish(self) -> None:
        self._stop_event.set()
        self.join()

    def summary(self, prompt_tokens: int, wall: float) -> dict:
        if not self.samples:
            return {"peak_running_requests": None, "timeline": []}
        # Prefill is over once every prompt token was computed (recomputed ones after a preemption
        # count again, hence >=); what follows is pure decoding.
        prefilled = next((s for s in self.samples if s.get("prompt_tokens", 0) >= prompt_tokens), None)
        final = self.samples[-1]
        decode_tail = None
        if prefilled is not None and wall - prefilled["t"] > 2 * self.interval:
            tail_tokens = final.get("generation_tokens", 0) - prefilled.get("generation_tokens", 0)
            decode_tail = {"starts_s": prefilled["t"], "output_tok_per_s": tail_tokens / (final["t"] - prefilled["t"])}
        return {
            "peak_running_requests": max(s.get("running", 0) for s in self.samples),
            "peak_kv_usage": max(s.get("kv_usage", 0.0) for s in self.samples),
            "all_prefilled_s": prefilled["t"] if prefilled else None,
            "decode_tail": decode_tail,
            "timeline": self.samples,
        }


def _compression_stats(llm, method: str) -> dict | None:
    if method in ("FLASH_ATTN", "TRITON_ATTN", "none"):
        return None
    from vllm_kvzip.backend.state import worker_compression_stats

    return llm.collective_rpc(worker_compression_stats)[0]


def _stats_delta(after: dict, before: dict | None) -> dict:
    """Counters of `after` minus `before`; per-request averages recomputed from the differences."""
    before = before or {}
    delta = {key: value - before.get(key, 0) if isinstance(value, (int, float)) else value for key, value in after.items()}
    if "kept_fraction" in delta:
        delta["kept_fraction"] = delta.get("kept_tokens", 0) / max(1, delta.get("evictable_tokens", 0))
    if delta.get("compressed_requests"):
        for name in ("scoring", "compression", "compression_gpu"):
            delta[f"{name}_ms_per_request"] = 1000.0 * delta.get(f"{name}_seconds", 0.0) / delta["compressed_requests"]
    return delta


# ---- parent: run every point, compare ----------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["8k", "32k"], choices=sorted(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=CHOICES)
    parser.add_argument("--model-config", default="llama-3.1-8b", choices=sorted(MODEL_CONFIGS),
                        help="architecture of the dummy-weight model (tiny: a CPU dry run of the script)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokenizer-from", default=None, help="folder with a tokenizer.json to copy (optional)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=0, help="KV block size in tokens (0: the platform's default)")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=0,
                        help="KV pool size in blocks (0: what the memory gives); a small pool shows concurrency on the CPU")
    parser.add_argument("--prefill-requests", type=int, default=16)
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between reads of vLLM's metrics")
    parser.add_argument("--baseline-from", default=None,
                        help="a throughput JSON of an earlier run on the same warm machine whose FLASH_ATTN "
                             "results are the baseline (when FLASH_ATTN is not among --methods)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no run: combine the results of earlier runs of one machine (FLASH_ATTN among them) "
                             "into one JSON + PNG named by --tag")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per method (one engine, every workload)")
    parser.add_argument("--dump-stacks-after", type=int, default=0,
                        help="dump every thread's stack every N seconds while the engine starts (diagnosis)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="log-score threshold of kvzap-threshold/-dms")
    # child mode
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--surrogate", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(m in RECONSTRUCTION_METHODS for m in args.methods) and not args.point and not args.tokenizer_from:
        parser.error("kvzip / kvzip-plus need --tokenizer-from FOLDER (a tokenizer with a chat template)")

    if args.merge:
        return _merge(args)
    if args.point:
        results = run_point(args)
        Path(args.result_file).write_text(json.dumps(results))
        return 0

    baseline_results = []
    if args.baseline_from:
        if "FLASH_ATTN" in args.methods:
            parser.error("--baseline-from replaces the FLASH_ATTN run: leave FLASH_ATTN out of --methods")
        earlier = json.loads(Path(args.baseline_from).read_text())
        baseline_results = [
            dict(r, baseline_from=args.baseline_from) for r in earlier["results"]
            if r["method"] == "FLASH_ATTN" and "error" not in r and r["workload"] in args.workloads
        ]
        missing = sorted(set(args.workloads) - {r["workload"] for r in baseline_results})
        if missing:
            parser.error(f"--baseline-from {args.baseline_from} has no FLASH_ATTN result for {missing}")

    work = Path(tempfile.mkdtemp(prefix="kvzip-throughput-"))
    model = make_dummy_model(work / f"{args.model_config}-dummy", args.tokenizer_from, MODEL_CONFIGS[args.model_config])
    surrogate = make_surrogate(model, work / "kvzap-mlp") if any(m.startswith("kvzap") for m in args.methods) else ""
    out_dir = Path(args.out_dir)
    stem = _stem(args.workloads, args.tag)
    log_dir = out_dir / "logs"  # each engine's whole log (git-ignored)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = list(baseline_results)
    # One engine per method (its start is paid once), every workload in it, in turn.
    for method in args.methods:
        results.extend(_run_method(args, method, model, surrogate, work, log_dir / f"{stem}_{method}.log"))
        # Written after every method: a run cut short by the device's time limit keeps what it measured.
        _compare(results, args.workloads)
        _write(out_dir, stem, results, **_run_header(args))

    _compare(results, args.workloads)
    _print_table(results)
    _write(out_dir, stem, results, **_run_header(args))
    _plot(results, out_dir / f"{stem}.png")
    return 0 if all("error" not in r for r in results) else 1


# The worker's per-request log line (vllm_kvzip.backend.state.compression_log_line): "... freed F of B
# blocks, 1017.9 ms (scoring_ms 1014.4)".
_COMPRESSION_LINE = re.compile(r"compressed \(([\w+-]+)\): kept .*?, freed (\d+) of \d+ blocks, ([\d.]+) ms(?: \(scoring_ms ([\d.]+)\))?")


def compressions_in_log(log_text: str) -> dict | None:
    """Count and mean cost of the compressions an engine logged (a run that timed out has no stats RPC)."""
    matches = _COMPRESSION_LINE.findall(log_text)
    if not matches:
        return None
    count = len(matches)
    return {
        "compressed_requests": count,
        "compression_ms_per_request": sum(float(m[2]) for m in matches) / count,
        "scoring_ms_per_request": sum(float(m[3] or 0.0) for m in matches) / count,
        "freed_blocks": sum(int(m[1]) for m in matches),
    }


def _merge(args) -> int:
    """One JSON + PNG from runs made in turn on one warm machine (each run's commands are kept)."""
    results, commands, devices, models = [], [], set(), set()
    for path in args.merge:
        payload = json.loads(Path(path).read_text())
        commands.append(payload["command"])
        models.add(payload.get("model"))
        devices.add(payload.get("device"))
        for result in payload["results"]:
            if "baseline_from" in result:
                continue  # the FLASH_ATTN copy an earlier run lent it: the original is merged itself
            result = {k: v for k, v in result.items()
                      if k not in ("speedup", "prefill_ratio_vs_flash_attn", "prefill_2_tokens_ratio_vs_flash_attn")}
            results.append(result)
    if len(devices - {None}) > 1:
        raise SystemExit(f"--merge: results from different devices {sorted(devices - {None})}: compare within one machine")
    # A method that failed in one run (a timeout, say) and ran to the end in another: the run that
    # finished stands, the failure stays in the log of its command.
    finished = {(r["workload"], r["method"]) for r in results if "error" not in r}
    results = [r for r in results if "error" not in r or (r["workload"], r["method"]) not in finished]
    workloads = sorted({r["workload"] for r in results})
    _compare(results, workloads)
    _print_table(results)
    stem = _stem(workloads, args.tag)
    out_dir = Path(args.out_dir)
    _write(out_dir, stem, results, commands=commands, model=" / ".join(sorted(m for m in models if m)))
    _plot(results, out_dir / f"{stem}.png")
    return 0


def _run_header(args) -> dict:
    return {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "model": f"{args.model_config} config, dummy weights, {args.dtype}",
    }


def _stem(workloads: list[str], tag: str) -> str:
    """Output file name: long-generation runs and the rest are reported apart."""
    kind = "long_generation" if all(workload.startswith("long") for workload in workloads) else "throughput"
    return kind + (f"_{tag}" if tag else "")


def _run_method(args, method: str, model: str, surrogate: str, work: Path, log_path: Path) -> list[dict]:
    result_file = work / f"{method}.json"
    command = [
        sys.executable, __file__, "--point", "--workload", ",".join(args.workloads), "--method", method,
        "--model", model, "--surrogate", surrogate, "--result-file", str(result_file), "--dtype", args.dtype,
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--num-gpu-blocks-override", str(args.num_gpu_blocks_override), "--block-size", str(args.block_size),
        "--prefill-requests", str(args.prefill_requests), "--threshold", str(args.threshold),
        "--sample-interval", str(args.sample_interval), "--dump-stacks-after", str(args.dump_stacks_after),
    ]
    print(f"== {method}: {', '.join(args.workloads)}", flush=True)
    started = time.perf_counter()
    # Unbuffered: a child killed on timeout otherwise loses the last lines of its log.
    # Pickled RPC: the child reads the worker's compression totals with
    # `collective_rpc(worker_compression_stats)`, a function, which vLLM's msgpack refuses otherwise.
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if args.dump_stacks_after:
        # The plugin's register() arms the dump in every vLLM process, the engine core included.
        env["VLLM_KVZIP_DUMP_STACKS_AFTER"] = str(args.dump_stacks_after)
    try:
        with open(log_path, "w") as log:
            # Own process group: on a timeout vLLM's engine-core process goes too (GPU memory back).
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            failed = child.wait(timeout=args.timeout) != 0
    except subprocess.TimeoutExpired:
        failed = True
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        print(f"   timed out after {args.timeout} s", flush=True)
    log_tail = log_path.read_text(errors="replace")[-6000:]
    if failed or not result_file.exists():
        print(f"   FAILED after {time.perf_counter() - started:.0f} s\n{log_tail}", flush=True)
        failure = {"error": log_tail[-3000:], "failed_after_s": round(time.perf_counter() - started, 1)}
        partial = compressions_in_log(log_path.read_text(errors="replace"))
        if partial:
            failure["compressions_before_failure"] = partial  # what a timed-out run still tells
        return [dict(failure, workload=workload, method=method) for workload in args.workloads]
    results = json.loads(result_file.read_text())
    for result in results:
        print(f"   {result['workload']}: {result['output_tok_per_s']:.0f} output tok/s, wall {result['wall_s']:.1f} s, "
              f"prefill {result['prefill_s']:.1f} s, engine start {result['engine_start_s']:.0f} s, "
              f"peak running {result['peak_running_requests']}", flush=True)
        stats = result.get("compression_stats") or {}
        if stats.get("compressed_requests"):
            print(f"   compression: {stats['compression_ms_per_request']:.1f} ms per request on the host, "
                  f"{stats.get('compression_gpu_ms_per_request', float('nan')):.2f} ms of kernels "
                  f"(scoring pass {stats['scoring_ms_per_request']:.1f} ms), {stats['compressed_requests']} requests, "
                  f"kept fraction {stats['kept_fraction']:.3f}", flush=True)
            if stats.get("decode_foldings"):
                print(f"   decode-time foldings: {stats['decode_foldings']}, of which re-packs: "
                      f"{stats.get('decode_repacks', 'n/a')}", flush=True)
    return results


def _compare(results: list[dict], workloads: list[str]) -> None:
    """`speedup` and the prefill ratio against FLASH_ATTN; the bound prefill puts on any speedup."""
    for workload in workloads:
        baseline = next((r for name in BASELINES for r in results
                         if r["workload"] == workload and r["method"] == name and "error" not in r), None)
        if baseline is None:
            continue
        # FLASH_ATTN's prefill of every prompt alone (its measured prefill rate): no method that
        # prefills the same prompts can finish sooner, so wall / this bounds the speedup.
        prefill_all = baseline["prefill_s"] * baseline["requests"] / baseline["prefill_requests"]
        for result in results:
            if result["workload"] != workload or "error" in result:
                continue
            result["baseline_method"] = baseline["method"]
            result["speedup"] = result["output_tok_per_s"] / baseline["output_tok_per_s"]
            if baseline.get("peak_running_requests") and result.get("peak_running_requests"):
                result["peak_running_vs_baseline"] = result["peak_running_requests"] / baseline["peak_running_requests"]
            result["prefill_ratio_vs_flash_attn"] = result["prefill_s"] / baseline["prefill_s"]
            if result.get("prefill_2_tokens_s") and baseline.get("prefill_2_tokens_s"):
                result["prefill_2_tokens_ratio_vs_flash_attn"] = result["prefill_2_tokens_s"] / baseline["prefill_2_tokens_s"]
            result["flash_attn_prefill_only_s"] = prefill_all
            result["speedup_bound_if_decoding_were_free"] = baseline["wall_s"] / prefill_all
            tail, base_tail = result.get("decode_tail"), baseline.get("decode_tail")
            if tail and base_tail:
                result["decode_tail_speedup"] = tail["output_tok_per_s"] / base_tail["output_tok_per_s"]


def _print_table(results: list[dict]) -> None:
    print(f"\n{'workload':8} {'method':16} {'out tok/s':>10} {'speedup':>8} {'bound':>6} {'prefill x':>9} "
          f"{'+1 tok x':>8} {'peak run':>8}")
    for result in results:
        if "error" in result:
            print(f"{result['workload']:8} {result['method']:16} FAILED")
            continue
        print(f"{result['workload']:8} {result['method']:16} {result['output_tok_per_s']:10.0f} "
              f"{result.get('speedup', float('nan')):8.2f} {result.get('speedup_bound_if_decoding_were_free', float('nan')):6.2f} "
              f"{result.get('prefill_ratio_vs_flash_attn', float('nan')):9.3f} "
              f"{result.get('prefill_2_tokens_ratio_vs_flash_attn', float('nan')):8.3f} {result.get('peak_running_requests') or 0:8.0f}")


def _write(out_dir: Path, stem: str, results: list[dict], **header) -> None:
    """The results JSON: `header` (the command(s), the model) first, then what every run shares."""
    payload = {
        **header,
        "device": next((r["device"] for r in results if "device" in r), None),
        "surrogate": "kvzap-* methods: random MLP weights whose output bias makes "
                     f"{KEEP_RATIO} of the (layer, KV head) pairs score +8, the rest -8 (make_surrogate)",
        "keep_ratio": KEEP_RATIO,
        "results": results,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))


def _plot(results: list[dict], path: Path) -> None:
    """Speed-up bars per workload and method, and each run's generated tokens over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if "speedup" in r]
    if not ok:
        return
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in ok)]
    methods = [m for m in CHOICES if any(r["method"] == m for r in ok)]
    figure, axes = plt.subplots(1, 1 + len(workloads), figsize=(5 + 4.5 * len(workloads), 4))
    bars = axes[0]
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        values = [next((r["speedup"] for r in ok if r["workload"] == w and r["method"] == method), 0) for w in workloads]
        bars.bar([x + index * width for x in range(len(workloads))], values, width, label=method, color=f"C{index}")
    for x, workload in enumerate(workloads):
        bound = next((r["speedup_bound_if_decoding_were_free"] for r in ok if r["workload"] == workload), None)
        if bound and bound < 3 * max(r["speedup"] for r in ok):  # a bound far off the scale says nothing
            bars.hlines(bound, x - width / 2, x + width * (len(methods) - 0.5), colors="black", linestyles="dotted")
    bars.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(workloads))], workloads)
    baselines = sorted({r.get("baseline_method", "FLASH_ATTN") for r in ok})
    bars.set_ylabel(f"output tokens/s vs {'/'.join(baselines)} (dotted: prefill bound)")
    bars.axhline(1.0, color="grey", linewidth=0.8)
    bars.legend(fontsize=7)
    for axis, workload in zip(axes[1:], workloads):
        running_axis = axis.twinx()
        for result in (r for r in ok if r["workload"] == workload and r.get("timeline")):
            times = [s["t"] for s in result["timeline"]]
            color = f"C{methods.index(result['method'])}"
            axis.plot(times, [s.get("generation_tokens", 0) for s in result["timeline"]], color=color, label=result["method"])
            running_axis.plot(times, [s.get("running", 0) for s in result["timeline"]], color=color, linestyle="dotted", linewidth=0.9)
        axis.set_title(f"{workload}: output tokens (solid), running requests (dotted)", fontsize=9)
        axis.set_xlabel("seconds")
        axis.set_ylabel("output tokens generated")
        running_axis.set_ylabel("requests running")
        axis.legend(fontsize=7)
    devices = sorted({r.get("device") for r in ok if r.get("device")})
    figure.suptitle(f"vllm-kvzip throughput (dummy weights; {', '.join(devices) or 'unknown device'})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
