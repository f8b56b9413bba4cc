"""Compaction plans and page geometry, checked token by token on a whole multi-layer cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvzip.block_manager.geometry import CompressionGeometry, cdiv, max_head_pages
from vllm_kvzip.block_manager.plan import (
    RESERVE_FOLDINGS,
    container_blocks_needed,
    container_flat_blocks,
    head_page_spans,
    page_flat_slots,
    pages_per_head,
    plan_request_compaction,
    plan_retirement,
)
from vllm_kvzip.scoring.policies import POLICY_NAMES, keep_by_ratio


def _apply(kv_cache, plan):
    """The compaction as the worker runs it: staged moves through scratch, the others copied directly."""
    from vllm_kvzip.backend.ops import compact_kv_ref

    # The direct moves' sources are never written by the compaction (else they would need staging).
    assert not set(plan.src_slots[plan.num_staged :].tolist()) & set(plan.dst_slots.tolist())
    compact_kv_ref(kv_cache, plan.src_slots, plan.dst_slots, num_staged=plan.num_staged)


def _pair_tokens(kv_cache, kept_len, page_start, layer, head, container_block_ids, num_layers, block_size):
    """What the decode kernels read for (layer, head): its kept tokens, through the page layout."""
    num_kv_heads = kv_cache.shape[1]
    blocks_per_layer = kv_cache.shape[0] // num_layers
    ranks = torch.arange(int(kept_len[layer, head]))
    pages = int(page_start[layer, head]) + ranks // block_size
    containers = container_flat_blocks(torch.as_tensor(container_block_ids), num_layers, blocks_per_layer)
    slots = page_flat_slots(pages, ranks % block_size, containers, num_kv_heads, block_size)
    return kv_cache.view(-1, kv_cache.shape[-1])[slots]


def _labelled_cache(num_layers, blocks_per_layer, num_kv_heads, block_size, physical):
    """Whole cache [L * NB, H, bs, 2]; token (layer l, head h, logical position p) holds
    ((p + 1) * 100 + h) * 10 + l in column 0, so any misplaced row is visible."""
    cache = torch.full((num_layers * blocks_per_layer, num_kv_heads, block_size, 2), -1.0)
    for logical, block in enumerate(physical.tolist()):
        positions = torch.arange(logical * block_size, (logical + 1) * block_size, dtype=torch.float32)
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                cache[layer * blocks_per_layer + block, head, :, 0] = ((positions + 1) * 100 + head) * 10 + layer
    return cache


def _label(layer, head, position):
    return ((position + 1) * 100 + head) * 10 + layer


# ---- the geometry's container bound ----------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    num_layers=st.integers(1, 5),
    num_kv_heads=st.integers(1, 4),
    block_size=st.sampled_from([1, 2, 4, 16]),
    evictable_blocks=st.integers(0, 12),
    tail=st.integers(0, 40),
    keep_ratio=st.floats(0.01, 1.0),
    sinks=st.integers(0, 6),
    policy=st.sampled_from(POLICY_NAMES),
    seed=st.integers(0, 2**16),
    distinct_scores=st.sampled_from([2, 1000]),
)
def test_container_bound_holds_for_every_policy_and_split(
    num_layers, num_kv_heads, block_size, evictable_blocks, tail, keep_ratio, sinks, policy, seed, distinct_scores
):
    """The scheduler's R (`container_blocks`) holds the pages of whatever keep-set the policy picks."""
    window = tail + block_size - 1
    geometry = CompressionGeometry(
        num_tokens=evictable_blocks * block_size + window, block_size=block_size, window=window, keep_ratio=keep_ratio,
        num_kv_heads=num_kv_heads, num_layers=num_layers, policy=policy, sink_tokens=sinks,
    )
    assert geometry.evictable_tokens == evictable_blocks * block_size
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, distinct_scores, (num_layers, num_kv_heads, geometry.evictable_tokens), generator=generator)
    keep = keep_by_ratio(scores.float(), keep_ratio, policy, sink_tokens=sinks, window=0)
    # The total the scheduler assumes is what the policy keeps (the split is the scores').
    assert int(keep.kept_counts.sum()) == geometry.kept_tokens
    pages = sum(cdiv(int(k), block_size) for k in keep.kept_counts.flatten())
    assert pages <= geometry.head_pages <= geometry.container_blocks * num_layers * num_kv_heads


