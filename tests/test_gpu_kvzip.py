"""KVzip / KVzip+ inside vLLM on a CUDA device (skipped on CPU machines).

The CPU engine test (tests/test_e2e_kvzip.py) checks exact agreement with
the transformers oracle in float32; here the engine runs as deployed: bf16,
torch.compile and CUDA graphs on (the reconstruction pass must run eagerly
between them), the fused SDPA path for the repeat attention.  bf16 moves
scores by about a percent, so agreement with the float32 oracle is checked
as keep-set overlap; the pass must leave the request's blocks untouched, and
its cost is printed (`-s`).

    PYTHONPATH=. python -m pytest -q -s tests/test_gpu_kvzip.py
"""

from __future__ import annotations

import gc

import pytest
import torch

from tests.engine_helpers import model_runner, question_prompt, recorded

BLOCK_SIZE = 16
SETTINGS = {"keep_ratio": 0.3, "window": 64, "chunk_size": 256}

pytestmark = [
    pytest.mark.engine,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (vLLM's CUDA backend)"),
]


@pytest.fixture(scope="module", params=["kvzip", "kvzip-plus"])
def method(request):
    return request.param


@pytest.fixture(scope="module")
def engine(embedded_model, method):
    from vllm import LLM

    llm = LLM(
        model=embedded_model,
        dtype="bfloat16",
        max_model_len=4096,
        block_size=BLOCK_SIZE,
        gpu_memory_utilization=0.3,
        seed=0,
        additional_config={"kv_compression": {"method": method, **SETTINGS}},
    )
    yield llm
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _prompts(engine, count: int) -> list[list[int]]:
    tokenizer = engine.get_tokenizer()
    tasks = ["needle", "profile", "multikey", "uuid_kv"]
    return [question_prompt(tokenizer, task, seed, 1500) for seed, task in zip(range(count), tasks)]


def test_kvzip_on_cuda_with_graphs(engine, method, embedded_model):
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvzip.backend.reconstruction import ATTENTION_PATHS
    from vllm_kvzip.backend.state import get_state, worker_compression_stats
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.hf import PromptTemplate
    from vllm_kvzip.scoring.reconstruction import RepeatPrompt
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    runner = model_runner(engine)
    scorer = runner._vllm_kvzip_reconstruction
    state = get_state()
    state.recorded_keep_sets.clear()
    state.recorded_scores.clear()
    kv_caches = [runner.compilation_config.static_forward_context[name].kv_cache for name in state.layer_names]
    untouched = []
    original_score = scorer.score

    def score_and_check(token_ids, num_tokens, block_ids, *args, **kwargs):
        blocks = torch.tensor(list(block_ids)[: -(-num_tokens // BLOCK_SIZE)], device=kv_caches[0].device)
        before = [cache[blocks].clone() for cache in kv_caches]
        scores = original_score(token_ids, num_tokens, block_ids, *args, **kwargs)
        untouched.append(all(torch.equal(a, cache[blocks]) for a, cache in zip(before, kv_caches)))
        return scores

    prompts = _prompts(engine, 4)
    params = SamplingParams(temperature=0, max_tokens=16)
    # Prefill-only baseline of the same prompts, compression opted out: the pass's cost relative to it.
    dense = SamplingParams(temperature=0, max_tokens=1, extra_args={"kv_compression": "none"})
    engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], dense, use_tqdm=False)
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], dense, use_tqdm=False)
    torch.cuda.synchronize()
    prefill_seconds = time.perf_counter() - started

    ATTENTION_PATHS.clear()
    scoring_before, compressed_before = state.total_scoring_seconds, state.total_compressed
    scorer.score = score_and_check
    try:
        outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    finally:
        del scorer.score
    assert untouched == [True] * len(prompts), "the reconstruction pass wrote into the request's blocks"
    assert ATTENTION_PATHS["blocks"] == 0 and sum(ATTENTION_PATHS.values()) > 0, dict(ATTENTION_PATHS)
    scoring_seconds = state.total_scoring_seconds - scoring_before
    print(
        f"\n{method}: {len(prompts)} prompts of {sum(map(len, prompts)) / len(prompts):.0f} tokens, "
        f"chunk {SETTINGS['chunk_size']}: scoring pass {1e3 * scoring_seconds / len(prompts):.1f} ms per request; "
        f"prefill of the same prompts {1e3 * prefill_seconds / len(prompts):.1f} ms per request (batched); "
        f"stats {worker_compression_stats()}"
    )
    assert state.total_compressed - compressed_before == len(prompts)

    oracle = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    repeat_prompt = RepeatPrompt.from_tokenizer(tokenizer, PromptTemplate.from_tokenizer(tokenizer).postfix)
    assert scorer.repeat_prompt == repeat_prompt
    config = KVCompressionConfig.parse({"method": method, **SETTINGS})
    for prompt, output in zip(prompts, outputs):
        reference = generate_like_vllm(
            oracle, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=1, repeat_prompt=repeat_prompt
        )
        evictable = reference.geometry.evictable_tokens
        keep, scores = recorded(state.recorded_keep_sets, output.request_id), recorded(state.recorded_scores, output.request_id)
        assert keep is not None and scores is not None, f"request {output.request_id} was not compressed"
        assert torch.isfinite(scores[:, :, config.sink_tokens :]).all()
        expected = reference.keep[:, :, :evictable].cpu()
        # Of the tokens the oracle keeps, the bf16 engine keeps nearly all.
        agreement = (keep & expected).sum() / expected.sum()
        assert agreement > 0.85, f"{method}: keep-set agreement {agreement:.3f}"
        assert len(output.outputs[0].token_ids) >= 1
