"""KVzap's score recording: the Triton kernel equals the torch reference, which puts each score at its KV slot."""

from __future__ import annotations

import pytest
import torch

from vllm_kvzip.backend.ops import record_scores, record_scores_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def score_cache(num_blocks: int, heads: int, block_size: int) -> torch.Tensor:
    # Filled with a sentinel, so that an entry written by mistake shows.
    return torch.full((num_blocks * heads * block_size + heads,), -7.0, device=DEVICE)


def random_case(num_tokens: int, num_blocks: int, heads: int, block_size: int, padding: int, seed: int, dtype):
    generator = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    # Padding tokens (slot -1) anywhere in the batch, as vLLM's padded CUDA-graph batches have at the end.
    if padding:
        slots[torch.randperm(num_tokens, generator=generator)[:padding]] = -1
    scores = torch.randn(num_tokens, heads, generator=generator).to(dtype)
    return scores.to(DEVICE), slots.to(device=DEVICE, dtype=torch.int64)


def test_reference_puts_every_score_at_its_slot_and_padding_in_the_trash() -> None:
    heads, block_size, num_blocks = 3, 4, 5
    cache = score_cache(num_blocks, heads, block_size)
    slots = torch.tensor([9, -1, 0, 19], device=DEVICE)
    scores = torch.arange(12, dtype=torch.float32, device=DEVICE).reshape(4, 3)
    record_scores_ref(cache, scores, slots, heads, block_size)
    layout = cache[:-heads].reshape(num_blocks, heads, block_size)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(layout[slot // block_size, :, slot % block_size], scores[token])
    assert torch.equal(cache[-heads:], scores[1])  # the padding token's scores, in the trash entries
    assert int((cache == -7.0).sum()) == cache.numel() - heads * 4


@pytest.mark.parametrize(
    "num_tokens, num_blocks, heads, block_size, padding",
    [
        (1, 1, 1, 16, 0),  # one token, one head
        (16, 1, 8, 16, 0),  # exactly one full block
        (300, 40, 8, 16, 7),  # more than one program, padding inside
        (130, 20, 3, 32, 0),  # heads not a power of two
        (5, 4, 2, 16, 5),  # padding only
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_reference(num_tokens, num_blocks, heads, block_size, padding, dtype) -> None:
    scores, slots = random_case(num_tokens, num_blocks, heads, block_size, padding, seed=num_tokens, dtype=dtype)
    expected = score_cache(num_blocks, heads, block_size)
    record_scores_ref(expected, scores, slots, heads, block_size)
    actual = score_cache(num_blocks, heads, block_size)
    record_scores(actual, scores, slots, heads, block_size, use_triton=True)
    # The trash entries are written by every padding token in any order: only the real entries must agree.
    assert torch.equal(actual[:-heads], expected[:-heads])
    if padding == 0:
        assert torch.equal(actual[-heads:], expected[-heads:])


def test_triton_reads_strided_scores() -> None:
    """The surrogate's output may be a view (a column slice): strides are honoured."""
    heads, block_size, num_blocks = 4, 16, 8
    wide, slots = random_case(100, num_blocks, 2 * heads, block_size, 0, seed=3, dtype=torch.float32)
    scores = wide[:, ::2]
    expected = score_cache(num_blocks, heads, block_size)
    record_scores_ref(expected, scores, slots, heads, block_size)
    actual = score_cache(num_blocks, heads, block_size)
    record_scores(actual, scores, slots, heads, block_size, use_triton=True)
    assert torch.equal(actual, expected)


def test_triton_refuses_scores_of_the_wrong_shape() -> None:
    cache = score_cache(2, 4, 16)
    slots = torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"scores \(5, 3\) must be \[num_tokens=5, heads=4\]"):
        record_scores(cache, torch.zeros(5, 3, device=DEVICE), slots, 4, 16, use_triton=True)
