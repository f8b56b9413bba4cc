"""Worker-side state of vllm-kvzip: which request is compressed, and where its pages are.

One `WorkerCompressionState` lives in each worker process (created when the
attention backend's metadata builder is built).  It keeps

* per-request bookkeeping (`RequestEntry`): the token count at which the
  request is compressed, its keep ratio, its slot;
* a `RaggedPageTable`: persistent device tensors indexed by slot, which the
  decode kernels read through a per-step row -> slot map.  Slot 0 is the
  "dense" slot (no ragged part) used by every request that is not compressed;
* the current step's batch (request ids in row order), stashed by the
  model-runner hooks in `vllm_kvzip.adapter.runner_hooks`;
* the whole KV cache as one tensor `kv_cache [L * NB, H, bs, 2 * head_size]`
  (all layers share one buffer, `vllm_kvzip.adapter.kv_cache_api`): head pages
  are packed across layers, so compaction and decode address it as a whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from vllm_kvzip.config import KVCompressionConfig, request_keep_ratio, request_uses_threshold

DENSE_SLOT = 0


class RaggedPageTable:
    """Per-slot page metadata in persistent tensors (fixed addresses: CUDA-graph safe)."""

    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.kept_len = torch.zeros(num_slots, num_layers, num_kv_heads, dtype=torch.int32, device=device)
        self.page_start = torch.zeros(num_slots, num_layers, num_kv_heads, dtype=torch.int32, device=device)
        self.dense_start = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self._free = list(range(num_slots - 1, DENSE_SLOT, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("vllm-kvzip: no free compressed-request slot (more running requests than max_num_seqs)")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot == DENSE_SLOT or slot in self._free:
            raise RuntimeError(f"vllm-kvzip: slot {slot} released twice")
        # Reset so a stale slot can never be read as a compressed layout.
        self.kept_len[slot].zero_()
        self.page_start[slot].zero_()
        self.dense_start[slot] = 0
        self._free.append(slot)


class GpuTimer:
    """Device time of work bracketed by CUDA event pairs, read once the events have completed.

    Reading an event's time waits for it; this only reads pairs whose end has passed (or all of
    them, synchronising, when asked for the total), so that timing never holds the host back.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._open: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def add(self, start: "torch.cuda.Event | None", end: "torch.cuda.Event | None") -> None:
        if start is None or end is None:
            return
        self._open.append((start, end))
        if len(self._open) > 64:
            self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        still_open = []
        for start, end in self._open:
            if wait or end.query():
                end.synchronize()
                self.seconds += start.elapsed_time(end) / 1e3
            else:
                still_open.append((start, end))
        self._open = still_open

    def total_seconds(self) -> float:
        self._collect(wait=True)
        return self.seconds


@dataclass
class RequestEntry:
    request_id: str
    keep_ratio: float | None  # None: the request stays dense
    slot: int = DENSE_SLOT
    compressed: bool = False  # the prefill completed and compression (or the decision not to) is done
    kept_tokens: int = 0  # kept evictable tokens summed over layers and heads
    evictable_tokens: int = 0  # per (layer, head)
    dense_start: int = 0
    # Threshold mode (KVzap / DMS): budgets are decided here, block by block.
    threshold_mode: bool = False
    admission_tokens: int = 0  # tokens of the prefill the request was (re)admitted with
    containers: list[int] = field(default_factory=list)  # physical ids of the head-page blocks, in page order
    dense_start_block: int = 0  # first logical block of the dense tail
    next_retire_block: int = 0  # fold the dense tail into the head pages once it reaches this block
    retirements: int = 0
    # Threshold mode: the host copy of this request's page-table rows (kept_len, page_start [L, H]).
    host_kept_len: torch.Tensor | None = None
    host_page_start: torch.Tensor | None = None
    keep_digest: str | None = None  # ratio mode: `keep_set_digest` of the prefill's keep mask


@dataclass
class StepBatch:
    """The batch of the step being executed (rows in attention order)."""

    request_ids: list[str] = field(default_factory=list)
    # Requests whose prefill completes in this step -> their token count.
    completing: dict[str, int] = field(default_factory=dict)
    # Tokens in the cache after this step, for every request of the step.
    reached: dict[str, int] = field(default_factory=dict)


