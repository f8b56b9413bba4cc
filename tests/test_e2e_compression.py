"""vLLM's real engine (CPU build) compressing with the plugin, checked against the transformers oracle.

One in-process engine (see conftest: VLLM_ENABLE_V1_MULTIPROCESSING=0) runs
KVzap-MLP at a default keep ratio of 0.25 with block size 16 and the default
(global) budget policy, whose per-layer counts follow the scores: head pages
are packed across layers in one KV buffer; requests override
the ratio or opt out through `extra_args` (vllm_xargs), so one batch mixes
compressed and dense requests.  For every request the oracle
(`vllm_kvzip.scoring.vllm_reference.generate_like_vllm`: same geometry, scores,
policy, then ragged greedy decoding in transformers) must give the same kept
tokens and the same output tokens.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvzip.block_manager.geometry import CompressionGeometry, cdiv

from tests.conftest import SCHEDULING_MODES, close_engine, start_engine
from tests.engine_helpers import model_runner, question_prompt, recorded
from tests.scheduler_harness import kvzip_manager

BLOCK_SIZE = 16
MAX_TOKENS = 12
SETTINGS = {"method": "kvzap-mlp", "keep_ratio": 0.25, "window": 64}

pytestmark = pytest.mark.engine


# Every test runs with vLLM's scheduler in both modes (async: vLLM's default on a GPU, one batch in
# flight, so the scheduler sees a prefill's compression one step later).
@pytest.fixture(scope="module", params=SCHEDULING_MODES)
def engine(embedded_model, surrogate_dir, request):
    llm = start_engine(
        request.param,
        model=embedded_model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        block_size=BLOCK_SIZE,
        seed=0,
        disable_log_stats=False,  # vLLM's stat loggers run, so LLM.get_metrics() has vllm-kvzip's metrics
        additional_config={"kv_compression": {**SETTINGS, "surrogate": surrogate_dir}},
    )
    yield llm
    close_engine(llm)


def _prompts(engine, count: int) -> list[list[int]]:
    tokenizer = engine.get_tokenizer()
    tasks = ["profile", "needle", "uuid_kv", "multikey", "variable"]
    return [question_prompt(tokenizer, task, seed, 700) for seed, task in zip(range(count), tasks)]


def _scheduler(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler


def _manager(engine):
    return kvzip_manager(_scheduler(engine))


def _assert_worker_state_follows_vllm(engine):
    """The plugin holds state only for requests vLLM's model runner still holds (ended
    requests reach the worker with the next step), and one page-table slot per compressed one."""
    from vllm_kvzip.backend.state import DENSE_SLOT, get_state

    state = get_state()
    runner = model_runner(engine)
    assert set(state.requests) <= set(runner.requests)
    assert not set(state.pending) - set(runner.requests)
    used_slots = sum(entry.slot != DENSE_SLOT for entry in state.requests.values())
    assert state.table.free_slots == state.table.num_slots - 1 - used_slots


def test_mixed_batch_matches_the_transformers_oracle(engine, oracle_model, surrogate_dir):
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    per_request = [None, {"kv_compression_ratio": 0.5}, {"kv_compression": "none"}, {"kv_compression_ratio": 1.0}]
    prompts = _prompts(engine, len(per_request))
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=extra) for extra in per_request]
    state = get_state()
    state.recorded_keep_sets.clear()
    outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)

    config = KVCompressionConfig.parse({**SETTINGS, "surrogate": surrogate_dir})
    surrogate = KVzapSurrogate.load(surrogate_dir).float()
    stop = [engine.get_tokenizer().eos_token_id]
    compressed = 0
    for prompt, extra, output in zip(prompts, per_request, outputs):
        reference = generate_like_vllm(
            oracle_model, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=MAX_TOKENS,
            stop_token_ids=stop, surrogate=surrogate, extra_args=extra,
        )
        recorded_keep = recorded(state.recorded_keep_sets, output.request_id)
        if reference.keep is None or not reference.geometry.compresses:
            assert recorded_keep is None, f"request {extra} should have stayed dense"
        else:
            compressed += 1
            evictable = reference.geometry.evictable_tokens
            assert recorded_keep is not None, f"request {extra} was not compressed"
            assert torch.equal(recorded_keep, reference.keep[:, :, :evictable].cpu()), f"keep-sets differ for {extra}"
            # The global budget is exact over the request, and its layers keep different counts.
            per_layer = recorded_keep.sum(dim=(1, 2))
            assert int(per_layer.sum()) == reference.geometry.kept_tokens
            assert len(set(per_layer.tolist())) > 1, per_layer
            assert reference.geometry.policy == "global" and reference.geometry.num_layers == len(per_layer)
        assert list(output.outputs[0].token_ids) == reference.token_ids, f"outputs differ for {extra}"
    assert compressed == 2


def test_free_blocks_grow_by_what_the_geometry_predicts(engine):
    from vllm import SamplingParams

    from vllm_kvzip.backend.state import get_state

    llm_engine = engine.llm_engine
    pool = _scheduler(engine).kv_cache_manager.block_pool
    prompt = _prompts(engine, 1)[0]
    start = pool.get_num_free_blocks()
    llm_engine.add_request("blocks-1", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8))
    scheduler = _scheduler(engine)
    manager = _manager(engine)
    request_id = None  # the engine's id: vLLM suffixes the one given to add_request
    record = None
    # Step until the scheduler has seen the processed prefill and freed the gap: one step on the CPU
    # for the prefill (and the worker's compaction) and one more; with async scheduling (vLLM's
    # default on a GPU) the steps are shifted by its one batch in flight.  Until then the request
    # holds a dense block for every token scheduled so far.
    while record is None:
        llm_engine.step()
        request_id = request_id or next(key for key in scheduler.requests if key.startswith("blocks-1"))
        tokens = scheduler.requests[request_id].num_computed_tokens
        record = manager._compressed.get(request_id)
        if record is None:
            assert start - pool.get_num_free_blocks() == cdiv(tokens, BLOCK_SIZE)
    state = get_state()
    geometry = CompressionGeometry(
        num_tokens=len(prompt), block_size=BLOCK_SIZE, window=SETTINGS["window"],
        keep_ratio=SETTINGS["keep_ratio"], num_kv_heads=state.num_kv_heads, num_layers=state.num_layers,
        policy="global", sink_tokens=4,
    )
    assert geometry.freed_blocks > 0
    assert record.freed_blocks == geometry.freed_blocks
    # Blocks for every token scheduled so far (the prompt, and the decode steps' tokens at the
    # tail), less the gap the compression freed.
    assert len(prompt) < tokens <= len(prompt) + 2
    assert start - pool.get_num_free_blocks() == cdiv(tokens, BLOCK_SIZE) - geometry.freed_blocks
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    assert pool.get_num_free_blocks() == start
    _assert_worker_state_follows_vllm(engine)


def test_abort_after_compression_leaks_nothing(engine):
    from vllm import SamplingParams

    llm_engine = engine.llm_engine
    pool = _scheduler(engine).kv_cache_manager.block_pool
    start = pool.get_num_free_blocks()
    for index, prompt in enumerate(_prompts(engine, 3)):
        llm_engine.add_request(f"abort-{index}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=50))
    for _ in range(3):
        llm_engine.step()
    llm_engine.abort_request(["abort-0", "abort-2"])
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    assert pool.get_num_free_blocks() == start
    _assert_worker_state_follows_vllm(engine)


def test_offline_metrics_count_what_the_scheduler_freed(engine, embedded_model):
    """LLM.get_metrics() (engine core in this process) has the vllm:kvzip_* series, exact to the geometry."""
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.block_manager.vllm_manager import KVzipManager

    labels = {"model_name": embedded_model, "engine": "0", "method": SETTINGS["method"]}

    def snapshot():
        return {
            (metric.name, metric.labels.get("outcome")): metric
            for metric in engine.get_metrics()
            if metric.name.startswith("vllm:kvzip_") and all(metric.labels.get(k) == v for k, v in labels.items())
        }

    managers = _scheduler(engine).kv_cache_manager.coordinator.single_type_managers
    manager = next(m for m in managers if isinstance(m, KVzipManager))
    freed_before, before = manager.total_freed_blocks, snapshot()
    per_request = [None, {"kv_compression_ratio": 0.5}, {"kv_compression": "none"}]
    prompts = _prompts(engine, len(per_request))
    params = [SamplingParams(temperature=0, max_tokens=4, extra_args=extra) for extra in per_request]
    engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    after = snapshot()

    state = get_state()
    geometries = [
        CompressionGeometry(
            num_tokens=len(prompt), block_size=BLOCK_SIZE, window=SETTINGS["window"], keep_ratio=ratio,
            num_kv_heads=state.num_kv_heads, num_layers=state.num_layers, policy="global", sink_tokens=4,
        )
        for prompt, ratio in zip(prompts[:2], (SETTINGS["keep_ratio"], 0.5))
    ]
    assert all(g.compresses for g in geometries)
    # Kept per (layer, KV head) on average: the global total over the pairs, plus the dense tail.
    ratios = [
        (g.kept_tokens / g.num_pairs + g.num_tokens - g.evictable_tokens) / g.num_tokens for g in geometries
    ]

    def delta(name, outcome=None, field="value"):
        return getattr(after[(name, outcome)], field) - getattr(before[(name, outcome)], field)

    assert delta("vllm:kvzip_requests", "compressed") == 2
    assert delta("vllm:kvzip_requests", "opted_out") == 1
    assert delta("vllm:kvzip_kept_ratio", field="count") == 2
    assert delta("vllm:kvzip_kept_ratio", field="sum") == pytest.approx(sum(ratios), abs=1e-9)
    freed = sum(g.freed_blocks for g in geometries)
    assert delta("vllm:kvzip_freed_blocks") == freed == manager.total_freed_blocks - freed_before
    assert delta("vllm:kvzip_context_tokens") == sum(len(p) for p in prompts[:2])
