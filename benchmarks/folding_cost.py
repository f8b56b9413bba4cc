"""Cost of decode-time foldings (threshold mode / DMS) for one long generation, with and without room.

Replays the worker's folding schedule for one request of `--prompt` + `--output` tokens at
Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, blocks of 16, a folding every `--window`
tokens) through `vllm_kvzip.block_manager.plan.plan_retirement`, twice: re-packing tight at every
folding (`interval_tokens=None`, the layout before the room existed) and with the room the worker
leaves now (`interval_tokens=window`).  Keep patterns: `pairs` (what benchmarks/throughput.py's
surrogate does: 25% of the (layer, head) pairs keep every token, the others only the 4 sinks) and
`tokens` (every token of every pair kept with probability `--keep`).

It reports, per variant: foldings, re-packs, rows moved (one row = one token's K and V of one head),
container blocks at the end, and the time of planning (and, on CUDA with --apply, of the
compaction on a real cache), from the second of two identical replays (the first one warms up).
Rows moved and containers do not depend on the device; the times do.
Writes `benchmarks/results/folding_cost[_TAG].json`.

    python benchmarks/folding_cost.py                        # CPU: plans only
    python benchmarks/folding_cost.py --device cuda --apply  # GPU: plans and compactions, timed
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from result_files import write_results
from vllm_kvzip.block_manager.plan import container_blocks_needed, plan_retirement

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, SINKS = 32, 8, 128, 16, 4


def keep_pattern(kind: str, keep: float, generator: torch.Generator):
    pairs_kept = torch.rand(LAYERS, KV_HEADS, generator=generator) < keep  # `pairs`: fixed per pair

    def folded(first_position: int, tokens: int) -> torch.Tensor:
        positions = torch.arange(first_position, first_position + tokens)
        if kind == "pairs":
            mask = pairs_kept[:, :, None].expand(LAYERS, KV_HEADS, tokens).clone()
        else:
            mask = torch.rand(LAYERS, KV_HEADS, tokens, generator=generator) < keep
        return mask | (positions < SINKS)[None, None, :]

    return folded


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay(args, with_room: bool, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    folded_keep = keep_pattern(args.pattern, args.keep, generator)
    total = args.prompt + args.output
    blocks_per_layer = -(-total // BLOCK_SIZE) + 2
    cache = None
    if args.apply:
        cache = torch.zeros(LAYERS * blocks_per_layer, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, dtype=torch.bfloat16,
                            device=device)
    from vllm_kvzip.backend.ops import compact_kv

    # Block ids and the [L, H] layout on the host, as the worker keeps them (plan_retirement).
    physical = torch.arange(blocks_per_layer - 2)
    kept_len = torch.zeros(LAYERS, KV_HEADS, dtype=torch.int32)
    page_start = torch.zeros_like(kept_len)
    containers = torch.zeros(0, dtype=torch.int64)
    interval_blocks = args.window // BLOCK_SIZE
    dense_start_block, next_block = 0, 0
    foldings = repacks = rows_moved = 0
    plan_seconds = compact_seconds = 0.0
    for tokens in range(args.prompt, total + 1):
        end_block = max(0, (tokens - args.window) // BLOCK_SIZE)
        if tokens != args.prompt and end_block < next_block:
            continue  # the worker folds right after the prefill, then every `window` tokens
        first_block = dense_start_block
        next_block = max(end_block, first_block) + interval_blocks
        if end_block <= first_block:
            continue
        keep = folded_keep(first_block * BLOCK_SIZE, (end_block - first_block) * BLOCK_SIZE).to(device)
        _sync(device)
        started = time.perf_counter()
        plan = plan_retirement(
            kept_len, page_start, containers, keep, physical[first_block:end_block], BLOCK_SIZE, blocks_per_layer,
            interval_tokens=args.window if with_room else None,
        )
        _sync(device)
        plan_seconds += time.perf_counter() - started
        if (end_block - first_block) - plan.new_container_blocks <= 0:
            continue  # frees nothing: the worker skips it and retries with a longer tail
        if cache is not None:
            started = time.perf_counter()
            compact_kv(cache, plan.src_slots, plan.dst_slots, num_staged=plan.num_staged)
            _sync(device)
            compact_seconds += time.perf_counter() - started
        foldings += 1
        repacks += int(plan.repacked)
        rows_moved += plan.src_slots.numel()
        containers = torch.cat([containers, physical[first_block : first_block + plan.new_container_blocks]])
        kept_len, page_start = plan.kept_len, plan.page_start
        dense_start_block = end_block
    return {
        "room": with_room,
        "foldings": foldings,
        "repacks": repacks,
        "rows_moved": rows_moved,
        "bytes_moved": rows_moved * 2 * HEAD_DIM * 2,
        "container_blocks": containers.numel(),
        "tight_container_blocks": container_blocks_needed(kept_len, BLOCK_SIZE),
        "kept_tokens": int(kept_len.sum()),
        "plan_ms_per_folding": 1e3 * plan_seconds / max(1, foldings),
        "compact_ms_per_folding": 1e3 * compact_seconds / max(1, foldings) if cache is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=8192)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--pattern", choices=["pairs", "tokens"], nargs="+", default=["pairs", "tokens"])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--apply", action="store_true", help="also run the compactions on a bf16 cache and time them")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.window % BLOCK_SIZE or args.window <= 0:
        parser.error(f"--window must be a positive multiple of {BLOCK_SIZE}")
    device = torch.device(args.device)
    patterns = args.pattern
    results = []
    for pattern in patterns:
        args.pattern = pattern
        for with_room in (False, True):
            # Each replay runs twice and the second is reported: the first compiles the Triton
            # compaction for the argument values it meets (Triton specialises integers such as
            # the staged count) and warms torch's CUDA ops.  Without that the first variant's
            # times held seconds of compilation (the H100 run of 2026-12-07, see its JSON).
            replay(args, with_room, device)
            row = dict(replay(args, with_room, device), pattern=pattern)
            results.append(row)
        tight, room = results[-2], results[-1]
        print(f"{pattern:6}: foldings {room['foldings']}, re-packs {tight['repacks']} -> {room['repacks']}, "
              f"rows moved {tight['rows_moved']:,} -> {room['rows_moved']:,} "
              f"({room['rows_moved'] / max(1, tight['rows_moved']):.3f}x), containers at the end "
              f"{tight['container_blocks']} -> {room['container_blocks']}, plan ms/folding "
              f"{tight['plan_ms_per_folding']:.2f} -> {room['plan_ms_per_folding']:.2f}"
              + (f", compaction ms/folding {tight['compact_ms_per_folding']:.3f} -> {room['compact_ms_per_folding']:.3f}"
                 if args.apply else ""), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    payload = {
        "device": device_name,
        "shapes": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                   "prompt": args.prompt, "output": args.output, "window": args.window, "keep": args.keep},
        "results": results,
    }
    write_results(args.out_dir, "folding_cost", args.tag, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
