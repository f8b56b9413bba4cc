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
