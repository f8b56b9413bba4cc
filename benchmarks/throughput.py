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
FLASH_ATTN's in the same run, the maximum concurrency vLLM reports for the
KV pool, the peak number of running requests, and the prefill time (the same
prompts with max_tokens=1) whose ratio to FLASH_ATTN's is the prefill cost
added by scoring.  JSON + PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
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
}
# kvzap-threshold: KVzap-MLP in threshold mode (prefill only); kvzap-dms: the same with
# decode-time eviction (--kv-compression-decode-eviction).
METHODS = ("FLASH_ATTN", "TRITON_ATTN", "kvzap-mlp", "streaming", "kvzap-threshold", "kvzap-dms")
# Also runnable (--methods): KVzip's reconstruction pass needs a tokenizer with a chat
# template (--tokenizer-from, e.g. the embedded SmolLM2 folder).
RECONSTRUCTION_METHODS = ("kvzip", "kvzip-plus")
# Also runnable: SnapKV's observation pass (one extra forward of its 64-token window; no tokenizer needed).
CHOICES = METHODS + RECONSTRUCTION_METHODS + ("snapkv",)
KEEP_RATIO = 0.25
# Log-score threshold of the threshold-mode methods.  The surrogate's weights are random here,
# so the kept fraction is measured and reported, not assumed.
DEFAULT_THRESHOLD = 0.0


def make_dummy_model(folder: Path, tokenizer_source: str | None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=1))
    if tokenizer_source:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            source = Path(tokenizer_source) / name
            if source.is_file():
                (folder / name).write_bytes(source.read_bytes())
    return str(folder)


def make_surrogate(model_dir: str, folder: Path) -> str:
    """KVzap-MLP weights for the model's shape (random: speed does not depend on them)."""
    import torch

    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
    from transformers import AutoConfig

    torch.manual_seed(0)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    KVzapSurrogate.for_model(shape, "mlp").to(torch.bfloat16).save(folder)
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
        dtype="bfloat16",
        skip_tokenizer_init=args.method not in RECONSTRUCTION_METHODS,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
        seed=0,
        disable_log_stats=False,  # vLLM's 10-second stats lines (running / waiting, KV usage) in the log
    )
    if args.method in ("FLASH_ATTN", "TRITON_ATTN"):
        kwargs["attention_backend"] = args.method
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
    if args.dump_stacks_after:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()  # this process's dump: the engine started in time
    results = []
    for workload in workloads:
        result = _run_workload(llm, args, workload)
        result["engine_start_s"] = engine_seconds
        result["max_model_len"] = max_model_len
        results.append(result)
    return results


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

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, detokenize=False, temperature=0)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
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
        "kv_cache_blocks": num_blocks,
        "block_size": block_size,
        "max_concurrency_uncompressed": max_concurrency,
        "keep_ratio": KEEP_RATIO if args.method in ("kvzap-mlp", "streaming", "snapkv", *RECONSTRUCTION_METHODS) else None,
        "threshold": args.threshold if args.method in ("kvzap-threshold", "kvzap-dms") else None,
        "compression_stats": compression_stats,
    }


def _compression_stats(llm, method: str) -> dict | None:
    if method in ("FLASH_ATTN", "TRITON_ATTN"):
        return None
    from vllm_kvzip.backend.state import worker_compression_stats

    return llm.collective_rpc(worker_compression_stats)[0]


def _stats_delta(after: dict, before: dict | None) -> dict:
    """Counters of `after` minus `before`; per-request averages recomputed from the differences."""
    before = before or {}
    delta = {key: value - before.get(key, 0) if isinstance(value, (int, float)) else value for key, value in after.items()}
    if "kept_fraction" in delta:
        delta["kept_fraction"] = delta.get("kept_tokens", 0) / max(1, delta.get("evictable_tokens", 0))
    if "scoring_ms_per_request" in delta and delta.get("compressed_requests"):
        delta["scoring_ms_per_request"] = 1000.0 * delta.get("scoring_seconds", 0.0) / delta["compressed_requests"]
    return delta


