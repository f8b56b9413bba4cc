"""Decode-attention kernel benchmark: ragged KV (vllm-kvzip) vs vLLM's FA3 and TRITON_ATTN.

Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128),
bf16, block_size 16, one decode token per request.  For every (batch,
context) that fits in ``--max-cache-gb`` of KV cache it times:

* ``fa3``: ``vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3)`` on
  the full, uncompressed cache, called the way vLLM's FLASH_ATTN backend
  calls it for decode under full CUDA graphs (AOT scheduler metadata, at most
  32 splits);
* ``triton_attn``: ``vllm.v1.attention.ops.triton_unified_attention.unified_attention``
  on the full cache, with the 3D (split-softmax) buffers vLLM's TRITON_ATTN
  backend allocates;
* ``ragged_uncompressed``: our kernel on the same uncompressed layout
  (``kept_len = 0``, everything dense): same bytes as FA3;
* ``ragged``: our kernel on the plugin's layout of a ``context``-token request
  compressed at each keep ratio: the newest 128 tokens in a dense tail, and
  each KV head keeping ``keep * (context - 128)`` of the others (+-40%
  variation between heads below keep 1.0, same total) in ragged pages, as the
  plugin's budgets count only the evictable tokens.  At keep 1.0 it reads the
  same bytes as FA3 (until session 14 the ragged part held ``keep * context``
  tokens, so keep 1.0 read 128 tokens per head more than FA3;
  ``config.ragged_tokens_per_head`` says which a result file used);
* with ``--variants``, the same two with other merge strategies, named by
  suffix, so that one run shows which to use where: ``_pdl`` (the merge
  kernel as a programmatic dependent launch, Hopper and newer only: the
  default in session 13, off since session 14), ``_pdl_after_loop`` (the
  same, triggered after each split's loop instead of at its start),
  ``_min_tiles_2`` / ``_min_tiles_1`` / ``_tile_32`` (shorter splits: more
  programs per head), ``_nearest_split`` (tiles per split rounded to the
  nearest, not up) and ``_fused`` (the workspace's ``fused_merge``: the last split of a head
  merges, no second kernel).  Each variant point gets ``time_ratio_vs_default``
  (its time / the default kernel's at the same point).

Every kernel is captured in a CUDA graph (``--inner`` calls, cycling over
several copies of the layout when one copy would fit in L2) and the graph is
replayed several times; the median time per call is reported.  Per point:
``time_us``, ``kv_bytes`` (K and V bytes the kernel must read),
``bandwidth_GBps``, ``bandwidth_fraction`` (of 3.0 TB/s) and
``time_ratio_vs_fa3`` (time / FA3 time at the same batch and context; < 1 is
faster).  Results: ``benchmarks/results/decode_kernel.json`` and ``.png``.

Run on an H100 with vLLM 0.26.0 (CUDA) installed, from the repository root::

    PYTHONPATH=. python benchmarks/decode_kernel.py            # full sweep, ~1.5 min
    PYTHONPATH=. python benchmarks/decode_kernel.py --quick    # subset, < 2 min
    PYTHONPATH=. python benchmarks/decode_kernel.py --quick --variants pdl,fused --tag merge_quick

``--smoke`` runs tiny shapes on the CPU through the torch reference (no vLLM
kernels), to exercise the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from result_files import command_line  # noqa: E402
from vllm_kvzip.backend.ops import ragged_decode_attention  # noqa: E402

PEAK_BANDWIDTH = 3.0e12  # bytes/s, H100 SXM HBM3 (the brief's reference figure)
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
BLOCK_SIZE = 16
DENSE_TAIL = 128
HEAD_VARIATION = 0.4
L2_BYTES = 50 * 2**20
MAX_COPIES = 16
BLOCK_BYTES = NUM_KV_HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 2  # one block of all heads, bf16
# --variants: other merge strategies timed beside the default workspace (RaggedDecodeWorkspace options).
VARIANTS = {
    # The merge kernel as a programmatic dependent launch (Hopper and newer; a ValueError elsewhere).
    "pdl": dict(dependent_launch=True),
    "pdl_after_loop": dict(dependent_launch=True, dependent_launch_trigger="after_loop"),
    "fused": dict(fused_merge=True),
    # Shorter splits (more programs) for few (row, head) pairs, where latency, not bandwidth, rules.
    "min_tiles_2": dict(min_tiles_per_split=2),
    "min_tiles_1": dict(min_tiles_per_split=1),
    "tile_32": dict(tile_tokens=32),
    # Tiles per split rounded to the nearest, not up (no 2.02 -> 3 cliff on short rows).
    "nearest_split": dict(split_rounding="nearest"),
}

FULL_BATCHES = [1, 4, 16, 32, 64, 128]
FULL_CONTEXTS = [4096, 8192, 16384, 32768, 65536, 131072]
QUICK_BATCHES = [1, 16, 64]
QUICK_CONTEXTS = [4096, 32768, 131072]
KEEP_RATIOS = [1.0, 0.5, 0.3, 0.2, 0.1]


@dataclass
class Layout:
    """Metadata of one batch over the shared block pool (int32 tensors on the device)."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    dense_start: torch.Tensor
    kept_len: torch.Tensor
    page_start: torch.Tensor
    kv_bytes: int
    max_seq_len: int


