"""The worker's keep-ratio compression in two halves: planned on the device, applied one step later.

`plan_compression` must not read anything back from the GPU (every read waits for the queued
forward, and with vLLM's async scheduling that stalls the host at each completing prefill);
`apply_planned_compaction` must give exactly the cache and page table that planning and applying
at once with the counted plan gives.  The GPU test runs on the device machine (`tools/device_run.sh
gputests`).
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvzip.backend.compressor import apply_planned_compaction, keep_set_digest, plan_compression
from vllm_kvzip.backend.ops.reference import compact_kv_ref
from vllm_kvzip.backend.state import DENSE_SLOT, WorkerCompressionState
from vllm_kvzip.block_manager.plan import kept_flat_indices, plan_request_compaction
from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.policies import keep_by_ratio

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, BLOCK = 3, 2, 8, 16
NUM_BLOCKS = 40  # per layer


def _kvzap_state(device: str, seed: int = 0) -> WorkerCompressionState:
    """A worker state with a random whole cache and random recorded KVzap scores."""
    config = KVCompressionConfig.parse({"method": "kvzap-mlp", "keep_ratio": 0.25, "window": 32})
    layer_names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    state = WorkerCompressionState(config, layer_names, NUM_KV_HEADS, HEAD_SIZE, BLOCK, 4, torch.device(device))
    generator = torch.Generator().manual_seed(seed)
    whole = torch.randn(NUM_LAYERS * NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD_SIZE, generator=generator)
    whole = whole.to(device)
    state.attach_kv_cache({name: whole[i * NUM_BLOCKS : (i + 1) * NUM_BLOCKS] for i, name in enumerate(layer_names)})
    entries = NUM_BLOCKS * NUM_KV_HEADS * BLOCK + NUM_KV_HEADS
    state.score_buffer = torch.randn(NUM_LAYERS, entries, generator=generator).to(device)
    # The tests' keep-set recording (VLLM_KVZIP_RECORD_KEEP_SETS, tests/conftest.py) copies to the host.
    state.recorded_keep_sets = state.recorded_scores = None
    return state


def _block_ids(num_tokens: int, seed: int) -> list[int]:
    return torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))[: -(-num_tokens // BLOCK)].tolist()


def _counted_reference(state: WorkerCompressionState, geometry, block_ids: list[int]):
    """(cache, plan, keep): planned with the counted plan and applied at once, on a CPU copy."""
    evictable = geometry.evictable_tokens
    block_table = torch.tensor(block_ids[: geometry.dense_start_block], dtype=torch.int32)
    heads = torch.arange(NUM_KV_HEADS)[:, None]
    positions = torch.arange(evictable)
    slots = ((block_table.long()[positions // BLOCK][None, :] * NUM_KV_HEADS + heads) * BLOCK + positions % BLOCK)
    scores = state.score_buffer.cpu()[:, slots]
    keep = keep_by_ratio(scores, geometry.keep_ratio, "global", sink_tokens=4, window=0).mask
    plan = plan_request_compaction(keep, block_table, geometry.container_blocks, BLOCK, NUM_BLOCKS)
    cache = state.kv_cache.cpu().clone()
    compact_kv_ref(cache, plan.src_slots, plan.dst_slots, num_staged=plan.num_staged)
    return cache, plan, keep


def _compress_in_two_halves(state, request_id: str, num_tokens: int, block_ids: list[int]):
    state.add_request(request_id, None)
    geometry = plan_compression(state, request_id, num_tokens, block_ids)
    assert geometry is not None and geometry.compresses
    return geometry


@pytest.mark.parametrize("num_tokens", [200, 407, 640])
def test_two_halves_give_the_counted_plans_cache_and_page_table(num_tokens):
    state = _kvzap_state("cpu", seed=num_tokens)
    block_ids = _block_ids(num_tokens, seed=num_tokens)
    original = state.kv_cache.clone()
    geometry = _compress_in_two_halves(state, "r", num_tokens, block_ids)
    expected_cache, expected_plan, keep = _counted_reference(state, geometry, block_ids)
    # Planned only: the cache is untouched and the request still reads its dense blocks.
    assert torch.equal(state.kv_cache, original) and state.slot_of("r") == DENSE_SLOT
    apply_planned_compaction(state, state.planned.pop("r"))
    assert torch.equal(state.kv_cache, expected_cache)
    slot = state.slot_of("r")
    assert slot != DENSE_SLOT
    assert torch.equal(state.table.kept_len[slot], expected_plan.kept_len)
    assert torch.equal(state.table.page_start[slot], expected_plan.page_start)
    assert int(state.table.dense_start[slot]) == geometry.evictable_tokens
    entry = state.requests["r"]
    assert entry.kept_tokens == geometry.kept_tokens == int(keep.sum())
    assert entry.keep_digest == keep_set_digest(keep)
    assert state.stats()["compressed_requests"] == 1


def test_a_request_dropped_between_the_halves_never_moves_a_row():
    """Preempted or finished before its next step: the scheduler frees its blocks whole, so the moves must not run."""
    state = _kvzap_state("cpu")
    original = state.kv_cache.clone()
    _compress_in_two_halves(state, "r", 400, _block_ids(400, seed=1))
    free_slots = state.table.free_slots
    state.drop_request("r")
    assert not state.planned and torch.equal(state.kv_cache, original)
    assert state.table.free_slots == free_slots and state.stats()["compressed_requests"] == 0


@pytest.mark.parametrize("seed", range(6))
def test_kept_flat_indices_are_nonzeros_for_the_known_count(seed):
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(3, 4, 37, generator=generator) < [0.0, 0.05, 0.5, 1.0][seed % 4]
    keep[seed % 3, seed % 4] = seed % 2 == 0  # a pair keeping all or nothing
    count = int(keep.sum())
    assert torch.equal(kept_flat_indices(keep, count), keep.reshape(-1).nonzero().flatten())


def test_a_plan_whose_mask_misses_the_budget_is_refused_before_any_move():
    keep = torch.zeros(2, 2, 32, dtype=torch.bool)
    keep[:, :, :5] = True  # 20 kept
    plan = plan_request_compaction(keep, torch.arange(4, dtype=torch.int32), 1, 16, 4, num_kept=21)
    assert plan.num_staged is None
    with pytest.raises(ValueError, match="holds 20 tokens but the policy's budget is 21"):
        plan.resolve()
    plan = plan_request_compaction(keep, torch.arange(4, dtype=torch.int32), 1, 16, 4, num_kept=19)
    with pytest.raises(ValueError, match="holds 20 tokens but the policy's budget is 19"):
        plan.resolve()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: checks that planning never synchronises a CUDA stream")
def test_planning_on_the_gpu_never_waits_and_matches_the_cpu():
    num_tokens, block_ids = 640, _block_ids(640, seed=3)
    gpu, cpu = _kvzap_state("cuda", seed=3), _kvzap_state("cpu", seed=3)
    gpu.add_request("r", None)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any stream synchronisation raises
    try:
        plan_compression(gpu, "r", num_tokens, block_ids)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    apply_planned_compaction(gpu, gpu.planned.pop("r"))
    _compress_in_two_halves(cpu, "r", num_tokens, block_ids)
    apply_planned_compaction(cpu, cpu.planned.pop("r"))
    assert torch.equal(gpu.kv_cache.cpu(), cpu.kv_cache)
    slot_gpu, slot_cpu = gpu.slot_of("r"), cpu.slot_of("r")
    assert torch.equal(gpu.table.kept_len[slot_gpu].cpu(), cpu.table.kept_len[slot_cpu])
    assert gpu.requests["r"].keep_digest == cpu.requests["r"].keep_digest
    assert gpu.stats()["compression_gpu_ms_per_request"] > 0
