"""Threshold mode (KVzap thresholds) and decode-time eviction (DMS) through vLLM's real engine (CPU build).

The worker decides the budgets: right after the prefill, and then whenever the
dense tail has grown by `window` tokens, it folds the tail's older blocks into
the head pages, keeping the tokens whose KVzap log-score is >= the threshold,
and reports the blocks it emptied to the scheduler with the step's output.
Checked here against the transformers oracle (`generate_like_vllm`, which
implements the same schedule) and against vLLM's own block counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vllm_kvzip
from vllm_kvzip.block_manager.geometry import cdiv
from vllm_kvzip.block_manager.plan import (
    RESERVE_FOLDINGS,
    container_blocks_needed,
    pages_per_head,
    plan_retirement_layout,
)

from tests.conftest import SCHEDULING_MODES, close_engine, start_engine
from tests.engine_helpers import question_prompt, recorded, runs_async_scheduling
from tests.scheduler_harness import kvzip_manager

BLOCK_SIZE = 16
WINDOW = 64
# The shipped SmolLM2 surrogate keeps ~24% of (layer, head, token) pairs at -2 (the busiest layer ~68%):
# with head pages packed across layers the freed blocks follow the average, not the busiest layer.
THRESHOLD = -2.0
SURROGATE = str(Path(vllm_kvzip.__file__).parent / "data" / "kvzap" / "SmolLM2-135M-Instruct-mlp")
SETTINGS = {"method": "kvzap-mlp", "threshold": THRESHOLD, "window": WINDOW, "decode_eviction": True, "surrogate": SURROGATE}

pytestmark = pytest.mark.engine


# Every test runs with vLLM's scheduler in both modes: decode-time foldings report their freed blocks
# with a step's output, which async scheduling (vLLM's default on a GPU) processes one step later.
@pytest.fixture(scope="module", params=SCHEDULING_MODES)
def engine(embedded_model, request):
    llm = start_engine(
        request.param,
        model=embedded_model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4800,
        block_size=BLOCK_SIZE,
        seed=0,
        additional_config={"kv_compression": SETTINGS},
    )
    yield llm
    close_engine(llm)


@pytest.fixture(autouse=True)
def _requests_end_with_their_test(engine):
    """A test that fails mid-generation must not leave its requests running into the next test's
    block accounting (they share the module's engine)."""
    yield
    llm_engine = engine.llm_engine
    leftover = list(_scheduler(engine).requests)
    if leftover:
        llm_engine.abort_request(leftover, internal=True)
    while llm_engine.has_unfinished_requests():
        llm_engine.step()


def _prompt(engine, task: str, seed: int, budget: int = 700) -> list[int]:
    return question_prompt(engine.get_tokenizer(), task, seed, budget)


def _scheduler(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler


def _manager(engine):
    return kvzip_manager(_scheduler(engine))


def _held_blocks(manager, request_id: str) -> int:
    return sum(block is not manager._null_block for block in manager.req_to_blocks.get(request_id, []))


def _engine_request(state, request_id: str):
    return recorded(state.requests, request_id)


# A GPU engine runs other kernels than the CPU oracle (cuBLAS, vLLM's attention; float32 dots in IEEE,
# see conftest.py), so its KVzap scores differ from the oracle's by float rounding, and a score that
# close to the threshold may land on the other side of it there. On the CPU, the keep-sets must be
# equal.
GPU_SCORE_TOLERANCE = 1e-2


def _keep_sets_agree(recorded_keep, recorded_scores, reference, prompt_len: int, output_ids: list[int]) -> bool:
    """Asserts that the engine's keep-set is the oracle's; True when equal to the token.

    On the CPU they must be equal, and so must the outputs. On a GPU, the engine's scores must be
    within GPU_SCORE_TOLERANCE of the oracle's up to the end of the first folding where the
    decisions differ: those tokens were scored from the same inputs over caches that agree. (A
    decision can then differ only where the oracle's score is that close to the threshold.) Later
    foldings score tokens over caches that already differ (and after the first differing output
    token, other tokens), so they are not compared; the outputs may differ only after a flip.
    Returns False when a flip happened (the caller stops there)."""
    reference_keep = reference.keep.cpu()
    if not torch.cuda.is_available():
        assert recorded_keep.shape == reference_keep.shape
        assert torch.equal(recorded_keep, reference_keep)
        assert recorded_scores.shape == reference.scores.shape
        assert torch.allclose(recorded_scores, reference.scores, atol=1e-3, rtol=0)
        return True
    same_prefix = next(
        (index for index, (a, b) in enumerate(zip(output_ids, reference.token_ids)) if a != b),
        min(len(output_ids), len(reference.token_ids)),
    )
    # The token at generated index i is at position prompt_len + i - 1 in the cache (the first one
    # comes from the prefill's logits); decisions up to the first differing token share their inputs.
    comparable = min(recorded_keep.shape[-1], reference_keep.shape[-1], prompt_len + same_prefix)
    differ = recorded_keep[..., :comparable] != reference_keep[..., :comparable]
    differ_at = differ.any(dim=(0, 1)).nonzero()
    if differ_at.numel():
        first_differing_position = int(differ_at[0])
        folding_end = next(end * BLOCK_SIZE for _, end, _ in reference.folded_blocks if end * BLOCK_SIZE > first_differing_position)
        comparable = min(comparable, folding_end)
        differ = differ[..., :comparable]
    score_gap = (recorded_scores[..., :comparable] - reference.scores[..., :comparable]).abs()
    margins = (reference.scores[..., :comparable][differ] - THRESHOLD).abs()
    detail = (
        f"{int(differ.sum())} of {differ.numel()} decisions up to the first differing folding differ (largest "
        f"margin to the threshold {float(margins.max()) if margins.numel() else 0.0:.2e}), largest score gap "
        f"{float(score_gap.max()):.2e}; outputs equal for {same_prefix} of {len(output_ids)} tokens"
    )
    print(f"keep-sets on the GPU: {detail}")
    assert float(score_gap.max()) <= GPU_SCORE_TOLERANCE, detail
    if bool(differ.any()):
        return False
    assert same_prefix == len(output_ids) == len(reference.token_ids), f"outputs differ without a flip: {detail}"
    assert recorded_keep.shape == reference_keep.shape, detail
    return True


def test_threshold_mode_with_decode_eviction_matches_the_oracle(engine, embedded_model):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    max_tokens = 160  # the tail is folded at the prefill and about every WINDOW tokens after it
    per_request = [None, {"kv_compression": "none"}]
    prompts = [_prompt(engine, "profile", 0), _prompt(engine, "uuid_kv", 2, 500)]
    params = [
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra) for extra in per_request
    ]
    state = get_state()
    state.recorded_keep_sets.clear()
    state.recorded_scores.clear()
    manager = _manager(engine)
    freed_before = manager.total_freed_blocks
    outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    freed_by_engine = manager.total_freed_blocks - freed_before

    oracle = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval()
    config = KVCompressionConfig.parse(SETTINGS)
    surrogate = KVzapSurrogate.load(SURROGATE).float()
    for prompt, extra, output in zip(prompts, per_request, outputs):
        reference = generate_like_vllm(
            oracle, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=max_tokens, surrogate=surrogate,
            extra_args=extra,
        )
        recorded_keep = recorded(state.recorded_keep_sets, output.request_id)
        if extra is not None:
            assert recorded_keep is None and reference.folded_blocks is None
        else:
            # Folded at the prefill and at least twice while decoding.
            assert len(reference.folded_blocks) >= 3, reference.folded_blocks
            assert recorded_keep is not None
            recorded_scores = recorded(state.recorded_scores, output.request_id)
            exact = _keep_sets_agree(
                recorded_keep, recorded_scores, reference, len(prompt), list(output.outputs[0].token_ids)
            )
            if not exact:
                continue  # a flip at the threshold on a GPU (checked above): the rest follows other decisions
            assert 0.05 < recorded_keep.float().mean() < 0.9  # the threshold really evicts, and keeps
            # The scheduler freed exactly what the oracle's foldings free (the only compressed request).
            assert freed_by_engine == sum(freed for _, _, freed in reference.folded_blocks)
            # The prefill folding, from its keep-set: pages of all layers packed together, L * H per
            # block, each pair with room for RESERVE_FOLDINGS more foldings at its rate.
            first, end, freed_first = reference.folded_blocks[0]
            kept = recorded_keep[:, :, : end * BLOCK_SIZE].sum(dim=-1)
            empty = torch.zeros_like(kept)
            layout = plan_retirement_layout(empty, empty, 0, kept, end * BLOCK_SIZE, end, BLOCK_SIZE, WINDOW)
            assert first == 0 and freed_first == end - layout.num_container_blocks
            room = layout.num_container_blocks - container_blocks_needed(kept, BLOCK_SIZE)
            assert 0 <= room <= cdiv(int((pages_per_head(kept + RESERVE_FOLDINGS * WINDOW, BLOCK_SIZE)
                                          - pages_per_head(kept, BLOCK_SIZE)).sum()), kept.numel()) + 1
            # Per-layer packing (one KV tensor per layer) needed the busiest layer's pages in every layer.
            busiest_layer = int(pages_per_head(kept, BLOCK_SIZE).sum(dim=-1).max())
            per_layer_freed = end - cdiv(busiest_layer, kept.shape[1])
            assert freed_first >= per_layer_freed + 10, (freed_first, per_layer_freed, end)
        assert list(output.outputs[0].token_ids) == reference.token_ids, f"outputs differ for {extra}"


def test_long_generation_stays_within_the_threshold_bound(engine):
    """A 4,000-token generation: after every step the scheduler holds exactly the worker's container
    blocks (every layer's head pages packed together, with bounded room for later foldings) plus
    the dense tail, and
    vLLM's free block count shows what decode-time eviction gave back."""
    from vllm import SamplingParams

    from vllm_kvzip.backend.state import get_state

    llm_engine = engine.llm_engine
    pool = _scheduler(engine).kv_cache_manager.block_pool
    manager = _manager(engine)
    state = get_state()
    state.recorded_keep_sets.clear()
    prompt = _prompt(engine, "variable", 3, 600)
    max_tokens = 4000
    start = pool.get_num_free_blocks()
    retirements_before, repacks_before = state.total_retirements, state.total_repacks
    llm_engine.add_request("long", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    peak_held = 0
    generated = 0
    checked = 0
    foldings = 0
    freed_now = freed_after_prefill = 0
    request_id = None  # the engine's id: vLLM suffixes the one given to add_request
    async_scheduling = runs_async_scheduling(engine)
    last_retirements, reports_waited = 0, False
    while llm_engine.has_unfinished_requests():
        for output in llm_engine.step():
            generated = len(output.outputs[0].token_ids)
        request_id = request_id or next((key for key in manager.req_to_blocks if key.startswith("long")), None)
        entry = state.requests.get(request_id)
        held = _held_blocks(manager, request_id)
        peak_held = max(peak_held, held)
        if entry is None or not entry.compressed or not manager.threshold_freed_blocks.get(request_id):
            continue
        # The worker reports a folding's freed blocks with the step's output (or, while it has none,
        # a later one's). Without async scheduling the scheduler processes that output within the
        # same step(); with it (vLLM's default on a GPU), in the next step() call, so a step that
        # folded, or that shipped a waiting report, is checked one step later.
        reports_waiting = bool(state.freed_block_ranges)
        in_flight = reports_waiting or (async_scheduling and (entry.retirements != last_retirements or reports_waited))
        last_retirements, reports_waited = entry.retirements, reports_waiting
        if in_flight:
            continue
        keep = state.recorded_keep_sets[request_id]
        assert keep.shape[-1] == entry.dense_start_block * BLOCK_SIZE
        kept = keep.sum(dim=-1)
        # Tokens the scheduler holds blocks for: the prompt and every generated token but the newest,
        # plus, with async scheduling (vLLM's default on a GPU), the token of the step it has already
        # scheduled ahead of the outputs seen here.
        tokens = _scheduler(engine).requests[request_id].num_computed_tokens
        assert tokens - (len(prompt) + generated - 1) in ((0, 1) if async_scheduling else (0,))
        assert held == len(entry.containers) + cdiv(tokens, BLOCK_SIZE) - entry.dense_start_block
        # The containers: the kept tokens' pages, plus at most RESERVE_FOLDINGS foldings of room per pair.
        tight = container_blocks_needed(kept, BLOCK_SIZE)
        assert tight <= len(entry.containers) <= tight + cdiv(int(pages_per_head(
            torch.full_like(kept, RESERVE_FOLDINGS * WINDOW + BLOCK_SIZE), BLOCK_SIZE).sum()), kept.numel())
        checked += 1
        foldings = entry.retirements
        freed_now = manager.threshold_freed_blocks[request_id]
        freed_after_prefill = freed_after_prefill or freed_now
    assert generated == max_tokens
    assert checked > max_tokens // 2
    # Folded right after the prefill and again while decoding (a folding that would free nothing
    # is skipped and retried with the next interval), giving blocks back to vLLM's pool while the
    # request ran.
    assert foldings >= 2, foldings
    # The room a re-pack leaves: some decode-time foldings wrote only their new tokens.
    decode_foldings = state.total_retirements - retirements_before
    assert 0 < state.total_repacks - repacks_before < decode_foldings, (state.total_repacks - repacks_before, decode_foldings)
    assert freed_now > freed_after_prefill, (freed_after_prefill, freed_now)
    dense_blocks = cdiv(len(prompt) + max_tokens, BLOCK_SIZE)
    assert peak_held < dense_blocks
    assert pool.get_num_free_blocks() == start


def test_abort_and_preemption_in_threshold_mode_leak_nothing(engine):
    from vllm import SamplingParams

    llm_engine = engine.llm_engine
    pool = _scheduler(engine).kv_cache_manager.block_pool
    manager = _manager(engine)
    start = pool.get_num_free_blocks()
    prompts = [_prompt(engine, task, seed, 500) for seed, task in enumerate(["profile", "needle", "multikey"])]
    for index, prompt in enumerate(prompts):
        llm_engine.add_request(f"t-{index}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=150, ignore_eos=True))
    for _ in range(40):
        llm_engine.step()
    llm_engine.abort_request(["t-1"])  # external id: vLLM maps it to its own
    # Preempt t-0 the way vLLM does under memory pressure: its blocks go back, it recomputes later.
    scheduler = _scheduler(engine)
    request = next(request for key, request in scheduler.requests.items() if key.startswith("t-0"))
    assert manager.threshold_freed_blocks.get(request.request_id), "t-0 should be compressed before it is preempted"
    scheduler.running.remove(request)
    scheduler._preempt_request(request, 0.0)
    # vLLM preempts inside schedule(), so a preempted request is never among the previous step's
    # scheduled ones; the model runner then gets its tokens again when it resumes (async scheduling
    # needs them). Preempting between steps must leave the scheduler in that same state.
    scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
    finished = {}
    while llm_engine.has_unfinished_requests():
        for output in llm_engine.step():
            if output.finished:
                finished[output.request_id] = len(output.outputs[0].token_ids)
    assert finished == {"t-0": 150, "t-2": 150}
    assert request.num_preemptions == 1
    assert pool.get_num_free_blocks() == start
    assert not manager._threshold and not manager.threshold_freed_blocks
