"""Compress one request on the worker: score -> keep-sets -> compaction -> page table.

Keep-ratio mode runs in two halves on the worker's compute stream (see
`vllm_kvzip.adapter.runner_hooks`): `plan_compression` right after the step
that completed the prefill (scores, keep set and moves, all on the device,
nothing read back), and `apply_planned_compaction` when the worker has
prepared the next step's inputs, before that step's attention metadata and
forward (the moves and the page table).  Only the second half waits, for the
few numbers the first copied to the host, so the host prepares the next step
while the GPU runs the forward before it, as vLLM's async scheduling expects.
The request's first decode step already reads the compressed layout, as in a
one-piece compression.  The scheduler frees the request's gap blocks only
when it schedules a step after that prefill's step, whose forward comes after
the moves.

The budget is the one `CompressionGeometry` gives the scheduler, so both sides
agree on the blocks that hold the head pages without talking to each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vllm_kvzip.backend.ops import compact_kv
from vllm_kvzip.backend.state import DENSE_SLOT, WorkerCompressionState
from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.block_manager.plan import (
    RequestCompactionPlan,
    dense_flat_slots,
    plan_request_compaction,
    plan_retirement,
)
from vllm_kvzip.scoring.context import context_scores
from vllm_kvzip.scoring.policies import keep_by_ratio


def _recorded_kvzap_scores(state: WorkerCompressionState, positions: torch.Tensor, block_table: torch.Tensor):
    """[L, H, n] KVzap scores written into the per-layer score caches during the prefill."""
    heads = torch.arange(state.num_kv_heads, device=positions.device)[:, None]
    # Each layer's score cache is laid out like that layer's own KV cache (NB blocks).
    slots = dense_flat_slots(0, positions[None, :], heads, block_table, state.num_kv_heads, state.block_size, 0)
    return state.score_buffer[:, slots]  # one gather for all layers (the caches are its rows)


def geometry_for(state: WorkerCompressionState, num_tokens: int, keep_ratio: float) -> CompressionGeometry:
    return CompressionGeometry(
        num_tokens=num_tokens,
        block_size=state.block_size,
        window=state.config.window,
        keep_ratio=keep_ratio,
        num_kv_heads=state.num_kv_heads,
        num_layers=state.num_layers,
        policy=state.policy,
        sink_tokens=state.config.sink_tokens,
    )


def _settled_clock(device: torch.device) -> float:
    """perf_counter() once the device has finished the work queued so far (threshold mode).

    A folding reads its plan sizes back at once, so it would wait for the forward it follows
    either way; waiting first keeps that forward out of the time logged for the folding.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _whole_kv_cache(state: WorkerCompressionState) -> torch.Tensor:
    if state.kv_cache is None:
        raise RuntimeError("vllm-kvzip: the KV cache is not attached to the worker state")
    return state.kv_cache


def keep_digest_terms(keep: torch.Tensor) -> torch.Tensor:
    """int64 [2] on the mask's device: the two sums `keep_set_digest` formats (no read-back)."""
    flat = keep.reshape(-1).to(torch.int64)
    index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    # A fixed pseudo-random weight below 2**31 per position: sums stay far below int64's range.
    weights = (index * 0x9E3779B1 + 0x7F4A7C15) % 2147483647
    return torch.stack([(weights * flat).sum(), flat.sum()])


def format_keep_digest(weighted: int, count: int) -> str:
    return f"{(weighted ^ (count << 20)) & 0xFFFFFFFF:08x}"


def keep_set_digest(keep: torch.Tensor) -> str:
    """Eight hex digits naming a keep mask [L, H, T]: equal masks give equal digests.

    Logged with each compression so that two runs of one request (the soak's concurrent and
    sequential phases) can tell whether they kept the same tokens, i.e. whether a difference in
    their outputs comes from scoring or from decoding.
    """
    return format_keep_digest(*keep_digest_terms(keep).tolist())


