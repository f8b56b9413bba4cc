"""KVzipManager inside vLLM's real Scheduler: blocks freed after prefill, exact to the block."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.scheduler_harness import NUM_KV_HEADS, NUM_LAYERS, build_scheduler, free_blocks, kvzip_manager, make_request, step
from vllm_kvzip.block_manager.geometry import CompressionGeometry, cdiv

BLOCK = 16


@pytest.fixture(scope="module")
def compressing_scheduler_factory(embedded_model):
    def factory(**overrides):
        settings_ = {"method": "streaming", "keep_ratio": 0.25, "window": 32}
        settings_.update(overrides.pop("kv", {}))
        return build_scheduler(embedded_model, settings_, block_size=BLOCK, **overrides)

    return factory


@pytest.mark.parametrize("policy", [None, "global", "layer", "head", "adakv"])
def test_blocks_freed_after_prefill_match_the_geometry(compressing_scheduler_factory, policy):
    scheduler = compressing_scheduler_factory(kv={"policy": policy} if policy else {})
    manager = kvzip_manager(scheduler)
    # vLLM merged the group's per-layer specs: the manager knows how many layers share a block.
    assert manager.kv_cache_spec.num_layers == NUM_LAYERS
    start = free_blocks(scheduler)
    request = make_request(num_prompt_tokens=1000, max_tokens=5)
    scheduler.add_request(request)
    step(scheduler)  # chunk 1 (512 tokens)
    step(scheduler)  # chunk 2: prefill done, first token sampled
    held_dense = cdiv(1000, BLOCK)
    assert start - free_blocks(scheduler) == held_dense
    step(scheduler)  # first decode step: the scheduler sees the processed prefill
    geometry = CompressionGeometry(
        num_tokens=1000, block_size=BLOCK, window=32, keep_ratio=0.25, num_kv_heads=NUM_KV_HEADS,
        num_layers=NUM_LAYERS, policy=policy or "global", sink_tokens=4,
    )
    assert geometry.dense_start_block == (1000 - 32) // BLOCK == 60
    # 8 (layer, head) pairs: 8 * 4 sinks + floor(0.25 * 8 * 956) = 1944 tokens (every policy: no
    # flooring loss here); any split needs at most 8 + (1944 - 8) // 16 = 129 pages: 17 blocks of 8.
    assert geometry.kept_tokens == 1944 and geometry.head_pages == 129 and geometry.container_blocks == 17
    record = manager.compression_record(request.request_id)
    assert record is not None and record.freed_blocks == geometry.freed_blocks == 43
    blocks = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[request.request_id]
    null = scheduler.kv_cache_manager.block_pool.null_block
    assert all(b is not null for b in blocks[:17]) and all(b is null for b in blocks[17:60])
    assert all(b is not null for b in blocks[60:])
    assert start - free_blocks(scheduler) == held_dense - 43
    while scheduler.requests:
        step(scheduler)
    assert free_blocks(scheduler) == start
    assert manager.total_freed_blocks == 43 and manager.total_compressed_requests == 1


def test_short_and_opted_out_requests_stay_dense(compressing_scheduler_factory):
    scheduler = compressing_scheduler_factory()
    manager = kvzip_manager(scheduler)
    short = make_request(num_prompt_tokens=40, max_tokens=20)  # shorter than window + a block
    opted_out = make_request(num_prompt_tokens=800, max_tokens=20, extra_args={"kv_compression": "none"})
    full_ratio = make_request(num_prompt_tokens=800, max_tokens=20, extra_args={"kv_compression_ratio": 1.0})
    for request in (short, opted_out, full_ratio):
        scheduler.add_request(request)
    for _ in range(4):
        step(scheduler)
    assert manager.compression_record(short.request_id).freed_blocks == 0
    assert manager.compression_record(opted_out.request_id) is None
    assert manager.compression_record(full_ratio.request_id) is None
    assert manager.total_freed_blocks == 0


def test_per_request_ratio_overrides_the_engine_ratio(compressing_scheduler_factory):
    scheduler = compressing_scheduler_factory()
    manager = kvzip_manager(scheduler)
    request = make_request(num_prompt_tokens=800, max_tokens=20, extra_args={"kv_compression_ratio": 0.5})
    scheduler.add_request(request)
    for _ in range(3):
        step(scheduler)
    geometry = CompressionGeometry(
        num_tokens=800, block_size=BLOCK, window=32, keep_ratio=0.5, num_kv_heads=NUM_KV_HEADS,
        num_layers=NUM_LAYERS, policy="global", sink_tokens=4,
    )
    assert manager.compression_record(request.request_id).freed_blocks == geometry.freed_blocks > 0


def test_freed_blocks_admit_more_requests(compressing_scheduler_factory, embedded_model):
    """With compression the pool holds more concurrent long requests than without."""

    def peak_running(scheduler):
        for _ in range(12):
            scheduler.add_request(make_request(num_prompt_tokens=900, max_tokens=40))
        peak = 0
        for _ in range(400):
            step(scheduler)
            peak = max(peak, len(scheduler.running))
            if not scheduler.requests:
                break
        assert not scheduler.requests
        return peak

    dense = build_scheduler(embedded_model, None, num_blocks=200, block_size=BLOCK)
    compressed = compressing_scheduler_factory(num_blocks=200)
    dense_peak, compressed_peak = peak_running(dense), peak_running(compressed)
    assert dense_peak <= 3  # 200 blocks / 60 blocks per request
    assert compressed_peak >= 2 * dense_peak


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(
        st.tuples(st.integers(1, 1500), st.integers(1, 30), st.sampled_from([None, 0.1, 0.5, 1.0])),
        min_size=1,
        max_size=10,
    ),
    abort_at=st.lists(st.integers(0, 60), max_size=4),
    num_blocks=st.integers(100, 400),
)
def test_random_workloads_never_leak_or_double_free(compressing_scheduler_factory, requests, abort_at, num_blocks):
    from vllm.v1.request import RequestStatus

    from vllm_kvzip.metrics import COMPRESSED, take_events

    scheduler = compressing_scheduler_factory(num_blocks=num_blocks)
    manager = kvzip_manager(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    start = free_blocks(scheduler)
    engine_outputs = []
    added = []
    for prompt, max_tokens, ratio in requests:
        if cdiv(prompt + max_tokens, BLOCK) >= num_blocks - 1:
            continue
        extra = None if ratio is None else {"kv_compression_ratio": ratio}
        request = make_request(prompt, max_tokens, extra)
        scheduler.add_request(request)
        added.append(request.request_id)
    for step_index in range(600):
        if step_index in abort_at and scheduler.requests:
            victim = sorted(scheduler.requests)[0]
            scheduler.finish_requests(victim, RequestStatus.FINISHED_ABORTED)
        if not scheduler.requests:
            break
        step(scheduler, engine_outputs)
        # A block is never both free and held by a request (no double free).
        held = {
            block.block_id
            for blocks in scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.values()
            for block in blocks
            if not block.is_null
        }
        free_ids = {block.block_id for block in pool.free_block_queue.get_all_free_blocks()}
        assert not held & free_ids
        assert len(held) + len(free_ids) == num_blocks - 1  # every block but the null block is accounted for
    assert not scheduler.requests
    assert free_blocks(scheduler) == start
    # The metrics' events (shipped with the scheduler stats) tell exactly what the manager freed.
    events = [event for outputs in engine_outputs for event in take_events(outputs.scheduler_stats)]
    assert sum(event.freed_blocks for event in events) == manager.total_freed_blocks
    assert sum(event.outcome != "opted_out" for event in events) == manager.total_compressed_requests
    assert all((event.freed_blocks > 0) == (event.outcome == COMPRESSED) for event in events)


def test_preempted_request_is_compressed_again_at_its_new_length(compressing_scheduler_factory):
    """Preemption (recompute) frees everything; on resume the request is compressed at prompt + outputs."""
    scheduler = compressing_scheduler_factory(num_blocks=130, kv={"keep_ratio": 0.5})
    manager = kvzip_manager(scheduler)
    start = free_blocks(scheduler)
    requests = [make_request(num_prompt_tokens=700, max_tokens=400) for _ in range(3)]
    for request in requests:
        scheduler.add_request(request)
    admissions: dict[str, list[int]] = {}
    original = manager.note_admission

    def spy(request_id, num_tokens, keep_ratio, **kwargs):
        admissions.setdefault(request_id, []).append(num_tokens)
        original(request_id, num_tokens, keep_ratio, **kwargs)

    manager.note_admission = spy
    preemptions = 0
    for _ in range(3000):
        if not scheduler.requests:
            break
        output = step(scheduler)
        preemptions += len(getattr(output, "preempted_req_ids", None) or ())
    assert not scheduler.requests
    assert free_blocks(scheduler) == start
    resumed = {rid: sizes for rid, sizes in admissions.items() if len(set(sizes)) > 1}
    assert resumed, f"no request was preempted and resumed: {admissions}"
    for sizes in resumed.values():
        assert sizes[0] == 700 and max(sizes) > 700  # resumed at prompt + generated tokens
    assert all(r.num_output_tokens == 400 for r in requests)
