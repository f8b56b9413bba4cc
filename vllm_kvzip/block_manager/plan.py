"""Compaction plans: which cache rows move where when a layer is compressed.

A layer's KV cache is `[num_blocks, num_kv_heads, block_size, 2 * head_size]`;
a *flat slot* is the row index into `kv_cache.view(-1, 2 * head_size)`, i.e.
`(block * num_kv_heads + head_slot) * block_size + offset`.

Head pages of one layer are numbered linearly: KV head `h` owns pages
`[page_start[h], page_start[h] + cdiv(kept_len[h], block_size))`, heads in
order, and page `P` lives in container block `containers[P // num_kv_heads]`,
head slot `P % num_kv_heads`.  Consecutive pages of a head therefore sit next
to each other inside a block (`[num_kv_heads, block_size, ...]` is contiguous),
which keeps the decode kernel's reads long.

Everything here is vectorised torch and runs on the cache's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCompactionPlan:
    """Moves for one layer of one request, plus the metadata the decode kernel reads."""

    kept_len: torch.Tensor  # [num_kv_heads] int32: kept evictable tokens per head
    page_start: torch.Tensor  # [num_kv_heads] int32: first linear page of each head
    src_slots: torch.Tensor  # [num_moves] int64: flat slot each kept token is read from
    dst_slots: torch.Tensor  # [num_moves] int64: flat slot it is written to


def pages_per_head(kept_len: torch.Tensor, block_size: int) -> torch.Tensor:
    return (kept_len + block_size - 1) // block_size


def page_starts(kept_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """Exclusive prefix sum of the pages each head needs (heads in order)."""
    pages = pages_per_head(kept_len, block_size)
    return torch.cumsum(pages, dim=-1) - pages


def dense_flat_slots(
    positions: torch.Tensor, heads: torch.Tensor, block_ids: torch.Tensor, num_kv_heads: int, block_size: int
) -> torch.Tensor:
    """Flat slots of tokens at logical `positions` of KV `heads` in vLLM's dense layout."""
    blocks = block_ids.to(torch.int64)[positions // block_size]
    return (blocks * num_kv_heads + heads) * block_size + positions % block_size


def page_flat_slots(
    pages: torch.Tensor, offsets: torch.Tensor, containers: torch.Tensor, num_kv_heads: int, block_size: int
) -> torch.Tensor:
    """Flat slots of `offsets` inside linear head `pages`."""
    blocks = containers.to(torch.int64)[pages // num_kv_heads]
    return (blocks * num_kv_heads + pages % num_kv_heads) * block_size + offsets


def plan_layer_compaction(
    keep: torch.Tensor, block_ids: torch.Tensor, num_containers: int, block_size: int
) -> LayerCompactionPlan:
    """Plan the moves that pack one layer's kept tokens into head pages.

    keep: [num_kv_heads, evictable_tokens] bool, evictable_tokens a multiple of
        block_size: which tokens of the evictable prefix each head keeps.
    block_ids: the request's block ids (logical order), at least
        evictable_tokens / block_size of them; the first `num_containers`
        become head-page containers.
    Kept tokens stay in position order inside each head.  Sources and
    destinations overlap (the containers are the request's first blocks), so
    the moves must be applied gather-then-scatter.
    """
    num_kv_heads, evictable = keep.shape
    if evictable % block_size:
        raise ValueError(f"evictable length {evictable} is not a multiple of block_size {block_size}")
    kept_len = keep.sum(dim=-1, dtype=torch.int32)
    page_start = page_starts(kept_len, block_size).to(torch.int32)
    total_pages = int(pages_per_head(kept_len, block_size).sum())
    if total_pages > num_containers * num_kv_heads:
        raise ValueError(
            f"layer needs {total_pages} head pages but {num_containers} container blocks hold "
            f"{num_containers * num_kv_heads}"
        )
    heads, positions = keep.nonzero(as_tuple=True)
    # Rank of each kept token inside its head (nonzero() is row-major, so in position order).
    rank = torch.cumsum(keep.to(torch.int32), dim=-1)[heads, positions] - 1
    src = dense_flat_slots(positions, heads, block_ids, num_kv_heads, block_size)
    pages = page_start.to(torch.int64)[heads] + rank // block_size
    dst = page_flat_slots(pages, (rank % block_size).to(torch.int64), block_ids, num_kv_heads, block_size)
    return LayerCompactionPlan(kept_len=kept_len, page_start=page_start, src_slots=src, dst_slots=dst)
