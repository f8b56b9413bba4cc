"""Triton in-place KV compaction equals the torch reference (gather, then scatter)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvzip.backend.ops import compact_kv, compact_kv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Small cache: 3 blocks x 2 heads x 16 tokens = 96 token rows of width 2 * head_size.
NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE = 3, 2, 16
NUM_SLOTS = NUM_BLOCKS * NUM_KV_HEADS * BLOCK_SIZE


def random_cache(head_size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * head_size, generator=generator)
    return cache.to(dtype=dtype, device=DEVICE)


def expected_after_move(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    rows = cache.reshape(-1, cache.shape[-1]).clone()
    moved = rows[src.long()].clone()
    rows[dst.long()] = moved
    return rows.view_as(cache)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    data=st.data(),
    num_moves=st.integers(min_value=1, max_value=NUM_SLOTS),
    head_size=st.sampled_from([8, 64]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_compaction_property(data, num_moves: int, head_size: int, dtype: torch.dtype) -> None:
    """Random distinct destinations and distinct sources that overlap them: Triton == reference."""
    dst = data.draw(st.permutations(range(NUM_SLOTS)))[:num_moves]
    # Sources: distinct too, from the same slots, so they overlap the destinations
    # (a row can be both read and overwritten) whenever num_moves is large.
    src = data.draw(st.permutations(range(NUM_SLOTS)))[:num_moves]
    src_t = torch.tensor(src, dtype=torch.int64, device=DEVICE)
    dst_t = torch.tensor(dst, dtype=torch.int64, device=DEVICE)
    cache = random_cache(head_size, dtype, seed=num_moves)
    reference = cache.clone()
    compact_kv_ref(reference, src_t, dst_t)
    assert torch.equal(reference, expected_after_move(cache, src_t, dst_t))
    compact_kv(cache, src_t, dst_t, use_triton=True)
    assert torch.equal(cache, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compaction_shift_over_itself(dtype: torch.dtype) -> None:
    """The real pattern: every kept token moves to an earlier slot, overlapping its own run."""
    cache = random_cache(64, dtype, seed=1)
    keep = torch.tensor([1, 2, 5, 6, 7, 9, 20, 21, 40, 41, 42, 70, 95])
    src = keep.to(DEVICE)
    dst = torch.arange(keep.numel(), device=DEVICE)
    reference = cache.clone()
    compact_kv_ref(reference, src, dst)
    scratch = torch.empty(32, 128, dtype=dtype, device=DEVICE)  # larger than needed: allowed
    compact_kv(cache, src, dst, use_triton=True, scratch=scratch)
    assert torch.equal(cache, reference)
    # swap two halves: a cycle, which a naive in-order copy would get wrong
    src = torch.cat([torch.arange(48, 96), torch.arange(0, 48)]).to(DEVICE)
    dst = torch.arange(0, 96, device=DEVICE)
    before = cache.clone()
    compact_kv(cache, src, dst, use_triton=True)
    assert torch.equal(cache, expected_after_move(before, src, dst))


def test_compaction_empty_and_int32_slots() -> None:
    cache = random_cache(64, torch.float16, seed=2)
    before = cache.clone()
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    compact_kv(cache, empty, empty, use_triton=True)
    assert torch.equal(cache, before)
    src = torch.tensor([10, 11], dtype=torch.int32, device=DEVICE)
    dst = torch.tensor([11, 10], dtype=torch.int32, device=DEVICE)
    compact_kv(cache, src, dst, use_triton=True)
    assert torch.equal(cache, expected_after_move(before, src, dst))


def test_compaction_rejects_bad_scratch() -> None:
    cache = random_cache(64, torch.float16, seed=3)
    src = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="scratch"):
        compact_kv(cache, src, src + 4, use_triton=True, scratch=torch.empty(2, 128, dtype=torch.float16, device=DEVICE))


def large_cuda_moves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4096-block bf16 cache (head_dim 128) and 200,000 random overlapping moves on the GPU."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    cache = torch.randn(4096, 8, 16, 256, device="cuda", generator=generator).to(torch.bfloat16)
    num_slots = cache.numel() // 256
    src = torch.randperm(num_slots, device="cuda", generator=generator)[:200_000]
    dst = torch.randperm(num_slots, device="cuda", generator=generator)[:200_000]
    return cache, src, dst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes need a CUDA device (too slow for the Triton interpreter)")
def test_compaction_large_cuda() -> None:
    cache, src, dst = large_cuda_moves()
    reference = cache.clone()
    compact_kv_ref(reference, src, dst)
    compact_kv(cache, src, dst)
    assert torch.equal(cache, reference)


# ---- one compaction for every layer: pages packed across layers -----------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_layers_compaction_with_cross_layer_overlap(seed: int) -> None:
    """The plan of a whole request (3 layers, layer 0 keeping far more than the others) writes
    layer 0's pages into the other layers' shares of the first blocks, which still hold their
    own kept sources: one gather of every layer's rows, then one scatter, gets it right, where
    a layer-by-layer compaction would overwrite sources of later layers."""
    from vllm_kvzip.block_manager.plan import container_flat_blocks, page_flat_slots, plan_request_compaction

    generator = torch.Generator().manual_seed(seed)
    num_layers, num_kv_heads, block_size, head_size = 3, 2, 16, 8
    evictable_blocks, blocks_per_layer = 6, 9
    evictable = evictable_blocks * block_size
    keep = torch.rand(num_layers, num_kv_heads, evictable, generator=generator) < torch.tensor([0.9, 0.3, 0.3])[:, None, None]
    keep[1, 1] = False  # a pair keeping nothing
    keep[2, 0] = False
    keep[2, 0, 7] = True  # a pair keeping one token
    pages = int(((keep.sum(-1) + block_size - 1) // block_size).sum())
    num_container_blocks = -(-pages // (num_layers * num_kv_heads))
    physical = torch.randperm(blocks_per_layer, generator=generator)[:evictable_blocks].to(torch.int32)
    plan = plan_request_compaction(keep, physical, num_container_blocks, block_size, blocks_per_layer)
    layer_of_slot = lambda slots: slots // (blocks_per_layer * num_kv_heads * block_size)  # noqa: E731
    src_layer, dst_layer = layer_of_slot(plan.src_slots), layer_of_slot(plan.dst_slots)
    assert (src_layer != dst_layer).any(), "the case must move tokens across layers"
    # A destination of one layer's token is a source of another layer's token.
    crossed = set(plan.dst_slots[src_layer == 0].tolist()) & set(plan.src_slots[src_layer != 0].tolist())
    assert crossed

    cache = torch.randn(num_layers * blocks_per_layer, num_kv_heads, block_size, 2 * head_size, generator=generator)
    cache = cache.to(dtype=torch.float16, device=DEVICE)
    original = cache.clone()
    expected = expected_after_move(original, plan.src_slots, plan.dst_slots)
    # Only the kept rows already inside the containers go through scratch; the rest is copied directly.
    assert 0 < plan.num_staged < plan.src_slots.numel()
    scratch = torch.empty(plan.num_staged, 2 * head_size, dtype=cache.dtype, device=DEVICE)
    compact_kv(cache, plan.src_slots.to(DEVICE), plan.dst_slots.to(DEVICE), use_triton=True, scratch=scratch,
               num_staged=plan.num_staged)
    assert torch.equal(cache, expected)
    reference = original.clone()
    compact_kv_ref(reference, plan.src_slots.to(DEVICE), plan.dst_slots.to(DEVICE), num_staged=plan.num_staged)
    assert torch.equal(reference, expected)

    # Every (layer, head) reads back its kept tokens in order through the page layout.
    rows, original_rows = cache.view(-1, 2 * head_size), original.view(-1, 2 * head_size)
    containers = container_flat_blocks(physical[:num_container_blocks], num_layers, blocks_per_layer)
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            positions = keep[layer, head].nonzero().flatten()
            ranks = torch.arange(positions.numel())
            slots = page_flat_slots(
                int(plan.page_start[layer, head]) + ranks // block_size, ranks % block_size, containers, num_kv_heads, block_size
            )
            dense = ((layer * blocks_per_layer + physical.long()[positions // block_size]) * num_kv_heads + head) * block_size
            assert torch.equal(rows[slots.to(DEVICE)], original_rows[(dense + positions % block_size).to(DEVICE)])

    # The direct moves read rows no move writes (the precondition that makes them safe).
    assert not set(plan.src_slots[plan.num_staged :].tolist()) & set(plan.dst_slots.tolist())
    assert set(plan.src_slots[: plan.num_staged].tolist()) & set(plan.dst_slots.tolist())
    # Layer by layer (gather and scatter each layer's moves before the next) loses tokens here.
    per_layer = original.clone()
    for layer in range(num_layers):
        mine = src_layer == layer
        compact_kv_ref(per_layer, plan.src_slots[mine].to(DEVICE), plan.dst_slots[mine].to(DEVICE))
    assert not torch.equal(per_layer, expected)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data(), num_moves=st.integers(min_value=1, max_value=NUM_SLOTS // 2), dtype=st.sampled_from([torch.float16, torch.float32]))
def test_staged_and_direct_moves_property(data, num_moves: int, dtype: torch.dtype) -> None:
    """Staged moves overlap freely; direct moves read rows no move writes: Triton == reference == plain."""
    slots = data.draw(st.permutations(range(NUM_SLOTS)))
    dst = slots[:num_moves]
    num_staged = data.draw(st.integers(0, num_moves))
    # Staged sources anywhere (destinations included); direct sources outside every destination.
    staged_src = data.draw(st.permutations(range(NUM_SLOTS)))[:num_staged]
    direct_src = slots[num_moves : num_moves + (num_moves - num_staged)]
    src_t = torch.tensor(staged_src + direct_src, dtype=torch.int64, device=DEVICE)
    dst_t = torch.tensor(dst, dtype=torch.int64, device=DEVICE)
    cache = random_cache(64, dtype, seed=num_moves)
    expected = expected_after_move(cache, src_t, dst_t)
    reference = cache.clone()
    compact_kv_ref(reference, src_t, dst_t, num_staged=num_staged)
    assert torch.equal(reference, expected)
    compact_kv(cache, src_t, dst_t, use_triton=True, num_staged=num_staged)
    assert torch.equal(cache, expected)