# ---- parent: run every point, compare ----------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["8k", "32k"], choices=sorted(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=CHOICES)
    parser.add_argument("--tokenizer-from", default=None, help="folder with a tokenizer.json to copy (optional)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--prefill-requests", type=int, default=16)
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

    if args.point:
        results = run_point(args)
        Path(args.result_file).write_text(json.dumps(results))
        return 0

    work = Path(tempfile.mkdtemp(prefix="kvzip-throughput-"))
    model = make_dummy_model(work / "llama-3.1-8b-dummy", args.tokenizer_from)
    surrogate = make_surrogate(model, work / "kvzap-mlp") if any(m.startswith("kvzap") for m in args.methods) else ""
    out_dir = Path(args.out_dir)
    long_only = all(workload.startswith("long") for workload in args.workloads)
    stem = ("long_generation" if long_only else "throughput") + (f"_{args.tag}" if args.tag else "")
    log_dir = out_dir / "logs"  # each engine's whole log (git-ignored)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    # One engine per method (its start is paid once), every workload in it, in turn.
    for method in args.methods:
        result_file = work / f"{method}.json"
        command = [
            sys.executable, __file__, "--point", "--workload", ",".join(args.workloads), "--method", method,
            "--model", model, "--surrogate", surrogate, "--result-file", str(result_file),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--prefill-requests", str(args.prefill_requests), "--threshold", str(args.threshold),
            "--dump-stacks-after", str(args.dump_stacks_after),
        ]
        print(f"== {method}: {', '.join(args.workloads)}", flush=True)
        started = time.perf_counter()
        # Unbuffered: a child killed on timeout otherwise loses the last lines of its log.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.dump_stacks_after:
            # The plugin's register() arms the dump in every vLLM process, the engine core included.
            env["VLLM_KVZIP_DUMP_STACKS_AFTER"] = str(args.dump_stacks_after)
        log_path = log_dir / f"{stem}_{method}.log"
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
            results.extend({"workload": workload, "method": method, "error": log_tail[-3000:]} for workload in args.workloads)
            continue
        for result in json.loads(result_file.read_text()):
            results.append(result)
            print(f"   {result['workload']}: {result['output_tok_per_s']:.0f} output tok/s, wall {result['wall_s']:.1f} s, "
                  f"prefill {result['prefill_s']:.1f} s, engine start {result['engine_start_s']:.0f} s", flush=True)
            if (result.get("compression_stats") or {}).get("scoring_seconds"):
                stats = result["compression_stats"]
                print(f"   scoring pass: {stats['scoring_ms_per_request']:.0f} ms per request "
                      f"({stats['compressed_requests']} requests)", flush=True)

    for workload in args.workloads:
        baseline = next((r for r in results if r["workload"] == workload and r["method"] == "FLASH_ATTN" and "error" not in r), None)
        for result in results:
            if result["workload"] != workload or "error" in result or baseline is None:
                continue
            result["speedup"] = result["output_tok_per_s"] / baseline["output_tok_per_s"]
            result["prefill_ratio_vs_flash_attn"] = result["prefill_s"] / baseline["prefill_s"]

    print(f"\n{'workload':8} {'method':12} {'out tok/s':>10} {'speedup':>8} {'prefill x':>9}")
    for result in results:
        if "error" in result:
            print(f"{result['workload']:8} {result['method']:12} FAILED")
            continue
        print(f"{result['workload']:8} {result['method']:12} {result['output_tok_per_s']:10.0f} "
              f"{result.get('speedup', float('nan')):8.2f} {result.get('prefill_ratio_vs_flash_attn', float('nan')):9.3f}")

    payload = {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "model": "Llama-3.1-8B config, dummy weights, bf16",
        "keep_ratio": KEEP_RATIO,
        "results": results,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    _plot(results, out_dir / f"{stem}.png")
    return 0 if all("error" not in r for r in results) else 1


def _plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if "speedup" in r]
    if not ok:
        return
    workloads = sorted({r["workload"] for r in ok})
    methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        values = [next((r["speedup"] for r in ok if r["workload"] == w and r["method"] == method), 0) for w in workloads]
        axis.bar([x + index * width for x in range(len(workloads))], values, width, label=method)
    axis.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(workloads))], workloads)
    axis.set_ylabel("output tokens/s vs FLASH_ATTN")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.legend()
    axis.set_title("vllm-kvzip throughput (Llama-3.1-8B shapes, H100)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
