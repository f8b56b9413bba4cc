"""Compression metrics: events, their trip inside vLLM's SchedulerStats, and the Prometheus series.

The last tests drive vLLM's real Scheduler (no model, tests/scheduler_harness.py),
send every step's EngineCoreOutputs through vLLM's msgpack codec (the engine
core -> API server hop) and into a real StatLoggerManager, with vLLM's own
logging and Prometheus loggers next to ours.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests.scheduler_harness import NUM_KV_HEADS, NUM_LAYERS, build_scheduler, kvzip_manager, make_request, step
from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.metrics import (
    COMPRESSED,
    OPTED_OUT,
    PAYLOAD_KEY,
    TOO_SHORT,
    CompressionEvent,
    CompressionMetrics,
    attach_events,
    decode_events,
    encode_events,
    take_events,
)

BLOCK = 16
WINDOW = 32
SETTINGS = {"method": "streaming", "keep_ratio": 0.25, "window": WINDOW}


def _geometry(num_tokens, keep_ratio=0.25, num_kv_heads=NUM_KV_HEADS, policy="global"):
    return CompressionGeometry(
        num_tokens=num_tokens, block_size=BLOCK, window=WINDOW, keep_ratio=keep_ratio,
        num_kv_heads=num_kv_heads, num_layers=NUM_LAYERS, policy=policy, sink_tokens=4,
    )


def _kept_per_head(geometry):
    """Context tokens a compressed request keeps per (layer, KV head) on average, as the worker's policy keeps them."""
    return geometry.kept_tokens / geometry.num_pairs + geometry.num_tokens - geometry.evictable_tokens


class _Stats:
    """Stands in for SchedulerStats (only `kv_connector_stats` is used)."""

    def __init__(self, kv_connector_stats=None):
        self.kv_connector_stats = kv_connector_stats


# ---- events ------------------------------------------------------------------------------


def test_event_of_a_compressed_request_counts_kept_tokens_over_all_pairs_plus_the_tail():
    geometry = _geometry(1000)
    # 960 evictable tokens, 4 sinks, 4 layers x 2 heads: the request keeps 8 * 4 + floor(0.25 * 8 * 956)
    # = 1944 of them over its 8 (layer, head) pairs; 40-token tail in every pair.
    event = CompressionEvent.from_geometry(geometry, freed_blocks=43)
    assert event == CompressionEvent(COMPRESSED, 1000, 8, 1944 + 8 * 40, 43)
    assert event.kept_tokens == 283 and event.kept_ratio == pytest.approx(283 / 1000)


@pytest.mark.parametrize(
    "policy, kept",
    [
        ("global", 3 * 12 + 1112),  # floor(0.3 * 3 layers * 3 heads * 412) = floor(1112.4), once for the request
        ("layer", 3 * (12 + 370)),  # floor(370.8) per layer
        ("adakv", 3 * (12 + 370)),
        ("head", 9 * (4 + 123)),  # floor(123.6) per (layer, head)
    ],
)
def test_each_policy_floors_its_budget_once_per_unit(policy, kept):
    geometry = CompressionGeometry(
        num_tokens=485, block_size=BLOCK, window=64, keep_ratio=0.3, num_kv_heads=3, num_layers=3, policy=policy,
        sink_tokens=4,
    )
    assert geometry.evictable_tokens == 416
    event = CompressionEvent.from_geometry(geometry, 17)
    assert event.kept_entries == kept + 9 * 69
    assert event.kept_tokens == pytest.approx(kept / 9 + 69)


def test_event_of_a_short_request_keeps_everything():
    geometry = _geometry(40)
    assert not geometry.compresses
    event = CompressionEvent.from_geometry(geometry, freed_blocks=0)
    pairs = NUM_LAYERS * NUM_KV_HEADS
    assert event == CompressionEvent(TOO_SHORT, 40, pairs, 40 * pairs, 0) and event.kept_ratio == 1.0
    assert CompressionEvent.opted_out(800, 3) == CompressionEvent(OPTED_OUT, 800, 3, 2400, 0)