@settings(max_examples=300, deadline=None)
@given(
    num_pairs=st.integers(1, 40),
    block_size=st.sampled_from([1, 3, 16]),
    total=st.integers(0, 2000),
    seed=st.integers(0, 2**16),
)
def test_max_head_pages_bounds_every_split_and_is_reached(num_pairs, block_size, total, seed):
    generator = torch.Generator().manual_seed(seed)
    # A random split of `total` tokens between the pairs.
    cuts = torch.sort(torch.randint(0, total + 1, (num_pairs - 1,), generator=generator)).values.tolist()
    split = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    assert sum(split) == total
    bound = max_head_pages(total, num_pairs, block_size)
    assert sum(cdiv(k, block_size) for k in split) <= bound
    # The worst split: one token in as many pairs as possible, the rest in whole pages.
    worst = [1] * min(total, num_pairs) + [0] * max(0, num_pairs - total)
    worst[0] += total - sum(worst)
    assert sum(cdiv(k, block_size) for k in worst) == bound


def test_geometry_examples():
    # Llama-3.1-8B shapes: 32 layers x 8 KV heads, 8k prompt, keep 0.25, global policy.
    geometry = CompressionGeometry(
        num_tokens=8192, block_size=16, window=128, keep_ratio=0.25, num_kv_heads=8, num_layers=32,
        policy="global", sink_tokens=4,
    )
    assert geometry.dense_start_block == 504 and geometry.evictable_tokens == 8064
    # 256 pairs x 4 sinks + floor(0.25 * 256 * 8060) = 1024 + 515840 kept tokens
    assert geometry.kept_tokens == 516864
    # at most 256 + (516864 - 256) // 16 = 32544 pages, 256 pages per block
    assert geometry.head_pages == 32544 and geometry.container_blocks == 128
    assert geometry.freed_blocks == 376 and geometry.compresses
    # The per-layer policies keep the same total here (no flooring loss), so the same blocks.
    for policy in ("layer", "head", "adakv"):
        other = CompressionGeometry(**{**geometry.__dict__, "policy": policy})
        assert other.kept_tokens == geometry.kept_tokens and other.container_blocks == 128
    short = dict(block_size=16, window=128, num_kv_heads=8, num_layers=32, policy="global")
    assert not CompressionGeometry(num_tokens=100, keep_ratio=0.1, **short).compresses
    assert not CompressionGeometry(num_tokens=4096, keep_ratio=1.0, **short).compresses
    with pytest.raises(ValueError, match="policy"):
        CompressionGeometry(num_tokens=4096, keep_ratio=0.5, **{**short, "policy": "best"})


