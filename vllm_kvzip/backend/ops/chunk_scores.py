"""Triton KVzip chunk scores: max over repeat queries of softmax weights, without the logits matrix.

The reference is `vllm_kvzip.scoring.functional.kvzip_chunk_scores` (plain torch, float32): for
each KV head h, query head g of its group and repeat query i, the softmax over the keys
[sink | chunk | repeat input (causal: repeat key j only for j <= i)], then for every chunk key k
the max over queries i (in `score_rows`) and over g of weight(i, k) (KVzip+: times 1 / ||h_i|| and
||W_O^g v_k||).  The torch version materialises float32 logits [G, q, s + m + q] per KV head: at
8B shapes and 2,000-token chunks 134 MB written and re-read about five times per head, layer and
chunk, most of the 972 ms a KVzip pass took per 8k prompt on the H100.

Two launches, flash-style, logits only ever in registers:

1. row statistics: for every (h, g, query i) the log-sum-exp of its scaled logits over every key
   it sees (online max and sum over key blocks);
2. column max: for every (h, g, chunk key k), max over the scored queries of
   exp(logit - lse_i) * query_scale_i.

The max over g and the KVzip+ value norms (constant over queries, non-negative) are applied
after, in torch, on [H, G, m].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vllm_kvzip.scoring.functional import KVzipPlusTerms, kvzip_plus_factors

BLOCK_QUERIES = 64
BLOCK_KEYS = 64


@triton.jit
def _load_query_rows(queries_ptr, head, group, rows, row_mask, stride_qh, stride_qg, stride_qi, HEAD_DIM: tl.constexpr):
    """Queries [BLOCK_Q, d] of one (KV head, group member) at `rows` (0 outside `row_mask`)."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(
        queries_ptr + head * stride_qh + group * stride_qg + rows[:, None] * stride_qi + dims[None, :],
        mask=row_mask[:, None], other=0.0,
    )