@pytest.mark.parametrize(
    "row",
    [
        ["shrunk", 10, 1, 5, 1],  # unknown outcome
        [COMPRESSED, 10, 2, 21, 1],  # kept more than there was
        [COMPRESSED, 10, 1, 5, -1],
        [COMPRESSED, 10.0, 1, 5, 1],  # not an int
        [COMPRESSED, 0, 1, 0, 0],
        [COMPRESSED, 10, 0, 0, 0],
        [COMPRESSED, 10, 1, 5],
        "compressed",
    ],
)
def test_malformed_rows_are_refused(row):
    with pytest.raises(ValueError):
        CompressionEvent.from_row(row)


def test_payload_round_trips_through_vllms_msgpack_codec():
    """The engine core ships SchedulerStats msgpack'd: our payload must come out equal, other fields too."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    events = [CompressionEvent(COMPRESSED, 1000, 3, 849, 43), CompressionEvent.opted_out(77, 3)]
    stats = SchedulerStats(num_running_reqs=3)
    attach_events(stats, events)
    stats.kvzip_extra = "dropped"  # what an extra attribute would suffer
    buffers = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
    received = MsgpackDecoder(EngineCoreOutputs).decode(buffers).scheduler_stats
    assert not hasattr(received, "kvzip_extra")
    assert received.num_running_reqs == 3
    assert take_events(received) == events
    assert received.kv_connector_stats is None


def test_take_events_leaves_the_dict_as_vllm_made_it():
    stats = _Stats()
    assert take_events(stats) == [] and stats.kv_connector_stats is None
    attach_events(stats, [])
    assert stats.kv_connector_stats is None  # nothing to say: nothing attached
    first, second = CompressionEvent.opted_out(5, 1), CompressionEvent(COMPRESSED, 500, 1, 100, 20)
    attach_events(stats, [first])
    attach_events(stats, [second])  # merged, in order
    assert take_events(stats) == [first, second]
    assert stats.kv_connector_stats is None
    assert take_events(stats) == []
    # A connector's own entries (never together with compression today) stay untouched.
    stats = _Stats({"NixlConnector": {"num_transfers": 2}})
    attach_events(stats, [first])
    assert take_events(stats) == [first]
    assert stats.kv_connector_stats == {"NixlConnector": {"num_transfers": 2}}
    assert take_events(None) == []


def test_a_bad_payload_is_removed_before_it_is_refused():
    stats = _Stats({PAYLOAD_KEY: {"version": 99}})
    with pytest.raises(ValueError, match="unsupported"):
        take_events(stats)
    assert stats.kv_connector_stats is None
    assert decode_events(encode_events([])) == []


# ---- Prometheus series -------------------------------------------------------------------


def _value(registry, name, **labels):
    return registry.get_sample_value(name, {"model_name": "m", "method": "streaming", **labels})


def test_metrics_sum_the_events_per_engine():
    registry = CollectorRegistry()
    metrics = CompressionMetrics("m", "streaming", [0, 1], registry=registry)
    # Every series exists (at 0) before the first event.
    for engine in ("0", "1"):
        assert _value(registry, "vllm:kvzip_freed_blocks_total", engine=engine) == 0
        assert _value(registry, "vllm:kvzip_kept_ratio_count", engine=engine) == 0
        for outcome in (COMPRESSED, TOO_SHORT, OPTED_OUT):
            assert _value(registry, "vllm:kvzip_requests_total", engine=engine, outcome=outcome) == 0
    events = [
        CompressionEvent(COMPRESSED, 1000, 1, 283, 43),
        CompressionEvent(COMPRESSED, 800, 3, 1201, 20),  # 400 + 1/3 tokens per head
        CompressionEvent.from_geometry(_geometry(40), 0),
        CompressionEvent.opted_out(900, 3),
    ]
    metrics.observe(events, engine_idx=1)
    metrics.observe([CompressionEvent(COMPRESSED, 100, 2, 100, 2)], engine_idx=0)
    assert _value(registry, "vllm:kvzip_requests_total", engine="1", outcome=COMPRESSED) == 2
    assert _value(registry, "vllm:kvzip_requests_total", engine="1", outcome=TOO_SHORT) == 1
    assert _value(registry, "vllm:kvzip_requests_total", engine="1", outcome=OPTED_OUT) == 1
    assert _value(registry, "vllm:kvzip_freed_blocks_total", engine="1") == 63
    assert _value(registry, "vllm:kvzip_context_tokens_total", engine="1") == 1800
    assert _value(registry, "vllm:kvzip_kept_tokens_total", engine="1") == pytest.approx(683 + 1 / 3)
    assert _value(registry, "vllm:kvzip_kept_ratio_count", engine="1") == 2
    assert _value(registry, "vllm:kvzip_kept_ratio_sum", engine="1") == pytest.approx(0.283 + 1201 / 2400)
    assert _value(registry, "vllm:kvzip_kept_ratio_bucket", engine="1", le="0.3") == 1
    assert _value(registry, "vllm:kvzip_kept_ratio_bucket", engine="1", le="0.5") == 1  # 0.5004 is above 0.5
    assert _value(registry, "vllm:kvzip_kept_ratio_bucket", engine="1", le="0.55") == 2
    assert _value(registry, "vllm:kvzip_kept_ratio_bucket", engine="1", le="0.25") == 0
    assert _value(registry, "vllm:kvzip_freed_blocks_total", engine="0") == 2
    with pytest.raises(KeyError):
        metrics.observe(events, engine_idx=2)


def test_a_new_instance_replaces_the_old_series():
    registry = CollectorRegistry()
    CompressionMetrics("m", "streaming", [0], registry=registry).observe([CompressionEvent(COMPRESSED, 10, 1, 5, 1)])
    assert _value(registry, "vllm:kvzip_freed_blocks_total", engine="0") == 1
    CompressionMetrics("m", "streaming", [0], registry=registry)  # no "Duplicated timeseries" error
    assert _value(registry, "vllm:kvzip_freed_blocks_total", engine="0") == 0


# ---- inside vLLM's scheduler and stat loggers ----------------------------------------------


@pytest.fixture(scope="module")
def scheduler_factory(embedded_model):
    def factory(kv=SETTINGS, **overrides):
        return build_scheduler(embedded_model, kv, block_size=BLOCK, **overrides)

    return factory


def _through_the_wire(engine_outputs):
    """What the API server receives: each EngineCoreOutputs msgpack'd and decoded."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    encoder, decoder = MsgpackEncoder(), MsgpackDecoder(EngineCoreOutputs)
    return [decoder.decode(encoder.encode(outputs)) for outputs in engine_outputs]


