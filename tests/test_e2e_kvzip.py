"""KVzip and KVzip+ inside vLLM's real engine (CPU build), checked against the transformers oracle.

One in-process engine per method (float32, block size 16, window 64, keep
ratio 0.3, chunk size 96 so that every prompt takes several reconstruction
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
from vllm_kvzip.eval.synthetic import make_example

BLOCK_SIZE = 16
MAX_TOKENS = 6
PROMPT_TOKENS = 320
SETTINGS = {"keep_ratio": 0.3, "window": 64, "chunk_size": 96}

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
    del llm


@pytest.fixture(scope="module")
def oracle_model(embedded_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def repeat_prompt(embedded_model):
    from transformers import AutoTokenizer

    from vllm_kvzip.scoring.hf import PromptTemplate
    from vllm_kvzip.scoring.reconstruction import RepeatPrompt

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    return RepeatPrompt.from_tokenizer(tokenizer, PromptTemplate.from_tokenizer(tokenizer).postfix)


def _prompts(engine, tasks) -> list[list[int]]:
    tokenizer = engine.get_tokenizer()
    prompts = []
    for seed, task in enumerate(tasks):
        example = make_example(task, seed, token_budget=PROMPT_TOKENS, count_tokens=lambda text: len(tokenizer.encode(text)))
        question = example.questions[0]
        messages = [{"role": "user", "content": example.context + "\n\n" + question.text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text + question.answer_prefix, add_special_tokens=False))
    return prompts


def _runner(engine):
    return engine.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _recorded(records: dict, request_id: str):
    # LLM.generate makes the engine's request id from its own with a suffix.
    return next((value for key, value in records.items() if key.split("-")[0] == request_id), None)


def test_scores_keep_sets_and_outputs_match_the_transformers_oracle(engine, method, oracle_model, repeat_prompt):
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.reconstruction import prompt_reconstruction_chunks
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    # The worker built the same repeat prompt from vLLM's tokenizer.
    assert _runner(engine)._vllm_kvzip_reconstruction.repeat_prompt == repeat_prompt
    prompts = _prompts(engine, ["needle", "profile"])
    state = get_state()
    state.recorded_keep_sets.clear()
    state.recorded_scores.clear()
    outputs = engine.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    )

    config = KVCompressionConfig.parse({"method": method, **SETTINGS})
    stop = [engine.get_tokenizer().eos_token_id]
    for prompt, output in zip(prompts, outputs):
        reference = generate_like_vllm(
            oracle_model, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=MAX_TOKENS,
            stop_token_ids=stop, repeat_prompt=repeat_prompt,
        )
        geometry = reference.geometry
        chunks = prompt_reconstruction_chunks(
            prompt, len(prompt), geometry.evictable_tokens, config.sink_tokens, config.chunk_size, repeat_prompt
        )
        assert len(chunks) >= 3, "the prompts must take several reconstruction passes"
        scores = _recorded(state.recorded_scores, output.request_id)
        keep = _recorded(state.recorded_keep_sets, output.request_id)
        assert scores is not None and keep is not None, "the request was not compressed"
        # Sinks +inf, every other score a softmax weight (KVzip) or its normalised form (KVzip+), finite.
        assert torch.isinf(scores[:, :, : config.sink_tokens]).all()
        assert torch.isfinite(scores[:, :, config.sink_tokens :]).all()
        torch.testing.assert_close(scores, reference.scores.cpu(), rtol=2e-4, atol=1e-6)
        assert torch.equal(keep, reference.keep[:, :, : geometry.evictable_tokens].cpu()), "keep-sets differ"
        assert list(output.outputs[0].token_ids) == reference.token_ids, "greedy outputs differ"


def test_the_pass_writes_no_kv_and_the_freed_blocks_match_the_geometry(engine, method):
    from vllm import SamplingParams

    from vllm_kvzip.backend.state import get_state, worker_compression_stats

    runner = _runner(engine)
    scorer = runner._vllm_kvzip_reconstruction
    state = get_state()
    kv_caches = [runner.compilation_config.static_forward_context[name].kv_cache for name in state.layer_names]
    snapshots = {}
    original_score = scorer.score

    def score_and_check(*args, **kwargs):
        before = [cache.clone() for cache in kv_caches]
        scores = original_score(*args, **kwargs)
        snapshots["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, kv_caches))
        return scores

    scorer.score = score_and_check
    try:
        scoring_before = state.total_scoring_seconds
        llm_engine = engine.llm_engine
        pool = engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        prompt = _prompts(engine, ["uuid_kv"])[0]
        start = pool.get_num_free_blocks()
        llm_engine.add_request("blocks-1", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6))
        while not snapshots:  # (chunked) prefill, then the reconstruction pass and the compaction on the worker
            llm_engine.step()
        assert snapshots == {"unchanged": True}, "the reconstruction pass wrote into the KV cache"
        held_dense = cdiv(len(prompt), BLOCK_SIZE)
        assert start - pool.get_num_free_blocks() == held_dense
        llm_engine.step()  # the scheduler sees the processed prefill and frees the gap
        geometry = CompressionGeometry(
            num_tokens=len(prompt), block_size=BLOCK_SIZE, window=SETTINGS["window"],
            keep_ratio=SETTINGS["keep_ratio"], num_kv_heads=state.num_kv_heads, sink_tokens=4,
        )
        assert geometry.freed_blocks > 0
        tail_growth = cdiv(len(prompt) + 1, BLOCK_SIZE) - held_dense
        assert start - pool.get_num_free_blocks() == held_dense - geometry.freed_blocks + tail_growth
        while llm_engine.has_unfinished_requests():
            llm_engine.step()
        assert pool.get_num_free_blocks() == start
    finally:
        del scorer.score
    # The pass's cost is measured and exposed.
    assert state.total_scoring_seconds > scoring_before
    stats = worker_compression_stats()
    assert stats["method"] == method and stats["scoring_seconds"] == state.total_scoring_seconds
