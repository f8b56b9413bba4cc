"""Compaction kernel benchmark: CUDA (csrc/compaction.cu) vs Triton, same plans, same run.

The moves are those of a real compaction plan (`plan_request_compaction`) for
Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, bf16, block size 16,
pages packed across layers): one request of `context` evictable tokens whose
heads keep `keep * context` tokens each on average (+-40% between heads).
Each kernel runs the whole plan (gather of the staged sources, direct copies,
scatter) inside a CUDA graph; the median over replays is reported with the
bandwidth (bytes read + written / time) against 3.0 TB/s, and the CUDA time as
a ratio of Triton's (< 1: CUDA faster).  Results: JSON + PNG under
benchmarks/results/.  Run on the GPU machine after building the extension
(`python setup.py build_ext --inplace`):

    PYTHONPATH=. python benchmarks/compaction_kernel.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BANDWIDTH = 3.0e12
NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16


def make_plan(context: int, keep_ratio: float, seed: int):
    from vllm_kvzip.block_manager.plan import container_blocks_needed, plan_request_compaction

    generator = torch.Generator().manual_seed(seed)
    per_head = keep_ratio * (1 + 0.4 * (2 * torch.rand(NUM_LAYERS, NUM_KV_HEADS, generator=generator) - 1))
    keep = torch.rand(NUM_LAYERS, NUM_KV_HEADS, context, generator=generator) < per_head[:, :, None]
    blocks = context // BLOCK_SIZE
    blocks_per_layer = blocks + 64
    physical = torch.randperm(blocks_per_layer, generator=generator)[:blocks].to(torch.int32)
    containers = container_blocks_needed(keep.sum(-1), BLOCK_SIZE)
    plan = plan_request_compaction(keep, physical, containers, BLOCK_SIZE, blocks_per_layer)
    return plan, blocks_per_layer


def time_graph(function, repeats: int) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        function()  # warm-up (Triton compiles here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--keep-ratios", default="0.5,0.25,0.1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    from vllm_kvzip.backend.ops.compaction import compact_kv as triton_compact
    from vllm_kvzip.backend.ops.cuda_ops import compact_kv_cuda, cuda_extension

    if cuda_extension() is None:
        parser.error("vllm_kvzip._cuda_ops is not built: run `python setup.py build_ext --inplace` first")
    points = []
    print(f"{'context':>8} {'keep':>5} {'moves':>9} {'triton_us':>10} {'cuda_us':>9} {'cuda/triton':>11} {'cuda bw':>8}")
    for context in map(int, args.contexts.split(",")):
        for keep_ratio in map(float, args.keep_ratios.split(",")):
            plan, blocks_per_layer = make_plan(context, keep_ratio, seed=context)
            cache = torch.randn(NUM_LAYERS * blocks_per_layer, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE,
                                device="cuda", dtype=torch.bfloat16)
            src, dst = plan.src_slots.cuda(), plan.dst_slots.cuda()
            scratch = torch.empty(max(plan.num_staged, 1), 2 * HEAD_SIZE, device="cuda", dtype=torch.bfloat16)
            # Both kernels on a copy must give the reference result before they are timed.
            expected = cache.clone()
            rows = expected.view(-1, 2 * HEAD_SIZE)
            rows[dst] = rows[src].clone()
            for kernel in (triton_compact, compact_kv_cuda):
                trial = cache.clone()
                kernel(trial, src, dst, scratch=scratch, num_staged=plan.num_staged)
                assert torch.equal(trial, expected), kernel.__module__
            triton_us = time_graph(lambda: triton_compact(cache, src, dst, scratch=scratch, num_staged=plan.num_staged), args.repeats)
            cuda_us = time_graph(lambda: compact_kv_cuda(cache, src, dst, scratch=scratch, num_staged=plan.num_staged), args.repeats)
            moves = src.numel()
            # Staged rows are read, written to scratch, read back and written: 4 row transfers; direct rows 2.
            row_bytes = 2 * HEAD_SIZE * 2
            transfers = (4 * plan.num_staged + 2 * (moves - plan.num_staged)) * row_bytes
            point = {
                "context": context, "keep_ratio": keep_ratio, "moves": moves, "staged": plan.num_staged,
                "triton_us": triton_us, "cuda_us": cuda_us, "cuda_over_triton": cuda_us / triton_us,
                "bytes_moved": transfers,
                "triton_bandwidth_fraction": transfers / (triton_us * 1e-6) / PEAK_BANDWIDTH,
                "cuda_bandwidth_fraction": transfers / (cuda_us * 1e-6) / PEAK_BANDWIDTH,
            }
            points.append(point)
            print(f"{context:8d} {keep_ratio:5.2f} {moves:9d} {triton_us:10.1f} {cuda_us:9.1f} "
                  f"{point['cuda_over_triton']:11.3f} {point['cuda_bandwidth_fraction']:8.3f}")
            cache = scratch = expected = trial = None  # free the pool before the next point
            torch.cuda.empty_cache()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/compaction_kernel.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "shapes": {"layers": NUM_LAYERS, "kv_heads": NUM_KV_HEADS, "head_size": HEAD_SIZE, "block_size": BLOCK_SIZE, "dtype": "bfloat16"},
        "points": points,
    }
    (out_dir / "compaction_kernel.json").write_text(json.dumps(payload, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        labels = [f"{p['context'] // 1024}k/{p['keep_ratio']}" for p in points]
        axis.bar(range(len(points)), [p["cuda_over_triton"] for p in points])
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(points)), labels, rotation=45)
        axis.set_ylabel("CUDA time / Triton time")
        axis.set_title("KV compaction, Llama-3.1-8B shapes (context / keep)")
        figure.tight_layout()
        figure.savefig(out_dir / "compaction_kernel.png", dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
