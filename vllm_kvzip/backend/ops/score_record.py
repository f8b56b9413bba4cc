"""Triton: record KVzap's per-token scores at their KV slots, one launch per layer.

`record_scores_ref` (reference.py) is the definition and the CPU path.  The
torch version launches about a dozen elementwise kernels per layer (index
arithmetic, the padding test, the cast, the scatter); in a prefill step that
is hundreds of tiny launches, each a few microseconds of GPU time.  Here one
program computes the destinations of `TOKENS` tokens for every head and
stores the scores cast to the cache's dtype.  No host reads: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_PROGRAM = 128


@triton.jit
def _record_scores_kernel(
    cache_ptr,
    scores_ptr,
    slots_ptr,
    num_tokens,
    score_token_stride,
    score_head_stride,
    trash_start,
    HEADS: tl.constexpr,
    HEADS_POW2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
):
    tokens = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    token_mask = tokens < num_tokens
    slots = tl.load(slots_ptr + tokens, mask=token_mask, other=-1).to(tl.int64)
    heads = tl.arange(0, HEADS_POW2)
    mask = token_mask[:, None] & (heads < HEADS)[None, :]
    # Padding slots are -1: clamp before the division so that the index stays non-negative.
    valid_slots = tl.maximum(slots, 0)
    index = ((valid_slots // BLOCK_SIZE)[:, None] * HEADS + heads[None, :]) * BLOCK_SIZE + (valid_slots % BLOCK_SIZE)[:, None]
    index = tl.where(slots[:, None] >= 0, index, trash_start + heads[None, :])
    values = tl.load(
        scores_ptr + tokens.to(tl.int64)[:, None] * score_token_stride + heads[None, :] * score_head_stride,
        mask=mask,
        other=0.0,
    )
    tl.store(cache_ptr + index, values.to(cache_ptr.dtype.element_ty), mask=mask)


def record_scores(
    cache: torch.Tensor, scores: torch.Tensor, slot_mapping: torch.Tensor, heads: int, block_size: int
) -> None:
    """`record_scores_ref` in one Triton launch (`cache` must be contiguous)."""
    num_tokens = slot_mapping.shape[0]
    if scores.shape != (num_tokens, heads):
        raise ValueError(f"scores {tuple(scores.shape)} must be [num_tokens={num_tokens}, heads={heads}]")
    if not cache.is_contiguous():
        raise ValueError("the score cache must be contiguous")
    if num_tokens == 0:
        return
    grid = (triton.cdiv(num_tokens, TOKENS_PER_PROGRAM),)
    _record_scores_kernel[grid](
        cache,
        scores,
        slot_mapping,
        num_tokens,
        scores.stride(0),
        scores.stride(1),
        cache.numel() - heads,
        HEADS=heads,
        HEADS_POW2=triton.next_power_of_2(heads),
        BLOCK_SIZE=block_size,
        TOKENS=TOKENS_PER_PROGRAM,
    )
