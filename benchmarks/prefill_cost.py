"""Where KVzap's prefill cost goes, piece by piece, at 8B shapes on one GPU (no engine).

`benchmarks/throughput.py` measures the whole cost (the prefill of 8 requests with the plugin
against FLASH_ATTN); this script splits it, each piece timed in this process and printed as a
share of the same tokens' dense prefill.  Each piece has two times: `*_ms`, CUDA events around
back-to-back calls (the host's launch gaps count: what a piece costs when the GPU waits for the
host), and `*_graph_ms`, CUDA-graph replays (device time only: what it costs inside vLLM's
prefill, where the host runs ahead of the GPU).  The shares use the graph times.

* per layer of one `--tokens` prefill step: the dense decoder layer (QKV, O, gate-up and down
  GEMMs plus causal attention; the baseline), the KVzap surrogate of that layer (KVzap-MLP), and
  the recording of its scores at the tokens' KV slots (torch reference vs the Triton kernel);
* per request of `--tokens` prompt tokens: the compression's two halves as the worker runs them
  (`plan_compression` + `apply_planned_compaction`: the device time its own timer reports, and
  the sum of its kernels' times in a profile, whose largest kernels are listed), and the keep
  selection inside it (the stable-sort definition vs the selection without sort).

The dense layer times the real shapes' matrix products with random bf16 weights; attention is
vLLM's FlashAttention (FA3 on Hopper) when it imports, else PyTorch's SDPA (the JSON says which).

    python benchmarks/prefill_cost.py --model-config llama-3.1-8b    # on the GPU machine
    python benchmarks/prefill_cost.py --model-config qwen3-8b
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_kernel import time_graph  # noqa: E402
from result_files import write_results  # noqa: E402
from throughput import MODEL_CONFIGS  # noqa: E402

BLOCK_SIZE = 16


DEVICE = "cuda"
DTYPE = torch.bfloat16
# The Triton kernels: on the GPU; on the CPU dry run only under TRITON_INTERPRET=1 (slow), so not there.
TRITON = True


def time_ms(function, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `function`: CUDA events on the GPU, the host clock on the CPU (a dry run)."""
    for _ in range(warmup):
        function()
    times = []
    if DEVICE != "cuda":
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(function, repeats: int) -> float:
    """Median milliseconds of one CUDA-graph replay of `function` (device time, no launch gaps)."""
    if DEVICE != "cuda":
        return time_ms(function, repeats)
    try:
        return time_graph([function], inner=1, repeats=repeats) / 1e3
    except RuntimeError as error:  # a piece that cannot be captured: say so, keep the other numbers
        print(f"CUDA graph capture failed ({error}); its graph time is NaN")
        return float("nan")


def both_times(name: str, function, repeats: int) -> dict:
    """`{name}_ms` (events around eager calls) and `{name}_graph_ms` (graph replays) of `function`."""
    return {f"{name}_ms": time_ms(function, repeats), f"{name}_graph_ms": graph_ms(function, repeats)}


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"


def attention_function():
    """(name, causal attention over [T, heads, head_dim] q / k / v) with the fastest kernel at hand."""
    if DEVICE == "cuda":
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func

            boundaries = {}  # made before any graph capture (a host-to-device copy cannot be captured)

            def flash(q, k, v):
                # Not dict.setdefault: it would build (and copy to the device) its default on every
                # call, which is what made the dense layer's capture fail in session 13.
                cu = boundaries.get(q.shape[0])
                if cu is None:
                    cu = boundaries[q.shape[0]] = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
                return flash_attn_varlen_func(q, k, v, max_seqlen_q=q.shape[0], cu_seqlens_q=cu,
                                              max_seqlen_k=k.shape[0], cu_seqlens_k=cu, causal=True, fa_version=3)

            probe = torch.randn(16, 4, 128, device=DEVICE, dtype=torch.bfloat16)
            flash(probe, probe[:, :2].contiguous(), probe[:, :2].contiguous())
            return "vllm_flash_attn_fa3", flash
        except Exception as error:  # noqa: BLE001 - any import or launch failure: fall back, and say so
            print(f"vLLM's FA3 is not usable here ({type(error).__name__}: {error}); using SDPA")

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        return out.transpose(0, 1)

    return "torch_sdpa", sdpa