class WorkerCompressionState:
    def __init__(
        self,
        config: KVCompressionConfig,
        layer_names: list[str],
        num_kv_heads: int,
        head_size: int,
        block_size: int,
        max_num_seqs: int,
        device: torch.device,
    ) -> None:
        self.config = config
        self.policy = config.effective_policy
        self.layer_names = list(layer_names)
        self.layer_index = {name: index for index, name in enumerate(self.layer_names)}
        self.num_layers = len(self.layer_names)
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size
        self.device = device
        self.table = RaggedPageTable(max_num_seqs + 1, self.num_layers, num_kv_heads, device)
        # Every layer's cache, one after another: [L * NB, H, bs, 2 * head_size]
        # (set by `attach_kv_cache` once vLLM has allocated the cache).
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks_per_layer = 0
        self.requests: dict[str, RequestEntry] = {}
        self.step = StepBatch()
        # Requests whose compaction is due (prefill done, not yet compacted).
        self.pending: dict[str, int] = {}
        # Keep-ratio compactions planned on the device, launched in the next step
        # (`vllm_kvzip.backend.compressor.apply_planned_compaction`), by request id.
        self.planned: dict = {}
        # Score buffers filled during the forward pass (KVzap), by layer name.
        self.score_caches: dict[str, torch.Tensor] = {}
        self.score_buffer: torch.Tensor | None = None  # [L, entries]: the score caches are its rows
        # [L, H] saved head scores (method "head").
        self.head_scores: torch.Tensor | None = None
        self.total_compressed = 0
        self.total_kept_tokens = 0
        self.total_evictable_tokens = 0
        self.total_freed_blocks = 0
        self.total_retirements = 0  # decode-time (DMS) foldings of the dense tail
        self.total_repacks = 0  # of those, the ones that re-packed every kept token (plan.RESERVE_FOLDINGS)
        # Threshold mode: blocks the worker freed, for the scheduler (sent with the
        # next ModelRunnerOutput): request id -> {"admission": tokens at admission, "ranges":
        # [(first, end) logical blocks], "kept_entries": first folding's kept count or None}.
        self.freed_block_ranges: dict[str, dict] = {}
        # Wall time of KVzip's reconstruction passes (device-synchronised), summed over requests.
        self.total_scoring_seconds = 0.0
        # Host time of every compression and folding (scoring, planning, compaction launch; not the
        # wait for the previous forward before a planned compaction is launched).
        self.total_compression_seconds = 0.0
        # Device time of the keep-ratio compressions' kernels (CUDA only).
        self.gpu_timer = GpuTimer()
        # Debugging / tests: keep masks [L, H, evictable] and the scores they
        # came from, by request id (VLLM_KVZIP_RECORD_KEEP_SETS=1 turns it on).
        record = os.environ.get("VLLM_KVZIP_RECORD_KEEP_SETS") == "1"
        self.recorded_keep_sets: dict[str, torch.Tensor] | None = {} if record else None
        self.recorded_scores: dict[str, torch.Tensor] | None = {} if record else None

    def attach_kv_cache(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check that the layers' caches lie one after another in one buffer, in layer order, and view it whole."""
        first = kv_caches[self.layer_names[0]]
        num_blocks = first.shape[0]
        if tuple(first.shape[1:]) != (self.num_kv_heads, self.block_size, 2 * self.head_size):
            raise RuntimeError(f"vllm-kvzip: unexpected KV cache shape {tuple(first.shape)}")
        layer_bytes = first.numel() * first.element_size()
        for index, name in enumerate(self.layer_names):
            cache = kv_caches[name]
            if (
                cache.shape != first.shape
                or cache.dtype != first.dtype
                or not cache.is_contiguous()
                or cache.data_ptr() != first.data_ptr() + index * layer_bytes
            ):
                raise RuntimeError(
                    f"vllm-kvzip: KV cache of layer {name} is not slice {index} of one shared buffer; "
                    "cross-layer page packing needs vllm-kvzip's KV cache allocation"
                )
        # Layer 0's view, extended over the L slices that follow it in the same storage.
        whole = first.as_strided((self.num_layers * num_blocks, *first.shape[1:]), first.stride())
        assert whole.is_contiguous() and whole.data_ptr() == first.data_ptr()
        self.kv_cache = whole
        self.num_blocks_per_layer = num_blocks

    def load_method_assets(self, model_config) -> None:
        """Per-method data the compressor needs (saved head scores)."""
        if self.config.method == "head":
            from vllm_kvzip.scoring.head_scores import load_head_scores
            from vllm_kvzip.scoring.kvzap_model import ModelShape

            shape = ModelShape.from_config(model_config.hf_config)
            self.head_scores = load_head_scores(self.config.head_scores, model_config.model, shape).to(self.device)

    def record_compression(self, entry: "RequestEntry", geometry, seconds: float, scoring_seconds: float = 0.0) -> None:
        """Count one compressed request and log it; `seconds` includes `scoring_seconds` (KVzip's pass)."""
        pairs = self.num_layers * self.num_kv_heads
        self.total_compressed += 1
        self.total_scoring_seconds += scoring_seconds
        self.total_compression_seconds += seconds
        self.total_kept_tokens += entry.kept_tokens
        self.total_evictable_tokens += entry.evictable_tokens * pairs
        self.total_freed_blocks += geometry.freed_blocks
        line = compression_log_line(entry, geometry, pairs, self.config.method, seconds, scoring_seconds)
        logger().info("vllm-kvzip: %s", line)

    def record_retirement(
        self, entry: "RequestEntry", num_tokens: int, freed_blocks: int, seconds: float, repacked: bool = True
    ) -> None:
        """Threshold mode: one folding of the dense tail (the first one happens right after the prefill)."""
        pairs = self.num_layers * self.num_kv_heads
        first = entry.retirements == 1
        self.total_compression_seconds += seconds
        if first:
            self.total_compressed += 1
            self.total_kept_tokens += entry.kept_tokens
            self.total_evictable_tokens += entry.evictable_tokens * pairs
        else:
            self.total_retirements += 1
            self.total_repacks += int(repacked)
        # The block total is kept by report_freed_blocks; one log line per request
        # (its prefill), the decode-time foldings at debug level.
        log = logger().info if first else logger().debug
        log(
            "vllm-kvzip: request %s %s (%s, threshold %g): kept %.0f of %d context tokens per (layer, head) "
            "+ %d dense tail tokens, freed %d blocks (%d in all), %.1f ms",
            entry.request_id,
            "compressed" if first else "folded its decode tail",
            self.config.method,
            self.config.threshold,
            entry.kept_tokens / pairs,
            entry.evictable_tokens,
            num_tokens - entry.evictable_tokens,
            freed_blocks,
            entry.dense_start_block - len(entry.containers),
            seconds * 1e3,
        )

    def stats(self) -> dict[str, float | int]:
        """Totals since the engine started (benchmarks read them, e.g. with `worker_compression_stats`)."""
        gpu_seconds = self.gpu_timer.total_seconds()  # waits for the compressions still running
        return {
            "method": self.config.method,
            "compressed_requests": self.total_compressed,
            "kept_tokens": self.total_kept_tokens,
            "evictable_tokens": self.total_evictable_tokens,
            "kept_fraction": self.total_kept_tokens / max(1, self.total_evictable_tokens),
            "freed_blocks": self.total_freed_blocks,
            "decode_foldings": self.total_retirements,
            "decode_repacks": self.total_repacks,
            "scoring_seconds": self.total_scoring_seconds,
            "scoring_ms_per_request": 1e3 * self.total_scoring_seconds / max(1, self.total_compressed),
            "compression_seconds": self.total_compression_seconds,
            "compression_ms_per_request": 1e3 * self.total_compression_seconds / max(1, self.total_compressed),
            # Device time of the keep-ratio compressions' kernels (planning and moves); 0 off CUDA.
            "compression_gpu_seconds": gpu_seconds,
            "compression_gpu_ms_per_request": 1e3 * gpu_seconds / max(1, self.total_compressed),
        }

    # -- request lifecycle -------------------------------------------------------------
    def add_request(self, request_id: str, extra_args: dict | None) -> RequestEntry:
        self.drop_request(request_id)
        entry = RequestEntry(
            request_id=request_id,
            keep_ratio=request_keep_ratio(self.config, extra_args),
            threshold_mode=request_uses_threshold(self.config, extra_args),
        )
        self.requests[request_id] = entry
        return entry

    def drop_request(self, request_id: str) -> None:
        """Finished, aborted or preempted: forget the request (its blocks go back to vLLM)."""
        self.pending.pop(request_id, None)
        self.planned.pop(request_id, None)
        self.freed_block_ranges.pop(request_id, None)
        entry = self.requests.pop(request_id, None)
        if entry is not None and entry.slot != DENSE_SLOT:
            self.table.release(entry.slot)

    def report_freed_blocks(self, entry: RequestEntry, first_block: int, end_block: int, num_tokens: int) -> None:
        report = self.freed_block_ranges.setdefault(
            entry.request_id, {"admission": entry.admission_tokens, "ranges": [], "kept_entries": None}
        )
        report["ranges"].append((first_block, end_block))
        if entry.retirements == 1:
            # First folding: KV entries kept over all (layer, head) pairs (scored kept + dense tail), for the metrics.
            tail = num_tokens - entry.evictable_tokens
            report["kept_entries"] = entry.kept_tokens + self.num_layers * self.num_kv_heads * tail
        self.total_freed_blocks += end_block - first_block

    def take_freed_block_ranges(self) -> dict[str, dict]:
        ranges, self.freed_block_ranges = self.freed_block_ranges, {}
        return ranges

    def slot_of(self, request_id: str) -> int:
        entry = self.requests.get(request_id)
        return DENSE_SLOT if entry is None else entry.slot


def install_state(config: KVCompressionConfig, kv_cache_spec, layer_names, vllm_config, device) -> WorkerCompressionState:
    """Build this worker's state from a metadata builder's arguments and make it current."""
    merged_layers = getattr(kv_cache_spec, "num_layers", len(layer_names))
    if merged_layers != len(layer_names):
        # The scheduler sizes head-page containers with the spec's layer count.
        raise RuntimeError(
            f"vllm-kvzip: the KV cache spec stands for {merged_layers} layers but the attention group has "
            f"{len(layer_names)}; KV compression needs every attention layer in one group"
        )
    state = WorkerCompressionState(
        config=config,
        layer_names=layer_names,
        num_kv_heads=kv_cache_spec.num_kv_heads,
        head_size=kv_cache_spec.head_size,
        block_size=kv_cache_spec.block_size,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        device=torch.device(device),
    )
    state.load_method_assets(vllm_config.model_config)
    set_state(state)
    return state


def compression_log_line(
    entry: RequestEntry, geometry, pairs: int, method: str, seconds: float, scoring_seconds: float = 0.0
) -> str:
    """What one compression did, from the worker's real keep counts (vllm:kvzip_* metrics give the same numbers).

    "kept K of T context tokens": per (layer, KV head), the kept scored tokens
    plus the dense tail, out of the T tokens of the prefill.  Then the time
    (and KVzip's pass within it) and the keep mask's digest (ratio mode), which
    benchmarks/throughput.py and benchmarks/soak.py read back.
    """
    kept_per_head = entry.kept_tokens / pairs
    tail = geometry.num_tokens - geometry.evictable_tokens
    kept = kept_per_head + tail
    kept_text = f"{kept:.0f}" if float(kept).is_integer() else f"{kept:.2f}"
    line = (
        f"request {entry.request_id} compressed ({method}): kept {kept_text} of {geometry.num_tokens} context tokens "
        f"(ratio {kept / geometry.num_tokens:.4f}; {kept_per_head:g} of {entry.evictable_tokens} scored tokens per "
        f"(layer, KV head) + {tail} dense tail tokens), freed {geometry.freed_blocks} of "
        f"{-(-geometry.num_tokens // geometry.block_size)} blocks, {seconds * 1e3:.1f} ms"
    )
    if scoring_seconds:
        line += f" (scoring_ms {scoring_seconds * 1e3:.1f})"
    if entry.keep_digest is not None:
        line += f", keep-set {entry.keep_digest}"
    return line


def worker_compression_stats(worker=None) -> dict | None:
    """This worker's `WorkerCompressionState.stats()` (None with compression off).

    In-process engines call it directly; through vLLM's RPC to a separate engine core
    (`llm.collective_rpc(worker_compression_stats)`) vLLM sends a function only with
    `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (benchmarks/throughput.py sets it in its engines).
    """
    state = get_state()
    return None if state is None else state.stats()


def logger():
    from vllm_kvzip.adapter.vllm_api import get_logger

    return get_logger("vllm.kvzip")


_STATE: WorkerCompressionState | None = None


def get_state() -> WorkerCompressionState | None:
    return _STATE


def set_state(state: WorkerCompressionState | None) -> None:
    global _STATE
    _STATE = state
