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
from collections.abc import Callable

import torch

from vllm_kvzip.backend.ops import compact_kv
from vllm_kvzip.backend.state import RequestEntry, WorkerCompressionState
from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.block_manager.plan import dense_flat_slots, plan_layer_compaction
from vllm_kvzip.scoring.functional import random_scores, streaming_scores
from vllm_kvzip.scoring.policies import keep_by_ratio

# Methods the vLLM path scores itself, from what the worker has at hand.
ScoreFn = Callable[[WorkerCompressionState, RequestEntry, torch.Tensor, torch.Tensor], torch.Tensor]


def _streaming(state, entry, positions, block_ids):
    scores = streaming_scores(positions, state.num_kv_heads, state.config.sink_tokens)
    return scores.expand(state.num_layers, -1, -1)


def _random(state, entry, positions, block_ids):
    return torch.stack(
        [
            random_scores(positions, state.num_kv_heads, seed=state.config.seed, layer_idx=layer)
            for layer in range(state.num_layers)
        ]
    )


def _head(state, entry, positions, block_ids):
    head_scores = state.head_scores  # [L, H], loaded when the state is built
    return head_scores[:, :, None].expand(-1, -1, positions.numel())


def _from_score_caches(state, entry, positions, block_ids):
    """Scores written into the per-layer score caches during the prefill (KVzap)."""
    heads = torch.arange(state.num_kv_heads, device=positions.device)[:, None]
    slots = dense_flat_slots(positions[None, :], heads, block_ids, state.num_kv_heads, state.block_size)
    return torch.stack([state.score_caches[name].view(-1)[slots].float() for name in state.layer_names])


SCORE_FUNCTIONS: dict[str, ScoreFn] = {
    "streaming": _streaming,
    "random": _random,
    "head": _head,
    "kvzap-linear": _from_score_caches,
    "kvzap-mlp": _from_score_caches,
}


def geometry_for(state: WorkerCompressionState, num_tokens: int, keep_ratio: float) -> CompressionGeometry:
    return CompressionGeometry(
        num_tokens=num_tokens,
        block_size=state.block_size,
        window=state.config.window,
        keep_ratio=keep_ratio,
        num_kv_heads=state.num_kv_heads,
        sink_tokens=state.config.sink_tokens,
    )


@torch.inference_mode()
def compress_request(
    state: WorkerCompressionState,
    request_id: str,
    num_tokens: int,
    block_ids: list[int],
    kv_caches: dict[str, torch.Tensor],
) -> CompressionGeometry | None:
    """Compress `request_id` (its prefill of `num_tokens` tokens is in the cache)."""
    entry = state.requests.get(request_id)
    if entry is None or entry.compressed:
        return None
    entry.compressed = True
    if entry.keep_ratio is None:
        return None
    geometry = geometry_for(state, num_tokens, entry.keep_ratio)
    if not geometry.compresses:
        return geometry
    started = time.perf_counter()
    device = state.device
    evictable = geometry.evictable_tokens
    block_table = torch.tensor(block_ids[: geometry.dense_start_block], dtype=torch.int32, device=device)
    positions = torch.arange(evictable, device=device)
    scores = SCORE_FUNCTIONS[state.config.method](state, entry, positions, block_table)
    # The dense tail holds the window, so only the sinks are protected here.
    keep = keep_by_ratio(
        scores, entry.keep_ratio, state.policy, sink_tokens=state.config.sink_tokens, window=0
    ).mask

    slot = state.table.acquire()
    kept_total = 0
    for layer, name in enumerate(state.layer_names):
        plan = plan_layer_compaction(keep[layer], block_table, geometry.container_blocks, state.block_size)
        compact_kv(kv_caches[name], plan.src_slots, plan.dst_slots)
        state.table.kept_len[slot, layer] = plan.kept_len
        state.table.page_start[slot, layer] = plan.page_start
        kept_total += int(plan.src_slots.numel())
    state.table.dense_start[slot] = geometry.evictable_tokens
    entry.slot = slot
    entry.kept_tokens = kept_total
    entry.evictable_tokens = evictable
    entry.dense_start = geometry.evictable_tokens
    state.record_compression(entry, geometry, time.perf_counter() - started)
    return geometry