def dense_layer_ms(config: dict, tokens: int, repeats: int) -> tuple[dict, str]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    options = {"device": DEVICE, "dtype": DTYPE}
    x = torch.randn(tokens, hidden, **options)
    w_qkv = torch.randn(hidden, (q_heads + 2 * kv_heads) * head_dim, **options) * 0.02
    w_o = torch.randn(q_heads * head_dim, hidden, **options) * 0.02
    w_gate_up = torch.randn(hidden, 2 * inter, **options) * 0.02
    w_down = torch.randn(inter, hidden, **options) * 0.02
    name, attention = attention_function()

    def layer():
        qkv = x @ w_qkv
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        out = attention(q.reshape(tokens, q_heads, head_dim), k.reshape(tokens, kv_heads, head_dim).contiguous(),
                        v.reshape(tokens, kv_heads, head_dim).contiguous())
        h = out.reshape(tokens, -1) @ w_o
        gate, up = (h @ w_gate_up).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w_down

    return both_times("dense_layer", layer, repeats), name


def surrogate_and_record_ms(config: dict, tokens: int, repeats: int) -> dict:
    from vllm_kvzip.backend.ops import record_scores
    from vllm_kvzip.scoring.kvzap_model import KVzapMLP

    hidden, kv_heads = config["hidden_size"], config["num_key_value_heads"]
    surrogate = KVzapMLP(hidden, kv_heads, 1).to(device=DEVICE, dtype=DTYPE).eval()
    layer = surrogate.layers[0]
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE)
    num_blocks = 4 * tokens // BLOCK_SIZE
    cache = torch.zeros(num_blocks * kv_heads * BLOCK_SIZE + kv_heads, device=DEVICE)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:tokens]
    with torch.inference_mode():
        scores = layer(x)
        expected = cache.clone()
        record_scores(expected, scores, slots, kv_heads, BLOCK_SIZE, use_triton=False)
        record_scores(cache, scores, slots, kv_heads, BLOCK_SIZE, use_triton=TRITON)
        if not torch.equal(cache, expected):
            raise AssertionError("the Triton score recording differs from the torch reference")
        return {
            **both_times("surrogate_mlp", lambda: layer(x), repeats),
            **both_times("record_torch",
                         lambda: record_scores(cache, scores, slots, kv_heads, BLOCK_SIZE, use_triton=False), repeats),
            **both_times("record_triton",
                         lambda: record_scores(cache, scores, slots, kv_heads, BLOCK_SIZE, use_triton=TRITON), repeats),
        }


def compress_once(state, request_id: str, tokens: int, num_blocks: int, request_blocks: int,
                  generator: torch.Generator) -> float:
    """Compress one request on random blocks as the worker does (both halves); its device ms by the worker's timer."""
    from vllm_kvzip.backend.compressor import apply_planned_compaction, plan_compression

    block_ids = torch.randperm(num_blocks, generator=generator)[:request_blocks].tolist()
    state.add_request(request_id, None)
    before = state.gpu_timer.total_seconds()
    with torch.inference_mode():
        plan_compression(state, request_id, tokens, block_ids)
        apply_planned_compaction(state, state.planned.pop(request_id))
    device_ms = (state.gpu_timer.total_seconds() - before) * 1e3
    state.drop_request(request_id)
    return device_ms


def profile_kernels(function, top: int = 15) -> tuple[float, list[dict]]:
    """(milliseconds of all device kernels, the `top` kernels by time) of one call of `function`.

    (0.0, []) on the CPU dry run.
    """
    if DEVICE != "cuda":
        return 0.0, []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    rows = []
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us > 0:
            rows.append({"kernel": event.key[:120], "calls": event.count, "device_us": round(device_us, 1)})
    rows.sort(key=lambda row: -row["device_us"])
    return sum(row["device_us"] for row in rows) / 1e3, rows[:top]


