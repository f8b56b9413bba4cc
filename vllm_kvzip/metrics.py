"""Prometheus metrics of KV compression: what the scheduler freed, per request.

The numbers start in the engine core, where `KVzipManager` frees a request's
gap blocks once its prefill is processed (`CompressionEvent`, exact: the freed
count is the block pool's own, and the kept count follows from the geometry
and the budget policy, which the worker's keep-sets meet exactly; in threshold
mode the worker reports it).  They travel to the
process that serves `/metrics` inside vLLM's `SchedulerStats`, under one key of
its free-form `kv_connector_stats` dict (`attach_events` / `take_events`), and
`CompressionMetrics` turns them into Prometheus series there.  The vLLM side
of that trip lives in `vllm_kvzip.adapter.stats_api`.

Metrics (labels `model_name`, `engine` as vLLM's own, and `method`):

* `vllm:kvzip_kept_ratio` (histogram): per compressed request, the fraction of
  its context KV that stays cached: (scored tokens kept per (layer, KV head),
  on average, + dense tail) / context tokens;
* `vllm:kvzip_freed_blocks_total`: KV blocks given back to vLLM by compression;
* `vllm:kvzip_requests_total{outcome}`: processed prefills by outcome:
  `compressed`, `too_short` (too few tokens before the window to free a
  block: stays dense), `opted_out` (`vllm_xargs` `kv_compression: none` or
  ratio 1);
* `vllm:kvzip_context_tokens_total`, `vllm:kvzip_kept_tokens_total`: context
  tokens of compressed requests and how many of them stay cached (per layer
  and KV head, on average: not always an integer), so that their ratio is the
  token-weighted kept ratio.

A request that is preempted and recomputed is compressed again at its new
length and counted again (its blocks were all freed and allocated anew).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from vllm_kvzip.block_manager.geometry import CompressionGeometry

COMPRESSED = "compressed"
TOO_SHORT = "too_short"
OPTED_OUT = "opted_out"
OUTCOMES = (COMPRESSED, TOO_SHORT, OPTED_OUT)

# Key of our entry in SchedulerStats.kv_connector_stats; `take_events` removes
# it before vLLM's own stat loggers look at that dict.
PAYLOAD_KEY = "vllm_kvzip"
PAYLOAD_VERSION = 2  # 2: sizes over all (layer, KV head) pairs (1: one layer's)

METRIC_PREFIX = "vllm:kvzip_"
KEPT_RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.0


@dataclass(frozen=True)
class CompressionEvent:
    """One processed prefill of a request in a compressing engine.

    Sizes are counted in KV entries (one token of one (layer, KV head) pair)
    over the whole request: `num_pairs = L * H` pairs, so the counts are exact
    whatever the split between layers (the global policy and threshold mode
    keep different counts in different layers).
    """

    outcome: str
    context_tokens: int  # tokens in the cache when the prefill completed
    num_pairs: int  # (layer, KV head) pairs of the model: L * H
    kept_entries: int  # of the context_tokens * num_pairs entries, those still cached
    freed_blocks: int = 0

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; valid: {', '.join(OUTCOMES)}")
        for name in ("context_tokens", "num_pairs", "kept_entries", "freed_blocks"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.num_pairs == 0:
            raise ValueError("num_pairs must be positive")
        if self.kept_entries > self.context_entries:
            raise ValueError(f"kept_entries {self.kept_entries} > {self.context_entries} context entries")
        if self.outcome == COMPRESSED and self.context_tokens == 0:
            raise ValueError("a compressed request has context tokens")

    @classmethod
    def from_geometry(cls, geometry: CompressionGeometry, freed_blocks: int) -> "CompressionEvent":
        """A request the scheduler compressed (or found too short), `freed_blocks` blocks freed.

        The kept count is the one the worker's `keep_by_ratio(policy)` keeps
        over all (layer, KV head) pairs (`geometry.kept_tokens`): known from the
        geometry alone (no worker message), and exact
        (tests/scoring/test_policies.py checks the formula against the keep-sets).
        """
        pairs = geometry.num_pairs
        if not geometry.compresses:
            return cls(TOO_SHORT, geometry.num_tokens, pairs, pairs * geometry.num_tokens, 0)
        tail = geometry.num_tokens - geometry.evictable_tokens
        return cls(COMPRESSED, geometry.num_tokens, pairs, geometry.kept_tokens + pairs * tail, freed_blocks)

    @classmethod
    def opted_out(cls, num_tokens: int, num_pairs: int) -> "CompressionEvent":
        return cls(OPTED_OUT, num_tokens, num_pairs, num_tokens * num_pairs, 0)

    @property
    def context_entries(self) -> int:
        return self.context_tokens * self.num_pairs

    @property
    def kept_tokens(self) -> float:
        """Context tokens still cached, per (layer, KV head) on average."""
        return self.kept_entries / self.num_pairs

    @property
    def kept_ratio(self) -> float:
        return self.kept_entries / self.context_entries if self.context_tokens else 1.0

    def to_row(self) -> list:
        return [self.outcome, self.context_tokens, self.num_pairs, self.kept_entries, self.freed_blocks]

    @classmethod
    def from_row(cls, row: Any) -> "CompressionEvent":
        if not isinstance(row, (list, tuple)) or len(row) != 5:
            raise ValueError(f"malformed compression event {row!r}")
        return cls(*row)


# -- the trip from the engine core to the metrics process ---------------------------------
def encode_events(events: Iterable[CompressionEvent]) -> dict:
    """msgpack-friendly payload (plain lists of str / int)."""
    return {"version": PAYLOAD_VERSION, "events": [event.to_row() for event in events]}


def decode_events(payload: Any) -> list[CompressionEvent]:
    if not isinstance(payload, dict) or payload.get("version") != PAYLOAD_VERSION:
        raise ValueError(f"unsupported vllm-kvzip stats payload {payload!r}")
    return [CompressionEvent.from_row(row) for row in payload.get("events", ())]


def attach_events(scheduler_stats: Any, events: list[CompressionEvent]) -> None:
    """Add `events` to a SchedulerStats (merged with any events already attached)."""
    if not events:
        return
    stats = dict(scheduler_stats.kv_connector_stats or {})
    earlier = decode_events(stats[PAYLOAD_KEY]) if PAYLOAD_KEY in stats else []
    stats[PAYLOAD_KEY] = encode_events(earlier + list(events))
    scheduler_stats.kv_connector_stats = stats


def take_events(scheduler_stats: Any) -> list[CompressionEvent]:
    """Remove our payload from a SchedulerStats and return its events.

    vLLM's LoggingStatLogger hands any non-empty `kv_connector_stats` to the
    configured KV connector's stats class and fails when there is none; with
    our key removed the dict is left as vLLM made it (None without a connector).
    """
    if scheduler_stats is None:
        return []
    stats = scheduler_stats.kv_connector_stats
    if not isinstance(stats, dict) or PAYLOAD_KEY not in stats:
        return []
    rest = {key: value for key, value in stats.items() if key != PAYLOAD_KEY}
    scheduler_stats.kv_connector_stats = rest or None
    return decode_events(stats[PAYLOAD_KEY])


# -- Prometheus --------------------------------------------------------------------------
_registered: list[tuple[Any, Any]] = []  # (registry, collector) we registered


def _unregister_ours(registry) -> None:
    for entry in list(_registered):
        owner, collector = entry
        if owner is registry:
            try:
                registry.unregister(collector)
            except KeyError:  # vLLM's unregister_vllm_metrics() got there first
                pass
            _registered.remove(entry)


class CompressionMetrics:
    """The Prometheus series of one engine group (one per vLLM front-end process).

    Building it replaces the series an earlier instance registered in the same
    registry (vLLM does the same with its own metrics when an engine is
    rebuilt), so counters start from zero with their engine.
    """

    def __init__(self, model_name: str, method: str, engine_indexes: Iterable[int], registry=None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        _unregister_ours(registry)
        labelnames = ["model_name", "engine", "method"]

        def make(cls, name, documentation, extra_labels=(), **kwargs):
            metric = cls(name, documentation, labelnames=labelnames + list(extra_labels), registry=registry, **kwargs)
            _registered.append((registry, metric))
            return metric

        kept_ratio = make(
            Histogram,
            METRIC_PREFIX + "kept_ratio",
            "Per compressed request: fraction of its context KV that stays cached "
            "((tokens kept per layer and KV head + dense tail) / context tokens).",
            buckets=KEPT_RATIO_BUCKETS,
        )
        freed_blocks = make(Counter, METRIC_PREFIX + "freed_blocks", "KV-cache blocks freed by KV compression.")
        requests = make(
            Counter,
            METRIC_PREFIX + "requests",
            "Requests whose prefill completed in a compressing engine, by outcome "
            "(compressed; too_short: too few tokens before the window to free a block; "
            "opted_out: the request asked for no compression).",
            extra_labels=["outcome"],
        )
        context_tokens = make(Counter, METRIC_PREFIX + "context_tokens", "Context tokens of compressed requests.")
        kept_tokens = make(
            Counter,
            METRIC_PREFIX + "kept_tokens",
            "Context tokens of compressed requests that stay cached (per layer and KV head).",
        )
        self._series: dict[int, dict[str, Any]] = {}
        for index in engine_indexes:
            labels = {"model_name": str(model_name), "engine": str(index), "method": method}
            # Children made up front, so every series is exposed (at 0) from the start.
            self._series[index] = {
                "kept_ratio": kept_ratio.labels(**labels),
                "freed_blocks": freed_blocks.labels(**labels),
                "context_tokens": context_tokens.labels(**labels),
                "kept_tokens": kept_tokens.labels(**labels),
                **{outcome: requests.labels(**labels, outcome=outcome) for outcome in OUTCOMES},
            }

    def observe(self, events: Iterable[CompressionEvent], engine_idx: int = 0) -> None:
        series = self._series.get(engine_idx)
        if series is None:
            raise KeyError(f"no vllm-kvzip metrics for engine {engine_idx}")
        for event in events:
            series[event.outcome].inc()
            if event.outcome != COMPRESSED:
                continue
            series["kept_ratio"].observe(event.kept_ratio)
            series["freed_blocks"].inc(event.freed_blocks)
            series["context_tokens"].inc(event.context_tokens)
            series["kept_tokens"].inc(event.kept_tokens)
