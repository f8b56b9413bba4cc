"""SnapKV inside vLLM's real engine (CPU build), checked against the transformers oracle.

One in-process engine (float32, block size 16, keep ratio 0.3, dense window 32,
SnapKV observation window 44, kernel 5; a 256-token batch budget, so every
prompt's prefill takes two steps).  After a request's prefill the worker
re-runs the prompt's last 44 tokens through vLLM's model over the request's
cached KV (the observation pass); its scores, keep-sets and greedy outputs
must be those of `generate_like_vllm`, which scores with the scoring library's
SnapKV scorer on the queries of one full transformers prefill.  With these
settings the observation window lies inside the always-kept dense tail for one
prompt and reaches into the evictable span for the others.  The pass must
write nothing into the paged KV cache, and the scheduler must free exactly the
blocks the geometry predicts.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvzip.block_manager.geometry import CompressionGeometry, cdiv

from tests.conftest import close_engine
from tests.engine_helpers import model_runner, question_prompt, recorded

BLOCK_SIZE = 16
MAX_TOKENS = 5
PROMPT_TOKENS = 260
SETTINGS = {"method": "snapkv", "keep_ratio": 0.3, "window": 32, "snapkv_window": 44, "snapkv_kernel": 5}
TASKS = ["needle", "profile", "multikey"]

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(embedded_model):
    from vllm import LLM

    llm = LLM(
        model=embedded_model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_batched_tokens=256,
        max_num_seqs=8,
        block_size=BLOCK_SIZE,
        seed=0,
        additional_config={"kv_compression": SETTINGS},
    )
    yield llm
    close_engine(llm)


def _prompts(engine) -> list[list[int]]:
    tokenizer = engine.get_tokenizer()
    return [question_prompt(tokenizer, task, seed, PROMPT_TOKENS) for seed, task in enumerate(TASKS)]


def test_vllm_snapkv_matches_the_oracle_writes_no_kv_and_frees_the_predicted_blocks(engine, oracle_model):
    from vllm import SamplingParams

    from vllm_kvzip.backend.observation import ObservationScorer
    from vllm_kvzip.backend.state import get_state, worker_compression_stats
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    runner = model_runner(engine)
    scorer = runner._vllm_kvzip_observation
    assert isinstance(scorer, ObservationScorer) and not hasattr(runner, "_vllm_kvzip_reconstruction")
    assert (scorer.window, scorer.kernel_size) == (44, 5)
    state = get_state()
    state.recorded_keep_sets.clear()
    state.recorded_scores.clear()
    kv_caches = [runner.compilation_config.static_forward_context[name].kv_cache for name in state.layer_names]
    passes = []
    forwards = []
    original_score, original_forward = scorer.score, scorer.forward

    def score_and_check(*args, **kwargs):
        # The whole paged cache (every layer, every block) before and after the observation pass.
        before = [cache.clone() for cache in kv_caches]
        scores = original_score(*args, **kwargs)
        passes.append(all(torch.equal(a, b) for a, b in zip(before, kv_caches)))
        return scores

    def forward_and_record(input_ids, start_position, metadata):
        forwards.append((list(input_ids), start_position))
        return original_forward(input_ids, start_position, metadata)

    config = KVCompressionConfig.parse(SETTINGS)
    llm_engine = engine.llm_engine
    pool = llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    stop = [engine.get_tokenizer().eos_token_id]
    overlaps = []
    differences = []  # largest score difference to the oracle, relative to the largest score
    scorer.score, scorer.forward = score_and_check, forward_and_record
    try:
        for index, prompt in enumerate(_prompts(engine)):
            request_id = f"snapkv{index}"
            geometry = CompressionGeometry(
                num_tokens=len(prompt), block_size=BLOCK_SIZE, window=config.window,
                keep_ratio=config.keep_ratio, num_kv_heads=state.num_kv_heads, num_layers=state.num_layers,
                policy=state.policy, sink_tokens=config.sink_tokens,
            )
            assert geometry.freed_blocks > 0 and len(prompt) > 256, "the prompt must free blocks and prefill in steps"
            overlaps.append(max(0, geometry.evictable_tokens - (len(prompt) - config.snapkv_window)))

            start = pool.get_num_free_blocks()
            scoring_before = state.total_scoring_seconds
            llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
            outputs = []
            while len(passes) == index:  # chunked prefill, then the observation pass and the compaction
                outputs += llm_engine.step()
            assert passes[index], "the observation pass wrote into the KV cache"
            # One forward of the prompt's last snapkv_window tokens, at their own positions.
            first = len(prompt) - config.snapkv_window
            assert forwards[index] == (prompt[first:], first)
            held_dense = cdiv(len(prompt), BLOCK_SIZE)
            assert start - pool.get_num_free_blocks() == held_dense
            outputs += llm_engine.step()  # the scheduler sees the processed prefill and frees the gap
            tail_growth = cdiv(len(prompt) + 1, BLOCK_SIZE) - held_dense
            assert start - pool.get_num_free_blocks() == held_dense - geometry.freed_blocks + tail_growth
            while llm_engine.has_unfinished_requests():
                outputs += llm_engine.step()
            assert pool.get_num_free_blocks() == start
            assert state.total_scoring_seconds > scoring_before  # the pass's cost is measured

            reference = generate_like_vllm(
                oracle_model, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=MAX_TOKENS, stop_token_ids=stop,
            )
            assert reference.geometry == geometry
            scores = recorded(state.recorded_scores, request_id)
            keep = recorded(state.recorded_keep_sets, request_id)
            assert scores is not None and keep is not None, "the request was not compressed"
            assert scores.shape == (state.num_layers, state.num_kv_heads, geometry.evictable_tokens)
            assert torch.isfinite(scores).all()
            torch.testing.assert_close(scores, reference.scores.cpu(), rtol=2e-4, atol=1e-6)
            differences.append(float((scores - reference.scores.cpu()).abs().max() / reference.scores.abs().max()))
            assert torch.equal(keep, reference.keep[:, :, : geometry.evictable_tokens].cpu()), "keep-sets differ"
            if overlaps[-1]:  # observed tokens in the scored span score their head's maximum: all kept
                assert keep[:, :, geometry.evictable_tokens - overlaps[-1] :].all()
            final = [output for output in outputs if output.request_id.split("-")[0] == request_id][-1]
            assert final.finished
            assert list(final.outputs[0].token_ids) == reference.token_ids, "greedy outputs differ"
    finally:
        del scorer.score  # the method again
        scorer.forward = original_forward
    # Both sides of the dense tail: a window inside it, windows reaching into the scored span.
    assert 0 in overlaps and any(overlaps)
    stats = worker_compression_stats()
    assert stats["method"] == "snapkv" and stats["compressed_requests"] >= len(TASKS)
    assert stats["scoring_seconds"] == state.total_scoring_seconds > 0
    print(
        f"\nSnapKV observation pass ({config.snapkv_window} tokens, CPU, float32): "
        f"{1e3 * scorer.total_seconds / scorer.total_passes:.1f} ms per request over {scorer.total_passes} requests; "
        f"largest score difference to the oracle {max(differences):.2e} of the largest score"
    )
