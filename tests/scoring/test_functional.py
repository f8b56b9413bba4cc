"""The pure scoring functions against loop-by-loop brute force on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvzip.scoring.functional import (
    KVzipPlusTerms,
    kvzip_chunk_scores,
    output_value_norms,
    random_scores,
    snapkv_scores,
    streaming_scores,
)


def brute_force_kvzip(queries, keys_sink, keys_chunk, keys_repeat, scaling, plus=None, rows=None):
    """Row by row, head by head, with an explicit softmax over the allowed columns."""
    num_kv_heads, group, num_queries, _ = queries.shape
    num_sink, num_chunk = keys_sink.shape[1], keys_chunk.shape[1]
    rows = range(num_queries) if rows is None else range(*rows)
    scores = torch.full((num_kv_heads, num_chunk), -math.inf, dtype=torch.float64)
    for head in range(num_kv_heads):
        for g in range(group):
            query_head = head * group + g
            for j in rows:
                keys = torch.cat([keys_sink[head], keys_chunk[head], keys_repeat[head, : j + 1]]).double()
                logits = keys @ queries[head, g, j].double() * scaling
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                for i in range(num_chunk):
                    value = weights[num_sink + i]
                    if plus is not None:
                        w_o = plus.o_proj_weight.double()[:, query_head * queries.shape[-1] : (query_head + 1) * queries.shape[-1]]
                        value = value * torch.linalg.vector_norm(w_o @ plus.values_chunk[head, i].double())
                        value = value / torch.linalg.vector_norm(plus.hidden_states[j].double())
                    scores[head, i] = max(scores[head, i], value)
    return scores


class _Plus:
    def __init__(self, values_chunk, o_proj_weight, hidden_states):
        self.values_chunk, self.o_proj_weight, self.hidden_states = values_chunk, o_proj_weight, hidden_states


@pytest.mark.parametrize("num_kv_heads,group,num_sink,num_chunk,num_queries", [(2, 2, 5, 7, 6), (1, 4, 0, 3, 9), (3, 1, 2, 11, 4)])
@pytest.mark.parametrize("use_plus", [False, True])
def test_kvzip_chunk_scores_match_brute_force(num_kv_heads, group, num_sink, num_chunk, num_queries, use_plus):
    generator = torch.Generator().manual_seed(num_chunk * 31 + group)
    head_dim, hidden = 8, 24
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64) * 2.0  # noqa: E731
    queries = randn(num_kv_heads, group, num_queries, head_dim)
    keys_sink, keys_chunk, keys_repeat = randn(num_kv_heads, num_sink, head_dim), randn(num_kv_heads, num_chunk, head_dim), randn(num_kv_heads, num_queries, head_dim)
    plus = terms = None
    if use_plus:
        plus = _Plus(randn(num_kv_heads, num_chunk, head_dim), randn(hidden, num_kv_heads * group * head_dim), randn(num_queries, hidden))
        terms = KVzipPlusTerms(plus.values_chunk, plus.o_proj_weight, plus.hidden_states.norm(dim=-1))
    scaling = head_dim**-0.5
    got = kvzip_chunk_scores(queries, keys_sink, keys_chunk, keys_repeat, scaling=scaling, plus=terms)
    expected = brute_force_kvzip(queries, keys_sink, keys_chunk, keys_repeat, scaling, plus)
    assert got.shape == (num_kv_heads, num_chunk)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    # Restricting the rows (KVzap targets use only the repeated prompt).
    rows = (num_queries // 2, num_queries)
    got_rows = kvzip_chunk_scores(queries, keys_sink, keys_chunk, keys_repeat, scaling=scaling, plus=terms, score_rows=rows)
    torch.testing.assert_close(got_rows.double(), brute_force_kvzip(queries, keys_sink, keys_chunk, keys_repeat, scaling, plus, rows), rtol=1e-5, atol=1e-7)


def test_output_value_norms_is_norm_of_projected_values():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(2, 5, 4, generator=generator)
    weight = torch.randn(12, 2 * 3 * 4, generator=generator)
    norms = output_value_norms(values, weight, group_size=3)
    for head in range(2):
        for g in range(3):
            query_head = head * 3 + g
            projected = values[head] @ weight[:, query_head * 4 : (query_head + 1) * 4].T
            torch.testing.assert_close(norms[head, g], projected.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_snapkv_scores_match_brute_force():
    generator = torch.Generator().manual_seed(5)
    num_kv_heads, group, window, total, head_dim = 2, 2, 4, 15, 8
    queries = torch.randn(num_kv_heads, group, window, head_dim, generator=generator, dtype=torch.float64)
    keys = torch.randn(num_kv_heads, total, head_dim, generator=generator, dtype=torch.float64)
    scaling = head_dim**-0.5
    got = snapkv_scores(queries, keys, scaling=scaling, kernel_size=5)
    context = total - window
    expected = torch.zeros(num_kv_heads, total, dtype=torch.float64)
    for head in range(num_kv_heads):
        mean_weights = torch.zeros(group, context, dtype=torch.float64)
        for g in range(group):
            for w in range(window):
                visible = context + w + 1
                weights = torch.softmax(keys[head, :visible] @ queries[head, g, w] * scaling, dim=0)
                mean_weights[g] += weights[:context] / window
        # avg-pool, kernel 5, zero padding 2, count_include_pad (torch's default).
        padded = torch.nn.functional.pad(mean_weights, (2, 2))
        pooled = torch.stack([padded[:, i : i + 5].sum(dim=1) / 5 for i in range(context)], dim=1)
        expected[head, :context] = pooled.mean(dim=0)
        expected[head, context:] = expected[head, :context].max()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_snapkv_scores_batch_heads_without_changing_them(kernel_size):
    generator = torch.Generator().manual_seed(6)
    queries = torch.randn(3, 2, 6, 8, generator=generator)
    keys = torch.randn(3, 30, 8, generator=generator)
    whole = snapkv_scores(queries, keys, scaling=0.35, kernel_size=kernel_size)
    one_head_at_a_time = snapkv_scores(queries, keys, scaling=0.35, kernel_size=kernel_size, max_elements=1)
    assert torch.equal(whole, one_head_at_a_time)
    per_head = torch.cat([snapkv_scores(queries[h : h + 1], keys[h : h + 1], scaling=0.35, kernel_size=kernel_size) for h in range(3)])
    assert torch.equal(whole, per_head)


def test_streaming_scores_rank_sinks_then_recency():
    positions = torch.arange(10, 30)
    scores = streaming_scores(positions, num_kv_heads=2, sink_tokens=12)
    assert scores.shape == (2, 20)
    assert torch.isinf(scores[:, :2]).all() and not torch.isinf(scores[:, 2:]).any()
    assert (scores[:, 3:] > scores[:, 2:-1]).all()


def test_random_scores_seeded_and_independent_of_splitting():
    positions = torch.arange(0, 50)
    whole = random_scores(positions, 3, seed=7, layer_idx=2)
    split = torch.cat([random_scores(positions[:20], 3, seed=7, layer_idx=2), random_scores(positions[20:], 3, seed=7, layer_idx=2)], dim=1)
    torch.testing.assert_close(whole, split)
    assert not torch.equal(whole, random_scores(positions, 3, seed=8, layer_idx=2))
    assert not torch.equal(whole, random_scores(positions, 3, seed=7, layer_idx=3))
    assert not torch.equal(whole[0], whole[1])
    assert whole.min() >= 0 and whole.max() < 1
