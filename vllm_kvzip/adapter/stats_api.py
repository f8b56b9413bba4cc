"""Compression metrics on vLLM 0.26.0's `/metrics` (and `LLM.get_metrics()`).

The numbers are made in the engine-core process (the scheduler's
`KVzipManager` frees the blocks) and must reach the process that owns the
Prometheus registry: the API server under `vllm serve`, the `LLM` process
offline.  vLLM 0.26 carries exactly one thing across that boundary for stat
loggers, `SchedulerStats` (msgpack'd when the engine core is a separate
process; dataclass fields only, extra attributes are dropped), and its only
free-form field is the `kv_connector_stats` dict.  So:

* engine core: `Scheduler.update_from_output` is wrapped to drain the
  managers' events every step and put them under one key of
  `kv_connector_stats` of the stats it ships (compressing engines only, and
  they never have a KV connector: `--kv-transfer-config` is refused);
* front end: `StatLoggerManager.__init__` is wrapped to put `KVzipStatLogger`
  first among its loggers; it takes our key out of the dict (leaving None, as
  vLLM made it without a connector) before vLLM's LoggingStatLogger, which
  fails on a non-empty dict when no connector is configured, and
  PrometheusStatLogger see it.

Why not a `vllm.stat_logger_plugins` entry point: only `AsyncLLM` loads those
(not the offline `LLMEngine`), and a payload that reaches a StatLoggerManager
without our logger would crash vLLM's LoggingStatLogger; wrapping the manager
covers both front ends, needs no extra package metadata, and keeps producer
and consumer behind the same `vllm.general_plugins` entry point.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_kvzip.adapter.vllm_api import get_logger
from vllm_kvzip.metrics import CompressionMetrics, take_events

logger = get_logger(__name__)


def kvzip_managers(scheduler) -> list:
    from vllm_kvzip.block_manager.vllm_manager import KVzipManager

    coordinator = scheduler.kv_cache_manager.coordinator
    return [manager for manager in coordinator.single_type_managers if isinstance(manager, KVzipManager)]


class KVzipStatLogger(AggregateStatLoggerBase):
    """Records the compression events that arrive with each engine's SchedulerStats."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        from vllm_kvzip.adapter.engine import kv_compression_config

        self.engine_indexes = list(engine_indexes or [0])
        self.metrics = CompressionMetrics(
            model_name=vllm_config.model_config.served_model_name,
            method=kv_compression_config(vllm_config).method,
            engine_indexes=self.engine_indexes,
        )

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        try:
            events = take_events(scheduler_stats)
        except ValueError as exc:  # never let a bad payload stop the output loop
            logger.warning("vllm-kvzip: dropped compression stats: %s", exc)
            return
        if events:
            self.metrics.observe(events, engine_idx)

    def log_engine_initialized(self):
        pass


def install_stats_hooks() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.metrics.loggers import StatLoggerManager

    if getattr(Scheduler, "_vllm_kvzip_stats_hooked", False):
        return
    from vllm_kvzip.adapter.engine import kv_compression_config
    from vllm_kvzip.metrics import attach_events

    original_update_from_output = Scheduler.update_from_output

    def update_from_output(self, *args, **kwargs):
        outputs = original_update_from_output(self, *args, **kwargs)
        managers = getattr(self, "_vllm_kvzip_managers", None)
        if managers is None:
            managers = self._vllm_kvzip_managers = kvzip_managers(self)
        if managers:
            # Drained every step, shipped or not (log_stats off): nothing piles up.
            events = [event for manager in managers for event in manager.drain_events()]
            if events:
                # vLLM attaches its stats to one of the outputs (none without log_stats).
                stats = next((eco.scheduler_stats for eco in outputs.values() if eco.scheduler_stats), None)
                if stats is not None:
                    attach_events(stats, events)
        return outputs

    original_manager_init = StatLoggerManager.__init__

    def manager_init(self, vllm_config, *args, **kwargs):
        original_manager_init(self, vllm_config, *args, **kwargs)
        if kv_compression_config(vllm_config).enabled:
            # First: it must take its payload out before vLLM's loggers look at it.
            self.stat_loggers.insert(0, KVzipStatLogger(vllm_config, self.engine_indexes))

    Scheduler.update_from_output = update_from_output
    StatLoggerManager.__init__ = manager_init
    Scheduler._vllm_kvzip_stats_hooked = True
