"""Answer synthetic examples with the transformers API (`vllm_kvzip.scoring.hf`)."""

from __future__ import annotations

from vllm_kvzip.eval.synthetic import Example, Question

# The answers end at the end of the line (or the closing quote for UUIDs).
STOP_STRINGS = ("\n", '"')


def max_new_tokens(kvzip_model, question: Question) -> int:
    """Room for the expected answers plus a few tokens of punctuation."""
    answer_tokens = sum(len(kvzip_model.encode(" " + answer)) + 2 for answer in question.answers)
    return answer_tokens + 4


def answer_example(kvzip_model, kv, example: Example) -> list[str]:
    """Greedy answers to every question of `example` from the prefilled (maybe pruned) `kv`."""
    return [
        kvzip_model.generate(
            question.text,
            kv,
            answer_prefix=question.answer_prefix,
            max_new_tokens=max_new_tokens(kvzip_model, question),
            stop_strings=STOP_STRINGS,
        )
        for question in example.questions
    ]
