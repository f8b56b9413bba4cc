"""Seeded synthetic tasks: deterministic, answerable from the context, sized by the token budget."""

from __future__ import annotations

import re

import pytest

from vllm_kvzip.eval.synthetic import TASKS, Question, is_correct, make_dataset, make_example, score_answer
from vllm_kvzip.eval.textgen import GENERATORS, calibration_texts


def word_count(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_seed_dependent(task):
    first, again, other = make_example(task, 3), make_example(task, 3), make_example(task, 4)
    assert first == again
    assert first.context != other.context
    assert len(first.questions) == 3


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_in_the_context(task):
    example = make_example(task, 5)
    for question in example.questions:
        for answer in question.answers:
            assert answer in example.context
    if task == "variable":
        for question in example.questions:
            value = re.search(r"value (\d+)", question.text).group(1)
            assert f"VAR {question.answers[0]} = {value}." in example.context
            for previous, current in zip(question.answers, question.answers[1:]):
                assert example.context.index(f"VAR {current} = VAR {previous}.") > example.context.index(f"VAR {previous} =")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("budget", [300, 1500])
def test_context_size_follows_the_token_budget(task, budget):
    example = make_example(task, 1, token_budget=budget, count_tokens=word_count)
    assert 0.6 * budget <= word_count(example.context) <= 1.35 * budget


def test_scoring_is_string_match_all():
    question = Question("q", "a", ("ABC", "def"))
    assert score_answer("abc and DEF", question) == 1.0 and is_correct("abc and DEF", question)
    assert score_answer("only abc", question) == 0.5 and not is_correct("only abc", question)
    assert score_answer("nothing", question) == 0.0


def test_dataset_covers_tasks_with_distinct_seeds():
    dataset = make_dataset(seed=2, examples_per_task=2)
    assert [example.task for example in dataset] == [task for task in TASKS for _ in range(2)]
    assert len({example.context for example in dataset}) == len(dataset)


def test_calibration_texts_cycle_through_generators():
    texts = calibration_texts(seed=0, count=10, num_chars=500)
    assert [kind for kind, _ in texts] == list(GENERATORS) * 2
    assert texts == calibration_texts(seed=0, count=10, num_chars=500)
    assert all(300 <= len(text) <= 800 for _, text in texts)
