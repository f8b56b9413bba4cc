"""Seeded synthetic long-context tasks (RULER-like), no downloads.

Tasks (each example = one context + several questions, answered from one prefill):
  * needle        3 "special magic number" needles with distinct keys in a prose haystack
  * multikey      10 needles whose keys share words (distractors), 3 asked
  * uuid_kv       a JSON object of UUID -> UUID pairs, 3 keys asked
  * variable      variable-assignment chains (VAR X = 123 ... VAR Y = VAR X) in filler; which variables hold a value
  * profile       facts about the user ("My cat's name is ...") scattered in a diary-like haystack

Every question carries an `answer_prefix` that starts the assistant's answer
(as RULER does) so that small models answer in a checkable form, and its
expected strings; `score_answer` is RULER's string_match_all (fraction of the
expected strings found, case-insensitive).  Everything is a pure function of
(seed, task, token budget, token counter).

Contexts are sized by a token budget: pass `count_tokens` (e.g. a tokenizer's
length) for exact sizing; the default estimates 4 characters per token.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Callable

from vllm_kvzip.eval.textgen import NAMES, NOUNS, prose

TASKS: tuple[str, ...] = ("needle", "multikey", "uuid_kv", "variable", "profile")
DEFAULT_TOKEN_BUDGET = 1500
TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Question:
    text: str
    answer_prefix: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    task: str
    seed: int
    context: str
    questions: tuple[Question, ...]
    metadata: dict = field(default_factory=dict, compare=False)


def score_answer(prediction: str, question: Question) -> float:
    """Fraction of the expected strings that occur in the prediction (case-insensitive)."""
    lowered = prediction.lower()
    return sum(answer.lower() in lowered for answer in question.answers) / len(question.answers)


def is_correct(prediction: str, question: Question) -> bool:
    return score_answer(prediction, question) == 1.0


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


# ---------------------------------------------------------------------------------
# Haystack assembly
# ---------------------------------------------------------------------------------
def _fill(rng: random.Random, insertions: list[str], budget: int, count: TokenCounter, filler=prose) -> str:
    """Spread `insertions` at random depths through filler text of about `budget` tokens."""
    fixed = sum(count(text) for text in insertions)
    slots = len(insertions) + 1
    # Filler per slot in characters, from the token estimate of a sample.
    sample = filler(random.Random(rng.random()), 2000)
    chars_per_token = len(sample) / max(1, count(sample))
    filler_chars = max(0, int((budget - fixed) * chars_per_token))
    weights = [rng.random() + 0.2 for _ in range(slots)]
    total_weight = sum(weights)
    pieces = []
    for index in range(slots):
        length = int(filler_chars * weights[index] / total_weight)
        if length > 0:
            pieces.append(filler(rng, length)[:length].rsplit(" ", 1)[0] + ".")
        if index < len(insertions):
            pieces.append(insertions[index])
    return "\n".join(pieces)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(('red', 'blue', 'green', 'amber', 'violet', 'grey'))}-{rng.choice(NOUNS)}"


# ---------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------
def _needle(rng: random.Random, seed: int, budget: int, count: TokenCounter) -> Example:
    keys = []
    while len(keys) < 3:
        key = _word_key(rng)
        if key not in keys:
            keys.append(key)
    values = [_number(rng) for _ in keys]
    needles = [f"The special magic number for {key} is: {value}." for key, value in zip(keys, values)]
    rng.shuffle(needles)
    questions = tuple(
        Question(
            f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is",
            (value,),
        )
        for key, value in zip(keys, values)
    )
    return Example("needle", seed, _fill(rng, needles, budget, count), questions)


def _multikey(rng: random.Random, seed: int, budget: int, count: TokenCounter) -> Example:
    keys: list[str] = []
    while len(keys) < 10:
        key = f"{_word_key(rng)}-{rng.randint(10, 99)}"
        if key not in keys:
            keys.append(key)
    values = [_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {key} is: {value}." for key, value in zip(keys, values)]
    asked = rng.sample(range(len(keys)), 3)
    questions = tuple(
        Question(
            f"What is the special magic number for {keys[index]} mentioned in the provided text?",
            f"The special magic number for {keys[index]} mentioned in the provided text is",
            (values[index],),
        )
        for index in asked
    )
    return Example("multikey", seed, _fill(rng, needles, budget, count), questions)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _uuid_kv(rng: random.Random, seed: int, budget: int, count: TokenCounter) -> Example:
    pairs: dict[str, str] = {}
    header = "JSON data:\n"
    while True:
        pairs[_uuid(rng)] = _uuid(rng)
        if count(header + json.dumps(pairs, indent=1)) >= budget:
            break
    if len(pairs) > 3:
        pairs.pop(next(reversed(pairs)))
    context = header + json.dumps(pairs, indent=1)
    asked = rng.sample(list(pairs), min(3, len(pairs)))
    questions = tuple(
        Question(
            f'What is the value associated with the key "{key}" in the JSON data above?',
            f'The value associated with the key "{key}" is "',
            (pairs[key],),
        )
        for key in asked
    )
    return Example("uuid_kv", seed, context, questions)


def _variable(rng: random.Random, seed: int, budget: int, count: TokenCounter) -> Example:
    names: set[str] = set()

    def fresh() -> str:
        while True:
            name = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.add(name)
                return name

    chains = []
    statements: list[str] = []
    for _ in range(3):
        value = str(rng.randint(10000, 99999))
        chain = [fresh() for _ in range(3)]
        chains.append((value, chain))
        statements.append(f"VAR {chain[0]} = {value}.")
        statements.extend(f"VAR {chain[index]} = VAR {chain[index - 1]}." for index in range(1, len(chain)))
    # Keep each chain in order while interleaving chains.
    ordered: list[str] = []
    queues = [statements[i * 3 : (i + 1) * 3] for i in range(3)]
    while any(queues):
        queue = rng.choice([queue for queue in queues if queue])
        ordered.append(queue.pop(0))
    questions = tuple(
        Question(
            f"Find all variables that are assigned the value {value} in the text above.",
            f"The variables assigned the value {value} are:",
            tuple(chain),
        )
        for value, chain in chains
    )
    return Example("variable", seed, _fill(rng, ordered, budget, count), questions)


PROFILE_FACTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # (statement template, question, answer prefix, candidate values)
    ("My cat's name is {}.", "What is my cat's name?", "Your cat's name is", ("Whiskers", "Mochi", "Pepper", "Biscuit", "Luna", "Tofu")),
    ("I live in {}.", "Which city do I live in?", "You live in", ("Lisbon", "Osaka", "Denver", "Nairobi", "Oslo", "Lima")),
    ("I work as a {}.", "What is my job?", "You work as a", ("carpenter", "pharmacist", "pilot", "librarian", "chef", "geologist")),
    ("My favorite color is {}.", "What is my favorite color?", "Your favorite color is", ("teal", "maroon", "lavender", "ochre", "crimson")),
    ("My brother's name is {}.", "What is my brother's name?", "Your brother's name is", NAMES),
    ("I drive a {}.", "What car do I drive?", "You drive a", ("Volvo", "Subaru", "Fiat", "Tesla", "Skoda", "Mazda")),
)


def _profile(rng: random.Random, seed: int, budget: int, count: TokenCounter) -> Example:
    facts = rng.sample(PROFILE_FACTS, 4)
    statements, questions = [], []
    for template, question, prefix, candidates in facts:
        value = rng.choice(candidates)
        statements.append(template.format(value))
        questions.append(Question(question, prefix, (value,)))
    asked = tuple(rng.sample(questions, 3))
    context = "These are notes from my diary.\n" + _fill(rng, statements, budget, count)
    return Example("profile", seed, context, asked)


_BUILDERS = {"needle": _needle, "multikey": _multikey, "uuid_kv": _uuid_kv, "variable": _variable, "profile": _profile}


def make_example(task: str, seed: int, token_budget: int = DEFAULT_TOKEN_BUDGET, count_tokens: TokenCounter | None = None) -> Example:
    """One example of `task`, a pure function of its arguments."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return _BUILDERS[task](rng, seed, token_budget, count_tokens or _estimate_tokens)


def make_dataset(
    seed: int = 0,
    examples_per_task: int = 2,
    tasks: tuple[str, ...] = TASKS,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    count_tokens: TokenCounter | None = None,
) -> list[Example]:
    """examples_per_task examples of every task, seeds seed*1000 + i."""
    return [
        make_example(task, seed * 1000 + index, token_budget, count_tokens)
        for task in tasks
        for index in range(examples_per_task)
    ]
