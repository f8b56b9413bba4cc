"""Policies keep exactly the intended counts, always keep sinks and window, and keep the best scores."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from vllm_kvzip.scoring.policies import (
    ADAKV_SAFEGUARD,
    _keep_top_per_group,
    keep_top_by_stable_sort,
    keep_by_ratio,
    keep_by_threshold,
    layer_keep_count,
    protected_mask,
    total_keep_count,
)


@st.composite
def problems(draw):
    layers, heads, tokens = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**16))
    # Few distinct values to exercise ties.
    scores = torch.randint(0, draw(st.sampled_from([3, 1000])), (layers, heads, tokens), generator=torch.Generator().manual_seed(seed)).float()
    return scores, draw(st.floats(0.0, 1.0)), draw(st.integers(0, 8)), draw(st.integers(0, 30))


def floor(value: float) -> int:
    return int(value + 1e-9)


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(["global", "layer", "head", "adakv"]))
def test_ratio_policies_keep_exact_counts_and_protected(problem, policy):
    scores, ratio, sinks, window = problem
    layers, heads, tokens = scores.shape
    keep = keep_by_ratio(scores, ratio, policy, sink_tokens=sinks, window=window)
    protected = protected_mask(tokens, sinks, window)
    evictable_count = int((~protected).sum())
    assert keep.mask.dtype == torch.bool and keep.mask.shape == scores.shape
    assert keep.mask[..., protected].all(), "sinks and window must always be kept"
    torch.testing.assert_close(keep.kept_counts, keep.mask.sum(-1))
    kept_evictable = keep.mask[..., ~protected]  # [L, H, E]
    if policy == "global":
        assert int(kept_evictable.sum()) == floor(ratio * layers * heads * evictable_count)
        groups = [(scores[..., ~protected].reshape(-1), kept_evictable.reshape(-1))]
    elif policy == "head":
        assert (kept_evictable.sum(-1) == floor(ratio * evictable_count)).all()
        groups = [(scores[l, h, ~protected], kept_evictable[l, h]) for l in range(layers) for h in range(heads)]
    else:
        assert (kept_evictable.sum(dim=(1, 2)) == floor(ratio * heads * evictable_count)).all()
        groups = [(scores[l][:, ~protected].reshape(-1), kept_evictable[l].reshape(-1)) for l in range(layers)]
    if policy == "adakv":
        safe = floor(ADAKV_SAFEGUARD * ratio * evictable_count)
        assert (kept_evictable.sum(-1) >= safe).all()
        for l in range(layers):
            for h in range(heads):
                # Each head's own top `safe` tokens are kept.
                order = torch.sort(-scores[l, h, ~protected], stable=True).indices[:safe]
                assert kept_evictable[l, h, order].all()
    else:
        for values, kept in groups:
            if kept.any() and (~kept).any():
                assert values[kept].min() >= values[~kept].max(), "a lower score was kept over a higher one"


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(["layer", "head", "adakv"]))
def test_layer_keep_count_is_what_every_layer_keeps(problem, policy):
    """The scheduler's metrics count kept tokens with layer_keep_count, without seeing the scores."""
    scores, ratio, sinks, window = problem
    layers, heads, tokens = scores.shape
    keep = keep_by_ratio(scores, ratio, policy, sink_tokens=sinks, window=window)
    expected = layer_keep_count(ratio, policy, heads, tokens, sink_tokens=sinks, window=window)
    assert keep.kept_counts.sum(dim=-1).tolist() == [expected] * layers


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(["global", "layer", "head", "adakv"]))
def test_total_keep_count_is_what_the_request_keeps(problem, policy):
    """The scheduler sizes head-page containers with total_keep_count, without seeing the scores."""
    scores, ratio, sinks, window = problem
    layers, heads, tokens = scores.shape
    keep = keep_by_ratio(scores, ratio, policy, sink_tokens=sinks, window=window)
    expected = total_keep_count(ratio, policy, layers, heads, tokens, sink_tokens=sinks, window=window)
    assert int(keep.kept_counts.sum()) == expected


def test_layer_keep_count_floors_once_per_layer():
    # 3 heads, 412 evictable tokens each at 0.3: floor(370.8) = 370 for the layer, 3 * floor(123.6) = 369 per head.
    assert layer_keep_count(0.3, "layer", 3, 416, sink_tokens=4, window=0) == 12 + 370
    assert layer_keep_count(0.3, "head", 3, 416, sink_tokens=4, window=0) == 3 * (4 + 123)
    with pytest.raises(ValueError, match="depends on the scores"):
        layer_keep_count(0.3, "global", 3, 416)


