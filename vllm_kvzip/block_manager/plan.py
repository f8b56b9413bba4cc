"""Compaction plans: which cache rows move where when a request is compressed.

All layers share one KV buffer (`vllm_kvzip.adapter.kv_cache_api`): layer l's
cache `[NB, H, bs, 2 * head_size]` is a contiguous slice of it, so the whole
cache is also `flat = [L * NB, H, bs, 2 * head_size]`, where *flat block*
`l * NB + b` is layer l's share of vLLM's block b.  A *flat slot* is the row
index into `flat.view(-1, 2 * head_size)`:
`(flat_block * H + head_slot) * bs + offset`.

Head pages are numbered over the request's (layer, KV head) pairs in order
(layer 0 heads 0..H-1, then layer 1, ...): pair (l, h) owns pages
`[page_start[l, h], page_start[l, h] + cdiv(kept_len[l, h], bs))`.  Page `P`
lives in *container* `P // H`, head slot `P % H`, and container `c` is flat
block `(c % L) * NB + container_blocks[c // L]`: the L layer shares of the
request's first block, then those of its second block, and so on.  Consecutive
pages of a pair therefore sit next to each other in memory while they stay in
one container (`[H, bs, ...]` is contiguous), which keeps the decode kernel's
reads long, and a pair's pages may continue in another layer's share or in
the next block.

Everything here is vectorised torch and runs on the cache's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pages_per_head(kept_len: torch.Tensor, block_size: int) -> torch.Tensor:
    return (kept_len + block_size - 1) // block_size


def global_page_starts(kept_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """[L, H] first page of every (layer, head): exclusive prefix sum over the pairs in order."""
    pages = pages_per_head(kept_len, block_size).reshape(-1)
    return (torch.cumsum(pages, dim=0) - pages).reshape(kept_len.shape)


def container_flat_blocks(container_block_ids: torch.Tensor, num_layers: int, blocks_per_layer: int) -> torch.Tensor:
    """Flat block of every container: container c = layer (c % L)'s share of block `container_block_ids[c // L]`."""
    blocks = container_block_ids.to(torch.int64)
    layers = torch.arange(num_layers, device=blocks.device, dtype=torch.int64)
    return (layers[None, :] * blocks_per_layer + blocks[:, None]).reshape(-1)


