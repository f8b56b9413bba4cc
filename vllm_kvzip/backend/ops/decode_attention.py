"""Triton split-KV decode attention over ragged per-head pages + a dense tail.

Layout (see ``reference.py`` for the full description): one buffer for all
``L`` layers, ``kv_cache: [L * NB, H, block_size, 2 * head_size]`` with rows
``[K | V]``; flat block ``l * NB + b`` is layer ``l``'s share of block ``b``.
KV head ``h`` of request row ``r`` in layer ``layer`` attends over its
*virtual sequence*: ``kept_len[r, h]`` ragged tokens (token ``j`` in global
page ``P = page_start[r, h] + j // block_size``; container ``c = P // H`` is
flat block ``(c % L) * NB + block_table[r, c // L]``, head slot ``P % H``),
then the dense tokens at logical positions ``[dense_start[r], seq_lens[r])``
in vLLM's normal paging, in the layer's own share
(``layer * NB + block_table[r, p // block_size]``).

Kernel design
-------------
* Grid ``(row, kv_head, split)``.  Each program handles *all* ``G`` query
  heads of its KV head: a K/V tile is loaded once and used by ``G`` queries
  (GQA), which is what keeps decode at memory speed.
* The virtual sequence is cut into tiles of ``TILE`` tokens, counted per
  region (ragged tiles first, then dense tiles), so a tile never straddles the
  two regions and every tile holds whole pages (both regions start
  page-aligned).  The address of each token is computed once per tile from
  the block table; the K and V rows are then loaded as ``[TILE, head_size]``
  blocks whose inner dimension is contiguous (16-byte vector loads).
* Work is divided by the *row*: all heads of a row get splits of about the
  same number of tiles, so a head that keeps more tokens gets more splits
  (per-head KVzip budgets differ several-fold, and equal splits per head would
  leave SMs idle while the longest head finishes).  The grid's split
  dimension is fixed on the host from the *shapes* only (about twice the
  nominal split count, so that long heads have room), so a CUDA graph replays
  it for any lengths; inside the kernel each (row, head) derives how many
  splits it uses (each at least ``MIN_TILES_PER_SPLIT`` tiles) and the
  programs with nothing to do return at once.
* Online softmax in fp32 (base-2 exponentials, the softmax scale folded with
  log2(e)); each split writes its unnormalised ``(acc, max, sum)`` to scratch
  and a second small kernel merges the splits.  When the grid has one split
  the first kernel normalises and writes the output directly and the merge
  kernel is not launched.  With ``fused_merge`` (workspace option) there is no
  second kernel: each split counts itself in a per-(row, head) arrival counter
  after writing its partial, and the last one to arrive merges (the split-K
  "last block fixes up" pattern).  It saves the second launch, but on the
  H100 it is slower where that launch matters (batch 1: 1.24x -> 1.53x FA3's
  time at 4k tokens, 1.06x -> 1.23x at 32k; the last split's merge waits for
  the slowest split and reads the partials back through L2) and at most 2%
  faster elsewhere (benchmarks/results/decode_kernel_fused_quick.json), so it
  stays off by default.
* On Hopper and newer the merge kernel can be launched as a *programmatic
  dependent launch* (``dependent_launch=True``; off by default): every split
  program signals ``griddepcontrol.launch_dependents`` as it starts, so the
  merge kernel's programs are scheduled while the last splits still run,
  compute their split plan from the metadata, and block in
  ``griddepcontrol.wait`` until the split kernel has finished and its
  partials are visible.  The merge kernel's launch latency then overlaps the
  split kernel instead of following it; the split kernel itself is launched
  normally, so it still waits for everything before it (the query, the KV
  write).  Measured on an H100 (sessions 13 and 14, FA3 in the same process,
  benchmarks/results/decode_kernel_{merge_quick,merge_b1_4,pdl_full}.json) it
  saves 3-9% only at batch 1 on compressed heads, points that already take
  0.2-0.8x FA3's time, and costs 5-10% at batch 1 keep 1.0 (4k-16k), the
  points nearest the keep-1.0 target (full sweep, no dependent launch /
  dependent launch: min 0.906, median 1.000, max 1.095 over 216 points); so
  the merge kernel is launched normally unless asked.  Triggered after each
  split's loop (``dependent_launch_trigger="after_loop"``) it times like no
  dependent launch.
* A (row, head) with no key at all (0 kept tokens and an empty dense region)
  gets a zero output, never NaN.

Nothing in the launch path reads device memory from the host: the grid and
every constexpr depend only on tensor shapes and the workspace, so the launch
can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

try:  # Grid dependency control (programmatic dependent launch), Triton >= 3.2 on sm_90+.
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton: the merge kernel is launched normally
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False

LOG2_E = 1.4426950408889634

# Launch parameters, tuned on H100s (benchmarks/tune_decode_kernel.py; Llama-3.1-8B
# shapes, bf16, batch 1..128, context 4k..128k, keep 0.1..1.0, heads +-40%).
# They depend on the regime, i.e. the number of (row, kv head) pairs against
# the SM count, never on lengths (CUDA-graph safe):
# * few pairs (2 * pairs < SMs, e.g. batch <= 8 at 8 KV heads): the GPU is
#   filled by splitting rows; 64-token tiles (K+V at head_size 128 in bf16:
#   32 KiB per stage), 4 warps, 3 stages, about 2 programs per SM.
# * middle (pairs < 2 * SMs): 64-token tiles, 4 warps, 2 stages (3 CTAs per
#   SM), about 3 programs per SM.
# * many pairs: 128-token tiles with 8 warps, 2 stages: fewer, longer loads
#   per program, 2-5% better than 64-token tiles at batch >= 64.
# In the middle and many regimes a (row, head) takes at least 2 splits while
# pairs <= 4 * SMs, so the row-balanced plan evens out heads of different
# lengths (one split per head lost 5-8% at batch 64 with +-40% budgets).
# Each of these choices measured 5-15% better than the alternatives in its
# regime; across two H100 machines the same code differed by up to 6% at the
# largest shapes, so treat differences below that as noise.
TILE_TOKENS_SMALL, TILE_TOKENS_LARGE = 64, 128
PROGRAMS_PER_SM_FEW_PAIRS, PROGRAMS_PER_SM_MANY_PAIRS = 2, 3
# A split handles at least 4 tiles: shorter splits cost more in merge traffic
# and per-program set-up than they gain in parallelism -- except with few
# pairs, where the whole call takes 10-60 us and latency, not bandwidth,
# rules: there 2 tiles per split (twice the programs on short heads) took
# 0.75-0.90x the time at batch 1 / 4k (e.g. 12.4 -> 9.3 us at keep 0.1, 17.6
# -> 15.9 us uncompressed, FA3 15.7) and 0.99-1.01x at every batch 1 and 4
# point from 32k up (session 13, decode_kernel_merge_b1_4.json).
MIN_TILES_PER_SPLIT_FEW_PAIRS, MIN_TILES_PER_SPLIT_MORE_PAIRS = 2, 4
DEFAULT_MAX_NUM_SPLITS = 128
# dependent_launch_trigger -> the split kernel's LAUNCH_DEPENDENTS (0: no dependent launch).
DEPENDENT_LAUNCH_TRIGGERS = {"start": 1, "after_loop": 2}
# split_rounding: how a row's tiles per split are rounded (_split_plan's ROUND_NEAREST).
SPLIT_ROUNDINGS = ("up", "nearest")


@triton.jit
def _split_plan(
    kept_len_row_ptr,
    kv_head,
    dense_len,
    nominal_splits,
    grid_splits,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,
    TILE: tl.constexpr,
    MIN_TILES_PER_SPLIT: tl.constexpr,
    ROUND_NEAREST: tl.constexpr,
):
    """How one (row, kv head) is divided among splits; both kernels call this.

    Splits are sized from the *row's* work, not the head's: every head of the
    row gets splits of about the same number of tiles, so a head that keeps
    twice the mean gets twice the splits (up to ``grid_splits``, the grid's
    split dimension, which the host sets to about twice ``nominal_splits``).
    With per-head budgets (KVzip) the heads of a row differ a lot; equal
    splits per head would leave most SMs idle while the longest head finishes.

    Returns (ragged_tiles, total_tiles, tiles_per_split, used_splits): split
    ``s < used_splits`` handles tiles ``[s * tiles_per_split, min(.., total_tiles))``
    and every used split has at least one tile.
    """
    head_offsets = tl.arange(0, HEADS_POW2)
    row_kept = tl.load(kept_len_row_ptr + head_offsets, mask=head_offsets < NUM_KV_HEADS, other=0)
    dense_tiles = tl.cdiv(dense_len, TILE)
    row_tiles = tl.sum(tl.cdiv(row_kept, TILE), axis=0) + NUM_KV_HEADS * dense_tiles
    capacity = NUM_KV_HEADS * nominal_splits
    if ROUND_NEAREST:
        # Rounding up turns 2.02 tiles per split into 3: 50% longer programs for 2% more tiles.
        # Session 13 suspected that cliff at batch 1 / 4k keep 1.0; that layout has 528 row tiles
        # of 64 tokens on 264 programs, exactly 2 per split under either rounding, and the H100
        # timed both the same there (session 14), so "up" stays the default.
        row_tiles_per_split = (row_tiles + capacity // 2) // capacity
    else:
        row_tiles_per_split = tl.cdiv(row_tiles, capacity)
    row_tiles_per_split = tl.maximum(row_tiles_per_split, MIN_TILES_PER_SPLIT)

    kept_len = tl.load(kept_len_row_ptr + kv_head)
    ragged_tiles = tl.cdiv(kept_len, TILE)
    total_tiles = ragged_tiles + dense_tiles
    # A head longer than grid_splits row-sized splits takes longer splits.
    tiles_per_split = tl.maximum(row_tiles_per_split, tl.cdiv(total_tiles, grid_splits))
    used_splits = tl.cdiv(total_tiles, tiles_per_split)
    return ragged_tiles, total_tiles, tiles_per_split, used_splits


# The layer's block offset changes from layer to layer: never specialise on it
# (one compiled kernel serves every layer).
@triton.jit(do_not_specialize=["layer_block_offset", "num_layers", "num_blocks_per_layer"])
def _ragged_decode_split_kernel(
    query_ptr,
    kv_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    dense_start_ptr,
    kept_len_ptr,
    page_start_ptr,
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    arrival_count_ptr,
    scale_log2,
    nominal_splits,
    grid_splits,
    layer_block_offset,
    num_layers,
    num_blocks_per_layer,
    query_stride_row,
    query_stride_head,
    out_stride_row,
    out_stride_head,
    block_table_stride_row,
    kept_len_stride_row,
    page_start_stride_row,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    MIN_TILES_PER_SPLIT: tl.constexpr,
    ROUND_NEAREST: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    MERGE_GROUP: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    if LAUNCH_DEPENDENTS == 1:
        # Lets the merge kernel (a dependent launch) be scheduled once every split program has
        # started; it waits in griddepcontrol.wait for this grid to finish before reading partials.
        gdc_launch_dependents()
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + row)
    dense_start = tl.load(dense_start_ptr + row)
    kept_len_row_ptr = kept_len_ptr + row * kept_len_stride_row
    kept_len = tl.load(kept_len_row_ptr + kv_head)
    first_page = tl.load(page_start_ptr + row * page_start_stride_row + kv_head)
    dense_len = tl.maximum(seq_len - dense_start, 0)

    ragged_tiles, total_tiles, tiles_per_split, used_splits = _split_plan(
        kept_len_row_ptr, kv_head, dense_len, nominal_splits, grid_splits,
        NUM_KV_HEADS, HEADS_POW2, TILE, MIN_TILES_PER_SPLIT, ROUND_NEAREST,
    )
    # With several splits an idle program writes nothing: the merge kernel
    # reads only the used splits.  With one split the program must still write
    # the (zero) output of an empty head.
    if SINGLE_SPLIT or split < used_splits:
        tile_begin = split * tiles_per_split
        tile_end = tl.minimum(tile_begin + tiles_per_split, total_tiles)

        group_offsets = tl.arange(0, BLOCK_GROUP)
        group_mask = group_offsets < GROUP
        dim_offsets = tl.arange(0, HEAD_SIZE)
        q_heads = kv_head * GROUP + group_offsets
        # [BLOCK_GROUP, HEAD_SIZE]; padded group rows are zero and their
        # results are never stored.
        query = tl.load(
            query_ptr + row * query_stride_row + q_heads[:, None] * query_stride_head + dim_offsets[None, :],
            mask=group_mask[:, None],
            other=0.0,
        )
        if DOT_IN_FP32:
            query = query.to(tl.float32)

        running_max = tl.full([BLOCK_GROUP], float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_GROUP], dtype=tl.float32)
        acc = tl.zeros([BLOCK_GROUP, HEAD_SIZE], dtype=tl.float32)

        token_offsets = tl.arange(0, TILE)
        block_table_row = block_table_ptr + row.to(tl.int64) * block_table_stride_row
        for tile in range(tile_begin, tile_end):
            # Which region the tile is in, and the token index inside that
            # region (ragged index j, or dense index p - dense_start).  Scalar
            # selects keep one code path for both regions, which the software
            # pipeliner handles better than a branch.
            is_ragged = tile < ragged_tiles
            region_tile = tl.where(is_ragged, tile, tile - ragged_tiles)
            region_len = tl.where(is_ragged, kept_len, dense_len)
            region_pos = region_tile * TILE + token_offsets
            token_valid = region_pos < region_len

            # Page of each token: ragged global page P -> container c = P // H
            # -> (layer share c % L of block_table[c // L], slot P % H); dense
            # logical block p // bs -> (this layer's share of block_table[..],
            # slot h).  Both regions start page-aligned, so the in-page offset
            # is region_pos % BLOCK_SIZE in both.
            page_in_region = region_pos // BLOCK_SIZE
            ragged_page = first_page + page_in_region
            container = ragged_page // NUM_KV_HEADS
            table_index = tl.where(is_ragged, container // num_layers, dense_start // BLOCK_SIZE + page_in_region)
            head_slot = tl.where(is_ragged, ragged_page % NUM_KV_HEADS, kv_head)
            share_offset = tl.where(
                is_ragged, (container % num_layers).to(tl.int64) * num_blocks_per_layer, layer_block_offset
            )
            block = tl.load(block_table_row + table_index, mask=token_valid, other=0).to(tl.int64) + share_offset
            token_slot = (block * NUM_KV_HEADS + head_slot) * BLOCK_SIZE + region_pos % BLOCK_SIZE
            key_offsets = token_slot[:, None] * (2 * HEAD_SIZE) + dim_offsets[None, :]

            keys = tl.load(kv_cache_ptr + key_offsets, mask=token_valid[:, None], other=0.0)
            values = tl.load(kv_cache_ptr + key_offsets + HEAD_SIZE, mask=token_valid[:, None], other=0.0)
            if DOT_IN_FP32:
                keys = keys.to(tl.float32)
                values = values.to(tl.float32)

            # [BLOCK_GROUP, TILE] scores in the log2 domain.
            scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2
            scores = tl.where(token_valid[None, :], scores, float("-inf"))
            # Every tile holds at least one valid token, so new_max is finite;
            # exp2(-inf - finite) = 0 resets the empty initial state.
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            correction = tl.math.exp2(running_max - new_max)
            probs = tl.math.exp2(scores - new_max[:, None])
            running_sum = running_sum * correction + tl.sum(probs, axis=1)
            acc = acc * correction[:, None] + tl.dot(
                probs.to(values.dtype), values, input_precision=DOT_PRECISION
            )
            running_max = new_max

        if LAUNCH_DEPENDENTS == 2:
            # Trigger after the loop: the merge kernel's programs take no SM slot while splits load.
            gdc_launch_dependents()
        if SINGLE_SPLIT:
            # An empty head has running_sum 0 and acc 0: output 0, not NaN.
            denom = tl.where(running_sum > 0, running_sum, 1.0)
            result = acc / denom[:, None]
            tl.store(
                out_ptr + row * out_stride_row + q_heads[:, None] * out_stride_head + dim_offsets[None, :],
                result.to(out_ptr.dtype.element_ty),
                mask=group_mask[:, None],
            )
        else:
            # Partial slot (row * grid_splits + split, q_head): the scratch only
            # needs num_rows * grid_splits slots, which stays small because
            # grid_splits shrinks as the batch grows.
            partial_index = (row.to(tl.int64) * grid_splits + split) * (NUM_KV_HEADS * GROUP) + q_heads
            tl.store(partial_max_ptr + partial_index, running_max, mask=group_mask)
            tl.store(partial_sum_ptr + partial_index, running_sum, mask=group_mask)
            tl.store(
                partial_acc_ptr + partial_index[:, None] * HEAD_SIZE + dim_offsets[None, :],
                acc,
                mask=group_mask[:, None],
            )
            if FUSED_MERGE:
                _merge_if_last(
                    row, kv_head, used_splits, grid_splits, out_ptr + row * out_stride_row, out_stride_head,
                    partial_acc_ptr, partial_max_ptr, partial_sum_ptr, arrival_count_ptr,
                    NUM_KV_HEADS, GROUP, HEAD_SIZE, MERGE_GROUP, BLOCK_SPLITS, SPLIT_CHUNK,
                )
    if FUSED_MERGE and not SINGLE_SPLIT:
        if used_splits == 0 and split == 0:
            # An empty head has no split to merge: split 0 writes its zero output.
            group_offsets = tl.arange(0, BLOCK_GROUP)
            dim_offsets = tl.arange(0, HEAD_SIZE)
            zero = tl.zeros([BLOCK_GROUP, HEAD_SIZE], dtype=tl.float32)
            tl.store(
                out_ptr + row * out_stride_row + (kv_head * GROUP + group_offsets)[:, None] * out_stride_head
                + dim_offsets[None, :],
                zero.to(out_ptr.dtype.element_ty),
                mask=(group_offsets < GROUP)[:, None],
            )


@triton.jit
def _merge_if_last(
    row, kv_head, used_splits, grid_splits, out_row_ptr, out_stride_head,
    partial_acc_ptr, partial_max_ptr, partial_sum_ptr, arrival_count_ptr,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr,
    MERGE_GROUP: tl.constexpr, BLOCK_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    """Called by every used split after it wrote its partial: the last one to arrive merges them
    all into the output of the (row, kv head)'s GROUP query heads and resets the counter for the
    next launch (so a CUDA graph replays it as is).  The merge reads the partials as whole
    [splits, group] and [SPLIT_CHUNK, group, head_size] tiles, not split by split: a serial loop
    of L2 round trips would cost more than the second kernel it replaces."""
    # Every thread's partial stores are issued before the count (barrier), and the count's
    # release / acquire orders them against the last split's loads (gpu scope).
    tl.debug_barrier()
    counter = arrival_count_ptr + row * NUM_KV_HEADS + kv_head
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == used_splits - 1:
        tl.store(counter, 0)
        num_q_heads: tl.constexpr = NUM_KV_HEADS * GROUP
        first_slot = row.to(tl.int64) * grid_splits
        group_offsets = tl.arange(0, MERGE_GROUP)
        group_mask = group_offsets < GROUP
        q_heads = kv_head * GROUP + group_offsets
        dim_offsets = tl.arange(0, HEAD_SIZE)

        # Pass 1: per query head, the max over the splits and the softmax denominator.
        # .cg: read from L2, where the other SMs' partials are, never a stale L1 line.
        split_offsets = tl.arange(0, BLOCK_SPLITS)
        index = (first_slot + split_offsets)[:, None] * num_q_heads + q_heads[None, :]
        mask = (split_offsets < used_splits)[:, None] & group_mask[None, :]
        split_max = tl.load(partial_max_ptr + index, mask=mask, other=float("-inf"), cache_modifier=".cg")
        split_sum = tl.load(partial_sum_ptr + index, mask=mask, other=0.0, cache_modifier=".cg")
        global_max = tl.max(split_max, axis=0)
        global_max = tl.where(global_max == float("-inf"), 0.0, global_max)
        denom = tl.sum(tl.math.exp2(split_max - global_max[None, :]) * split_sum, axis=0)

        # Pass 2: the weighted accumulators, SPLIT_CHUNK splits at a time.
        numer = tl.zeros([MERGE_GROUP, HEAD_SIZE], dtype=tl.float32)
        for chunk_start in range(0, used_splits, SPLIT_CHUNK):
            chunk_offsets = chunk_start + tl.arange(0, SPLIT_CHUNK)
            chunk_index = (first_slot + chunk_offsets)[:, None] * num_q_heads + q_heads[None, :]
            chunk_mask = (chunk_offsets < used_splits)[:, None] & group_mask[None, :]
            chunk_max = tl.load(partial_max_ptr + chunk_index, mask=chunk_mask, other=float("-inf"), cache_modifier=".cg")
            chunk_acc = tl.load(
                partial_acc_ptr + chunk_index[:, :, None] * HEAD_SIZE + dim_offsets[None, None, :],
                mask=chunk_mask[:, :, None], other=0.0, cache_modifier=".cg",
            )
            weight = tl.math.exp2(chunk_max - global_max[None, :])
            numer += tl.sum(weight[:, :, None] * chunk_acc, axis=0)
        result = numer / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(
            out_row_ptr + q_heads[:, None] * out_stride_head + dim_offsets[None, :],
            result.to(out_row_ptr.dtype.element_ty),
            mask=group_mask[:, None],
        )


@triton.jit
def _merge_splits_kernel(
    seq_lens_ptr,
    dense_start_ptr,
    kept_len_ptr,
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    nominal_splits,
    grid_splits,
    out_stride_row,
    out_stride_head,
    kept_len_stride_row,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    MIN_TILES_PER_SPLIT: tl.constexpr,
    ROUND_NEAREST: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    WAIT_FOR_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    q_head = tl.program_id(1)
    kv_head = q_head // GROUP
    num_q_heads: tl.constexpr = NUM_KV_HEADS * GROUP

    seq_len = tl.load(seq_lens_ptr + row)
    dense_start = tl.load(dense_start_ptr + row)
    dense_len = tl.maximum(seq_len - dense_start, 0)
    # Same plan as the split kernel: only the used splits hold partials.
    _, _, _, used_splits = _split_plan(
        kept_len_ptr + row * kept_len_stride_row, kv_head, dense_len, nominal_splits, grid_splits,
        NUM_KV_HEADS, HEADS_POW2, TILE, MIN_TILES_PER_SPLIT, ROUND_NEAREST,
    )
    first_slot = row.to(tl.int64) * grid_splits
    if WAIT_FOR_SPLITS:
        # A dependent launch may start before the split kernel ends: the metadata above was written
        # before the split kernel started, the partials below only when it has finished.
        gdc_wait()

    # Pass 1: the global max and the softmax denominator over all splits.
    split_offsets = tl.arange(0, BLOCK_SPLITS)
    split_mask = split_offsets < used_splits
    partial_index = (first_slot + split_offsets) * num_q_heads + q_head
    split_max = tl.load(partial_max_ptr + partial_index, mask=split_mask, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + partial_index, mask=split_mask, other=0.0)
    global_max = tl.max(split_max, axis=0)
    # No used split (empty head): shift by 0 so the weights are exp2(-inf) = 0.
    global_max = tl.where(global_max == float("-inf"), 0.0, global_max)
    denom = tl.sum(tl.math.exp2(split_max - global_max) * split_sum, axis=0)

    # Pass 2: the weighted sum of the accumulators, SPLIT_CHUNK splits at a
    # time so that registers stay bounded however many splits there are.
    dim_offsets = tl.arange(0, HEAD_SIZE)
    numer = tl.zeros([HEAD_SIZE], dtype=tl.float32)
    for chunk_start in range(0, used_splits, SPLIT_CHUNK):
        chunk_offsets = chunk_start + tl.arange(0, SPLIT_CHUNK)
        chunk_mask = chunk_offsets < used_splits
        chunk_index = (first_slot + chunk_offsets) * num_q_heads + q_head
        chunk_max = tl.load(partial_max_ptr + chunk_index, mask=chunk_mask, other=float("-inf"))
        chunk_acc = tl.load(
            partial_acc_ptr + chunk_index[:, None] * HEAD_SIZE + dim_offsets[None, :],
            mask=chunk_mask[:, None],
            other=0.0,
        )
        numer += tl.sum(tl.math.exp2(chunk_max - global_max)[:, None] * chunk_acc, axis=0)
    result = numer / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + row * out_stride_row + q_head * out_stride_head + dim_offsets,
        result.to(out_ptr.dtype.element_ty),
    )


class RaggedDecodeWorkspace:
    """Scratch for the split-KV partials, allocated once (CUDA-graph safe).

    The split grid depends only on the batch shape (``split_grid``), and the
    scratch holds one partial ``(acc [head_size], max, sum)`` in fp32 per
    (row, split, query head) for the largest ``num_rows * grid_splits`` any
    batch of up to ``max_rows`` rows can need.  Since the split count shrinks
    as the batch grows, that is about ``6 * num_sms / num_kv_heads + 4 *
    max_rows`` slots (about 1.2k slots, 20 MiB, for 256 rows of 32 query heads
    of 128 with 8 KV heads on an H100; without ``num_kv_heads`` it is sized
    for 1 KV head, a few times more).  One workspace serves every layer,
    since layers run one after another.
    """

    def __init__(
        self,
        max_rows: int,
        num_q_heads: int,
        head_size: int,
        max_num_splits: int = DEFAULT_MAX_NUM_SPLITS,
        device: torch.device | str | None = None,
        tile_tokens: int | None = None,
        min_tiles_per_split: int | None = None,
        target_programs_per_sm: int | None = None,
        num_kv_heads: int | None = None,
        max_partial_slots: int | None = None,
        fused_merge: bool = False,
        dependent_launch: bool = False,
        dependent_launch_trigger: str = "start",
        split_rounding: str = "up",
    ) -> None:
        if max_rows < 1 or num_q_heads < 1 or max_num_splits < 1:
            raise ValueError("max_rows, num_q_heads and max_num_splits must be >= 1")
        if head_size < 16 or head_size & (head_size - 1):
            raise ValueError(f"head_size must be a power of two >= 16, got {head_size}")
        if tile_tokens is not None and (tile_tokens < 16 or tile_tokens & (tile_tokens - 1)):
            raise ValueError(f"tile_tokens must be a power of two >= 16, got {tile_tokens}")
        if num_kv_heads is not None and (num_kv_heads < 1 or num_q_heads % num_kv_heads):
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_q_heads {num_q_heads}")
        device = torch.device(device) if device is not None else torch.device("cuda")
        self.max_rows = max_rows
        self.num_q_heads = num_q_heads
        self.head_size = head_size
        self.max_num_splits = max_num_splits
        self.tile_tokens = tile_tokens
        if min_tiles_per_split is not None and min_tiles_per_split < 1:
            raise ValueError(f"min_tiles_per_split must be >= 1 (or None: by regime), got {min_tiles_per_split}")
        self.min_tiles_per_split = min_tiles_per_split  # None: the regime's (min_tiles)
        self.target_programs_per_sm = target_programs_per_sm
        self.num_kv_heads = num_kv_heads
        self.device = device
        if device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            self.num_sms = 1  # Triton interpreter on CPU: parallelism does not matter
        # Slots for the worst batch shape under split_grid.  Callers that pass
        # an explicit num_splits to the kernel (tests, tuning) size it with
        # max_partial_slots (up to max_rows * max_num_splits); checked at launch.
        if max_partial_slots is None:
            kv_heads_bound = num_kv_heads or 1
            max_partial_slots = max(rows * self.split_grid(rows, kv_heads_bound)[1] for rows in range(1, max_rows + 1))
        self.max_partial_slots = max_partial_slots
        self.partial_acc = torch.empty((self.max_partial_slots, num_q_heads, head_size), dtype=torch.float32, device=device)
        self.partial_max = torch.empty((self.max_partial_slots, num_q_heads), dtype=torch.float32, device=device)
        self.partial_sum = torch.empty((self.max_partial_slots, num_q_heads), dtype=torch.float32, device=device)
        # fused_merge: one arrival counter per (row, kv head), zero between launches (the last split
        # of each resets its own); sized for kv heads = q heads when num_kv_heads is not given.
        self.fused_merge = fused_merge
        self.arrival_count = torch.zeros(max_rows * (num_kv_heads or num_q_heads), dtype=torch.int32, device=device)
        # dependent_launch: the merge kernel as a programmatic dependent launch (module docstring:
        # off by default, measured slower where the kernel is nearest FA3). It needs a CUDA device of
        # compute capability >= 9.0 and a Triton with grid dependency control; asking for it
        # elsewhere is an error, not a silent fallback.
        supported = _HAS_GDC and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        if dependent_launch and not supported:
            raise ValueError(
                "dependent_launch=True needs a CUDA device of compute capability >= 9.0 (Hopper) and a Triton "
                f"with triton.language.extra.cuda.gdc_wait; this is {device} with Triton {triton.__version__}"
            )
        self.dependent_launch = bool(dependent_launch)
        # Where the split programs let the merge kernel be scheduled: as they start, or once their
        # loop is done (the merge programs then never hold an SM slot a split could use).
        if dependent_launch_trigger not in DEPENDENT_LAUNCH_TRIGGERS:
            raise ValueError(
                f"dependent_launch_trigger must be one of {list(DEPENDENT_LAUNCH_TRIGGERS)}, got {dependent_launch_trigger!r}"
            )
        self.dependent_launch_trigger = dependent_launch_trigger
        # How the row's tiles per split are rounded: "up" (never more programs than the nominal
        # count) or "nearest" (no 2.02 -> 3 cliff on short rows); see _split_plan. "up" stays the
        # default: "nearest" timed the same on an H100 (median 0.997-1.000 of the default's time;
        # session 14, decode_kernel_{rounding_b1_4,pdl_full}.json).
        if split_rounding not in SPLIT_ROUNDINGS:
            raise ValueError(f"split_rounding must be one of {list(SPLIT_ROUNDINGS)}, got {split_rounding!r}")
        self.split_rounding = split_rounding

    def few_pairs(self, num_rows: int, num_kv_heads: int) -> bool:
        """Whether the batch has few (row, kv head) pairs: the GPU is filled by splitting them."""
        return 2 * num_rows * num_kv_heads < self.num_sms

    def min_tiles(self, num_rows: int, num_kv_heads: int) -> int:
        """Tiles a used split handles at least, for a batch shape (tuning notes above)."""
        if self.min_tiles_per_split is not None:
            return self.min_tiles_per_split
        if self.few_pairs(num_rows, num_kv_heads):
            return MIN_TILES_PER_SPLIT_FEW_PAIRS
        return MIN_TILES_PER_SPLIT_MORE_PAIRS

    def launch_config(self, num_rows: int, num_kv_heads: int) -> tuple[int, int, int]:
        """(tile_tokens, num_warps, num_stages) of the split kernel for a batch shape (tuning notes above)."""
        pairs = num_rows * num_kv_heads
        if self.few_pairs(num_rows, num_kv_heads):
            tile, warps, stages = TILE_TOKENS_SMALL, 4, 3
        elif pairs < 2 * self.num_sms:
            tile, warps, stages = TILE_TOKENS_SMALL, 4, 2
        else:
            tile, warps, stages = TILE_TOKENS_LARGE, 8, 2
        return (self.tile_tokens or tile), warps, stages

    def split_grid(self, num_rows: int, num_kv_heads: int) -> tuple[int, int]:
        """(nominal_splits, grid_splits) for a batch shape (shapes only: CUDA-graph safe).

        ``nominal_splits`` per (row, head) give about ``target_programs_per_sm``
        programs per SM (by regime unless set); the grid has up to twice that
        many splits so that heads longer than the row's mean can take
        proportionally more.  Large batches fill the GPU with one split each
        (and skip the merge kernel).
        """
        pairs = max(num_rows * num_kv_heads, 1)
        if self.target_programs_per_sm is not None:
            programs_per_sm, min_nominal = self.target_programs_per_sm, 1
        elif self.few_pairs(num_rows, num_kv_heads):
            programs_per_sm, min_nominal = PROGRAMS_PER_SM_FEW_PAIRS, 1
        else:
            programs_per_sm = PROGRAMS_PER_SM_MANY_PAIRS
            min_nominal = 2 if pairs <= 4 * self.num_sms else 1
        nominal = max(min_nominal, math.ceil(programs_per_sm * self.num_sms / pairs))
        if nominal <= 1 or self.max_num_splits == 1:
            return 1, 1
        grid = min(2 * nominal, self.max_num_splits)
        return min(nominal, grid), grid


def _check_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    out: torch.Tensor,
    workspace: RaggedDecodeWorkspace,
) -> None:
    # Shape / dtype checks only: they read no device memory.
    num_rows, num_q_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    if kv_cache.dim() != 4 or kv_cache.shape[3] != 2 * head_size or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous [L * NB, H, block_size, 2*{head_size}] tensor, got {tuple(kv_cache.shape)}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_size & (head_size - 1) or head_size < 16:
        raise ValueError(f"head_size must be a power of two >= 16, got {head_size}")
    if kv_cache.shape[2] % 16:
        raise ValueError(f"block_size must be a multiple of 16 for the Triton kernel, got {kv_cache.shape[2]}")
    if query.stride(2) != 1 or out.stride(2) != 1 or out.shape != query.shape:
        raise ValueError("query and out must be [num_rows, num_q_heads, head_size] with a contiguous last dim")
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} != kv_cache dtype {kv_cache.dtype}")
    for name, tensor in (("block_table", block_table), ("kept_len", kept_len), ("page_start", page_start)):
        if tensor.dim() != 2 or tensor.shape[0] < num_rows or tensor.stride(1) != 1 or tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 [>= num_rows, ...] tensor with a contiguous last dim")
    if kept_len.shape[1] != num_kv_heads or page_start.shape[1] != num_kv_heads:
        raise ValueError("kept_len and page_start must be [num_rows, num_kv_heads]")
    for name, tensor in (("seq_lens", seq_lens), ("dense_start", dense_start)):
        if tensor.dim() != 1 or tensor.shape[0] < num_rows or tensor.dtype != torch.int32 or tensor.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous int32 [>= num_rows] tensor")
    if num_rows > workspace.max_rows or num_q_heads != workspace.num_q_heads or head_size != workspace.head_size:
        raise ValueError(
            f"workspace is for <= {workspace.max_rows} rows, {workspace.num_q_heads} q heads, head_size "
            f"{workspace.head_size}; got {num_rows} rows, {num_q_heads} q heads, head_size {head_size}"
        )


def ragged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    workspace: RaggedDecodeWorkspace,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    *,
    layer: int,
    num_layers: int,
) -> torch.Tensor:
    """Decode attention of ``query [num_rows, num_q_heads, head_size]`` of ``layer`` into ``out``.

    Same semantics as ``reference.ragged_decode_attention_ref``.  ``num_splits``
    overrides the grid's split count (tests use it to force several splits);
    by default it follows ``workspace.split_grid``; an explicit ``num_splits``
    sets the grid's split dimension (the nominal split count is half of it)
    and needs ``num_rows * num_splits <= workspace.max_partial_slots``.  Returns ``out``.
    """
    _check_inputs(query, kv_cache, block_table, seq_lens, dense_start, kept_len, page_start, out, workspace)
    if num_layers < 1 or kv_cache.shape[0] % num_layers or not 0 <= layer < num_layers:
        raise ValueError(f"kv_cache of {kv_cache.shape[0]} blocks is not {num_layers} layers, or layer {layer} is outside them")
    num_blocks_per_layer = kv_cache.shape[0] // num_layers
    num_rows, num_q_heads, head_size = query.shape
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_rows == 0:
        return out
    if num_splits is None:
        nominal_splits, grid_splits = workspace.split_grid(num_rows, num_kv_heads)
    else:
        if not 1 <= num_splits <= workspace.max_num_splits:
            raise ValueError(f"num_splits must be in 1..{workspace.max_num_splits}, got {num_splits}")
        nominal_splits, grid_splits = max(1, num_splits // 2), num_splits
    single_split = grid_splits == 1
    tile, default_warps, default_stages = workspace.launch_config(num_rows, num_kv_heads)
    # Both kernels must derive the same split plan from these two.
    min_tiles = workspace.min_tiles(num_rows, num_kv_heads)
    round_nearest = workspace.split_rounding == "nearest"
    num_warps = num_warps or default_warps
    num_stages = num_stages or default_stages
    # fp32 caches (tests, CPU-like numerics) get exact fp32 dots instead of TF32.
    dot_precision = "ieee" if kv_cache.dtype == torch.float32 else "tf32"
    # Triton's CPU interpreter (tests) computes bf16 dots wrongly (it reads the
    # bits as integers); there, upcast the dot operands to fp32.
    dot_in_fp32 = kv_cache.device.type == "cpu" and kv_cache.dtype == torch.bfloat16
    if workspace.fused_merge and num_rows * num_kv_heads > workspace.arrival_count.numel():
        raise ValueError(
            f"{num_rows} rows x {num_kv_heads} kv heads exceed the workspace's {workspace.arrival_count.numel()} "
            "arrival counters (fused_merge): build it with num_kv_heads"
        )
    if num_rows * grid_splits > workspace.max_partial_slots:
        raise ValueError(
            f"{num_rows} rows x {grid_splits} splits exceed the workspace's {workspace.max_partial_slots} partial slots"
        )

    # The merge kernel, when there is one, follows the split kernel (as a dependent launch if asked).
    dependent_merge = workspace.dependent_launch and not single_split and not workspace.fused_merge
    _ragged_decode_split_kernel[(num_rows, num_kv_heads, grid_splits)](
        query,
        kv_cache,
        block_table,
        seq_lens,
        dense_start,
        kept_len,
        page_start,
        out,
        workspace.partial_acc,
        workspace.partial_max,
        workspace.partial_sum,
        workspace.arrival_count,
        float(scale) * LOG2_E,
        nominal_splits,
        grid_splits,
        layer * num_blocks_per_layer,
        num_layers,
        num_blocks_per_layer,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        kept_len.stride(0),
        page_start.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_POW2=triton.next_power_of_2(num_kv_heads),
        GROUP=group,
        BLOCK_GROUP=max(16, triton.next_power_of_2(group)),
        HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size,
        TILE=tile,
        MIN_TILES_PER_SPLIT=min_tiles,
        ROUND_NEAREST=round_nearest,
        SINGLE_SPLIT=single_split,
        FUSED_MERGE=workspace.fused_merge,
        MERGE_GROUP=triton.next_power_of_2(group),
        BLOCK_SPLITS=triton.next_power_of_2(grid_splits),
        SPLIT_CHUNK=min(8, triton.next_power_of_2(grid_splits)),
        DOT_PRECISION=dot_precision,
        DOT_IN_FP32=dot_in_fp32,
        LAUNCH_DEPENDENTS=DEPENDENT_LAUNCH_TRIGGERS[workspace.dependent_launch_trigger] if dependent_merge else 0,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single_split and not workspace.fused_merge:
        _merge_splits_kernel[(num_rows, num_q_heads)](
            seq_lens,
            dense_start,
            kept_len,
            out,
            workspace.partial_acc,
            workspace.partial_max,
            workspace.partial_sum,
            nominal_splits,
            grid_splits,
            out.stride(0),
            out.stride(1),
            kept_len.stride(0),
            NUM_KV_HEADS=num_kv_heads,
            HEADS_POW2=triton.next_power_of_2(num_kv_heads),
            GROUP=group,
            HEAD_SIZE=head_size,
            TILE=tile,
            MIN_TILES_PER_SPLIT=min_tiles,
            ROUND_NEAREST=round_nearest,
            BLOCK_SPLITS=triton.next_power_of_2(grid_splits),
            SPLIT_CHUNK=min(16, triton.next_power_of_2(grid_splits)),
            WAIT_FOR_SPLITS=dependent_merge,
            num_warps=4,
            **({"launch_pdl": True} if dependent_merge else {}),
        )
    return out