@settings(max_examples=100, deadline=None)
@given(problems(), st.floats(-2.0, 1200.0))
def test_threshold_keeps_scores_at_or_above_tau(problem, threshold):
    scores, _, sinks, window = problem
    keep = keep_by_threshold(scores, threshold, sink_tokens=sinks, window=window)
    protected = protected_mask(scores.shape[-1], sinks, window)
    expected = (scores >= threshold) | protected
    assert torch.equal(keep.mask, expected)
    assert torch.equal(keep.kept_counts, expected.sum(-1))


def test_ratio_one_keeps_everything_and_zero_keeps_only_protected():
    scores = torch.randn(3, 2, 40)
    for policy in ("global", "layer", "head", "adakv"):
        assert keep_by_ratio(scores, 1.0, policy, sink_tokens=4, window=8).mask.all()
        zero = keep_by_ratio(scores, 0.0, policy, sink_tokens=4, window=8)
        assert torch.equal(zero.mask, protected_mask(40, 4, 8).expand(3, 2, 40))


def test_global_policy_gives_non_uniform_budgets():
    scores = torch.zeros(2, 2, 20)
    scores[1, 0] = 10.0  # one head holds all the important tokens
    keep = keep_by_ratio(scores, 0.25, "global", sink_tokens=0, window=0)
    assert keep.kept_counts.tolist() == [[0, 0], [20, 0]]
    layer = keep_by_ratio(scores, 0.25, "layer", sink_tokens=0, window=0)
    assert layer.kept_counts.tolist() == [[10, 0], [10, 0]]
    # AdaKV: every head first keeps floor(0.2 * 0.25 * 20) = 1 token.
    adakv = keep_by_ratio(scores, 0.25, "adakv", sink_tokens=0, window=0)
    assert adakv.kept_counts.tolist() == [[9, 1], [9, 1]]


def test_policies_run_on_the_device_of_the_scores():
    scores = torch.randn(2, 2, 16, dtype=torch.bfloat16)
    keep = keep_by_ratio(scores, 0.5, "head", sink_tokens=2, window=2)
    assert keep.mask.device == scores.device
    assert (keep.kept_counts == 2 + 2 + 6).all()


@st.composite
def selection_problems(draw):
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 80))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    # Few distinct values (ties), with NaN and both infinities mixed in.
    palette = torch.tensor([float("nan"), float("-inf"), float("inf"), -1.0, 0.0, 0.5, 2.0])
    scores = palette[torch.randint(0, len(palette), (rows, length), generator=generator)]
    if draw(st.booleans()):
        scores = torch.randn(rows, length, generator=generator).to(torch.bfloat16).float()
    evictable = torch.rand(rows, length, generator=generator) < draw(st.floats(0.0, 1.0))
    evictable[:, 0] = True  # at least one evictable entry per row
    smallest_row = int(evictable.sum(-1).min())
    return scores, evictable, draw(st.integers(0, smallest_row))


@settings(max_examples=300, deadline=None)
@given(selection_problems())
def test_top_per_group_equals_the_stable_sort_definition(problem):
    """Selection without sorting keeps exactly the entries two stable sorts would rank first."""
    scores, evictable, count = problem
    kept = _keep_top_per_group(scores, evictable, count)
    assert torch.equal(kept, keep_top_by_stable_sort(scores, evictable, count))
    assert (kept.sum(-1) == count).all()


def test_top_per_group_breaks_ties_towards_the_earlier_token():
    scores = torch.tensor([[1.0, 3.0, 1.0, 3.0, 1.0, float("nan"), 3.0]])
    evictable = torch.tensor([[True, True, True, False, True, True, True]])
    # Two of the evictable 3.0s are kept (index 3 is protected), then the first evictable 1.0.
    assert _keep_top_per_group(scores, evictable, 3).nonzero()[:, 1].tolist() == [0, 1, 6]
    # Only NaN and protected entries left to fill: NaN ranks as -inf but is still evictable.
    assert _keep_top_per_group(scores, evictable, 6).nonzero()[:, 1].tolist() == [0, 1, 2, 4, 5, 6]