def dense_flat_slots(
    layers: torch.Tensor,
    positions: torch.Tensor,
    heads: torch.Tensor,
    block_ids: torch.Tensor,
    num_kv_heads: int,
    block_size: int,
    blocks_per_layer: int,
) -> torch.Tensor:
    """Flat slots of tokens at logical `positions` of KV `heads` of `layers` in vLLM's dense layout."""
    blocks = block_ids.to(torch.int64)[positions // block_size] + layers * blocks_per_layer
    return (blocks * num_kv_heads + heads) * block_size + positions % block_size


def page_flat_slots(
    pages: torch.Tensor, offsets: torch.Tensor, containers: torch.Tensor, num_kv_heads: int, block_size: int
) -> torch.Tensor:
    """Flat slots of `offsets` inside global head `pages`; `containers`: flat block of each container."""
    blocks = containers.to(torch.int64)[pages // num_kv_heads]
    return (blocks * num_kv_heads + pages % num_kv_heads) * block_size + offsets


def stage_overwritten_sources(
    src: torch.Tensor, dst: torch.Tensor, containers: torch.Tensor, num_kv_heads: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Moves whose source lies in a container (flat blocks `containers`) first, and their count.

    Every destination is in a container, so only those sources can be
    overwritten before they are read: they go through the compaction's scratch
    (`compact_kv(num_staged=...)`); the others are copied directly, which keeps
    the scratch to the kept rows already inside the containers.
    """
    in_container = torch.isin(src // (num_kv_heads * block_size), containers.to(src.device))
    order = torch.argsort((~in_container).to(torch.int8), stable=True)
    return src[order], dst[order], int(in_container.sum())


def total_head_pages(kept_len: torch.Tensor, block_size: int) -> int:
    return int(pages_per_head(kept_len.to(torch.int64), block_size).sum())


def container_blocks_needed(kept_len: torch.Tensor, block_size: int) -> int:
    """Blocks that hold every head page of `[L, H]` kept counts: `L * H` pages per block."""
    return -(-total_head_pages(kept_len, block_size) // kept_len.numel()) if kept_len.numel() else 0


@dataclass
class RequestCompactionPlan:
    """Moves for every layer of one request, plus the metadata the decode kernels read.

    The moves cross layers (a kept token of layer l may be written into
    another layer's share of a block that still holds sources), so they are
    applied to the flat cache all at once: gather every source, then scatter.
    """

    kept_len: torch.Tensor  # [num_layers, num_kv_heads] int32
    page_start: torch.Tensor  # [num_layers, num_kv_heads] int32, global page index
    src_slots: torch.Tensor  # [num_moves] int64 flat slots, the staged moves first
    dst_slots: torch.Tensor  # [num_moves] int64 flat slots
    num_staged: int  # moves whose source is in a container: read before any write (scratch)


def plan_request_compaction(
    keep: torch.Tensor, block_ids: torch.Tensor, num_container_blocks: int, block_size: int, blocks_per_layer: int
) -> RequestCompactionPlan:
    """Plan the moves that pack every (layer, head)'s kept tokens into the request's head pages.

    keep: [num_layers, num_kv_heads, evictable_tokens] bool, evictable_tokens a
        multiple of block_size: which tokens of the evictable prefix each pair keeps.
    block_ids: the request's block ids (logical order), at least
        evictable_tokens / block_size of them; the first `num_container_blocks`
        hold the head pages in all their layer shares.
    blocks_per_layer: NB, the number of blocks of one layer's cache.
    Kept tokens stay in position order inside each pair.  Sources and
    destinations overlap (the containers are the request's first blocks), so
    the first `num_staged` moves (sources inside the containers) must be
    applied gather-then-scatter; the others read blocks no move writes.
    """
    num_layers, num_kv_heads, evictable = keep.shape
    if evictable % block_size:
        raise ValueError(f"evictable length {evictable} is not a multiple of block_size {block_size}")
    kept_len = keep.sum(dim=-1, dtype=torch.int32)
    page_start = global_page_starts(kept_len, block_size)
    pages = total_head_pages(kept_len, block_size)
    capacity = num_container_blocks * num_layers * num_kv_heads
    if pages > capacity:
        raise ValueError(f"the request needs {pages} head pages but {num_container_blocks} container blocks hold {capacity}")
    layers, heads, positions = keep.nonzero(as_tuple=True)  # layer-major, then head, then position
    rank = torch.cumsum(keep.to(torch.int32), dim=-1)[layers, heads, positions] - 1
    src = dense_flat_slots(layers, positions, heads, block_ids, num_kv_heads, block_size, blocks_per_layer)
    containers = container_flat_blocks(block_ids[:num_container_blocks], num_layers, blocks_per_layer)
    linear_pages = page_start.to(torch.int64)[layers, heads] + rank // block_size
    dst = page_flat_slots(linear_pages, (rank % block_size).to(torch.int64), containers, num_kv_heads, block_size)
    src, dst, num_staged = stage_overwritten_sources(src, dst, containers, num_kv_heads, block_size)
    return RequestCompactionPlan(
        kept_len=kept_len, page_start=page_start.to(torch.int32), src_slots=src, dst_slots=dst, num_staged=num_staged
    )


# ---------------------------------------------------------------------------------
# Threshold mode (KVzap / DMS): data-dependent budgets, decided on the worker
# ---------------------------------------------------------------------------------
def ragged_flat_slots(
    kept_len: torch.Tensor, page_start: torch.Tensor, containers: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every kept token of the ragged region, layer-major then head then rank.

    `containers`: flat block of each container (`container_flat_blocks`).
    Returns `(layers, heads, ranks, flat_slots)` (int64, one entry per token).
    """
    num_layers, num_kv_heads = kept_len.shape
    device = containers.device
    kept = kept_len.to(device=device, dtype=torch.int64)
    longest = int(kept.max()) if kept.numel() else 0
    ranks = torch.arange(longest, device=device)
    present = ranks[None, None, :] < kept[:, :, None]
    layers, heads, token_ranks = present.nonzero(as_tuple=True)
    pages = page_start.to(device=device, dtype=torch.int64)[layers, heads] + token_ranks // block_size
    slots = page_flat_slots(pages, token_ranks % block_size, containers, num_kv_heads, block_size)
    return layers, heads, token_ranks, slots


@dataclass
class RetirementPlan:
    """Fold a block range of the dense tail into the head pages (threshold mode).

    The request's kept tokens so far stay kept; of the retired blocks'
    tokens, those in `keep` join them.  Every (layer, head) is re-packed from
    page 0 into the container blocks (the old ones, then the first blocks of
    the retired range), across layers, so the moves overlap: the staged ones
    (sources in a container) are applied gather-then-scatter on the flat cache.
    """

    kept_len: torch.Tensor  # [L, H] int32, after the retirement
    page_start: torch.Tensor  # [L, H] int32, global page index
    src_slots: torch.Tensor  # [num_moves] int64 flat slots, the staged moves first
    dst_slots: torch.Tensor
    num_staged: int  # moves whose source is in a container (old or new): read before any write
    num_container_blocks: int  # container blocks after the retirement
    new_container_blocks: int  # how many of them are taken from the start of the retired range


def plan_retirement(
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    container_block_ids: torch.Tensor,
    keep: torch.Tensor,
    retired_block_ids: torch.Tensor,
    block_size: int,
    blocks_per_layer: int,
) -> RetirementPlan:
    """Plan folding retired dense blocks into the head pages.

    kept_len / page_start: [L, H] current ragged layout over the container
        blocks `container_block_ids` (physical ids, in container order).
    keep: [L, H, n] bool, n = len(retired_block_ids) * block_size: which
        tokens of the retired blocks (in position order) are kept.
    retired_block_ids: physical ids of the retired dense blocks, in order; the
        first ones become new container blocks when the kept tokens need them.
    """
    num_layers, num_kv_heads, retired_tokens = keep.shape
    if retired_tokens != retired_block_ids.numel() * block_size:
        raise ValueError(f"keep covers {retired_tokens} tokens, the retired blocks hold {retired_block_ids.numel() * block_size}")
    device = keep.device
    old_kept = kept_len.to(device=device, dtype=torch.int64)
    new_kept = old_kept + keep.sum(dim=-1)
    num_blocks = container_blocks_needed(new_kept, block_size)
    held = container_block_ids.numel()
    new_blocks = num_blocks - held
    if new_blocks < 0 or new_blocks > retired_block_ids.numel():
        raise ValueError(f"{num_blocks} container blocks needed: {held} held, {retired_block_ids.numel()} blocks retired")
    old_containers = container_flat_blocks(container_block_ids.to(device), num_layers, blocks_per_layer)
    all_block_ids = torch.cat(
        [container_block_ids.to(device=device, dtype=torch.int64), retired_block_ids.to(device=device, dtype=torch.int64)[:new_blocks]]
    )
    all_containers = container_flat_blocks(all_block_ids, num_layers, blocks_per_layer)
    new_page_start = global_page_starts(new_kept, block_size)
    # Old tokens keep their rank; retired ones follow them in position order.
    old_layers, old_heads, old_ranks, old_src = ragged_flat_slots(old_kept, page_start, old_containers, block_size)
    layers, heads, positions = keep.nonzero(as_tuple=True)
    ranks = old_kept[layers, heads] + torch.cumsum(keep.to(torch.int64), dim=-1)[layers, heads, positions] - 1
    src = dense_flat_slots(layers, positions, heads, retired_block_ids, num_kv_heads, block_size, blocks_per_layer)
    layers = torch.cat([old_layers, layers])
    heads = torch.cat([old_heads, heads])
    ranks = torch.cat([old_ranks, ranks])
    src = torch.cat([old_src, src])
    dst_pages = new_page_start[layers, heads] + ranks // block_size
    dst = page_flat_slots(dst_pages, ranks % block_size, all_containers, num_kv_heads, block_size)
    src, dst, num_staged = stage_overwritten_sources(src, dst, all_containers, num_kv_heads, block_size)
    return RetirementPlan(
        kept_len=new_kept.to(torch.int32),
        page_start=new_page_start.to(torch.int32),
        src_slots=src,
        dst_slots=dst,
        num_staged=num_staged,
        num_container_blocks=num_blocks,
        new_container_blocks=new_blocks,
    )
