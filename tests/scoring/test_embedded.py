"""KVzip at keep ratio 0.3 on the embedded SmolLM2-135M-Instruct keeps the answers of the full cache."""

from __future__ import annotations

import pytest
import torch

from tests.scoring.conftest import embedded_model_dir
from vllm_kvzip.eval.hf_eval import answer_example
from vllm_kvzip.eval.synthetic import is_correct, make_dataset

MODEL_DIR = embedded_model_dir()
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="embedded model not available (set VLLM_KVZIP_MODEL_DIR)")


@pytest.mark.slow  # about 3.5 minutes on 2 CPU cores
def test_kvzip_keep_03_answers_what_the_full_cache_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvzip.scoring.hf import KVzipModel

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    kvzip_model = KVzipModel(model, tokenizer, model_name="SmolLM2-135M-Instruct")
    # 3 examples per task give ~20 questions that the full cache answers: the
    # 95% bar then tolerates one miss (with ~14, a single miss already fails it).
    examples = make_dataset(
        seed=1,
        examples_per_task=3,
        tasks=("needle", "multikey", "uuid_kv", "profile"),
        token_budget=700,
        count_tokens=lambda text: len(tokenizer(text)["input_ids"]),
    )
    full_correct = kept_correct = 0
    kept_fractions = []
    for example in examples:
        kv = kvzip_model.prefill(example.context, {"method": "kvzip", "keep_ratio": 0.3})
        full = answer_example(kvzip_model, kv, example)
        bytes_full = kv.kv_bytes()
        keep_set = kv.prune()
        kept_fractions.append(float(keep_set.mask.float().mean()))
        assert kv.kv_bytes() < bytes_full
        pruned = answer_example(kvzip_model, kv, example)
        for question, full_answer, pruned_answer in zip(example.questions, full, pruned):
            if is_correct(full_answer, question):
                full_correct += 1
                kept_correct += is_correct(pruned_answer, question)
    # The model must answer enough questions for the comparison to mean something.
    assert full_correct >= 15, f"full cache answered only {full_correct} questions"
    assert kept_correct >= 0.95 * full_correct, f"KVzip@0.3 kept {kept_correct}/{full_correct} (context KV kept: {kept_fractions})"
    # The ratio counts evictable tokens only; with ~700-token contexts and a 128-token window
    # the kept fraction of the context is about 0.3 + 0.7 * 128 / 700 ~ 0.43.
    assert max(kept_fractions) < 0.5
