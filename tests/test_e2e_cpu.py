"""vLLM's real engine (CPU build) with the plugin loaded, on the embedded model."""

from __future__ import annotations

import pytest

from tests.conftest import close_engine

PROFILE = (
    "Profile: My name is Ana. I live in Porto. I have a cat named Whiskers and a dog named Rex. "
    "I work as a nurse.\n\nQuestion: What is my cat's name? Answer with the name only."
)


@pytest.mark.engine
def test_vllm_on_cpu_answers_about_the_profile(embedded_model):
    from vllm import LLM, SamplingParams

    llm = LLM(model=embedded_model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    try:
        outputs = llm.chat([{"role": "user", "content": PROFILE}], SamplingParams(temperature=0, max_tokens=16))
        answer = outputs[0].outputs[0].text
        assert "Whiskers" in answer, answer
        assert outputs[0].outputs[0].finish_reason == "stop"  # stops at <|im_end|>
    finally:
        close_engine(llm)
