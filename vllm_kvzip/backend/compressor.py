"""Compress one request on the worker: score -> keep-sets -> compaction -> page table.

Runs once per request, right after the step that completed its prefill (see
`vllm_kvzip.adapter.runner_hooks`), on the worker's compute stream: the
scheduler frees the request's gap blocks only after it has processed that
step, so any later writer of those blocks is ordered after these moves.

The budget is the one `CompressionGeometry` gives the scheduler, so both sides
agree on the blocks that hold the head pages without talking to each other.
"""

from __future__ import annotations

import time

import torch

from vllm_kvzip.backend.ops import compact_kv
from vllm_kvzip.backend.state import DENSE_SLOT, WorkerCompressionState
from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.block_manager.plan import dense_flat_slots, plan_request_compaction, plan_retirement
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
    """perf_counter() once the device has finished the work queued so far.

    A compression runs right after the forward that completed the prefill, which is still
    running on the GPU; its first host read would wait for it, and the time logged per request
    was mostly that forward (~370 ms of a 2 x 8k prefill step on an H100, against ~3 ms of
    compression).  Waiting first costs nothing extra: the compression reads plan sizes back
    anyway, so it would wait for that forward either way.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _whole_kv_cache(state: WorkerCompressionState) -> torch.Tensor:
    if state.kv_cache is None:
        raise RuntimeError("vllm-kvzip: the KV cache is not attached to the worker state")
    return state.kv_cache


def keep_set_digest(keep: torch.Tensor) -> str:
    """Eight hex digits naming a keep mask [L, H, T]: equal masks give equal digests.

    Logged with each compression so that two runs of one request (the soak's concurrent and
    sequential phases) can tell whether they kept the same tokens, i.e. whether a difference in
    their outputs comes from scoring or from decoding.
    """
    flat = keep.reshape(-1).to(torch.int64)
    index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    # A fixed pseudo-random weight below 2**31 per position: sums stay far below int64's range.
    weights = (index * 0x9E3779B1 + 0x7F4A7C15) % 2147483647
    weighted, count = torch.stack([(weights * flat).sum(), flat.sum()]).tolist()
    return f"{(weighted ^ (count << 20)) & 0xFFFFFFFF:08x}"


@torch.inference_mode()
def compress_request(
    state: WorkerCompressionState,
    request_id: str,
    num_tokens: int,
    block_ids: list[int],
    *,
    token_ids: list[int] | None = None,
    reconstruction=None,
) -> CompressionGeometry | None:
    """Compress `request_id` (its prefill of `num_tokens` tokens is in the cache).

    KVzip / KVzip+ / SnapKV need the request's `token_ids` and the worker's
    scoring pass as `reconstruction` (`vllm_kvzip.backend.reconstruction.ReconstructionScorer`,
    `vllm_kvzip.backend.observation.ObservationScorer`), which runs over the
    request's still-dense blocks.
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
    started = _settled_clock(device)
    evictable = geometry.evictable_tokens
    block_table = torch.tensor(block_ids[: geometry.dense_start_block], dtype=torch.int32, device=device)
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

    entry.keep_digest = keep_set_digest(keep)
    if state.recorded_keep_sets is not None:
        state.recorded_keep_sets[request_id] = keep.cpu()
        state.recorded_scores[request_id] = scores.cpu()
    plan = plan_request_compaction(
        keep, block_table, geometry.container_blocks, state.block_size, state.num_blocks_per_layer
    )
    # Pages cross layers: every kept row inside the containers (of any layer) is gathered before any is written.
    compact_kv(_whole_kv_cache(state), plan.src_slots, plan.dst_slots, num_staged=plan.num_staged)
    slot = state.table.acquire()
    state.table.kept_len[slot] = plan.kept_len
    state.table.page_start[slot] = plan.page_start
    state.table.dense_start[slot] = geometry.evictable_tokens
    kept_total = plan.src_slots.numel()
    entry.slot = slot
    entry.kept_tokens = kept_total
    entry.evictable_tokens = evictable
    entry.dense_start = geometry.evictable_tokens
    state.record_compression(entry, geometry, time.perf_counter() - started, scoring_seconds)
    return geometry


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
