"""Launch-parameter sweep for the ragged decode kernel alone (no vLLM needed; CUDA only).

Times `vllm_kvzip.backend.ops.decode_attention.ragged_decode_attention` at a
few representative (batch, context, keep) points, Llama-3.1-8B head shapes,
for each tile size / num_warps / num_stages / programs-per-SM combination,
and prints the achieved fraction of 3.0 TB/s.  Used to pick the defaults in
decode_attention.py.

    PYTHONPATH=. python benchmarks/tune_decode_kernel.py [--points small|all]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_kernel import (  # noqa: E402
    BLOCK_SIZE,
    DENSE_TAIL,
    HEAD_SIZE,
    NUM_KV_HEADS,
    NUM_Q_HEADS,
    PEAK_BANDWIDTH,
    dense_layout,
    ragged_layout,
    time_graph,
)
from vllm_kvzip.backend.ops.decode_attention import RaggedDecodeWorkspace, ragged_decode_attention  # noqa: E402

POINTS = [  # (batch, context, keep); keep None = uncompressed layout
    (1, 32768, None),
    (1, 131072, 0.2),
    (4, 65536, 0.3),
    (8, 32768, 0.3),
    (16, 4096, 0.1),
    (32, 16384, None),
    (64, 32768, 1.0),
    (128, 8192, 0.1),
    (128, 32768, 0.5),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", default="0", help="0 = the kernel's own regime rule")
    parser.add_argument("--warps", default="0", help="0 = the kernel's own regime rule")
    parser.add_argument("--stages", default="0", help="0 = the kernel's own regime rule")
    parser.add_argument("--programs-per-sm", default="0", help="0 = the kernel's own regime rule")
    parser.add_argument("--min-tiles", default="0", help="0 = the kernel's own regime rule")
    parser.add_argument("--inner", type=int, default=10, help="kernel calls per CUDA graph")
    parser.add_argument("--repeats", type=int, default=5, help="graph replays per point (median)")
    parser.add_argument("--passes", type=int, default=1, help="measure every config this many times (noise check)")
    parser.add_argument("--points", help="batch:context:keep,... (keep 'none' = uncompressed); default: a fixed set")
    args = parser.parse_args()
    points = POINTS
    if args.points:
        points = [
            (int(b), int(c), None if k == "none" else float(k))
            for b, c, k in (item.split(":") for item in args.points.split(","))
        ]
    device = torch.device("cuda")
    max_blocks = max(b * (math.ceil(c / BLOCK_SIZE) + DENSE_TAIL // BLOCK_SIZE + 2) for b, c, _ in points)
    pool = torch.empty((max_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE), dtype=torch.bfloat16, device=device)
    for chunk in torch.split(pool, 4096):
        chunk.normal_()
    scale = 1.0 / math.sqrt(HEAD_SIZE)
    configs = args.passes * list(itertools.product(
        [int(x) for x in args.tiles.split(",")], [int(x) for x in args.warps.split(",")],
        [int(x) for x in args.stages.split(",")], [int(x) for x in args.programs_per_sm.split(",")],
        [int(x) for x in args.min_tiles.split(",")],
    ))
    print("config (tile,warps,stages,progs/SM,min_tiles) | " + " ".join(f"b{b}/c{c // 1024}k/k{keep}" for b, c, keep in points))
    for tile, warps, stages, programs, min_tiles in configs:
        fractions = []
        for batch, context, keep in points:
            block_ids = torch.randperm(max_blocks)
            if keep is None:
                layout = dense_layout(batch, context, block_ids, device)
            else:
                layout = ragged_layout(batch, context, keep, block_ids, device, seed=0)
            query = torch.randn(batch, NUM_Q_HEADS, HEAD_SIZE, dtype=torch.bfloat16, device=device)
            out = torch.empty_like(query)
            workspace = RaggedDecodeWorkspace(
                batch, NUM_Q_HEADS, HEAD_SIZE, device=device, tile_tokens=tile or None,
                min_tiles_per_split=min_tiles or None, target_programs_per_sm=programs or None, num_kv_heads=NUM_KV_HEADS,
            )

            def call() -> None:
                ragged_decode_attention(
                    query, pool, layout.block_table, layout.seq_lens, layout.dense_start, layout.kept_len,
                    layout.page_start, scale, out, workspace, num_warps=warps or None, num_stages=stages or None,
                    layer=0, num_layers=1,  # one layer's pool: the cross-layer address math with L = 1
                )

            try:
                time_us = time_graph([call], args.inner, args.repeats)
                fractions.append(f"{layout.kv_bytes / (time_us * 1e-6) / PEAK_BANDWIDTH:.3f}")
            except Exception as exc:  # e.g. out of shared memory for a big tile x many stages
                fractions.append("fail")
                print(f"  {tile},{warps},{stages}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        print(f"{tile:>4},{warps},{stages},{programs},{min_tiles} | " + " ".join(f"{f:>12}" for f in fractions), flush=True)


if __name__ == "__main__":
    main()