def dense_layout(batch: int, context: int, block_ids: torch.Tensor, device: torch.device) -> Layout:
    """Uncompressed rows: vLLM's own layout, `context` tokens each."""
    blocks_per_row = math.ceil(context / BLOCK_SIZE)
    block_table = block_ids[: batch * blocks_per_row].view(batch, blocks_per_row).to(torch.int32)
    zeros_rows = torch.zeros(batch, NUM_KV_HEADS, dtype=torch.int32)
    return Layout(
        block_table=block_table.to(device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        dense_start=torch.zeros(batch, dtype=torch.int32, device=device),
        kept_len=zeros_rows.to(device),
        page_start=zeros_rows.to(device),
        kv_bytes=batch * context * NUM_KV_HEADS * 2 * HEAD_SIZE * 2,
        max_seq_len=context,
    )


def ragged_layout(batch: int, context: int, keep: float, block_ids: torch.Tensor, device: torch.device, seed: int) -> Layout:
    """A compressed `context`-token request as the plugin lays it out: the newest DENSE_TAIL tokens
    dense, and per-head ragged budgets of mean keep * (context - DENSE_TAIL), the evictable tokens."""
    generator = torch.Generator().manual_seed(seed)
    evictable = context - DENSE_TAIL
    budget = keep * evictable
    if keep < 1.0:
        factors = 1.0 + HEAD_VARIATION * (2 * torch.rand(batch, NUM_KV_HEADS, generator=generator) - 1)
        factors = factors / factors.mean(dim=1, keepdim=True)
    else:
        factors = torch.ones(batch, NUM_KV_HEADS)
    kept_len = (budget * factors).round().clamp(0, evictable).to(torch.int64)
    pages = (kept_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    page_start = torch.cumsum(pages, dim=1) - pages  # heads packed one after another
    ragged_blocks = (pages.sum(dim=1) + NUM_KV_HEADS - 1) // NUM_KV_HEADS
    dense_start = ragged_blocks * BLOCK_SIZE
    seq_lens = dense_start + DENSE_TAIL
    blocks_per_row = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    width = int(blocks_per_row.max())
    block_table = torch.zeros(batch, width, dtype=torch.int32)
    cursor = 0
    for row in range(batch):
        count = int(blocks_per_row[row])
        block_table[row, :count] = block_ids[cursor:cursor + count].to(torch.int32)
        cursor += count
    tokens_read = int(kept_len.sum()) + batch * NUM_KV_HEADS * DENSE_TAIL
    return Layout(
        block_table=block_table.to(device),
        seq_lens=seq_lens.to(torch.int32).to(device),
        dense_start=dense_start.to(torch.int32).to(device),
        kept_len=kept_len.to(torch.int32).to(device),
        page_start=page_start.to(torch.int32).to(device),
        kv_bytes=tokens_read * 2 * HEAD_SIZE * 2,
        max_seq_len=int(seq_lens.max()),
    )


def ragged_layouts(
    batch: int, context: int, keep: float, block_ids: torch.Tensor, device: torch.device, copies_for: Callable[[int], int]
) -> list[Layout]:
    """As many ragged copies as keep small working sets out of L2, each on its own blocks."""
    first = ragged_layout(batch, context, keep, block_ids, device, seed=0)
    used_blocks = int((first.seq_lens.cpu().to(torch.int64) + BLOCK_SIZE - 1).div(BLOCK_SIZE, rounding_mode="floor").sum())
    copies = min(copies_for(first.kv_bytes), block_ids.numel() // (used_blocks + batch))
    layouts = [first]
    cursor = used_blocks
    for copy in range(1, copies):
        layout = ragged_layout(batch, context, keep, block_ids[cursor:], device, seed=copy)
        cursor += int((layout.seq_lens.cpu().to(torch.int64) + BLOCK_SIZE - 1).div(BLOCK_SIZE, rounding_mode="floor").sum())
        layouts.append(layout)
    return layouts


def time_graph(calls: list[Callable[[], None]], inner: int, repeats: int) -> float:
    """Median microseconds per call: `inner` calls (cycling over `calls`) captured in one CUDA graph."""
    for call in calls:  # compile / autotune / allocate outside the graph
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(inner):
            calls[index % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(samples)


def time_eager(calls: list[Callable[[], None]], inner: int, repeats: int, cuda: bool) -> float:
    """Median microseconds per call without graphs (CPU smoke mode, or a capture failure)."""
    for call in calls:
        call()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for index in range(inner):
            calls[index % len(calls)]()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e6 / inner)
    return statistics.median(samples)


class VllmKernels:
    """The two vLLM decode kernels, called as vLLM's backends call them."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
        from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

        self.flash_attn_varlen_func = flash_attn_varlen_func
        self.get_scheduler_metadata = get_scheduler_metadata
        self.unified_attention = unified_attention
        self.device = device
        # TRITON_ATTN backend: 3D kernel below 128 // num_kv_heads rows, 16 softmax segments.
        self.seq_threshold_3d = 128 // NUM_KV_HEADS
        self.num_segments = 16
        self.segm_output = torch.empty((self.seq_threshold_3d, NUM_Q_HEADS, self.num_segments, HEAD_SIZE), dtype=torch.float32, device=device)
        self.segm_max = torch.empty((self.seq_threshold_3d, NUM_Q_HEADS, self.num_segments), dtype=torch.float32, device=device)
        self.segm_expsum = torch.empty_like(self.segm_max)
        self.unit_scale = torch.ones(1, dtype=torch.float32, device=device)

    def fa3_call(self, query: torch.Tensor, kv_cache: torch.Tensor, layout: Layout, out: torch.Tensor, scale: float) -> Callable[[], None]:
        batch = query.shape[0]
        key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)
        cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
        # vLLM's decode under full CUDA graphs: AOT schedule with at most 32 splits.
        max_num_splits = 32
        scheduler_metadata = self.get_scheduler_metadata(
            batch_size=batch, max_seqlen_q=1, max_seqlen_k=layout.max_seq_len, num_heads_q=NUM_Q_HEADS,
            num_heads_kv=NUM_KV_HEADS, headdim=HEAD_SIZE, cache_seqlens=layout.seq_lens, qkv_dtype=kv_cache.dtype,
            cu_seqlens_q=cu_seqlens_q, page_size=BLOCK_SIZE, causal=True, num_splits=max_num_splits,
        )
        descale = self.unit_scale.expand(batch, NUM_KV_HEADS)

        def call() -> None:
            self.flash_attn_varlen_func(
                q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=1,
                seqused_k=layout.seq_lens, max_seqlen_k=layout.max_seq_len, softmax_scale=scale, causal=True,
                block_table=layout.block_table, scheduler_metadata=scheduler_metadata, fa_version=3,
                q_descale=None, k_descale=descale, v_descale=descale, num_splits=max_num_splits,
            )

        return call

    def triton_call(self, query: torch.Tensor, kv_cache: torch.Tensor, layout: Layout, out: torch.Tensor, scale: float) -> Callable[[], None]:
        batch = query.shape[0]
        key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)
        cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=self.device)
        descale = self.unit_scale.expand(batch, NUM_KV_HEADS)

        def call() -> None:
            self.unified_attention(
                q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=1,
                seqused_k=layout.seq_lens, max_seqlen_k=layout.max_seq_len, softmax_scale=scale, causal=True,
                window_size=(-1, -1), block_table=layout.block_table, softcap=0, q_descale=None,
                k_descale=descale, v_descale=descale, seq_threshold_3D=self.seq_threshold_3d,
                num_par_softmax_segments=self.num_segments, softmax_segm_output=self.segm_output,
                softmax_segm_max=self.segm_max, softmax_segm_expsum=self.segm_expsum,
            )

        return call


def ragged_call(query, kv_cache, layout: Layout, out, scale, workspace, use_triton: bool) -> Callable[[], None]:
    def call() -> None:
        ragged_decode_attention(
            query, kv_cache, layout.block_table, layout.seq_lens, layout.dense_start, layout.kept_len,
            layout.page_start, scale, out=out, workspace=workspace, use_triton=use_triton,
            layer=0, num_layers=1,  # one layer's pool: the cross-layer address math with L = 1
        )

    return call


def run_sweep(args: argparse.Namespace) -> list[dict]:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke and args.smoke_fp32 else torch.bfloat16
    if smoke:
        batches, contexts, keeps = [1, 2], [256, 512], KEEP_RATIOS
    elif args.quick:
        batches, contexts, keeps = QUICK_BATCHES, QUICK_CONTEXTS, KEEP_RATIOS
    else:
        batches, contexts, keeps = FULL_BATCHES, FULL_CONTEXTS, KEEP_RATIOS
    if args.batches:
        batches = [int(x) for x in args.batches.split(",")]
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    max_bytes = args.max_cache_gb * 1e9

    def copies_for(working_set: int) -> int:
        # Enough distinct layouts (different blocks) that a graph replay, which
        # cycles over them, cannot be served from the 50 MB L2.
        return 1 if smoke else max(1, min(MAX_COPIES, math.ceil(4 * L2_BYTES / max(working_set, 1))))

    def dense_bytes(batch: int, context: int) -> int:
        return batch * context * NUM_KV_HEADS * 2 * HEAD_SIZE * 2

    def pool_blocks_for(batch: int, context: int) -> int:
        # The dense copies; ragged layouts reuse the same blocks (a ragged row
        # needs at most ceil(keep * ctx / bs) + 2 + tail blocks), so add a
        # little per row.
        return copies_for(dense_bytes(batch, context)) * batch * (math.ceil(context / BLOCK_SIZE) + DENSE_TAIL // BLOCK_SIZE + 2)

    points = [(b, c) for b in batches for c in contexts]
    fitting = [(b, c) for b, c in points if pool_blocks_for(b, c) * BLOCK_BYTES <= max_bytes]
    for b, c in points:
        if (b, c) not in fitting:
            print(f"skip batch {b} context {c}: needs {pool_blocks_for(b, c) * BLOCK_BYTES / 1e9:.1f} GB > {args.max_cache_gb} GB", flush=True)
    if not fitting:
        return []
    pool_blocks = max(pool_blocks_for(b, c) for b, c in fitting)
    print(f"allocating a pool of {pool_blocks} blocks ({pool_blocks * BLOCK_BYTES / 1e9:.1f} GB, {dtype})", flush=True)
    kv_pool = torch.empty((pool_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE), dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for chunk in torch.split(kv_pool, 4096):  # random data: zeros can time differently
        chunk.normal_(generator=generator)

    vllm_kernels = None if smoke else VllmKernels(max(batches), device)
    from vllm_kvzip.backend.ops import RaggedDecodeWorkspace

    # Each ragged point is timed with the default workspace ("ragged...") and, on a GPU, with each
    # requested variant ("ragged..._<variant>").
    ragged_variants = [("", None if smoke else RaggedDecodeWorkspace(
        max(batches), NUM_Q_HEADS, HEAD_SIZE, device=device, num_kv_heads=NUM_KV_HEADS
    ))]
    if not smoke:
        ragged_variants += [
            ("_" + name, RaggedDecodeWorkspace(
                max(batches), NUM_Q_HEADS, HEAD_SIZE, device=device, num_kv_heads=NUM_KV_HEADS, **VARIANTS[name]
            ))
            for name in args.variants
        ]
    scale = 1.0 / math.sqrt(HEAD_SIZE)
    results: list[dict] = []
    config = dict(
        num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, block_size=BLOCK_SIZE,
        dtype=str(dtype).replace("torch.", ""), dense_tail=DENSE_TAIL, head_variation=HEAD_VARIATION,
        ragged_tokens_per_head="keep_ratio * (context - dense_tail)",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (torch reference)",
        peak_bandwidth=PEAK_BANDWIDTH,
        command=command_line(),
    )

    for batch, context in fitting:
        # Random physical placement, like a cache after churn.
        point_blocks = pool_blocks_for(batch, context)
        block_ids = torch.randperm(point_blocks, generator=torch.Generator().manual_seed(batch * 7 + context))
        dense_copies = copies_for(dense_bytes(batch, context))
        dense_blocks = batch * math.ceil(context / BLOCK_SIZE)
        query = torch.randn(batch, NUM_Q_HEADS, HEAD_SIZE, dtype=dtype, device=device)
        out = torch.empty_like(query)
        inner = args.inner if not smoke else 2
        repeats = args.repeats if not smoke else 3

        def measure(make_call: Callable[[Layout], Callable[[], None]], layouts: list[Layout]) -> float:
            calls = [make_call(layout) for layout in layouts]
            calls_per_graph = math.ceil(inner / len(calls)) * len(calls)  # each copy equally often
            if smoke:
                return time_eager(calls, calls_per_graph, repeats, cuda=False)
            try:
                return time_graph(calls, calls_per_graph, repeats)
            except Exception as exc:  # a kernel that cannot be captured: time it eagerly
                print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)", flush=True)
                torch.cuda.synchronize()
                return time_eager(calls, calls_per_graph, repeats, cuda=True)

        def record(backend: str, keep: float, layouts: list[Layout], time_us: float, **extra) -> dict:
            kv_bytes = sum(layout.kv_bytes for layout in layouts) / len(layouts)  # the graph cycles over them
            point = dict(
                backend=backend, batch=batch, context=context, keep_ratio=keep, time_us=round(time_us, 2),
                kv_bytes=int(kv_bytes), bandwidth_GBps=round(kv_bytes / (time_us * 1e-6) / 1e9, 1),
                bandwidth_fraction=round(kv_bytes / (time_us * 1e-6) / PEAK_BANDWIDTH, 4),
                copies=len(layouts), config=config, **extra,
            )
            results.append(point)
            return point

        dense = [
            dense_layout(batch, context, block_ids[copy * dense_blocks:(copy + 1) * dense_blocks], device)
            for copy in range(dense_copies)
        ]
        fa3_time = None
        if vllm_kernels is not None:
            fa3_time = measure(lambda layout: vllm_kernels.fa3_call(query, kv_pool, layout, out, scale), dense)
            record("fa3", 1.0, dense, fa3_time)
            fa3_out = torch.empty_like(out)
            triton_time = measure(lambda layout: vllm_kernels.triton_call(query, kv_pool, layout, out, scale), dense)
            record("triton_attn", 1.0, dense, triton_time)

        if fa3_time is not None:
            vllm_kernels.fa3_call(query, kv_pool, dense[0], fa3_out, scale)()
        for suffix, variant in ragged_variants:
            time_us = measure(lambda layout: ragged_call(query, kv_pool, layout, out, scale, variant, not smoke), dense)
            extra = {}
            if fa3_time is not None:
                # Same data, same layout: our output must match FA3's.
                ragged_call(query, kv_pool, dense[0], out, scale, variant, True)()
                extra["max_abs_diff_vs_fa3"] = float((out.float() - fa3_out.float()).abs().max())
            record("ragged_uncompressed" + suffix, 1.0, dense, time_us, **extra)

        for keep in keeps:
            layouts = ragged_layouts(batch, context, keep, block_ids, device, copies_for)
            for suffix, variant in ragged_variants:
                time_us = measure(lambda layout: ragged_call(query, kv_pool, layout, out, scale, variant, not smoke), layouts)
                record("ragged" + suffix, keep, layouts, time_us)

        for point in results:
            if point["batch"] == batch and point["context"] == context and fa3_time is not None:
                point["time_ratio_vs_fa3"] = round(point["time_us"] / fa3_time, 4)
        print_rows([p for p in results if p["batch"] == batch and p["context"] == context])
        del dense
    return results


HEADER = f"{'backend':<20}{'batch':>6}{'context':>8}{'keep':>6}{'time_us':>11}{'GB/s':>8}{'bw_frac':>8}{'vs_fa3':>8}"


def print_rows(points: list[dict]) -> None:
    for p in points:
        ratio = p.get("time_ratio_vs_fa3")
        print(
            f"{p['backend']:<20}{p['batch']:>6}{p['context']:>8}{p['keep_ratio']:>6.2f}{p['time_us']:>11.1f}"
            f"{p['bandwidth_GBps']:>8.0f}{p['bandwidth_fraction']:>8.3f}{(f'{ratio:.3f}' if ratio else '-'):>8}",
            flush=True,
        )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p["batch"] for p in results})
    fig, axes = plt.subplots(len(batches), 2, figsize=(12, 3.2 * len(batches)), squeeze=False)
    series = [("fa3", 1.0), ("triton_attn", 1.0), ("ragged_uncompressed", 1.0)] + [("ragged", k) for k in KEEP_RATIOS]
    for row, batch in enumerate(batches):
        for backend, keep in series:
            points = sorted(
                (p for p in results if p["batch"] == batch and p["backend"] == backend and p["keep_ratio"] == keep),
                key=lambda p: p["context"],
            )
            if not points:
                continue
            label = backend if backend != "ragged" else f"ragged keep={keep}"
            style = "--" if backend in ("fa3", "triton_attn") else "-"
            contexts = [p["context"] for p in points]
            axes[row][0].plot(contexts, [p["time_us"] for p in points], style, marker="o", label=label)
            axes[row][1].plot(contexts, [p["bandwidth_fraction"] for p in points], style, marker="o", label=label)
        axes[row][0].set_title(f"batch {batch}: time per decode step (one layer)")
        axes[row][0].set_ylabel("us")
        axes[row][0].set_yscale("log")
        axes[row][1].set_title(f"batch {batch}: KV bytes read / time / {PEAK_BANDWIDTH / 1e12:.1f} TB/s")
        axes[row][1].set_ylim(0, 1.1)
        for axis in axes[row]:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("context tokens")
            axis.grid(True, alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subset of batches/contexts (< 2 min on an H100)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the torch reference")
    parser.add_argument("--smoke-fp32", action="store_true", help="smoke mode in fp32 instead of bf16")
    parser.add_argument("--batches", help="comma-separated batch sizes (overrides the preset)")
    parser.add_argument("--contexts", help="comma-separated context lengths (overrides the preset)")
    parser.add_argument("--max-cache-gb", type=float, default=70.0, help="skip points whose KV pool exceeds this")
    parser.add_argument("--inner", type=int, default=20, help="kernel calls per CUDA graph")
    parser.add_argument("--repeats", type=int, default=7, help="graph replays timed per point (median)")
    parser.add_argument(
        "--variants", default="",
        help=f"comma-separated merge variants timed beside the default kernel, of {sorted(VARIANTS)} (GPU only)",
    )
    parser.add_argument("--tag", default="", help="results go to decode_kernel_<tag>.{json,png}")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --smoke on CPU")
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; valid: {sorted(VARIANTS)}")

    started = time.perf_counter()
    print(HEADER, flush=True)
    results = run_sweep(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "decode_kernel" + ("_smoke" if args.smoke else "") + (f"_{args.tag}" if args.tag else "")
    if not args.smoke:
        summarize(results, args.variants)  # adds each variant point's time_ratio_vs_default before the JSON is written
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    if results:
        plot(results, out_dir / f"{stem}.png")
    print(f"\n{len(results)} points in {time.perf_counter() - started:.0f} s -> {out_dir / (stem + '.json')}", flush=True)


def summarize(results: list[dict], variants: list[str]) -> None:
    """The two targets of the brief, checked on the measured points, and each variant against the default."""
    fa3 = {(p["batch"], p["context"]): p for p in results if p["backend"] == "fa3"}
    for suffix in [""] + ["_" + name for name in variants]:
        full = [p for p in results if p["backend"] == "ragged" + suffix and p["keep_ratio"] == 1.0 and (p["batch"], p["context"]) in fa3]
        if full:
            worst = max(full, key=lambda p: p["time_ratio_vs_fa3"])
            print(f"keep 1.0 vs FA3{' (' + suffix[1:] + ')' if suffix else ''}: worst time ratio "
                  f"{worst['time_ratio_vs_fa3']:.3f} at batch {worst['batch']} context {worst['context']}")
    # Each variant against the default kernel, point by point (time ratio < 1: the variant is faster).
    default = {
        (p["backend"], p["batch"], p["context"], p["keep_ratio"]): p["time_us"]
        for p in results if p["backend"] in ("ragged", "ragged_uncompressed")
    }
    for name in variants:
        ratios = []
        for p in results:
            base = p["backend"].removesuffix("_" + name)
            key = (base, p["batch"], p["context"], p["keep_ratio"])
            if p["backend"].endswith("_" + name) and key in default:
                p["time_ratio_vs_default"] = round(p["time_us"] / default[key], 4)
                ratios.append(p["time_ratio_vs_default"])
        if ratios:
            print(f"{name} / default time: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, "
                  f"max {max(ratios):.3f} over {len(ratios)} points")
    large = [p for p in results if p["backend"] == "ragged" and p["batch"] * p["context"] * p["keep_ratio"] >= 2**20]
    if large:
        worst = min(large, key=lambda p: p["bandwidth_fraction"])
        print(
            f"ragged, batch*context*keep >= 1M tokens: worst bandwidth fraction {worst['bandwidth_fraction']:.3f} "
            f"(batch {worst['batch']} context {worst['context']} keep {worst['keep_ratio']})"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