def test_vllms_logging_stat_logger_cannot_take_our_payload_by_itself(scheduler_factory):
    """Why our logger must come first: vLLM hands kv_connector_stats to a connector that is not there."""
    from vllm.v1.metrics.loggers import LoggingStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    vllm_config = scheduler_factory().vllm_config
    stats = SchedulerStats()
    attach_events(stats, [CompressionEvent.opted_out(5, 1)])
    with pytest.raises(AttributeError, match="connector_cls"):
        LoggingStatLogger(vllm_config).record(stats, None)


def test_stat_loggers_see_exact_numbers_from_the_scheduler(scheduler_factory):
    from prometheus_client import REGISTRY
    from vllm.v1.metrics.loggers import LoggingStatLogger, PerEngineStatLoggerAdapter, StatLoggerManager

    from vllm_kvzip.adapter.stats_api import KVzipStatLogger

    scheduler = scheduler_factory()
    manager = StatLoggerManager(scheduler.vllm_config)
    assert isinstance(manager.stat_loggers[0], KVzipStatLogger)
    assert any(
        isinstance(logger, PerEngineStatLoggerAdapter)
        and isinstance(logger.per_engine_stat_loggers[0], LoggingStatLogger)
        for logger in manager.stat_loggers
    ), "vLLM's logging stat logger should run too"
    plan = [  # (prompt tokens, per-request settings)
        (1000, None),
        (700, {"kv_compression_ratio": 0.5}),
        (300, None),
        (40, None),  # too short to free a block
        (800, {"kv_compression": "none"}),
        (600, {"kv_compression_ratio": 1.0}),  # keeps everything: opted out
    ]
    for prompt, extra in plan:
        scheduler.add_request(make_request(prompt, 4, extra))
    engine_outputs = []
    while scheduler.requests:
        step(scheduler, engine_outputs)
    for outputs in _through_the_wire(engine_outputs):
        if outputs.scheduler_stats is not None:
            manager.record(outputs.scheduler_stats, None, engine_idx=outputs.engine_index)
            assert outputs.scheduler_stats.kv_connector_stats is None  # vLLM's loggers saw nothing of ours
    manager.log()  # vLLM's periodic log line still works

    compressed = [_geometry(1000), _geometry(700, 0.5), _geometry(300)]
    assert all(geometry.compresses for geometry in compressed) and not _geometry(40).compresses
    labels = {"model_name": scheduler.vllm_config.model_config.served_model_name, "engine": "0", "method": "streaming"}

    def value(name, **extra):
        return REGISTRY.get_sample_value(name, {**labels, **extra})

    assert value("vllm:kvzip_requests_total", outcome=COMPRESSED) == 3
    assert value("vllm:kvzip_requests_total", outcome=TOO_SHORT) == 1
    assert value("vllm:kvzip_requests_total", outcome=OPTED_OUT) == 2
    assert value("vllm:kvzip_kept_ratio_count") == 3
    kept = [_kept_per_head(g) for g in compressed]
    assert value("vllm:kvzip_kept_ratio_sum") == pytest.approx(sum(k / g.num_tokens for k, g in zip(kept, compressed)))
    assert value("vllm:kvzip_kept_tokens_total") == pytest.approx(sum(kept))
    assert value("vllm:kvzip_freed_blocks_total") == sum(g.freed_blocks for g in compressed)
    assert value("vllm:kvzip_freed_blocks_total") == kvzip_manager(scheduler).total_freed_blocks
    assert value("vllm:kvzip_context_tokens_total") == 2000
    # vLLM's own series are still there (our logger did not replace its Prometheus logger).
    assert REGISTRY.get_sample_value("vllm:num_requests_running", {"model_name": labels["model_name"], "engine": "0"}) == 0


def test_no_payload_and_no_logger_without_compression(scheduler_factory):
    from vllm.v1.metrics.loggers import StatLoggerManager

    from vllm_kvzip.adapter.stats_api import KVzipStatLogger

    scheduler = scheduler_factory(kv={"method": "none"})
    scheduler.add_request(make_request(900, 3))
    engine_outputs = []
    while scheduler.requests:
        step(scheduler, engine_outputs)
    assert all(o.scheduler_stats is None or o.scheduler_stats.kv_connector_stats is None for o in engine_outputs)
    assert not any(isinstance(logger, KVzipStatLogger) for logger in StatLoggerManager(scheduler.vllm_config).stat_loggers)


def test_events_are_drained_even_when_stats_are_off(scheduler_factory):
    scheduler = scheduler_factory()
    scheduler.log_stats = False  # vLLM's `--disable-log-stats`: make_stats returns None
    scheduler.add_request(make_request(1000, 3))
    engine_outputs = []
    while scheduler.requests:
        step(scheduler, engine_outputs)
    assert all(o.scheduler_stats is None for o in engine_outputs)
    manager = kvzip_manager(scheduler)
    assert manager.total_compressed_requests == 1 and manager.drain_events() == []
