"""Seeded, download-free text generators (prose, code, key-value lists, numbers, dialogue).

Used as haystack filler by `vllm_kvzip.eval.synthetic` and as calibration /
training text by `vllm_kvzip.scoring.train` and `vllm_kvzip.scoring.head_scores`
(the references use Nemotron-Pretraining samples or SCBench books, which we
cannot download).  Every generator takes a `random.Random` and a target length
in characters, so the output is a pure function of the seed.
"""

from __future__ import annotations

import random
from typing import Callable

NOUNS = (
    "river", "garden", "library", "engine", "harbor", "village", "teacher", "market", "mountain", "painter",
    "window", "letter", "bridge", "forest", "student", "kitchen", "station", "museum", "doctor", "island",
    "factory", "orchard", "valley", "lantern", "compass", "meadow", "captain", "archive", "theater", "bakery",
)
ADJECTIVES = (
    "quiet", "ancient", "bright", "narrow", "golden", "curious", "distant", "gentle", "heavy", "silver",
    "crowded", "patient", "hidden", "wooden", "restless", "careful", "broad", "humble", "stormy", "modern",
)
VERBS = (
    "crossed", "painted", "described", "repaired", "visited", "watched", "carried", "followed", "measured",
    "remembered", "built", "opened", "studied", "guarded", "collected", "explained", "protected", "noticed",
)
PLACES = (
    "the old town", "the northern coast", "a small valley", "the city center", "the eastern hills",
    "a busy port", "the university", "the railway line", "the lake shore", "the main square",
)
TIMES = (
    "in the morning", "after the storm", "before winter", "at dusk", "during the festival", "last spring",
    "every Sunday", "for many years", "late at night", "at the end of the season",
)
CONNECTORS = ("Later,", "Meanwhile,", "As a result,", "In contrast,", "For a while,", "Eventually,", "Still,", "Then")
NAMES = (
    "Alice", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Keiko", "Luca",
    "Maya", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara",
)
CODE_WORDS = (
    "total", "count", "items", "buffer", "index", "result", "value", "config", "record", "offset", "limit",
    "cache", "payload", "window", "score", "weights", "tokens", "batch", "node", "queue",
)


def _sentence(rng: random.Random) -> str:
    pattern = rng.randrange(4)
    subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    if pattern == 0:
        text = f"{subject} {rng.choice(VERBS)} the {rng.choice(NOUNS)} near {rng.choice(PLACES)} {rng.choice(TIMES)}"
    elif pattern == 1:
        text = f"{rng.choice(NAMES)} {rng.choice(VERBS)} {subject} {rng.choice(TIMES)}"
    elif pattern == 2:
        text = f"{rng.choice(CONNECTORS)} {subject} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    else:
        text = f"in {rng.choice(PLACES)}, {rng.choice(NAMES)} and {rng.choice(NAMES)} {rng.choice(VERBS)} {subject}"
    return text[0].upper() + text[1:] + "."


def prose(rng: random.Random, num_chars: int) -> str:
    """Paragraphs of simple narrative sentences."""
    paragraphs, length = [], 0
    while length < num_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
        paragraphs.append(paragraph)
        length += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def code(rng: random.Random, num_chars: int) -> str:
    """Python-like functions with loops, conditions and comments."""
    blocks, length = [], 0
    while length < num_chars:
        name = f"{rng.choice(VERBS).rstrip('ed')}_{rng.choice(CODE_WORDS)}"
        arg, acc = rng.sample(CODE_WORDS, 2)
        limit = rng.randint(2, 500)
        lines = [
            f"def {name}({arg}, {acc}={rng.randint(0, 9)}):",
            f'    """{_sentence(rng)}"""',
            f"    for i in range(len({arg})):",
            f"        if {arg}[i] > {limit}:",
            f"            {acc} += {arg}[i] * {rng.randint(2, 9)}",
            "        else:",
            f"            {acc} -= {rng.randint(1, 50)}",
            f"    # {rng.choice(ADJECTIVES)} {rng.choice(CODE_WORDS)} handling",
            f"    return {acc}",
        ]
        block = "\n".join(lines)
        blocks.append(block)
        length += len(block) + 2
    return "\n\n".join(blocks)


def key_values(rng: random.Random, num_chars: int) -> str:
    """Key-value records: 'key: value' lines, JSON-like objects and CSV rows."""
    parts, length = [], 0
    while length < num_chars:
        style = rng.randrange(3)
        if style == 0:
            block = "\n".join(
                f"{rng.choice(CODE_WORDS)}_{rng.randint(1, 99)}: {rng.choice(NOUNS)}-{rng.randint(100, 999)}"
                for _ in range(rng.randint(3, 8))
            )
        elif style == 1:
            fields = ", ".join(
                f'"{rng.choice(CODE_WORDS)}": {rng.choice([str(rng.randint(0, 9999)), repr(rng.choice(NAMES))])}'
                for _ in range(rng.randint(2, 5))
            )
            block = "{" + fields.replace("'", '"') + "}"
        else:
            header = ",".join(rng.sample(CODE_WORDS, 3))
            rows = [f"{rng.choice(NAMES)},{rng.randint(1, 999)},{rng.choice(NOUNS)}" for _ in range(rng.randint(2, 6))]
            block = "\n".join([header] + rows)
        parts.append(block)
        length += len(block) + 1
    return "\n".join(parts)


def numbers(rng: random.Random, num_chars: int) -> str:
    """Arithmetic, dates, measurements and number tables."""
    lines, length = [], 0
    while length < num_chars:
        style = rng.randrange(4)
        a, b = rng.randint(1, 9999), rng.randint(1, 999)
        if style == 0:
            line = f"{a} + {b} = {a + b}; {a} - {b} = {a - b}; {a} x {b % 90 + 2} = {a * (b % 90 + 2)}"
        elif style == 1:
            line = f"On {rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1950, 2030)} the reading was {a / 100:.2f} units."
        elif style == 2:
            line = " | ".join(str(rng.randint(0, 99999)) for _ in range(rng.randint(4, 9)))
        else:
            line = f"Invoice {rng.randint(10000, 99999)}: {rng.randint(1, 40)} items at {b / 10:.1f} each, total {a}."
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)


def dialogue(rng: random.Random, num_chars: int) -> str:
    """Short exchanges between named speakers."""
    lines, length = [], 0
    while length < num_chars:
        speaker = rng.choice(NAMES)
        line = f"{speaker}: {_sentence(rng)} {rng.choice(['Right?', 'I think so.', 'Really?', 'Let us go.', ''])}".rstrip()
        lines.append(line)
        length += len(line) + 1
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[random.Random, int], str]] = {
    "prose": prose,
    "code": code,
    "key_values": key_values,
    "numbers": numbers,
    "dialogue": dialogue,
}


def calibration_texts(seed: int, count: int, num_chars: int) -> list[tuple[str, str]]:
    """`count` (kind, text) pairs cycling through every generator, deterministic in `seed`."""
    rng = random.Random(seed)
    kinds = list(GENERATORS)
    texts = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        # Vary the length +-25% so that the attention denominators differ.
        length = int(num_chars * rng.uniform(0.75, 1.25))
        texts.append((kind, GENERATORS[kind](rng, length)))
    return texts

