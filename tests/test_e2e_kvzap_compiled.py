"""KVzap under torch.compile: the surrogate hooks inside vLLM's compiled model.

The other engine tests run eagerly (fast engine starts on a 2-core machine);
deployed engines compile the model, and the KVzap pre-hooks are then traced
by Dynamo into vLLM's compiled graph.  The surrogate runs inside the opaque
custom op `vllm_kvzip::kvzap_score_and_record`, so the compiled model must
record exactly the eager scores: the keep-sets and greedy outputs must equal
the transformers oracle's, as in tests/test_e2e_compression.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import close_engine
from tests.engine_helpers import recorded
from tests.test_e2e_compression import BLOCK_SIZE, MAX_TOKENS, SETTINGS, _prompts

pytestmark = pytest.mark.engine

@pytest.fixture(scope="module")
def compiled_engine(embedded_model, surrogate_dir):
    from vllm import LLM

    llm = LLM(
        model=embedded_model,
        dtype="float32",
        enforce_eager=False,  # torch.compile on: the hooks are traced into vLLM's graph
        max_model_len=2048,
        block_size=BLOCK_SIZE,
        seed=0,
        additional_config={"kv_compression": {**SETTINGS, "surrogate": surrogate_dir}},
    )
    yield llm
    close_engine(llm)


def test_compiled_engine_records_the_eager_scores(compiled_engine, oracle_model, surrogate_dir):
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.config import KVCompressionConfig
    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate
    from vllm_kvzip.scoring.vllm_reference import generate_like_vllm

    compilation = compiled_engine.llm_engine.vllm_config.compilation_config
    assert int(compilation.mode) != 0, "the engine was meant to run compiled"

    prompts = _prompts(compiled_engine, 2)
    state = get_state()
    state.recorded_keep_sets.clear()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = compiled_engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)

    config = KVCompressionConfig.parse({**SETTINGS, "surrogate": surrogate_dir})
    surrogate = KVzapSurrogate.load(surrogate_dir).float()
    stop = [compiled_engine.get_tokenizer().eos_token_id]
    for prompt, output in zip(prompts, outputs):
        reference = generate_like_vllm(
            oracle_model, prompt, config, block_size=BLOCK_SIZE, max_new_tokens=MAX_TOKENS, stop_token_ids=stop, surrogate=surrogate
        )
        recorded_keep = recorded(state.recorded_keep_sets, output.request_id)
        assert recorded_keep is not None, "the request was not compressed"
        evictable = reference.geometry.evictable_tokens
        assert torch.equal(recorded_keep, reference.keep[:, :, :evictable].cpu()), "compiled keep-sets differ from the oracle's"
        assert list(output.outputs[0].token_ids) == reference.token_ids
