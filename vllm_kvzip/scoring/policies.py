"""From scores to keep-sets: pure, vectorised, device-agnostic torch.

Every policy takes scores `[L, H, n]` over the n scored tokens of one request
(higher = more important) and returns a `KeepSet`: a bool mask `[L, H, n]`
(True = keep) and the kept count of every (layer, KV head).

Protected tokens are ALWAYS kept and are not part of the budget:
  * the first `sink_tokens` of the scored span (attention sinks), and
  * the newest `window` tokens of the scored span.
Everything else is *evictable*.  With `E = n - protected` evictable tokens per
head, a keep ratio r keeps the protected tokens plus
  * global: floor(r * L * H * E) evictable pairs, chosen across all layers and heads;
  * layer:  floor(r * H * E) per layer, chosen freely across that layer's heads;
  * head:   floor(r * E) per (layer, head);
  * adakv:  floor(r * H * E) per layer like "layer", but every head first keeps
            its floor(alpha * r * E) best tokens (AdaKV's safeguard, alpha = 0.2).
so the kept fraction of the *evictable* tokens is r (up to the floor).  Ties
are broken by position (the earlier token wins), so the counts are exact.

Deviation from snu-mllab/KVzip: the reference keeps `score > thres` where
`thres` is the k-th largest score, i.e. it keeps k - 1 pairs (fewer on ties).
We keep exactly the top k, so a ratio means the same thing for every method
(the head-level method has massive ties).  kvpress's KVzipPress also keeps an
exact count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POLICY_NAMES: tuple[str, ...] = ("global", "layer", "head", "adakv")
ADAKV_SAFEGUARD = 0.2

# Floating error guard for floor(ratio * count): 0.3 * 10 is 2.9999999999999996.
_FLOOR_EPSILON = 1e-9


@dataclass(frozen=True)
class KeepSet:
    """mask: [L, H, n] bool, True = keep.  kept_counts: [L, H] int64 (protected included)."""

    mask: Tensor
    kept_counts: Tensor

    @property
    def kept_fraction(self) -> float:
        return float(self.kept_counts.sum()) / max(1, self.mask.numel())


def protected_mask(num_tokens: int, sink_tokens: int, window: int, device: torch.device | str = "cpu") -> Tensor:
    """[n] bool: the sinks and the newest `window` tokens."""
    positions = torch.arange(num_tokens, device=device)
    return (positions < sink_tokens) | (positions >= num_tokens - window)


def evictable_count(num_tokens: int, sink_tokens: int, window: int) -> int:
    """Tokens outside `protected_mask`, counted on the host (no read-back from the device)."""
    sinks_end = min(sink_tokens, num_tokens)
    window_start = max(num_tokens - window, 0)
    return max(0, window_start - sinks_end)


def budget(keep_ratio: float, count: int) -> int:
    """floor(keep_ratio * count), robust to 0.3 * 10 = 2.99999..."""
    return int(keep_ratio * count + _FLOOR_EPSILON) if count > 0 else 0


def total_keep_count(
    keep_ratio: float,
    policy: str,
    num_layers: int,
    num_heads: int,
    num_tokens: int,
    *,
    sink_tokens: int = 4,
    window: int = 128,
) -> int:
    """Tokens `keep_by_ratio` keeps over all `num_layers * num_heads` (layer, head) pairs (protected included).

    Fixed before scoring for every policy (how they are split between layers and
    heads depends on the scores for all but "head"): the scheduler sizes a
    request's head-page containers with it (`CompressionGeometry`).
    """
    if policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICY_NAMES)}")
    evictable = evictable_count(num_tokens, sink_tokens, window)
    protected = num_tokens - evictable
    pairs = num_layers * num_heads
    if policy == "global":
        return pairs * protected + budget(keep_ratio, pairs * evictable)
    return num_layers * layer_keep_count(
        keep_ratio, policy, num_heads, num_tokens, sink_tokens=sink_tokens, window=window
    )


def layer_keep_count(
    keep_ratio: float, policy: str, num_heads: int, num_tokens: int, *, sink_tokens: int = 4, window: int = 128
) -> int:
    """Tokens one layer keeps over its `num_heads` heads with `keep_by_ratio` (protected included).

    Known before scoring for every policy but "global" (whose split between
    layers depends on the scores); `total_keep_count` builds on it.
    """
    if policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICY_NAMES)}")
    if policy == "global":
        raise ValueError("the global policy's per-layer count depends on the scores")
    evictable = evictable_count(num_tokens, sink_tokens, window)
    protected = num_tokens - evictable
    if policy == "head":
        return num_heads * (protected + budget(keep_ratio, evictable))
    return num_heads * protected + budget(keep_ratio, num_heads * evictable)  # layer, adakv


def keep_top_by_stable_sort(scores: Tensor, evictable: Tensor, count: int) -> Tensor:
    """The definition `_keep_top_per_group` implements: keep the first `count` ranks of every row.

    Ranks come from two stable sorts: higher score first (NaN as -inf, the
    earlier index first on ties), then protected entries last, so that they
    never take a rank even when evictable scores are -inf.  Kept as the
    reference of the tests and of `benchmarks/prefill_cost.py`.
    """
    ranked = torch.nan_to_num(scores.float(), nan=float("-inf"))
    order = torch.sort(-ranked, dim=-1, stable=True).indices
    protected_last = (~torch.gather(evictable, -1, order)).to(torch.int8)
    order = torch.gather(order, -1, torch.sort(protected_last, dim=-1, stable=True).indices)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (ranks < count) & evictable


def _keep_top_per_group(scores: Tensor, evictable: Tensor, count: int) -> Tensor:
    """Keep the `count` highest evictable scores of every row of `scores` [G, N].

    Non-evictable entries never count against the budget; NaN ranks as -inf.
    Ties go to the earlier index, as a stable sort of the negated scores
    would order them.  No sort: the row's `count`-th largest value `kth`
    (a radix select, `topk` unsorted) splits the row into the entries above
    it, all kept, and those equal to it, of which the first `count - above`
    are kept.  The same keep set as `keep_top_by_stable_sort` (two stable
    sorts of the whole row), for a fraction of the work on the GPU (the
    global policy's row is every (layer, head, token) of a request), and
    nothing is read back.
    """
    if count <= 0:
        return torch.zeros_like(evictable)
    ranked = torch.nan_to_num(scores.float(), nan=float("-inf"))
    # Protected entries rank lowest; `& evictable` below keeps them out even when kth is -inf.
    ranked = torch.where(evictable, ranked, float("-inf"))
    kth = ranked.topk(count, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = ranked > kth
    tied = (ranked == kth) & evictable
    missing = count - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= missing))


def keep_by_ratio(
    scores: Tensor,
    keep_ratio: float,
    policy: str = "global",
    *,
    sink_tokens: int = 4,
    window: int = 128,
    adakv_safeguard: float = ADAKV_SAFEGUARD,
) -> KeepSet:
    """Keep-set for a keep ratio (fraction of the evictable tokens kept)."""
    if policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICY_NAMES)}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be within [0, 1], got {keep_ratio}")
    num_layers, num_heads, num_tokens = scores.shape
    protected = protected_mask(num_tokens, sink_tokens, window, scores.device)
    num_evictable = evictable_count(num_tokens, sink_tokens, window)
    evictable = (~protected).expand(num_layers, num_heads, num_tokens)

    if policy == "global":
        count = budget(keep_ratio, num_layers * num_heads * num_evictable)
        chosen = _keep_top_per_group(scores.reshape(1, -1), evictable.reshape(1, -1), count)
    elif policy == "head":
        chosen = _keep_top_per_group(
            scores.reshape(num_layers * num_heads, -1),
            evictable.reshape(num_layers * num_heads, -1),
            budget(keep_ratio, num_evictable),
        )
    else:
        per_layer = budget(keep_ratio, num_heads * num_evictable)
        layer_scores = scores.reshape(num_layers, -1).float()
        if policy == "adakv":
            # Each head's best floor(alpha * r * E) tokens are kept first (AdaKV
            # sets them to +max), then the layer budget is filled across heads.
            safe = budget(adakv_safeguard * keep_ratio, num_evictable)
            safeguarded = _keep_top_per_group(
                scores.reshape(num_layers * num_heads, -1), evictable.reshape(num_layers * num_heads, -1), safe
            ).reshape(num_layers, -1)
            layer_scores = torch.where(safeguarded, torch.full_like(layer_scores, float("inf")), layer_scores)
        chosen = _keep_top_per_group(layer_scores, evictable.reshape(num_layers, -1), per_layer)
    mask = chosen.reshape(num_layers, num_heads, num_tokens) | protected
    return KeepSet(mask=mask, kept_counts=mask.sum(dim=-1))


def keep_by_threshold(scores: Tensor, threshold: float, *, sink_tokens: int = 4, window: int = 128) -> KeepSet:
    """KVzap / DMS thresholding: keep a pair iff its (log-)score >= threshold.

    kvpress's DMSPress evicts `score < threshold`, i.e. keeps `>=`; we do the same.
    """
    num_tokens = scores.shape[-1]
    mask = (scores >= threshold) | protected_mask(num_tokens, sink_tokens, window, scores.device)
    return KeepSet(mask=mask, kept_counts=mask.sum(dim=-1))
