"""KVzip chunk scoring of one layer: the Triton kernel against the plain-torch definition (GPU).

Shapes of one reconstruction forward at Llama-3.1-8B scale: 8 KV heads x 4 query heads, head_dim
128, bf16, a `--chunk`-token chunk (KVzip's 2,000) whose repeat input is the chunk plus about 50
instruction tokens, 4 sink tokens.  Times `kvzip_chunk_scores` (float32 logits per KV head) and
`kvzip_chunk_scores_triton` on the same inputs, checks they agree, and scales the per-layer time to
a whole 8k prompt (32 layers x 4 chunks).  Writes `benchmarks/results/chunk_scores[_TAG].json`.

    python benchmarks/chunk_scores.py --tag h100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from result_files import write_results
from vllm_kvzip.backend.ops.chunk_scores import kvzip_chunk_scores_triton
from vllm_kvzip.scoring.functional import kvzip_chunk_scores


def _time_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 2000, 4000])
    parser.add_argument("--repeat-overhead", type=int, default=50, help="instruction + template tokens per repeat input")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/chunk_scores.py times CUDA kernels: run it on the GPU machine")
    kv_heads, group, head_dim, sinks, layers = 8, 4, 128, 4, 32
    scaling = head_dim ** -0.5
    points = []
    for chunk in args.chunks:
        queries_n = chunk + args.repeat_overhead
        generator = torch.Generator(device="cuda").manual_seed(chunk)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)

        queries, sink, keys, repeat = (randn(kv_heads, group, queries_n, head_dim), randn(kv_heads, sinks, head_dim),
                                       randn(kv_heads, chunk, head_dim), randn(kv_heads, queries_n, head_dim))
        torch_ms = _time_ms(lambda: kvzip_chunk_scores(queries, sink, keys, repeat, scaling=scaling), args.repeats)
        triton_ms = _time_ms(lambda: kvzip_chunk_scores_triton(queries, sink, keys, repeat, scaling=scaling), args.repeats)
        expected = kvzip_chunk_scores(queries, sink, keys, repeat, scaling=scaling)
        got = kvzip_chunk_scores_triton(queries, sink, keys, repeat, scaling=scaling)
        max_rel_error = float(((got - expected).abs() / expected.abs().clamp_min(1e-6)).max())
        chunks_per_8k = -(-8192 // chunk)
        point = {
            "chunk": chunk, "repeat_queries": queries_n, "torch_ms_per_layer": torch_ms, "triton_ms_per_layer": triton_ms,
            "speedup": torch_ms / triton_ms, "max_rel_error": max_rel_error,
            "torch_ms_per_8k_prompt": torch_ms * layers * chunks_per_8k,
            "triton_ms_per_8k_prompt": triton_ms * layers * chunks_per_8k,
        }
        points.append(point)
        print(f"chunk {chunk:5}: torch {torch_ms:8.3f} ms/layer, triton {triton_ms:7.3f} ms/layer "
              f"({point['speedup']:.1f}x); per 8k prompt {point['torch_ms_per_8k_prompt']:.0f} -> "
              f"{point['triton_ms_per_8k_prompt']:.0f} ms; max rel error {max_rel_error:.2e}", flush=True)
    payload = {
        "device": torch.cuda.get_device_name(),
        "shapes": {"kv_heads": kv_heads, "group": group, "head_dim": head_dim, "sinks": sinks, "dtype": "bfloat16",
                   "layers_for_8k": layers},
        "points": points,
    }
    write_results(args.out_dir, "chunk_scores", args.tag, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