@triton.jit
def _load_key_rows(keys_ptr, head, cols, col_mask, stride_kh, stride_kj, HEAD_DIM: tl.constexpr):
    """Keys [BLOCK_K, d] of one KV head at `cols` of [sink | chunk | repeat] (0 outside `col_mask`)."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(keys_ptr + head * stride_kh + cols[:, None] * stride_kj + dims[None, :],
                   mask=col_mask[:, None], other=0.0)


@triton.jit
def _scaled_logits(query, key, scale, IEEE: tl.constexpr):
    """[BLOCK_Q, BLOCK_K] float32 query . key * scale (IEEE products for float32 inputs, not TF32)."""
    if IEEE:
        logits = tl.dot(query, tl.trans(key), input_precision="ieee")
    else:
        logits = tl.dot(query, tl.trans(key))
    return logits * scale


@triton.jit
def _row_lse_kernel(
    queries_ptr,  # [H, G, q, d]
    keys_ptr,  # [H, K, d]: sink | chunk | repeat
    lse_ptr,  # [H * G, q] float32
    num_group,
    num_queries,
    num_keys,
    num_fixed,  # s + m: keys every query sees; the last num_queries keys are causal
    scale,
    stride_qh,
    stride_qg,
    stride_qi,
    stride_kh,
    stride_kj,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    head_group = tl.program_id(0)
    head = head_group // num_group
    group = head_group % num_group
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_mask = rows < num_queries
    query = _load_query_rows(queries_ptr, head, group, rows, row_mask, stride_qh, stride_qg, stride_qi, HEAD_DIM)
    running_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_Q], tl.float32)
    # Keys past num_fixed + the block's last query are hidden from every query of the block.
    last_key = tl.minimum(num_keys, num_fixed + (tl.program_id(1) + 1) * BLOCK_Q)
    for key_start in range(0, last_key, BLOCK_K):
        cols = key_start + tl.arange(0, BLOCK_K)
        key = _load_key_rows(keys_ptr, head, cols, cols < num_keys, stride_kh, stride_kj, HEAD_DIM)
        logits = _scaled_logits(query, key, scale, IEEE)
        visible = (cols[None, :] < num_fixed) | ((cols[None, :] - num_fixed) <= rows[:, None])
        visible = visible & (cols[None, :] < num_keys)
        logits = tl.where(visible, logits, float("-inf"))
        block_max = tl.max(logits, axis=1)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + head_group * num_queries + rows, lse, mask=row_mask)


@triton.jit
def _column_max_kernel(
    queries_ptr,  # [H, G, q, d]
    keys_ptr,  # [H, K, d]
    lse_ptr,  # [H * G, q]
    query_scale_ptr,  # [q] float32 (ones without KVzip+)
    out_ptr,  # [H * G, m] float32
    num_group,
    num_queries,
    num_sink,
    num_chunk,
    first_row,
    end_row,
    scale,
    stride_qh,
    stride_qg,
    stride_qi,
    stride_kh,
    stride_kj,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    head_group = tl.program_id(0)
    head = head_group // num_group
    group = head_group % num_group
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # chunk key indices
    col_mask = cols < num_chunk
    key = _load_key_rows(keys_ptr, head, num_sink + cols, col_mask, stride_kh, stride_kj, HEAD_DIM)
    # Weights are >= 0, so 0 is the identity of the max (rows outside [first_row, end_row) add 0).
    best = tl.zeros([BLOCK_K], tl.float32)
    for row_start in range(first_row, end_row, BLOCK_Q):
        rows = row_start + tl.arange(0, BLOCK_Q)
        row_mask = rows < end_row
        query = _load_query_rows(queries_ptr, head, group, rows, row_mask, stride_qh, stride_qg, stride_qi, HEAD_DIM)
        lse = tl.load(lse_ptr + head_group * num_queries + rows, mask=row_mask, other=float("inf"))
        query_scale = tl.load(query_scale_ptr + rows, mask=row_mask, other=0.0)
        logits = _scaled_logits(query, key, scale, IEEE)
        weights = tl.exp(logits - lse[:, None]) * query_scale[:, None]
        weights = tl.where(row_mask[:, None], weights, 0.0)
        best = tl.maximum(best, tl.max(weights, axis=0))
    tl.store(out_ptr + head_group * num_chunk + cols, best, mask=col_mask)


def kvzip_chunk_scores_triton(
    queries: Tensor,
    keys_sink: Tensor,
    keys_chunk: Tensor,
    keys_repeat: Tensor,
    *,
    scaling: float,
    plus: KVzipPlusTerms | None = None,
    score_rows: tuple[int, int] | None = None,
) -> Tensor:
    """KVzip chunk scores [H, m] float32, as `kvzip_chunk_scores` (same arguments).

    KVzip+'s factors (`kvzip_plus_factors`) go in as they are: 1 / ||h_i|| inside the max over
    queries, ||W_O^g v_k|| after it.  Keys are cast to the queries' dtype (fp16, bf16 or fp32;
    fp32 uses IEEE products, not TF32).
    """
    num_kv_heads, num_group, num_queries, head_dim = queries.shape
    num_sink, num_chunk = keys_sink.shape[1], keys_chunk.shape[1]
    if keys_repeat.shape[1] != num_queries:
        raise ValueError(f"keys_repeat has {keys_repeat.shape[1]} tokens but there are {num_queries} repeat queries")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {head_dim} is not supported by the Triton chunk scores (16, 32, 64, 128, 256)")
    device = queries.device
    scores = torch.zeros(num_kv_heads, num_chunk, dtype=torch.float32, device=device)
    if num_chunk == 0:
        return scores
    first_row, end_row = score_rows if score_rows is not None else (0, num_queries)
    queries = queries.contiguous()
    keys = torch.cat([keys_sink, keys_chunk, keys_repeat], dim=1).to(queries.dtype).contiguous()  # [H, K, d]
    num_keys = keys.shape[1]
    lse = torch.empty(num_kv_heads * num_group, num_queries, dtype=torch.float32, device=device)
    ieee = queries.dtype == torch.float32
    common = dict(HEAD_DIM=head_dim, BLOCK_Q=BLOCK_QUERIES, BLOCK_K=BLOCK_KEYS, IEEE=ieee)
    strides = (queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1))
    _row_lse_kernel[(num_kv_heads * num_group, triton.cdiv(num_queries, BLOCK_QUERIES))](
        queries, keys, lse, num_group, num_queries, num_keys, num_sink + num_chunk, float(scaling), *strides, **common
    )
    if plus is not None:
        query_scale, value_norms = kvzip_plus_factors(plus, num_group)
    else:
        query_scale, value_norms = torch.ones(num_queries, dtype=torch.float32, device=device), None
    per_group = torch.empty(num_kv_heads * num_group, num_chunk, dtype=torch.float32, device=device)
    _column_max_kernel[(num_kv_heads * num_group, triton.cdiv(num_chunk, BLOCK_KEYS))](
        queries, keys, lse, query_scale.to(device=device, dtype=torch.float32).contiguous(), per_group,
        num_group, num_queries, num_sink, num_chunk, first_row, end_row, float(scaling), *strides, **common
    )
    per_group = per_group.view(num_kv_heads, num_group, num_chunk)
    if value_norms is not None:
        per_group = per_group * value_norms.to(torch.float32)
    return per_group.amax(dim=1)