@dataclass
class PlannedCompaction:
    """A keep-ratio compression whose moves are planned on the device and not yet launched.

    Planned in the step that completed the prefill and applied in the worker's next step, once
    its inputs are prepared and before its forward (`apply_planned_compaction`): only then does the
    host wait for the few numbers it needs (`readback`: the plan's counts and the keep mask's
    digest terms), which follow the previous forward.
    """

    request_id: str
    geometry: CompressionGeometry
    plan: RequestCompactionPlan
    readback: torch.Tensor  # int64 [5] on the host: plan.counts, then keep_digest_terms
    ready: torch.cuda.Event | None  # recorded after the copy to `readback` (None: copied synchronously)
    host_seconds: float  # host time of the planning half
    scoring_seconds: float
    # Device time of the planning half (KVzip's / SnapKV's scoring pass included).
    gpu_started: torch.cuda.Event | None = None
    gpu_planned: torch.cuda.Event | None = None


def _host_to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, device=device)` without waiting for the device's queued work.

    A blocking copy to a GPU synchronises the stream; through pinned memory the copy is queued
    like a kernel (the pinned buffer is not reused before the copy has run).
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _timing_event(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


@torch.inference_mode()
def plan_compression(
    state: WorkerCompressionState,
    request_id: str,
    num_tokens: int,
    block_ids: list[int],
    *,
    token_ids: list[int] | None = None,
    reconstruction=None,
) -> CompressionGeometry | None:
    """Score `request_id` (its prefill of `num_tokens` tokens is in the cache) and plan its compaction.

    Nothing is read back from the device for KVzap (tests/test_compressor.py checks it on
    CUDA), the head-level method and the position-only methods: the keep set and the moves
    stay on the device, and the plan waits in `state.planned` for `apply_planned_compaction`
    in the next step (KVzip's and SnapKV's scoring passes do read back).  KVzip /
    KVzip+ / SnapKV need the request's `token_ids` and the worker's scoring pass as
    `reconstruction` (`vllm_kvzip.backend.reconstruction.ReconstructionScorer`,
    `vllm_kvzip.backend.observation.ObservationScorer`), which runs over the request's
    still-dense blocks.  Returns the geometry (None when the request is not compressed).
    """
    entry = state.requests.get(request_id)
    if entry is None or entry.compressed:
        return None
    entry.compressed = True
    if entry.keep_ratio is None:
        return None
    geometry = geometry_for(state, num_tokens, entry.keep_ratio)
    if not geometry.compresses:
        return geometry
    device = state.device
    started = time.perf_counter()
    gpu_started = _timing_event(device)
    evictable = geometry.evictable_tokens
    block_table = _host_to_device(block_ids[: geometry.dense_start_block], torch.int32, device)
    positions = torch.arange(evictable, device=device)
    recorded = None
    scoring_seconds = 0.0
    if state.config.is_kvzap:
        recorded = _recorded_kvzap_scores(state, positions, block_table)
    elif state.config.has_scoring_pass:
        if reconstruction is None or token_ids is None:
            raise RuntimeError(f"vllm-kvzip: --kv-compression {state.config.method} needs its scoring pass")
        scoring_started = time.perf_counter()
        recorded = reconstruction.score(token_ids, num_tokens, block_ids, evictable, state.layer_names)
        scoring_seconds = time.perf_counter() - scoring_started
    scores = context_scores(
        state.config,
        positions,
        state.num_layers,
        state.num_kv_heads,
        head_scores=state.head_scores,
        recorded_scores=recorded,
    )
    # The dense tail holds the window, so only the sinks are protected here.
    keep = keep_by_ratio(
        scores, entry.keep_ratio, state.policy, sink_tokens=state.config.sink_tokens, window=0
    ).mask
    if state.recorded_keep_sets is not None:
        state.recorded_keep_sets[request_id] = keep.cpu()
        state.recorded_scores[request_id] = scores.cpu()
    plan = plan_request_compaction(
        keep, block_table, geometry.container_blocks, state.block_size, state.num_blocks_per_layer,
        num_kept=geometry.kept_tokens,
    )
    numbers = torch.cat([plan.counts, keep_digest_terms(keep)])
    ready = None
    if device.type == "cuda":
        readback = torch.empty(numbers.shape, dtype=numbers.dtype, pin_memory=True)
        readback.copy_(numbers, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        readback = numbers
    state.planned[request_id] = PlannedCompaction(
        request_id=request_id,
        geometry=geometry,
        plan=plan,
        readback=readback,
        ready=ready,
        host_seconds=time.perf_counter() - started,
        scoring_seconds=scoring_seconds,
        gpu_started=gpu_started,
        gpu_planned=_timing_event(device),
    )
    return geometry


@torch.inference_mode()
def apply_planned_compaction(state: WorkerCompressionState, planned: PlannedCompaction) -> None:
    """Launch a planned compaction's moves and switch the request to its ragged layout.

    Runs in the step after `plan_compression`, once that step's inputs are prepared and before
    its attention metadata is built: the wait for the plan's numbers ends with the previous
    forward, and the moves queue before this step's forward, the first that may write the
    gap blocks (the scheduler frees them when it schedules this step or a later one).
    """
    entry = state.requests[planned.request_id]
    if planned.ready is not None:
        planned.ready.synchronize()
    # Timed from here: the wait above is for the previous forward, not for this compression.
    started = time.perf_counter()
    kept, staged, pages, weighted, count = planned.readback.tolist()
    plan = planned.plan.resolve([kept, staged, pages])
    geometry = planned.geometry
    gpu_started = _timing_event(state.device)
    compact_kv(_whole_kv_cache(state), plan.src_slots, plan.dst_slots, num_staged=plan.num_staged)
    slot = state.table.acquire()
    state.table.kept_len[slot] = plan.kept_len
    state.table.page_start[slot] = plan.page_start
    state.table.dense_start[slot] = geometry.evictable_tokens
    entry.slot = slot
    entry.kept_tokens = kept
    entry.evictable_tokens = geometry.evictable_tokens
    entry.dense_start = geometry.evictable_tokens
    entry.keep_digest = format_keep_digest(weighted, count)
    state.gpu_timer.add(planned.gpu_started, planned.gpu_planned)
    state.gpu_timer.add(gpu_started, _timing_event(state.device))
    seconds = planned.host_seconds + time.perf_counter() - started
    state.record_compression(entry, geometry, seconds, planned.scoring_seconds)


# ---------------------------------------------------------------------------------
# Threshold mode (KVzap thresholds, DMS-style decode-time eviction)
# ---------------------------------------------------------------------------------
def retire_interval_blocks(state: WorkerCompressionState) -> int:
    """Decode-time eviction folds the dense tail in batches of about `window` tokens."""
    return max(1, state.config.window // state.block_size)


def retirement_target_block(state: WorkerCompressionState, num_tokens: int) -> int:
    """First dense-tail block once a request holds `num_tokens` tokens: the tail keeps >= window tokens."""
    return max(0, (num_tokens - state.config.window) // state.block_size)


def _record_folding(state, request_id: str, first_token: int, keep: torch.Tensor, scores: torch.Tensor) -> None:
    """Tests' record of a threshold-mode request: every folding's decisions and scores, appended in
    token order (a request compressed again after a preemption starts over)."""
    for records, new in ((state.recorded_keep_sets, keep), (state.recorded_scores, scores.float())):
        previous = records.get(request_id)
        if previous is None or previous.shape[-1] != first_token:
            previous = torch.zeros(state.num_layers, state.num_kv_heads, first_token, dtype=new.dtype)
        records[request_id] = torch.cat([previous, new.cpu()], dim=-1)


@torch.inference_mode()
def retire_dense_blocks(
    state: WorkerCompressionState,
    request_id: str,
    num_tokens: int,
    block_ids: list[int],
    set_block_ids,
) -> int:
    """Threshold mode: fold the dense tail's blocks before the newest `window` tokens into the head pages.

    Of the folded tokens, those whose KVzap log-score is >= the threshold (and
    the attention sinks) are kept; everything kept so far stays kept.  They
    are written after their pair's old tokens when every pair's pages have
    room; otherwise the request's head pages are re-packed, with room for the
    next foldings, into container blocks (the old ones, then the first folded
    blocks; `plan_retirement_layout`).  The other folded blocks are reported
    to the scheduler, which frees them.  Skipped when no block
    would be freed.  `block_ids` is the worker's block-table row (logical ->
    physical); `set_block_ids(request_id, first, ids)` rewrites part of it so
    that container `i` is logical block `i`, which is where the decode kernels
    look for head pages.  Returns the number of blocks freed.
    """
    entry = state.requests[request_id]
    bs = state.block_size
    first_block, end_block = entry.dense_start_block, retirement_target_block(state, num_tokens)
    entry.next_retire_block = max(end_block, first_block) + retire_interval_blocks(state)
    if end_block <= first_block:
        return 0
    device = state.device
    started = _settled_clock(device)
    retired_host = torch.tensor(block_ids[first_block:end_block], dtype=torch.int64)
    positions = torch.arange(first_block * bs, end_block * bs, device=device)
    scores = _recorded_kvzap_scores(state, positions - first_block * bs, retired_host.to(device))
    keep = (scores >= state.config.threshold) | (positions < state.config.sink_tokens)
    slot = entry.slot
    if slot == DENSE_SLOT:
        kept_len = torch.zeros(state.num_layers, state.num_kv_heads, dtype=torch.int32)
        page_start = torch.zeros_like(kept_len)
    else:
        # The host copy of the table's rows: the plan decides the layout on the host.
        kept_len, page_start = entry.host_kept_len, entry.host_page_start
    containers = torch.tensor(entry.containers, dtype=torch.int64)
    plan = plan_retirement(
        kept_len, page_start, containers, keep, retired_host, bs, state.num_blocks_per_layer,
        interval_tokens=retire_interval_blocks(state) * bs,
    )
    freed = (end_block - first_block) - plan.new_container_blocks
    if freed <= 0:
        return 0  # everything would stay: keep the blocks dense, try again with a longer tail
    compact_kv(_whole_kv_cache(state), plan.src_slots, plan.dst_slots, num_staged=plan.num_staged)
    if state.recorded_keep_sets is not None:
        _record_folding(state, request_id, first_block * bs, keep, scores)
    new_container_ids = block_ids[first_block : first_block + plan.new_container_blocks]
    if slot == DENSE_SLOT:
        slot = entry.slot = state.table.acquire()
    state.table.kept_len[slot] = plan.kept_len
    state.table.page_start[slot] = plan.page_start
    state.table.dense_start[slot] = end_block * bs
    entry.host_kept_len, entry.host_page_start = plan.kept_len, plan.page_start
    if new_container_ids:
        set_block_ids(request_id, len(entry.containers), new_container_ids)
    entry.containers.extend(new_container_ids)
    entry.dense_start_block = end_block
    entry.dense_start = end_block * bs
    entry.evictable_tokens = end_block * bs
    entry.kept_tokens = int(plan.kept_len.sum())
    entry.retirements += 1
    state.report_freed_blocks(entry, first_block + plan.new_container_blocks, end_block, num_tokens)
    state.record_retirement(entry, num_tokens, freed, time.perf_counter() - started, repacked=plan.repacked)
    return freed


def compress_threshold_request(state, request_id, num_tokens, block_ids, set_block_ids) -> None:
    """The prefill of a threshold-mode request is complete: its first folding."""
    entry = state.requests.get(request_id)
    if entry is None or entry.compressed:
        return
    entry.compressed = True
    entry.admission_tokens = num_tokens
    retire_dense_blocks(state, request_id, num_tokens, block_ids, set_block_ids)