# ---- keep-ratio compaction: one plan for every layer, moves across layers -------------
@settings(max_examples=80, deadline=None)
@given(
    num_layers=st.integers(1, 4),
    num_kv_heads=st.integers(1, 3),
    evictable_blocks=st.integers(1, 8),
    block_size=st.sampled_from([1, 4, 16]),
    keep_ratio=st.floats(0.05, 1.0),
    policy=st.sampled_from(POLICY_NAMES),
    seed=st.integers(0, 2**16),
    split=st.sampled_from(["scores", "skewed", "empty_pairs", "one_token_pairs"]),
)
def test_plan_packs_every_layer_across_layers(
    num_layers, num_kv_heads, evictable_blocks, block_size, keep_ratio, policy, seed, split
):
    generator = torch.Generator().manual_seed(seed)
    tail_blocks = 2
    evictable = evictable_blocks * block_size
    geometry = CompressionGeometry(
        num_tokens=evictable + tail_blocks * block_size, block_size=block_size, window=tail_blocks * block_size,
        keep_ratio=keep_ratio, num_kv_heads=num_kv_heads, num_layers=num_layers, policy=policy,
    )
    pairs = num_layers * num_kv_heads
    if split == "scores":
        scores = torch.rand(num_layers, num_kv_heads, evictable, generator=generator)
        keep = keep_by_ratio(scores, keep_ratio, policy, sink_tokens=0, window=0).mask
    else:
        # Any split of the geometry's total between the pairs, each pair at most `evictable`.
        counts = [0] * pairs
        remaining = geometry.kept_tokens
        if split == "one_token_pairs":  # as many pairs as possible keep exactly one token
            for pair in range(min(pairs, remaining)):
                counts[pair] = 1
            remaining -= sum(counts)
        weights = torch.rand(pairs, generator=generator)
        if split == "empty_pairs":
            weights[: pairs // 2] = 0
        for pair in torch.argsort(weights, descending=True).tolist():
            if split == "one_token_pairs" and counts[pair] == 1:
                continue  # keep them at one token
            take = min(evictable - counts[pair], remaining)
            counts[pair] += take
            remaining -= take
        for pair in range(pairs):  # whatever is left (only when the one-token pairs cap the others)
            take = min(evictable - counts[pair], remaining)
            counts[pair] += take
            remaining -= take
        assert remaining == 0
        keep = torch.zeros(num_layers, num_kv_heads, evictable, dtype=torch.bool)
        for pair, count in enumerate(counts):
            keep[pair // num_kv_heads, pair % num_kv_heads, torch.randperm(evictable, generator=generator)[:count]] = True
    assert int(keep.sum()) == geometry.kept_tokens

    blocks_per_layer = evictable_blocks + tail_blocks + 3
    physical = torch.randperm(blocks_per_layer, generator=generator)[: evictable_blocks + tail_blocks]
    cache = _labelled_cache(num_layers, blocks_per_layer, num_kv_heads, block_size, physical)
    original = cache.clone()
    plan = plan_request_compaction(keep, physical.to(torch.int32), geometry.container_blocks, block_size, blocks_per_layer)
    _apply(cache, plan)

    assert plan.kept_len.tolist() == keep.sum(-1).tolist()
    containers = physical[: geometry.container_blocks]
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            positions = keep[layer, head].nonzero().flatten().tolist()
            got = _pair_tokens(cache, plan.kept_len, plan.page_start, layer, head, containers, num_layers, block_size)
            assert got[:, 0].tolist() == [_label(layer, head, p) for p in positions]
    # The dense tail of every layer is untouched.
    for layer in range(num_layers):
        tail = (physical[evictable_blocks:] + layer * blocks_per_layer).long()
        assert torch.equal(cache[tail], original[tail])
    # Pages are contiguous per pair, in pair order, and fit the containers.
    pages = (plan.kept_len.long() + block_size - 1) // block_size
    assert plan.page_start.flatten().tolist() == (torch.cumsum(pages.flatten(), 0) - pages.flatten()).tolist()
    assert int(pages.sum()) <= geometry.container_blocks * pairs


def test_plan_moves_a_token_into_another_layers_share():
    """Layer 0 keeps much more than layer 1: its pages continue in layer 1's share of block 0."""
    num_layers, num_kv_heads, block_size = 2, 1, 4
    keep = torch.zeros(num_layers, num_kv_heads, 16, dtype=torch.bool)
    keep[0, 0, :6] = True  # 2 pages: container 0 (layer 0's share) and container 1 (layer 1's share)
    keep[1, 0, 5] = True  # 1 page: container 2 = layer 0's share of block 1
    physical = torch.tensor([3, 0, 2, 1])
    cache = _labelled_cache(num_layers, 5, num_kv_heads, block_size, physical)
    plan = plan_request_compaction(keep, physical, 2, block_size, blocks_per_layer=5)
    _apply(cache, plan)
    assert plan.page_start.tolist() == [[0], [2]]
    flat_rows = cache[:, 0, :, 0]
    assert flat_rows[0 * 5 + 3].tolist() == [_label(0, 0, p) for p in range(4)]  # layer 0's share of block 3
    assert flat_rows[1 * 5 + 3, :2].tolist() == [_label(0, 0, 4), _label(0, 0, 5)]  # layer 1's share of block 3
    assert flat_rows[0 * 5 + 0, 0] == _label(1, 0, 5)  # layer 1's token, in layer 0's share of block 0


def test_plan_refuses_more_pages_than_the_containers_hold():
    keep = torch.ones(2, 2, 32, dtype=torch.bool)  # 2 layers x 2 heads x 2 pages = 8 pages
    with pytest.raises(ValueError, match="needs 8 head pages but 1 container blocks hold 4"):
        plan_request_compaction(keep, torch.arange(4, dtype=torch.int32), 1, block_size=16, blocks_per_layer=4)


# ---- threshold mode: folding dense blocks into the head pages, repeatedly ---------------
@settings(max_examples=80, deadline=None)
@given(
    num_layers=st.integers(1, 4),
    num_kv_heads=st.integers(1, 3),
    block_size=st.sampled_from([1, 4, 16]),
    foldings=st.lists(st.tuples(st.integers(1, 6), st.floats(0.0, 1.0)), min_size=1, max_size=4),
    skew=st.booleans(),
    with_room=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_repeated_retirements_keep_every_kept_token_in_order(
    num_layers, num_kv_heads, block_size, foldings, skew, with_room, seed
):
    """Each folding writes the newly kept tokens after the old ones of their pair, re-packing every
    pair (pages packed across layers, with room for later foldings) when they do not fit; every
    (layer, head) read back through the page layout is exactly its kept tokens in position order,
    pairs never share a page, and the containers stay within the room a re-pack may leave."""
    generator = torch.Generator().manual_seed(seed)
    total_blocks = sum(blocks for blocks, _ in foldings)
    blocks_per_layer = total_blocks + 5
    # Physical ids shuffled: logical order != physical order.
    physical = torch.randperm(blocks_per_layer, generator=generator)[:total_blocks]
    cache = _labelled_cache(num_layers, blocks_per_layer, num_kv_heads, block_size, physical)
    kept_len = torch.zeros(num_layers, num_kv_heads, dtype=torch.int32)
    page_start = torch.zeros_like(kept_len)
    containers = torch.zeros(0, dtype=torch.int64)
    expected = [[[] for _ in range(num_kv_heads)] for _ in range(num_layers)]
    start_block = 0
    # Skewed: layer 0 keeps far more than the others (the busiest layer of a real model).
    layer_scale = torch.tensor([1.0] + [0.2] * (num_layers - 1)) if skew else torch.ones(num_layers)
    for blocks, keep_probability in foldings:
        retired = physical[start_block : start_block + blocks]
        draws = torch.rand(num_layers, num_kv_heads, blocks * block_size, generator=generator)
        keep = draws < keep_probability * layer_scale[:, None, None]
        interval = blocks * block_size if with_room else None  # None: tight, no room for later foldings
        plan = plan_retirement(
            kept_len, page_start, containers, keep, retired, block_size, blocks_per_layer, interval_tokens=interval
        )
        _apply(cache, plan)
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                positions = (keep[layer, head].nonzero().flatten() + start_block * block_size).tolist()
                expected[layer][head] += [_label(layer, head, p) for p in positions]
        held_before = containers.numel()
        if not plan.repacked:  # only the new tokens moved, straight from the folded blocks
            assert plan.new_container_blocks == 0 and plan.num_staged == 0
            assert plan.src_slots.numel() == int(keep.sum())
            assert torch.equal(plan.page_start, page_start.to(torch.int32))
        containers = torch.cat([containers, retired[: plan.new_container_blocks]])
        assert plan.num_container_blocks == containers.numel()
        assert plan.new_container_blocks <= blocks
        # Staging: exactly the moves whose source lies in a container come first (the reference
        # compaction reads every source before writing, so it cannot catch a move staged wrong).
        flat_containers = container_flat_blocks(containers, num_layers, blocks_per_layer)
        rows_per_block = num_kv_heads * block_size
        src_in = torch.isin(plan.src_slots // rows_per_block, flat_containers)
        assert bool(src_in[: plan.num_staged].all()) and not bool(src_in[plan.num_staged :].any())
        assert bool(torch.isin(plan.dst_slots // rows_per_block, flat_containers).all())
        assert plan.dst_slots.unique().numel() == plan.dst_slots.numel()
        kept_len, page_start = plan.kept_len, plan.page_start
        start_block += blocks
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                got = _pair_tokens(cache, kept_len, page_start, layer, head, containers, num_layers, block_size)
                assert got[:, 0].tolist() == expected[layer][head]
        # Every pair's pages lie in its own span (pairs in order, no page shared), inside the containers.
        pages = pages_per_head(kept_len.long(), block_size)
        spans = head_page_spans(page_start, containers.numel())
        assert bool((spans >= pages).all()) and bool((spans >= 0).all())
        # Memory: the tight layout plus at most RESERVE_FOLDINGS foldings like this one per pair (a
        # page at least), or the containers held before.
        tight = container_blocks_needed(kept_len, block_size)
        if with_room:
            room = max(RESERVE_FOLDINGS * blocks * block_size, block_size)
            bound = cdiv(int(pages_per_head(kept_len.long() + room, block_size).sum()), num_layers * num_kv_heads)
            assert tight <= containers.numel() <= max(held_before, bound)
        elif plan.repacked:
            assert containers.numel() == max(held_before, tight)  # the fewest blocks (or those already held)


def test_cross_layer_folding_frees_what_the_average_layer_keeps():
    """One busy layer no longer sizes every layer's containers: 4 layers, layer 0 keeps everything,
    the others nothing; per-layer packing would need all 8 folded blocks, cross-layer packing 2."""
    num_layers, num_kv_heads, block_size, blocks = 4, 2, 4, 8
    keep = torch.zeros(num_layers, num_kv_heads, blocks * block_size, dtype=torch.bool)
    keep[0] = True
    empty = torch.zeros(num_layers, num_kv_heads, dtype=torch.int32)
    plan = plan_retirement(empty, empty, torch.zeros(0, dtype=torch.int64), keep, torch.arange(blocks), block_size, 20)
    assert plan.num_container_blocks == plan.new_container_blocks == 2  # 16 pages / (4 layers x 2 heads)


def _folding_sequence(num_layers, num_kv_heads, block_size, keep_per_block, foldings, blocks_per_folding):
    """Fold `foldings` ranges of `blocks_per_folding` blocks, pair (l, h) keeping `keep_per_block[l, h]`
    tokens of every block; returns the plans, the final layout and the cache read back per pair."""
    total_blocks = foldings * blocks_per_folding
    blocks_per_layer = total_blocks + 2
    physical = torch.arange(total_blocks)
    cache = _labelled_cache(num_layers, blocks_per_layer, num_kv_heads, block_size, physical)
    kept_len = torch.zeros(num_layers, num_kv_heads, dtype=torch.int32)
    page_start = torch.zeros_like(kept_len)
    containers = torch.zeros(0, dtype=torch.int64)
    plans = []
    offsets = torch.arange(block_size)
    for folding in range(foldings):
        retired = physical[folding * blocks_per_folding : (folding + 1) * blocks_per_folding]
        keep = (offsets[None, None, :] < keep_per_block[:, :, None]).repeat(1, 1, blocks_per_folding)
        plan = plan_retirement(
            kept_len, page_start, containers, keep, retired, block_size, blocks_per_layer,
            interval_tokens=blocks_per_folding * block_size,
        )
        _apply(cache, plan)
        plans.append(plan)
        containers = torch.cat([containers, retired[: plan.new_container_blocks]])
        kept_len, page_start = plan.kept_len, plan.page_start
    return plans, kept_len, page_start, containers, cache


def test_a_steady_rate_repacks_once_per_reserved_foldings():
    """Every pair keeps the same share of every folding: a re-pack leaves room for RESERVE_FOLDINGS
    more, so the old tokens move at most once every RESERVE_FOLDINGS + 1 foldings, and the foldings
    in between write only their new tokens and free every folded block."""
    num_layers, num_kv_heads, block_size, foldings, blocks_per_folding = 3, 2, 4, 16, 8
    keep_per_block = torch.tensor([[1, 0], [0, 1], [1, 0]])
    plans, kept_len, page_start, containers, cache = _folding_sequence(
        num_layers, num_kv_heads, block_size, keep_per_block, foldings, blocks_per_folding
    )
    repacks = [index for index, plan in enumerate(plans) if plan.repacked]
    assert repacks[0] == 0
    assert all(b - a >= RESERVE_FOLDINGS + 1 for a, b in zip(repacks, repacks[1:])), repacks
    assert len(repacks) <= cdiv(foldings, RESERVE_FOLDINGS + 1)
    for plan in plans:
        if not plan.repacked:
            assert plan.src_slots.numel() == int(keep_per_block.sum()) * blocks_per_folding
            assert plan.new_container_blocks == 0  # every folded block freed
    _assert_reads_back(cache, kept_len, page_start, containers, keep_per_block, foldings * blocks_per_folding)


def test_room_beyond_the_folded_blocks_shrinks_but_still_saves_repacks():
    """Pairs keep so much of every folding that RESERVE_FOLDINGS foldings of room would need more
    blocks than a folding gives back: the room shrinks so that every folding still frees a block,
    and some foldings still leave the old tokens where they are."""
    num_layers, num_kv_heads, block_size, foldings, blocks_per_folding = 3, 2, 4, 16, 2
    keep_per_block = torch.tensor([[4, 1], [0, 2], [3, 0]])
    plans, kept_len, page_start, containers, cache = _folding_sequence(
        num_layers, num_kv_heads, block_size, keep_per_block, foldings, blocks_per_folding
    )
    assert all(plan.new_container_blocks < blocks_per_folding for plan in plans)  # a block freed each time
    assert 0 < sum(not plan.repacked for plan in plans)
    assert sum(plan.repacked for plan in plans) < foldings
    # Never more containers than the kept tokens need plus a folding's blocks.
    assert containers.numel() <= container_blocks_needed(kept_len, block_size) + blocks_per_folding
    _assert_reads_back(cache, kept_len, page_start, containers, keep_per_block, foldings * blocks_per_folding)


def _assert_reads_back(cache, kept_len, page_start, containers, keep_per_block, total_blocks):
    num_layers, num_kv_heads = keep_per_block.shape
    block_size = cache.shape[2]
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            got = _pair_tokens(cache, kept_len, page_start, layer, head, containers, num_layers, block_size)
            positions = [p for p in range(total_blocks * block_size) if p % block_size < keep_per_block[layer, head]]
            assert got[:, 0].tolist() == [_label(layer, head, p) for p in positions]


def test_a_repack_that_would_keep_every_folded_block_packs_tight():
    """The first folding keeps everything in one layer: room for three more such foldings would
    need more blocks than were folded, so the pairs are packed tight and blocks are still freed."""
    num_layers, num_kv_heads, block_size, blocks = 4, 2, 4, 8
    keep = torch.zeros(num_layers, num_kv_heads, blocks * block_size, dtype=torch.bool)
    keep[0] = True
    empty = torch.zeros(num_layers, num_kv_heads, dtype=torch.int32)
    plan = plan_retirement(empty, empty, torch.zeros(0, dtype=torch.int64), keep, torch.arange(blocks), block_size, 20)
    assert plan.repacked and plan.num_container_blocks == 2  # 16 pages / (4 layers x 2 heads): tight
    assert plan.page_start.flatten().tolist() == [0, 8] + [16] * 6