def compression_ms(config: dict, tokens: int, keep_ratio: float, repeats: int) -> dict:
    """One request's two halves as the worker runs them, and the keep selection on its own."""
    from vllm_kvzip.backend.state import WorkerCompressionState
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.policies import _keep_top_per_group, keep_top_by_stable_sort

    layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    compression = KVCompressionConfig.parse({"method": "kvzap-mlp", "keep_ratio": keep_ratio})
    layer_names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    state = WorkerCompressionState(compression, layer_names, kv_heads, head_dim, BLOCK_SIZE, 4, torch.device(DEVICE))
    request_blocks = -(-tokens // BLOCK_SIZE)
    num_blocks = 2 * request_blocks + 8
    whole = torch.randn(layers * num_blocks, kv_heads, BLOCK_SIZE, 2 * head_dim, device=DEVICE, dtype=DTYPE)
    state.attach_kv_cache({name: whole[i * num_blocks:(i + 1) * num_blocks] for i, name in enumerate(layer_names)})
    state.score_buffer = torch.randn(layers, num_blocks * kv_heads * BLOCK_SIZE + kv_heads, device=DEVICE)
    state.recorded_keep_sets = state.recorded_scores = None
    generator = torch.Generator().manual_seed(0)
    # The first two compile the Triton kernels.
    device_ms = [compress_once(state, f"r{index}", tokens, num_blocks, request_blocks, generator)
                 for index in range(repeats + 2)][2:]
    kernel_ms, kernels = profile_kernels(
        lambda: compress_once(state, "profiled", tokens, num_blocks, request_blocks, generator))
    evictable = tokens - compression.window
    scores = torch.randn(1, layers * kv_heads * evictable, device=DEVICE)
    evictable_mask = torch.ones_like(scores, dtype=torch.bool)
    evictable_mask[:, :4] = False
    count = int(keep_ratio * evictable_mask.sum())
    if not torch.equal(_keep_top_per_group(scores, evictable_mask, count),
                       keep_top_by_stable_sort(scores, evictable_mask, count)):
        raise AssertionError("the selection differs from its stable-sort definition")
    return {
        "compression_device_ms": statistics.median(device_ms),
        "compression_kernel_ms": kernel_ms,
        "compression_kernels": kernels,
        **both_times("selection_sort", lambda: keep_top_by_stable_sort(scores, evictable_mask, count), repeats),
        **both_times("selection_topk", lambda: _keep_top_per_group(scores, evictable_mask, count), repeats),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", default="llama-3.1-8b", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--tokens", type=int, default=8192, help="prompt tokens (one prefill step of them)")
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the tiny config in float32 on the CPU, torch paths only: checks the plumbing, measures nothing")
    args = parser.parse_args()
    global DEVICE, DTYPE, TRITON
    if args.cpu_dry_run:
        DEVICE, DTYPE, TRITON = "cpu", torch.float32, False
        args.model_config, args.repeats = "tiny", 2
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --cpu-dry-run)")
    config = MODEL_CONFIGS[args.model_config]
    layers = config["num_hidden_layers"]
    dense, attention = dense_layer_ms(config, args.tokens, args.repeats)
    per_layer = surrogate_and_record_ms(config, args.tokens, args.repeats)
    per_request = compression_ms(config, args.tokens, args.keep_ratio, args.repeats)
    # The layers' share of the prefill (no embedding or LM head), from the pieces' graph times:
    # inside vLLM's prefill the host runs ahead, so launch gaps cost nothing there.  The dense
    # layer itself is timed with events around eager calls: its GEMMs and attention take
    # milliseconds, so launch gaps do not show (its graph time is kept beside it as a check; in
    # session 13 the capture failed on this script's own host-to-device copy, since fixed).
    dense_ms = dense["dense_layer_ms"] * layers
    shares = {
        name: per_layer[f"{name}_graph_ms"] * layers / dense_ms
        for name in ("surrogate_mlp", "record_torch", "record_triton")
    }
    # The compression's halves wait on the host between them: their kernels' sum, not a replay.
    shares["compression"] = per_request["compression_kernel_ms"] / dense_ms
    ratios = {
        "selection_topk_over_sort": per_request["selection_topk_graph_ms"] / per_request["selection_sort_graph_ms"],
        "record_triton_over_torch": per_layer["record_triton_graph_ms"] / per_layer["record_torch_graph_ms"],
    }
    print(f"{args.model_config}, {args.tokens} tokens, {device_name()}, attention: {attention}")
    print(f"dense layers: {dense['dense_layer_ms']:.3f} ms per layer (events; graph {dense['dense_layer_graph_ms']:.3f}), "
          f"{dense_ms:.1f} ms for all {layers}")
    print(f"  {'piece':24s} {'events ms':>10s} {'graph ms':>10s}")
    for name in ("surrogate_mlp", "record_torch", "record_triton", "selection_sort", "selection_topk"):
        times = per_layer if name in shares else per_request
        print(f"  {name:24s} {times[name + '_ms']:10.3f} {times[name + '_graph_ms']:10.3f}")
    print(f"  {'compression (timer)':24s} {per_request['compression_device_ms']:10.3f}")
    print(f"  {'compression (kernels)':24s} {per_request['compression_kernel_ms']:10.3f}")
    for row in per_request["compression_kernels"]:
        print(f"    {row['device_us']:9.1f} us  x{row['calls']:<3d} {row['kernel'][:90]}")
    print("share of the dense prefill of the same tokens:")
    for name, value in shares.items():
        print(f"  {name:24s} {100 * value:6.2f} %")
    for name, value in ratios.items():
        print(f"  {name:24s} {value:6.3f}")
    write_results(args.out_dir, "prefill_cost", args.tag, {
        "device": device_name(),
        "model_config": args.model_config,
        "tokens": args.tokens,
        "keep_ratio": args.keep_ratio,
        "attention": attention,
        **dense,
        "dense_layers_ms": dense_ms,
        **per_layer,
        **per_request,
        "share_of_dense_prefill": shares,
        **ratios,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
