"""Triton KVzip chunk scores against the plain-torch definition (`kvzip_chunk_scores`).

On the CPU through Triton's interpreter (small shapes, float32: IEEE products, so the two agree to
float32 rounding); on a GPU also bf16 at 8B-like shapes.  Ragged edges: chunks and query counts
that are not multiples of the kernel's 64-blocks, an empty sink, a single query, a single chunk
key, score rows limited to a slice (kvpress's KVzap targets), KVzip+ factors.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvzip.backend.ops.chunk_scores import kvzip_chunk_scores_triton
from vllm_kvzip.scoring.functional import KVzipPlusTerms, kvzip_chunk_scores, output_projection_gram

ON_GPU = torch.cuda.is_available()


def _inputs(num_kv_heads, group, num_queries, num_sink, num_chunk, head_dim, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return (randn(num_kv_heads, group, num_queries, head_dim), randn(num_kv_heads, num_sink, head_dim),
            randn(num_kv_heads, num_chunk, head_dim), randn(num_kv_heads, num_queries, head_dim))


@pytest.mark.parametrize(
    "num_kv_heads,group,num_queries,num_sink,num_chunk,head_dim,score_rows",
    [
        (2, 3, 70, 5, 90, 64, None),  # neither count a multiple of 64
        (1, 2, 1, 0, 1, 64, None),  # one query, one chunk key, no sink
        (3, 1, 64, 4, 128, 128, None),  # blocks exactly full
        (2, 2, 100, 3, 65, 64, (20, 83)),  # only the rows of the repeated text count
    ],
)
def test_chunk_scores_match_the_reference(num_kv_heads, group, num_queries, num_sink, num_chunk, head_dim, score_rows):
    queries, sink, chunk, repeat = _inputs(num_kv_heads, group, num_queries, num_sink, num_chunk, head_dim,
                                           torch.float32, "cpu", seed=num_queries)
    device = "cuda" if ON_GPU else "cpu"
    scaling = head_dim ** -0.5
    expected = kvzip_chunk_scores(queries, sink, chunk, repeat, scaling=scaling, score_rows=score_rows)
    got = kvzip_chunk_scores_triton(queries.to(device), sink.to(device), chunk.to(device), repeat.to(device),
                                    scaling=scaling, score_rows=score_rows)
    assert got.shape == (num_kv_heads, num_chunk)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-6)


def test_chunk_scores_kvzip_plus_match_the_reference():
    num_kv_heads, group, num_queries, num_sink, num_chunk, head_dim = 2, 2, 40, 4, 50, 64
    queries, sink, chunk, repeat = _inputs(num_kv_heads, group, num_queries, num_sink, num_chunk, head_dim,
                                           torch.float32, "cpu", seed=7)
    generator = torch.Generator().manual_seed(8)
    values = torch.randn(num_kv_heads, num_chunk, head_dim, generator=generator)
    o_proj = torch.randn(96, num_kv_heads * group * head_dim, generator=generator) * 0.05
    hidden_norms = torch.rand(num_queries, generator=generator) * 3 + 0.5
    gram = output_projection_gram(o_proj, num_kv_heads, group)
    plus = KVzipPlusTerms(values_chunk=values, o_proj_weight=None, hidden_norms=hidden_norms, o_proj_gram=gram)
    expected = kvzip_chunk_scores(queries, sink, chunk, repeat, scaling=0.125, plus=plus)
    device = "cuda" if ON_GPU else "cpu"
    plus_on_device = KVzipPlusTerms(values_chunk=values.to(device), o_proj_weight=None,
                                    hidden_norms=hidden_norms.to(device), o_proj_gram=gram.to(device))
    got = kvzip_chunk_scores_triton(
        queries.to(device), sink.to(device), chunk.to(device), repeat.to(device), scaling=0.125, plus=plus_on_device
    )
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-6)


def test_a_query_sees_only_earlier_repeat_keys():
    """A repeat key that only later queries could see must not change earlier rows' softmax:
    make repeat key 1 huge for query 0; query 0's weights on the chunk stay as if it did not exist."""
    queries, sink, chunk, repeat = _inputs(1, 1, 2, 0, 3, 64, torch.float32, "cpu", seed=3)
    repeat[0, 1] = queries[0, 0, 0] * 50  # query 0 . key 1 enormous, but key 1 is hidden from it
    rows = (0, 1)
    device = "cuda" if ON_GPU else "cpu"
    got = kvzip_chunk_scores_triton(queries.to(device), sink.to(device), chunk.to(device), repeat.to(device),
                                    scaling=0.125, score_rows=rows)
    logits = torch.cat([chunk[0], repeat[0, :1]]) @ queries[0, 0, 0] * 0.125
    torch.testing.assert_close(got.cpu()[0], logits.softmax(0)[:3], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="bf16 at 8B shapes (8 KV heads x 4, 2,000-token chunk) needs a GPU")
def test_chunk_scores_bf16_at_8b_shapes_on_gpu():
    queries, sink, chunk, repeat = _inputs(8, 4, 2050, 4, 2000, 128, torch.bfloat16, "cuda", seed=11)
    expected = kvzip_chunk_scores(queries, sink, chunk, repeat, scaling=128 ** -0.5)
    got = kvzip_chunk_scores_triton(queries, sink, chunk, repeat, scaling=128 ** -0.5)
    # Same bf16 inputs; the reference's float32 matmul and the kernel's tensor-core dot differ in
    # accumulation order only.
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-5)
