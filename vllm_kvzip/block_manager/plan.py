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


@dataclass
class RequestCompactionPlan:
    """Moves for every layer of one request (layer-major), with each layer's share."""

    kept_len: torch.Tensor  # [num_layers, num_kv_heads] int32
    page_start: torch.Tensor  # [num_layers, num_kv_heads] int32
    src_slots: torch.Tensor  # [num_moves] int64, layer 0's moves first
    dst_slots: torch.Tensor  # [num_moves] int64
    moves_per_layer: list[int]

    def layer(self, index: int) -> LayerCompactionPlan:
        start = sum(self.moves_per_layer[:index])
        end = start + self.moves_per_layer[index]
        return LayerCompactionPlan(
            kept_len=self.kept_len[index],
            page_start=self.page_start[index],
            src_slots=self.src_slots[start:end],
            dst_slots=self.dst_slots[start:end],
        )


def plan_request_compaction(
    keep: torch.Tensor, block_ids: torch.Tensor, num_containers: int, block_size: int
) -> RequestCompactionPlan:
    """Plan the moves that pack every layer's kept tokens into its head pages.

    keep: [num_layers, num_kv_heads, evictable_tokens] bool, evictable_tokens a
        multiple of block_size: which tokens of the evictable prefix each head keeps.
    block_ids: the request's block ids (logical order), at least
        evictable_tokens / block_size of them; the first `num_containers`
        become head-page containers in every layer.
    Kept tokens stay in position order inside each head.  Sources and
    destinations overlap (the containers are the request's first blocks), so
    the moves must be applied gather-then-scatter.  Vectorised over layers: two
    host synchronisations per request, whatever the number of layers.
    """
    num_layers, num_kv_heads, evictable = keep.shape
    if evictable % block_size:
        raise ValueError(f"evictable length {evictable} is not a multiple of block_size {block_size}")
    kept_len = keep.sum(dim=-1, dtype=torch.int32)
    pages = pages_per_head(kept_len, block_size)
    page_start = (torch.cumsum(pages, dim=-1) - pages).to(torch.int32)
    # One host copy: pages and moves per layer.
    per_layer = torch.stack([pages.sum(dim=-1), kept_len.sum(dim=-1)]).tolist()
    capacity = num_containers * num_kv_heads
    for layer, layer_pages in enumerate(per_layer[0]):
        if layer_pages > capacity:
            raise ValueError(
                f"layer {layer} needs {layer_pages} head pages but {num_containers} container blocks hold {capacity}"
            )
    layers, heads, positions = keep.nonzero(as_tuple=True)  # layer-major, then head, then position
    rank = torch.cumsum(keep.to(torch.int32), dim=-1)[layers, heads, positions] - 1
    src = dense_flat_slots(positions, heads, block_ids, num_kv_heads, block_size)
    linear_pages = page_start.to(torch.int64)[layers, heads] + rank // block_size
    dst = page_flat_slots(linear_pages, (rank % block_size).to(torch.int64), block_ids, num_kv_heads, block_size)
    return RequestCompactionPlan(
        kept_len=kept_len, page_start=page_start, src_slots=src, dst_slots=dst, moves_per_layer=per_layer[1]
    )


def plan_layer_compaction(
    keep: torch.Tensor, block_ids: torch.Tensor, num_containers: int, block_size: int
) -> LayerCompactionPlan:
    """`plan_request_compaction` for one layer: keep is [num_kv_heads, evictable_tokens]."""
    return plan_request_compaction(keep[None], block_ids, num_containers, block_size).layer(0)


