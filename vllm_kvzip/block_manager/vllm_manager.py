"""Scheduler side: a KV-cache spec and manager that give compressed pages back to vLLM.

`KVzipAttentionSpec` is vLLM's full-attention spec plus the compression
settings; layers of a model with compression on report it instead of
`FullAttentionSpec`, and vLLM's `KVCacheSpecRegistry` maps it to
`KVzipManager`.  The manager is vLLM's full-attention manager (allocation,
admission, preemption and metrics are unchanged) with one addition, in the
spirit of vLLM's R-SWA gap eviction: once a request's prefill has been
processed, the blocks between its head-page containers and its dense tail are
freed (replaced by the null block) -- see `CompressionGeometry`.  Head pages are
packed across layers (all layers share one KV buffer), so the geometry needs
the group's layer count, which `KVzipAttentionSpec.merge` records.

The request is compressed at the token count it had when it was (re)admitted:
its prompt, or prompt plus generated tokens after a preemption (recompute).
`note_admission` learns that count from `KVCacheManager.allocate_slots`, which
the adapter wraps, because a single-type manager only sees request ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace

from vllm_kvzip.adapter.kv_cache_api import FullAttentionManager, FullAttentionSpec, register_spec
from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.metrics import COMPRESSED, CompressionEvent


@dataclass(frozen=True, kw_only=True)
class KVzipAttentionSpec(FullAttentionSpec):
    # The settings as canonical JSON: frozen, hashable and picklable without
    # the plugin (the engine core unpickles specs before loading plugins).
    compression_json: str = "{}"
    # Attention layers this spec stands for: 1 per layer's own spec, the
    # group's layer count once vLLM merges a KV cache group (`merge`).  Head
    # pages are packed across layers, so the manager's geometry needs it.
    num_layers: int = 1

    @property
    def compression(self) -> KVCompressionConfig:
        return KVCompressionConfig.parse(json.loads(self.compression_json))

    @classmethod
    def from_full_attention(cls, spec: FullAttentionSpec, config: KVCompressionConfig) -> "KVzipAttentionSpec":
        values = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**values, compression_json=json.dumps(config.to_dict(), sort_keys=True))

    @classmethod
    def merge(cls, specs: list["KVzipAttentionSpec"]) -> "KVzipAttentionSpec":
        # FullAttentionSpec.merge rebuilds the spec from the base fields only.
        merged = super().merge(specs)
        settings = {spec.compression_json for spec in specs}
        if len(settings) != 1:
            raise ValueError("all layers of a KV cache group must share one compression setting")
        return replace(merged, compression_json=settings.pop(), num_layers=sum(spec.num_layers for spec in specs))


@dataclass
class CompressionRecord:
    """What the scheduler did for one compressed request (exact to the block)."""

    geometry: CompressionGeometry
    freed_blocks: int


class KVzipManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: KVzipAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.compression = kv_cache_spec.compression
        # request id -> (tokens at compression, keep ratio) decided at admission;
        # keep ratio None: the request opted out and stays dense.
        self._pending: dict[str, tuple[int, float | None]] = {}
        self._compressed: dict[str, CompressionRecord] = {}
        # Threshold mode: request id -> tokens at admission; blocks freed so far.
        self._threshold: dict[str, int] = {}
        self._compressed_threshold: set[str] = set()
        self.threshold_freed_blocks: dict[str, int] = {}
        self.total_freed_blocks = 0
        self.total_compressed_requests = 0
        # One event per processed prefill, until the engine ships them to the
        # API server's metrics (`drain_events`, called every engine step).
        self._events: list[CompressionEvent] = []

    # -- lifecycle ---------------------------------------------------------------------
    def note_admission(
        self, request_id: str, num_tokens: int, keep_ratio: float | None, threshold_mode: bool = False
    ) -> None:
        """The request (re)starts its prefill of `num_tokens` tokens; None: keep it dense.

        In threshold mode the worker decides which blocks empty out (see
        `free_worker_ranges`); the admission's token count tells its reports
        apart from those of an earlier admission of the same request.
        """
        self._compressed.pop(request_id, None)
        self._threshold.pop(request_id, None)
        if threshold_mode:
            self._pending.pop(request_id, None)
            self._threshold[request_id] = num_tokens
            return
        dense = keep_ratio is None or keep_ratio >= 1.0
        self._pending[request_id] = (num_tokens, None if dense else keep_ratio)

    def free_worker_ranges(
        self,
        request_id: str,
        admission_tokens: int,
        block_ranges: list[tuple[int, int]],
        kept_entries: int | None = None,
    ) -> int:
        """Threshold mode: free logical blocks `[first, end)` the worker's compaction emptied.

        The worker reports them with the step's output, after the moves were
        enqueued, so later users of the blocks run after them.  A report for an
        admission that ended meanwhile (preempted, finished, aborted) is
        dropped: those blocks went back to vLLM with the request.
        """
        if self._threshold.get(request_id) != admission_tokens:
            return 0
        before = self.block_pool.get_num_free_blocks()
        for first, end in block_ranges:
            self._remove_blocks_in_range(request_id, first, end)
        freed = self.block_pool.get_num_free_blocks() - before
        if request_id not in self._compressed_threshold:
            self._compressed_threshold.add(request_id)
            self.total_compressed_requests += 1
            if kept_entries is not None:
                # The first folding (right after the prefill): one metrics event per request,
                # with the kept count the worker measured over all (layer, KV head) pairs.
                pairs = self.num_pairs
                self._events.append(
                    CompressionEvent(
                        COMPRESSED, admission_tokens, pairs, min(kept_entries, admission_tokens * pairs), freed
                    )
                )
        self.threshold_freed_blocks[request_id] = self.threshold_freed_blocks.get(request_id, 0) + freed
        self.total_freed_blocks += freed
        return freed

    @property
    def num_pairs(self) -> int:
        """(layer, KV head) pairs of the group: the unit of the metrics' KV entries."""
        return self.kv_cache_spec.num_layers * self.kv_cache_spec.num_kv_heads

    def geometry_for(self, num_tokens: int, keep_ratio: float) -> CompressionGeometry:
        return CompressionGeometry(
            num_tokens=num_tokens,
            block_size=self.block_size,
            window=self.compression.window,
            keep_ratio=keep_ratio,
            num_kv_heads=self.kv_cache_spec.num_kv_heads,
            num_layers=self.kv_cache_spec.num_layers,
            policy=self.compression.effective_policy,
            sink_tokens=self.compression.sink_tokens,
        )

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        pending = self._pending.get(request_id)
        if pending is None or processed_computed_tokens < pending[0]:
            return
        # The prefill (and with it the worker's compaction, enqueued in that
        # step) is processed: later users of the freed blocks run after it.
        del self._pending[request_id]
        num_tokens, keep_ratio = pending
        if keep_ratio is None:
            self._events.append(CompressionEvent.opted_out(num_tokens, self.num_pairs))
            return
        geometry = self.geometry_for(num_tokens, keep_ratio)
        freed = 0
        if geometry.compresses:
            before = self.block_pool.get_num_free_blocks()
            self._remove_blocks_in_range(request_id, geometry.container_blocks, geometry.dense_start_block)
            freed = self.block_pool.get_num_free_blocks() - before
        self._compressed[request_id] = CompressionRecord(geometry=geometry, freed_blocks=freed)
        self.total_freed_blocks += freed
        self.total_compressed_requests += 1
        self._events.append(CompressionEvent.from_geometry(geometry, freed))

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._pending.pop(request_id, None)
        self._compressed.pop(request_id, None)
        self._threshold.pop(request_id, None)
        self._compressed_threshold.discard(request_id)
        self.threshold_freed_blocks.pop(request_id, None)

    def cache_blocks(self, *args, **kwargs) -> None:
        # Compressed requests rewrite their first blocks: never share them.
        return None

    # -- accounting --------------------------------------------------------------------
    def compression_record(self, request_id: str) -> CompressionRecord | None:
        return self._compressed.get(request_id)

    def drain_events(self) -> list[CompressionEvent]:
        """Events since the last call (the engine ships them with its scheduler stats).

        The metrics come from here, not from the worker: this is where blocks
        are really freed (`freed_blocks` is the block pool's own count), and
        the kept token count is known exactly without the worker (the budget
        policy keeps a fixed total, `CompressionEvent.from_geometry`), so no
        worker-to-scheduler message is needed in keep-ratio mode.
        """
        events, self._events = self._events, []
        return events


def register_kvzip_spec() -> None:
    register_spec(KVzipAttentionSpec, KVzipManager)


# The engine core unpickles the workers' specs (instances of this class) before
# it loads plugins: registering at import time covers that path too.
register_kvzip_spec()
