"""Triton in-place KV compaction: move token rows ``src_slots[i] -> dst_slots[i]``.

The cache is viewed as flat token rows ``kv_cache.view(-1, 2 * head_size)``
(a row is ``[K | V]`` of one token; the slot of ``(block, head slot, offset)``
is ``(block * H + slot) * block_size + offset``, see ``reference.py``).  The
block manager decides which rows move where; this module only moves them.

Sources and destinations may overlap (compaction moves kept tokens towards
the front of the pages they already occupy, across layers too), so the
*staged* moves take two launches: gather their source rows into a scratch
buffer, then scatter the scratch rows to their destinations.  Moves whose
source is not a destination of any move (a kept token outside the container
blocks) are copied directly, between the two, without scratch.  Within one
launch no program reads what another writes, so no ordering between programs
is needed.  ``dst_slots`` must not repeat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvzip.backend.ops.reference import compaction_moves, compaction_scratch

# Rows per program: 16 rows of 256 bf16 = 8 KiB per program, plenty of
# independent 16-byte loads per thread and still many programs for small N.
ROWS_PER_PROGRAM = 16


@triton.jit
def _copy_rows_kernel(
    src_ptr,
    dst_ptr,
    src_index_ptr,
    dst_index_ptr,
    num_rows,
    ROW_WIDTH: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    MODE: tl.constexpr,
):
    """``dst[dst_row(i)] = src[src_row(i)]`` for i in this program's rows.

    MODE 0 (gather): src rows are ``src_index[i]``, dst rows are ``i`` (scratch).
    MODE 1 (scatter): src rows are ``i`` (scratch), dst rows are ``dst_index[i]``.
    MODE 2 (direct copy): src rows are ``src_index[i]``, dst rows ``dst_index[i]``.
    """
    row_ids = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_mask = row_ids < num_rows
    if MODE == 1:
        src_rows = row_ids.to(tl.int64)
    else:
        src_rows = tl.load(src_index_ptr + row_ids, mask=row_mask, other=0).to(tl.int64)
    if MODE == 0:
        dst_rows = row_ids.to(tl.int64)
    else:
        dst_rows = tl.load(dst_index_ptr + row_ids, mask=row_mask, other=0).to(tl.int64)
    columns = tl.arange(0, BLOCK_WIDTH)
    mask = row_mask[:, None] & (columns[None, :] < ROW_WIDTH)
    values = tl.load(src_ptr + src_rows[:, None] * ROW_WIDTH + columns[None, :], mask=mask)
    tl.store(dst_ptr + dst_rows[:, None] * ROW_WIDTH + columns[None, :], values, mask=mask)


def compact_kv(
    kv_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    scratch: torch.Tensor | None = None,
    num_staged: int | None = None,
) -> torch.Tensor:
    """Move flat token rows ``src_slots[i] -> dst_slots[i]`` of ``kv_cache`` in place (Triton).

    ``src_slots`` / ``dst_slots``: int64 (int32 accepted) ``[N]`` on the cache's
    device.  The first ``num_staged`` moves (default: all) go through scratch;
    the others' sources must not be destinations.  ``scratch``: optional
    ``[>= num_staged, 2 * head_size]`` buffer of the cache dtype (pass a
    preallocated one to avoid an allocation per call).  Same semantics as
    ``reference.compact_kv_ref``.  Returns ``kv_cache``.
    """
    if kv_cache.dim() != 4 or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be a contiguous [num_blocks, H, block_size, 2*head_size] tensor")
    num_moves, num_staged = compaction_moves(src_slots, dst_slots, num_staged)
    if num_moves == 0:
        return kv_cache
    row_width = kv_cache.shape[-1]
    kv_rows = kv_cache.view(-1, row_width)
    scratch = compaction_scratch(kv_cache, num_staged, scratch)
    src_slots = src_slots.contiguous()
    dst_slots = dst_slots.contiguous()
    meta = dict(
        ROW_WIDTH=row_width,
        BLOCK_WIDTH=triton.next_power_of_2(row_width),
        ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
        num_warps=4,
    )
    staged_grid = (triton.cdiv(num_staged, ROWS_PER_PROGRAM),)
    direct = num_moves - num_staged
    # Launch 1 reads every staged source before any destination is written;
    # launch 2 copies the moves whose sources no move writes; launch 3 scatters.
    if num_staged:
        _copy_rows_kernel[staged_grid](kv_rows, scratch, src_slots, dst_slots, num_staged, MODE=0, **meta)
    if direct:
        _copy_rows_kernel[(triton.cdiv(direct, ROWS_PER_PROGRAM),)](
            kv_rows, kv_rows, src_slots[num_staged:], dst_slots[num_staged:], direct, MODE=2, **meta
        )
    if num_staged:
        _copy_rows_kernel[staged_grid](scratch, kv_rows, src_slots, dst_slots, num_staged, MODE=1, **meta)
    return kv_cache
