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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes need a CUDA device (too slow for the Triton interpreter)")
def test_compaction_large_cuda() -> None:
    generator = torch.Generator(device="cuda").manual_seed(4)
    cache = torch.randn(4096, 8, 16, 256, device="cuda", generator=generator).to(torch.bfloat16)
    num_slots = cache.numel() // 256
    src = torch.randperm(num_slots, device="cuda", generator=generator)[:200_000]
    dst = torch.randperm(num_slots, device="cuda", generator=generator)[:200_000]
    reference = cache.clone()
    compact_kv_ref(reference, src, dst)
    compact_kv(cache, src, dst)
    assert torch.equal(cache, reference)
