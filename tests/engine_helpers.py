"""Helpers shared by the engine tests: seeded chat prompts and the in-process engine's internals."""

from __future__ import annotations

from vllm_kvzip.eval.synthetic import make_example


def question_prompt(tokenizer, task: str, seed: int, token_budget: int) -> list[int]:
    """Token ids of a seeded synthetic example asked as a chat: context + first question, then its answer prefix."""
    example = make_example(task, seed, token_budget=token_budget, count_tokens=lambda text: len(tokenizer.encode(text)))
    question = example.questions[0]
    messages = [{"role": "user", "content": example.context + "\n\n" + question.text}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text + question.answer_prefix, add_special_tokens=False)


def model_runner(llm):
    """The GPU/CPU model runner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def runs_async_scheduling(llm) -> bool:
    """Whether the engine's scheduler runs one batch ahead (vLLM's default on a GPU)."""
    return bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling)


def recorded(records: dict, request_id: str):
    """The entry of `records` for `request_id`: the engine suffixes the ids LLM.generate gives it."""
    return next((value for key, value in records.items() if key.split("-")[0] == request_id), None)