# ---------------------------------------------------------------------------------
# Threshold mode (KVzap / DMS): data-dependent budgets, decided on the worker
# ---------------------------------------------------------------------------------
def containers_needed(kept_len: torch.Tensor, block_size: int) -> int:
    """Container blocks that hold every layer's head pages: `[num_layers, num_kv_heads]` kept counts.

    A block holds `num_kv_heads` head pages per layer and every layer packs its
    heads' pages linearly, so the busiest layer decides.
    """
    num_kv_heads = kept_len.shape[-1]
    pages = pages_per_head(kept_len.to(torch.int64), block_size).sum(dim=-1)
    busiest = int(pages.max()) if pages.numel() else 0
    return -(-busiest // num_kv_heads)


def ragged_flat_slots(
    kept_len: torch.Tensor, page_start: torch.Tensor, containers: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every kept token of the ragged region, layer-major then head then rank.

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
    page 0 into `containers` (the old containers, then the first blocks of the
    retired range), so the moves overlap and must be applied gather-then-scatter.
    """

    kept_len: torch.Tensor  # [L, H] int32, after the retirement
    page_start: torch.Tensor  # [L, H] int32
    src_slots: torch.Tensor  # [num_moves] int64, layer-major
    dst_slots: torch.Tensor
    moves_per_layer: list[int]
    num_containers: int  # container blocks after the retirement
    new_containers: int  # how many of them are taken from the start of the retired range


def plan_retirement(
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    containers: torch.Tensor,
    keep: torch.Tensor,
    retired_block_ids: torch.Tensor,
    block_size: int,
) -> RetirementPlan:
    """Plan folding retired dense blocks into the head pages.

    kept_len / page_start: [L, H] current ragged layout over `containers`
        (physical block ids, in page order).
    keep: [L, H, n] bool, n = len(retired_block_ids) * block_size: which
        tokens of the retired blocks (in position order) are kept.
    retired_block_ids: physical ids of the retired dense blocks, in order; the
        first ones become new containers when the kept tokens need them.
    """
    num_layers, num_kv_heads, retired_tokens = keep.shape
    if retired_tokens != retired_block_ids.numel() * block_size:
        raise ValueError(f"keep covers {retired_tokens} tokens, the retired blocks hold {retired_block_ids.numel() * block_size}")
    device = keep.device
    old_kept = kept_len.to(device=device, dtype=torch.int64)
    new_kept = old_kept + keep.sum(dim=-1)
    num_containers = containers_needed(new_kept, block_size)
    new_containers = num_containers - containers.numel()
    if new_containers < 0 or new_containers > retired_block_ids.numel():
        raise ValueError(
            f"{num_containers} containers needed: {containers.numel()} held, {retired_block_ids.numel()} blocks retired"
        )
    all_containers = torch.cat([containers.to(device=device, dtype=torch.int64), retired_block_ids.to(device=device, dtype=torch.int64)[:new_containers]])
    pages = pages_per_head(new_kept, block_size)
    new_page_start = torch.cumsum(pages, dim=-1) - pages
    # Old tokens keep their rank; retired ones follow them in position order.
    old_layers, old_heads, old_ranks, old_src = ragged_flat_slots(old_kept, page_start, containers.to(device), block_size)
    layers, heads, positions = keep.nonzero(as_tuple=True)
    ranks = old_kept[layers, heads] + torch.cumsum(keep.to(torch.int64), dim=-1)[layers, heads, positions] - 1
    src = dense_flat_slots(positions, heads, retired_block_ids, num_kv_heads, block_size)
    layers = torch.cat([old_layers, layers])
    heads = torch.cat([old_heads, heads])
    ranks = torch.cat([old_ranks, ranks])
    src = torch.cat([old_src, src])
    order = torch.argsort(layers, stable=True)  # layer-major, as compaction is applied per layer
    layers, heads, ranks, src = layers[order], heads[order], ranks[order], src[order]
    dst_pages = new_page_start[layers, heads] + ranks // block_size
    dst = page_flat_slots(dst_pages, ranks % block_size, all_containers, num_kv_heads, block_size)
    moves_per_layer = torch.bincount(layers, minlength=num_layers).tolist()
    return RetirementPlan(
        kept_len=new_kept.to(torch.int32),
        page_start=new_page_start.to(torch.int32),
        src_slots=src,
        dst_slots=dst,
        moves_per_layer=moves_per_layer,
        num_containers=num_containers,
        new_containers=new_containers,
    )
