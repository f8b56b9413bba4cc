"""KVzip and KVzip+ inside vLLM's real engine (CPU build), checked against the transformers oracle.

One in-process engine per method (float32, block size 16, window 64, keep
ratio 0.3, chunk size 80 so that every prompt takes several reconstruction
passes and the later-chunk prompt with its 8 overlap tokens runs; a 512-token
batch budget keeps vLLM's CPU warm-up short).  For every
request the worker's reconstruction pass through vLLM's model must give the
scores, keep-sets and greedy outputs of `generate_like_vllm`, which scores
with the scoring library's KVzip / KVzip+ scorers through transformers.  The
pass must write nothing into the paged KV cache, and the scheduler must free
exactly the blocks the geometry predicts.
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
SETTINGS = {"keep_ratio": 0.3, "window": 64, "chunk_size": 80}
# KVzip+ differs from KVzip only by its normalisation: one prompt covers it.
TASKS = {"kvzip": ["needle", "profile"], "kvzip-plus": ["multikey"]}

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", params=["kvzip", "kvzip-plus"])
def method(request):
    return request.param


@pytest.fixture(scope="module")
def engine(embedded_model, method):
    from vllm import LLM

    llm = LLM(
        model=embedded_model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_batched_tokens=512,
        max_num_seqs=8,
        block_size=BLOCK_SIZE,
        seed=0,
        additional_config={"kv_compression": {"method": method, **SETTINGS}},
    )
    yield llm
    close_engine(llm)


@pytest.fixture(scope="module")
def repeat_prompt(embedded_model):
    from transformers import AutoTokenizer

    from vllm_kvzip.scoring.hf import PromptTemplate
    from vllm_kvzip.scoring.reconstruction import RepeatPrompt

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    return RepeatPrompt.from_tokenizer(tokenizer, PromptTemplate.from_tokenizer(tokenizer).postfix)


def _prompts(engine, tasks) -> list[list[int]]:
    tokenizer = engine.get_tokenizer()
    return [question_prompt(tokenizer, task, seed, PROMPT_TOKENS) for seed, task in enumerate(tasks)]


def test_vllm_matches_the_oracle_writes_no_kv_and_frees_the_predicted_blocks(engine, method, oracle_model, repeat_prompt):
    from vllm import SamplingParams

    from vllm_kvzip.backend.state import get_state, worker_compression_stats
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.reconstruction import prompt_reconstruction_chunks
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    runner = model_runner(engine)
    scorer = runner._vllm_kvzip_reconstruction
    # The worker built the same repeat prompt from vLLM's tokenizer.
    assert scorer.repeat_prompt == repeat_prompt
    state = get_state()
    state.recorded_keep_sets.clear()
    state.recorded_scores.clear()
    kv_caches = [runner.compilation_config.static_forward_context[name].kv_cache for name in state.layer_names]
    passes = []
    original_score = scorer.score

    def score_and_check(*args, **kwargs):
        # The whole paged cache (every layer, every block) before and after the reconstruction pass.
        before = [cache.clone() for cache in kv_caches]
        scores = original_score(*args, **kwargs)
        passes.append(all(torch.equal(a, b) for a, b in zip(before, kv_caches)))
        return scores

    config = KVCompressionConfig.parse({"method": method, **SETTINGS})
    llm_engine = engine.llm_engine
    pool = llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    stop = [engine.get_tokenizer().eos_token_id]
    scorer.score = score_and_check
    try:
        for index, prompt in enumerate(_prompts(engine, TASKS[method])):
            request_id = f"{method.replace('-', '')}{index}"
            geometry = CompressionGeometry(
                num_tokens=len(prompt), block_size=BLOCK_SIZE, window=SETTINGS["window"],
                keep_ratio=SETTINGS["keep_ratio"], num_kv_heads=state.num_kv_heads, num_layers=state.num_layers,
                policy="global", sink_tokens=config.sink_tokens,
            )
            chunks = prompt_reconstruction_chunks(
                prompt, len(prompt), geometry.evictable_tokens, config.sink_tokens, config.chunk_size, repeat_prompt
            )
            assert len(chunks) >= 3 and geometry.freed_blocks > 0, "the prompt must take several passes and free blocks"

            start = pool.get_num_free_blocks()
            scoring_before = state.total_scoring_seconds
            llm_engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
            outputs = []
            while len(passes) == index:  # (chunked) prefill, then the reconstruction pass and the compaction
                outputs += llm_engine.step()
            assert passes[index], "the reconstruction pass wrote into the KV cache"
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
                oracle_model, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=MAX_TOKENS,
                stop_token_ids=stop, repeat_prompt=repeat_prompt,
            )
            assert reference.geometry == geometry
            scores = recorded(state.recorded_scores, request_id)
            keep = recorded(state.recorded_keep_sets, request_id)
            assert scores is not None and keep is not None, "the request was not compressed"
            # Sinks +inf; every other score a softmax weight (KVzip) or its normalised form (KVzip+).
            assert torch.isinf(scores[:, :, : config.sink_tokens]).all()
            assert torch.isfinite(scores[:, :, config.sink_tokens :]).all()
            torch.testing.assert_close(scores, reference.scores.cpu(), rtol=2e-4, atol=1e-6)
            assert torch.equal(keep, reference.keep[:, :, : geometry.evictable_tokens].cpu()), "keep-sets differ"
            final = [output for output in outputs if output.request_id.split("-")[0] == request_id][-1]
            assert final.finished
            assert list(final.outputs[0].token_ids) == reference.token_ids, "greedy outputs differ"
    finally:
        del scorer.score
    stats = worker_compression_stats()
    assert stats["method"] == method and stats["compressed_requests"] >= len(TASKS[method])
    assert stats["scoring_seconds"] == state.total_scoring_seconds > 0
