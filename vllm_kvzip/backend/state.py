"""Worker-side state of vllm-kvzip: which request is compressed, and where its pages are.

One `WorkerCompressionState` lives in each worker process (created when the
attention backend's metadata builder is built).  It keeps

* per-request bookkeeping (`RequestEntry`): the token count at which the
  request is compressed, its keep ratio, its slot;
* a `RaggedPageTable`: persistent device tensors indexed by slot, which the
  decode kernels read through a per-step row -> slot map.  Slot 0 is the
  "dense" slot (no ragged part) used by every request that is not compressed;
* the current step's batch (request ids in row order), stashed by the
  model-runner hooks in `vllm_kvzip.adapter.runner_hooks`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from vllm_kvzip.config import KVCompressionConfig, request_keep_ratio

DENSE_SLOT = 0
# Budget policy of the vLLM path when the user gave none: the same count in
# every layer (free across its heads) is what per-layer page packing holds
# exactly (docs/design.md).
DEFAULT_VLLM_POLICY = "layer"


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


@dataclass
class RequestEntry:
    request_id: str
    keep_ratio: float | None  # None: the request stays dense
    slot: int = DENSE_SLOT
    compressed: bool = False  # the prefill completed and compression (or the decision not to) is done
    kept_tokens: int = 0  # kept evictable tokens summed over layers and heads
    evictable_tokens: int = 0  # per (layer, head)
    dense_start: int = 0


@dataclass
class StepBatch:
    """The batch of the step being executed (rows in attention order)."""

    request_ids: list[str] = field(default_factory=list)
    # Requests whose prefill completes in this step -> their token count.
    completing: dict[str, int] = field(default_factory=dict)


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
        self.policy = config.policy or DEFAULT_VLLM_POLICY
        self.layer_names = list(layer_names)
        self.layer_index = {name: index for index, name in enumerate(self.layer_names)}
        self.num_layers = len(self.layer_names)
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.block_size = block_size
        self.device = device
        self.table = RaggedPageTable(max_num_seqs + 1, self.num_layers, num_kv_heads, device)
        self.requests: dict[str, RequestEntry] = {}
        self.step = StepBatch()
        # Requests whose compaction is due (prefill done, not yet compacted).
        self.pending: dict[str, int] = {}
        # Score buffers filled during the forward pass (KVzap), by layer name.
        self.score_caches: dict[str, torch.Tensor] = {}
        # [L, H] saved head scores (method "head").
        self.head_scores: torch.Tensor | None = None
        self.total_compressed = 0
        self.total_kept_tokens = 0
        self.total_evictable_tokens = 0
        self.total_freed_blocks = 0
        # Wall time of KVzip's reconstruction passes (device-synchronised), summed over requests.
        self.total_scoring_seconds = 0.0
        # Debugging / tests: keep masks [L, H, evictable] and the scores they
        # came from, by request id (VLLM_KVZIP_RECORD_KEEP_SETS=1 turns it on).
        record = os.environ.get("VLLM_KVZIP_RECORD_KEEP_SETS") == "1"
        self.recorded_keep_sets: dict[str, torch.Tensor] | None = {} if record else None
        self.recorded_scores: dict[str, torch.Tensor] | None = {} if record else None

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
        self.total_kept_tokens += entry.kept_tokens
        self.total_evictable_tokens += entry.evictable_tokens * pairs
        self.total_freed_blocks += geometry.freed_blocks
        kept_per_head = entry.kept_tokens / pairs
        logger().info(
            "vllm-kvzip: request %s compressed (%s): kept %.0f of %d context tokens per (layer, head) "
            "+ %d dense tail tokens, freed %d of %d blocks, %.1f ms (scoring_ms %.1f)",
            entry.request_id,
            self.config.method,
            kept_per_head,
            entry.evictable_tokens,
            geometry.num_tokens - geometry.evictable_tokens,
            geometry.freed_blocks,
            -(-geometry.num_tokens // geometry.block_size),
            seconds * 1e3,
            scoring_seconds * 1e3,
        )

    def stats(self) -> dict[str, float | int]:
        """Totals since the engine started (benchmarks read them, e.g. with `worker_compression_stats`)."""
        return {
            "method": self.config.method,
            "compressed_requests": self.total_compressed,
            "kept_fraction": self.total_kept_tokens / max(1, self.total_evictable_tokens),
            "freed_blocks": self.total_freed_blocks,
            "scoring_seconds": self.total_scoring_seconds,
            "scoring_ms_per_request": 1e3 * self.total_scoring_seconds / max(1, self.total_compressed),
        }

    # -- request lifecycle -------------------------------------------------------------
    def add_request(self, request_id: str, extra_args: dict | None) -> RequestEntry:
        self.drop_request(request_id)
        entry = RequestEntry(request_id=request_id, keep_ratio=request_keep_ratio(self.config, extra_args))
        self.requests[request_id] = entry
        return entry

    def drop_request(self, request_id: str) -> None:
        """Finished, aborted or preempted: forget the request (its blocks go back to vLLM)."""
        self.pending.pop(request_id, None)
        entry = self.requests.pop(request_id, None)
        if entry is not None and entry.slot != DENSE_SLOT:
            self.table.release(entry.slot)

    def slot_of(self, request_id: str) -> int:
        entry = self.requests.get(request_id)
        return DENSE_SLOT if entry is None else entry.slot


def install_state(config: KVCompressionConfig, kv_cache_spec, layer_names, vllm_config, device) -> WorkerCompressionState:
    """Build this worker's state from a metadata builder's arguments and make it current."""
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


def worker_compression_stats(worker=None) -> dict | None:
    """This worker's `WorkerCompressionState.stats()` (None with compression off).

    Usable through vLLM's RPC from any process: `llm.collective_rpc(worker_compression_stats)`.
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
