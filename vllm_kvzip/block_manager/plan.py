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


def page_starts(pages: torch.Tensor) -> torch.Tensor:
    """[L, H] first page of every (layer, head) given the pages each one gets: exclusive prefix
    sum over the pairs in order."""
    flat = pages.reshape(-1)
    return (torch.cumsum(flat, dim=0) - flat).reshape(pages.shape)


def global_page_starts(kept_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """[L, H] first page of every (layer, head) when each gets just the pages its kept tokens fill."""
    return page_starts(pages_per_head(kept_len, block_size))


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

    Built without reading anything back from the device (`plan_request_compaction`
    with `num_kept`): the move count is the policy's fixed total, and the numbers
    the host needs before it may launch the moves (the staged count, and the
    counts that check the plan) wait in `counts` until `resolve` reads them.
    """

    kept_len: torch.Tensor  # [num_layers, num_kv_heads] int32
    page_start: torch.Tensor  # [num_layers, num_kv_heads] int32, global page index
    src_slots: torch.Tensor  # [num_moves] int64 flat slots, the staged moves first
    dst_slots: torch.Tensor  # [num_moves] int64 flat slots
    # int64 [3] on the plan's device: kept tokens, staged moves, head pages.
    counts: torch.Tensor
    capacity_pages: int  # head pages the containers hold
    num_staged: int | None = None  # moves whose source is in a container: read before any write (scratch)

    def resolve(self, host_counts: list[int] | None = None) -> "RequestCompactionPlan":
        """Check the plan against the read-back `counts` (read here when not given) and set `num_staged`."""
        kept, staged, pages = host_counts if host_counts is not None else self.counts.tolist()
        moves = self.src_slots.numel()
        if kept != moves:
            raise ValueError(f"the keep mask holds {kept} tokens but the policy's budget is {moves}")
        if pages > self.capacity_pages:
            raise ValueError(
                f"the request needs {pages} head pages but {self.capacity_pages // self.kept_len.numel()} "
                f"container blocks hold {self.capacity_pages}"
            )
        self.num_staged = staged
        return self


def kept_flat_indices(keep: torch.Tensor, num_kept: int) -> torch.Tensor:
    """The flat indices of `keep`'s True entries in order (`keep.flatten().nonzero()`), for a known count.

    `nonzero` must read its output size back from the device; with the count known
    this is a scatter of every True entry to its rank.  Entries past `num_kept`
    (a mask holding more than it should) land on a spare last row and are
    dropped; `RequestCompactionPlan.resolve` then reports the mismatch.
    """
    flat = keep.reshape(-1)
    rank = torch.cumsum(flat, dim=0) - 1
    target = torch.where(flat & (rank < num_kept), rank, num_kept)
    index = torch.zeros(num_kept + 1, dtype=torch.int64, device=keep.device)
    index.scatter_(0, target, torch.arange(flat.numel(), device=keep.device))
    return index[:num_kept]


def plan_request_compaction(
    keep: torch.Tensor,
    block_ids: torch.Tensor,
    num_container_blocks: int,
    block_size: int,
    blocks_per_layer: int,
    num_kept: int | None = None,
) -> RequestCompactionPlan:
    """Plan the moves that pack every (layer, head)'s kept tokens into the request's head pages.

    keep: [num_layers, num_kv_heads, evictable_tokens] bool, evictable_tokens a
        multiple of block_size: which tokens of the evictable prefix each pair keeps.
    block_ids: the request's block ids (logical order, distinct, as in any vLLM
        block table row), at least evictable_tokens / block_size of them; the
        first `num_container_blocks` hold the head pages in all their layer shares.
    blocks_per_layer: NB, the number of blocks of one layer's cache.
    num_kept: the mask's True count when the caller knows it (the policy's fixed
        budget): then nothing is read back from the device and the plan comes
        unresolved (`resolve` later, once its `counts` have reached the host);
        None: counted here and resolved at once.
    Kept tokens stay in position order inside each pair.  Sources and
    destinations overlap (the containers are the request's first blocks), so
    the first `num_staged` moves (sources inside the containers) must be
    applied gather-then-scatter; the others read blocks no move writes.
    """
    num_layers, num_kv_heads, evictable = keep.shape
    if evictable % block_size:
        raise ValueError(f"evictable length {evictable} is not a multiple of block_size {block_size}")
    resolve_now = num_kept is None
    if resolve_now:
        num_kept = int(keep.sum())
    kept_len = keep.sum(dim=-1, dtype=torch.int32)
    page_start = global_page_starts(kept_len, block_size)
    flat_index = kept_flat_indices(keep, num_kept)  # layer-major, then head, then position
    layers = flat_index // (num_kv_heads * evictable)
    heads = (flat_index // evictable) % num_kv_heads
    positions = flat_index % evictable
    # The i-th kept token overall is the (i - first of its pair)-th of its pair: flat_index is in
    # pair order, and each pair's first index is the exclusive prefix sum of the kept counts.
    pair_first = page_starts(kept_len.to(torch.int64))
    rank = torch.arange(num_kept, device=keep.device) - pair_first[layers, heads]
    src = dense_flat_slots(layers, positions, heads, block_ids, num_kv_heads, block_size, blocks_per_layer)
    containers = container_flat_blocks(block_ids[:num_container_blocks], num_layers, blocks_per_layer)
    capacity_pages = num_container_blocks * num_layers * num_kv_heads
    if num_kept and not capacity_pages:
        raise ValueError(f"the request keeps {num_kept} tokens but has no container block")
    linear_pages = page_start.to(torch.int64)[layers, heads] + rank // block_size
    # Pages past the containers mean a plan that `resolve` refuses; clamped so that the plan can be
    # built (and refused) without a device-side out-of-bounds index.
    linear_pages = linear_pages.clamp(max=capacity_pages - 1)
    dst = page_flat_slots(linear_pages, (rank % block_size).to(torch.int64), containers, num_kv_heads, block_size)
    # Every destination is in a container, so only sources inside one can be overwritten before
    # they are read: they go first, through the compaction's scratch.  The containers are the
    # request's first blocks in every layer and a block table row holds distinct ids, so those
    # sources are the ones at positions before the containers' end.
    in_container = positions < num_container_blocks * block_size
    order = torch.argsort((~in_container).to(torch.int8), stable=True)
    counts = torch.stack(
        [
            kept_len.sum(dtype=torch.int64),
            in_container.sum(dtype=torch.int64),
            pages_per_head(kept_len.to(torch.int64), block_size).sum(),
        ]
    )
    plan = RequestCompactionPlan(
        kept_len=kept_len,
        page_start=page_start.to(torch.int32),
        src_slots=src[order],
        dst_slots=dst[order],
        counts=counts,
        capacity_pages=capacity_pages,
    )
    return plan.resolve() if resolve_now else plan


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
    longest = int(kept_len.max()) if kept_len.numel() else 0  # no device sync when kept_len is on the host
    kept = kept_len.to(device=device, dtype=torch.int64)
    ranks = torch.arange(longest, device=device)
    present = ranks[None, None, :] < kept[:, :, None]
    layers, heads, token_ranks = present.nonzero(as_tuple=True)
    pages = page_start.to(device=device, dtype=torch.int64)[layers, heads] + token_ranks // block_size
    slots = page_flat_slots(pages, token_ranks % block_size, containers, num_kv_heads, block_size)
    return layers, heads, token_ranks, slots


# A re-pack gives every pair room for this many more foldings at the rate it kept tokens in the
# folding that re-packed (at least one spare page): with contiguous head pages, a pair that
# outgrows its pages shifts every pair after it, so re-packing at every folding would move all of
# the request's kept tokens every `window` decode steps (measured on the H100: 3.1 ms per folding,
# 15% of a 512 + 8192 generation).  In between, a folding only writes its newly kept tokens.
RESERVE_FOLDINGS = 3


def head_page_spans(page_start: torch.Tensor, num_container_blocks: int) -> torch.Tensor:
    """[L, H] pages each pair may fill before the next pair's pages (the last: up to the containers' end)."""
    starts = page_start.reshape(-1).to(torch.int64)
    end = torch.full((1,), num_container_blocks * starts.numel(), dtype=torch.int64, device=starts.device)
    return (torch.cat([starts[1:], end]) - starts).reshape(page_start.shape)


def reserved_head_pages(new_kept: torch.Tensor, added: torch.Tensor, folded_tokens: int, interval_tokens: int,
                        block_size: int) -> torch.Tensor:
    """[L, H] pages a re-pack gives each pair: its kept tokens, plus RESERVE_FOLDINGS foldings of
    `interval_tokens` at the rate it kept this folding's `folded_tokens` (at least one page)."""
    slack = -(-RESERVE_FOLDINGS * interval_tokens * added // max(1, folded_tokens))  # ceil, integers
    return pages_per_head(new_kept + slack.clamp(min=block_size), block_size)


@dataclass
class RetirementLayout:
    """Where every pair's pages are after a folding: the decisions, without the moves.

    `repacked` False: every pair's kept tokens still fit the pages it had, nothing old moves and
    no container is added.  True: pairs laid out again from page 0, with room (RESERVE_FOLDINGS)
    as far as the folded blocks allow while one of them is freed.
    """

    kept_len: torch.Tensor  # [L, H] int64
    page_start: torch.Tensor  # [L, H] int64
    num_container_blocks: int
    new_container_blocks: int
    repacked: bool


def plan_retirement_layout(
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    held_blocks: int,
    added: torch.Tensor,
    folded_tokens: int,
    folded_blocks: int,
    block_size: int,
    interval_tokens: int | None,
) -> RetirementLayout:
    """The layout after folding `folded_blocks` dense blocks whose kept counts per pair are `added`.

    The worker (`plan_retirement`) and the transformers reference of the vLLM path
    (`vllm_kvzip.scoring.vllm_reference`) both decide with this function.  Raises when even the
    tight layout needs more containers than the held and folded blocks.  `interval_tokens` None:
    a re-pack leaves no room (the tight layout).
    """
    old = kept_len.to(torch.int64)
    added = added.to(device=old.device, dtype=torch.int64)
    new_kept = old + added
    needed = pages_per_head(new_kept, block_size)
    page_start = page_start.to(device=old.device, dtype=torch.int64)
    if bool((needed <= head_page_spans(page_start, held_blocks)).all()):
        return RetirementLayout(new_kept, page_start, held_blocks, 0, repacked=False)
    pairs = new_kept.numel()
    if interval_tokens is None:
        reserved = needed
    else:
        reserved = reserved_head_pages(new_kept, added, folded_tokens, interval_tokens, block_size)
    reserved_total, needed_total = torch.stack([reserved.sum(), needed.sum()]).tolist()
    # The room comes out of the folded blocks (the only blocks that can become containers), and a
    # folding frees at least one of them: past that, every pair's room shrinks in proportion.
    room_cap = (held_blocks + folded_blocks - 1) * pairs
    if reserved_total <= room_cap:
        pages, total = reserved, reserved_total
    elif needed_total <= room_cap:
        pages = needed + (reserved - needed) * (room_cap - needed_total) // (reserved_total - needed_total)
        total = int(pages.sum())
    else:
        pages, total = needed, needed_total  # frees nothing: the caller skips it, or it does not fit
    blocks = max(held_blocks, -(-total // pairs))
    if blocks > held_blocks + folded_blocks:
        raise ValueError(f"{blocks} container blocks needed: {held_blocks} held, {folded_blocks} blocks retired")
    return RetirementLayout(new_kept, page_starts(pages), blocks, blocks - held_blocks, repacked=True)


@dataclass
class RetirementPlan:
    """Fold a block range of the dense tail into the head pages (threshold mode).

    The request's kept tokens so far stay kept; of the retired blocks'
    tokens, those in `keep` join them.  When they fit the pairs' pages
    (`repacked` False) only the new tokens move, from retired blocks into
    containers, so nothing is staged.  Otherwise every (layer, head) is
    re-packed from page 0 into the container blocks (the old ones, then the
    first blocks of the retired range), across layers, so the moves overlap:
    the staged ones (sources in a container) are applied gather-then-scatter
    on the flat cache.  `kept_len` and `page_start` are host tensors (the
    caller copies them into its page table and passes them back next time).
    """

    kept_len: torch.Tensor  # [L, H] int32 on the host, after the retirement
    page_start: torch.Tensor  # [L, H] int32 on the host, global page index
    src_slots: torch.Tensor  # [num_moves] int64 flat slots on keep's device, the staged moves first
    dst_slots: torch.Tensor
    num_staged: int  # moves whose source is in a container (old or new): read before any write
    num_container_blocks: int  # container blocks after the retirement
    new_container_blocks: int  # how many of them are taken from the start of the retired range
    repacked: bool = True  # False: the old kept tokens stayed where they were


def plan_retirement(
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    container_block_ids: torch.Tensor,
    keep: torch.Tensor,
    retired_block_ids: torch.Tensor,
    block_size: int,
    blocks_per_layer: int,
    interval_tokens: int | None = None,
) -> RetirementPlan:
    """Plan folding retired dense blocks into the head pages.

    kept_len / page_start: [L, H] current ragged layout over the container
        blocks `container_block_ids` (physical ids, in container order); best
        on the host (the layout is decided there), any device works.
    keep: [L, H, n] bool, n = len(retired_block_ids) * block_size: which
        tokens of the retired blocks (in position order) are kept.
    retired_block_ids: physical ids of the retired dense blocks, in order; the
        first ones become new container blocks when the kept tokens need them.
    interval_tokens: tokens between two foldings, which sizes the room a
        re-pack leaves (None: no room, every pair packed tight).

    A folding runs every `window` decode steps per request, and with small
    tensors its cost is the number of operations, not their size: the layout
    is decided on the host from one copy of the per-block kept counts, and on
    the device only the moves are computed (no search for staged sources: they
    are known by construction).
    """
    num_layers, num_kv_heads, retired_tokens = keep.shape
    num_retired = retired_block_ids.numel()
    if retired_tokens != num_retired * block_size:
        raise ValueError(f"keep covers {retired_tokens} tokens, the retired blocks hold {num_retired * block_size}")
    device = keep.device
    held = container_block_ids.numel()
    # Kept tokens per (layer, head, retired block): the one device -> host copy of the plan.
    kept_per_block = keep.reshape(num_layers, num_kv_heads, num_retired, block_size).sum(dim=-1).cpu()
    old_kept = kept_len.to(device="cpu", dtype=torch.int64)
    layout = plan_retirement_layout(
        old_kept, page_start.to("cpu"), held, kept_per_block.sum(dim=-1), retired_tokens, num_retired, block_size,
        interval_tokens,
    )
    new_blocks = layout.new_container_blocks
    all_containers = container_flat_blocks(
        torch.cat([container_block_ids.to(torch.int64).cpu(), retired_block_ids[:new_blocks].to(torch.int64).cpu()]),
        num_layers, blocks_per_layer,
    ).to(device)
    # Newly kept tokens, position-major: those in the retired blocks that become containers come
    # first, and those are exactly the new tokens whose source a re-pack may overwrite.
    positions, layers, heads = keep.permute(2, 0, 1).nonzero(as_tuple=True)
    ranks = (
        old_kept.to(device)[layers, heads]
        + torch.cumsum(keep, dim=-1, dtype=torch.int64)[layers, heads, positions]
        - 1
    )
    src = dense_flat_slots(
        layers, positions, heads, retired_block_ids.to(device=device, dtype=torch.int64), num_kv_heads, block_size,
        blocks_per_layer,
    )
    if layout.repacked:
        # Old tokens keep their rank and move to their pair's new pages; all of them are read from
        # containers, so they are staged, followed by the new tokens read from the new containers.
        old_containers = all_containers[: held * num_layers]
        old_layers, old_heads, old_ranks, old_src = ragged_flat_slots(old_kept, page_start, old_containers, block_size)
        layers = torch.cat([old_layers, layers])
        heads = torch.cat([old_heads, heads])
        ranks = torch.cat([old_ranks, ranks])
        src = torch.cat([old_src, src])
        num_staged = int(old_kept.sum()) + int(kept_per_block[:, :, :new_blocks].sum())
    else:
        num_staged = 0  # sources in retired blocks that stay out of the containers, destinations in containers
    dst_pages = layout.page_start.to(device)[layers, heads] + ranks // block_size
    dst = page_flat_slots(dst_pages, ranks % block_size, all_containers, num_kv_heads, block_size)
    return RetirementPlan(
        kept_len=layout.kept_len.to(torch.int32),
        page_start=layout.page_start.to(torch.int32),
        src_slots=src,
        dst_slots=dst,
        num_staged=num_staged,
        num_container_blocks=layout.num_container_blocks,
        new_container_blocks=new_blocks,
        repacked=layout.repacked,
    )
