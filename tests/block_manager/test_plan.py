"""Compaction plans and page geometry, checked token by token."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvzip.block_manager.geometry import CompressionGeometry, cdiv
from vllm_kvzip.block_manager.plan import page_flat_slots, plan_layer_compaction


def _apply(kv_cache, plan):
    rows = kv_cache.view(-1, kv_cache.shape[-1])
    moved = rows[plan.src_slots].clone()  # gather first: sources and destinations overlap
    rows[plan.dst_slots] = moved


def _head_tokens(kv_cache, plan, head, containers, block_size):
    num_kv_heads = kv_cache.shape[1]
    ranks = torch.arange(int(plan.kept_len[head]))
    pages = plan.page_start[head].long() + ranks // block_size
    slots = page_flat_slots(pages, ranks % block_size, containers, num_kv_heads, block_size)
    return kv_cache.view(-1, kv_cache.shape[-1])[slots]


@settings(max_examples=60, deadline=None)
@given(
    num_kv_heads=st.integers(1, 4),
    evictable_blocks=st.integers(1, 12),
    block_size=st.sampled_from([1, 4, 16]),
    keep_ratio=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    split=st.sampled_from(["uniform", "skewed", "empty_head", "one_token_head"]),
)
def test_plan_packs_exactly_the_kept_tokens(num_kv_heads, evictable_blocks, block_size, keep_ratio, seed, split):
    generator = torch.Generator().manual_seed(seed)
    tail_blocks = 2
    num_blocks = evictable_blocks + tail_blocks + 3
    evictable = evictable_blocks * block_size
    geometry = CompressionGeometry(
        num_tokens=evictable + tail_blocks * block_size,
        block_size=block_size,
        window=tail_blocks * block_size,
        keep_ratio=keep_ratio,
        num_kv_heads=num_kv_heads,
    )
    assert geometry.evictable_tokens == evictable
    budget = geometry.layer_budget
    # Split the layer budget between heads, each head at most `evictable`.
    if split == "one_token_head" and budget < 1:
        split = "uniform"  # no budget to give a head its one token
    if split == "uniform":
        counts = [geometry.per_head_budget] * num_kv_heads
    else:
        weights = torch.rand(num_kv_heads, generator=generator)
        if split == "empty_head":
            weights[0] = 0
        if split == "one_token_head":
            weights[0] = 0
        counts = [0] * num_kv_heads
        remaining = budget - (1 if split == "one_token_head" else 0)
        if split == "one_token_head":
            counts[0] = 1
        order = torch.argsort(weights, descending=True).tolist()
        for head in order:
            take = min(evictable - counts[head], remaining)
            counts[head] += take
            remaining -= take
    keep = torch.zeros(num_kv_heads, evictable, dtype=torch.bool)
    for head, count in enumerate(counts):
        keep[head, torch.randperm(evictable, generator=generator)[:count]] = True

    block_ids = torch.randperm(num_blocks, generator=generator)[: evictable_blocks + tail_blocks].to(torch.int32)
    kv_cache = torch.randn(num_blocks, num_kv_heads, block_size, 8, generator=generator)
    original = kv_cache.clone()
    containers = block_ids[: max(geometry.container_blocks, 1)]
    plan = plan_layer_compaction(keep, block_ids, geometry.container_blocks, block_size)
    _apply(kv_cache, plan)

    assert plan.kept_len.tolist() == counts
    for head in range(num_kv_heads):
        positions = keep[head].nonzero().flatten()
        expected = original[block_ids[positions // block_size].long(), head, positions % block_size]
        torch.testing.assert_close(_head_tokens(kv_cache, plan, head, containers, block_size), expected, rtol=0, atol=0)
    # The dense tail blocks are untouched.
    tail = block_ids[evictable_blocks:].long()
    torch.testing.assert_close(kv_cache[tail], original[tail], rtol=0, atol=0)
    # Pages never leave the containers and never overlap.
    pages = sum(cdiv(c, block_size) for c in counts)
    assert pages <= geometry.head_pages_per_layer


def test_plan_refuses_more_pages_than_the_containers_hold():
    keep = torch.ones(2, 32, dtype=torch.bool)
    try:
        plan_layer_compaction(keep, torch.arange(4, dtype=torch.int32), num_containers=1, block_size=16)
    except ValueError as error:
        assert "needs 4 head pages but 1 container blocks hold 2" in str(error)
    else:
        raise AssertionError("an overfull plan was accepted")


def test_geometry_examples():
    geometry = CompressionGeometry(num_tokens=8192, block_size=16, window=128, keep_ratio=0.25, num_kv_heads=8)
    assert geometry.dense_start_block == 504 and geometry.evictable_tokens == 8064
    assert geometry.per_head_budget == 2016 and geometry.container_blocks == 127
    assert geometry.freed_blocks == 377 and geometry.compresses
    assert not CompressionGeometry(num_tokens=100, block_size=16, window=128, keep_ratio=0.1, num_kv_heads=8).compresses
    assert not CompressionGeometry(num_tokens=4096, block_size=16, window=128, keep_ratio=1.0, num_kv_heads=8).compresses


def test_request_plan_packs_every_layer_into_its_own_cache():
    from vllm_kvzip.block_manager.plan import plan_request_compaction

    generator = torch.Generator().manual_seed(7)
    num_layers, num_kv_heads, block_size, evictable_blocks = 3, 2, 4, 6
    evictable = evictable_blocks * block_size
    keep = torch.rand(num_layers, num_kv_heads, evictable, generator=generator) < 0.3
    keep[1, 0] = False  # a head that keeps nothing
    keep[2, 1] = False
    keep[2, 1, 5] = True  # a head that keeps one token
    block_ids = torch.randperm(20, generator=generator)[: evictable_blocks + 1].to(torch.int32)
    caches = [torch.randn(20, num_kv_heads, block_size, 4, generator=generator) for _ in range(num_layers)]
    originals = [cache.clone() for cache in caches]
    plan = plan_request_compaction(keep, block_ids, num_containers=evictable_blocks, block_size=block_size)
    assert plan.moves_per_layer == keep.sum(dim=(1, 2)).tolist()
    for layer in range(num_layers):
        layer_plan = plan.layer(layer)
        _apply(caches[layer], layer_plan)
        for head in range(num_kv_heads):
            positions = keep[layer, head].nonzero().flatten()
            expected = originals[layer][block_ids[positions // block_size].long(), head, positions % block_size]
            got = _head_tokens(caches[layer], layer_plan, head, block_ids, block_size)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- threshold mode: folding dense blocks into the head pages, repeatedly ---------------
@settings(max_examples=60, deadline=None)
@given(
    num_layers=st.integers(1, 3),
    num_kv_heads=st.integers(1, 4),
    block_size=st.sampled_from([1, 4, 16]),
    foldings=st.lists(st.tuples(st.integers(1, 6), st.floats(0.0, 1.0)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_repeated_retirements_keep_every_kept_token_in_order(num_layers, num_kv_heads, block_size, foldings, seed):
    """Each folding re-packs old kept tokens + newly kept ones into the fewest containers;
    the content of every (layer, head) read back through the page layout is exactly
    its kept tokens in position order, and blocks never used as containers are free."""
    from vllm_kvzip.block_manager.plan import containers_needed, plan_retirement

    generator = torch.Generator().manual_seed(seed)
    total_blocks = sum(blocks for blocks, _ in foldings)
    # Physical ids shuffled: logical order != physical order.
    physical = torch.randperm(total_blocks + 5, generator=generator)[:total_blocks]
    width = 2
    # One cache per layer; token (layer, head, position) has the value (position + 1) * 10 + head.
    caches = [torch.zeros(total_blocks + 5, num_kv_heads, block_size, width) for _ in range(num_layers)]
    for layer_cache in caches:
        for logical in range(total_blocks):
            for head in range(num_kv_heads):
                positions = torch.arange(logical * block_size, (logical + 1) * block_size, dtype=torch.float32)
                layer_cache[physical[logical], head, :, 0] = (positions + 1) * 10 + head
    kept_len = torch.zeros(num_layers, num_kv_heads, dtype=torch.int32)
    page_start = torch.zeros_like(kept_len)
    containers = torch.zeros(0, dtype=torch.int64)
    expected = [[[] for _ in range(num_kv_heads)] for _ in range(num_layers)]
    start_block = 0
    for blocks, keep_probability in foldings:
        retired = physical[start_block : start_block + blocks]
        keep = torch.rand(num_layers, num_kv_heads, blocks * block_size, generator=generator) < keep_probability
        try:
            plan = plan_retirement(kept_len, page_start, containers, keep, retired, block_size)
        except ValueError:
            # More containers than the retired blocks can give: only possible when nothing is freed.
            needed = containers_needed(kept_len.long() + keep.sum(-1), block_size)
            assert needed - containers.numel() > blocks
            return
        for layer in range(num_layers):
            begin = sum(plan.moves_per_layer[:layer])
            end = begin + plan.moves_per_layer[layer]
            _apply(caches[layer], type("P", (), {"src_slots": plan.src_slots[begin:end], "dst_slots": plan.dst_slots[begin:end]}))
            for head in range(num_kv_heads):
                positions = (keep[layer, head].nonzero().flatten() + start_block * block_size).tolist()
                expected[layer][head] += [(p + 1) * 10 + head for p in positions]
        containers = torch.cat([containers, retired[: plan.new_containers]])
        assert plan.num_containers == containers.numel() == containers_needed(plan.kept_len, block_size)
        kept_len, page_start = plan.kept_len, plan.page_start
        start_block += blocks
        for layer in range(num_layers):
            layer_plan = type("L", (), {"kept_len": kept_len[layer], "page_start": page_start[layer]})
            for head in range(num_kv_heads):
                tokens = _head_tokens(caches[layer], layer_plan, head, containers, block_size)[:, 0]
                assert tokens.tolist() == expected[layer][head]
            # Pages of one layer's heads do not overlap and fit the containers.
            pages = (kept_len[layer].long() + block_size - 1) // block_size
            assert int(pages.sum()) <= containers.numel() * num_kv_heads
