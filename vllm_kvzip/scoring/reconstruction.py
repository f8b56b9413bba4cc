"""KVzip's context-reconstruction inputs (snu-mllab/KVzip `ModelKVzip.self_task`), tokenizer-agnostic.

The context is split into contiguous chunks of `chunk_size` tokens (2000 in the
reference).  Chunk i is scored by feeding, after the whole context,
    prompt_i + assistant postfix + chunk_i
where prompt_0 = "\\n\\nRepeat the previous context exactly." and, for i > 0,
prompt_i = "\\n\\nRepeat the part of the previous context exactly, starting with "
followed by the last 8 tokens of chunk i-1.  The postfix is the chat template's
text between the end of a user turn and the assistant's answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

FIRST_CHUNK_PROMPT = "\n\nRepeat the previous context exactly."
LATER_CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP_TOKENS = 8


def chunk_spans(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive chunks covering num_tokens (the last one may be shorter)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of the repeat instructions and of the assistant postfix."""

    first_prompt_ids: tuple[int, ...]
    later_prompt_ids: tuple[int, ...]
    postfix_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, postfix: str) -> "RepeatPrompt":
        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        return cls(encode(FIRST_CHUNK_PROMPT), encode(LATER_CHUNK_PROMPT), encode(postfix))

    def input_ids(self, context_ids: Sequence[int], span: tuple[int, int]) -> list[int]:
        """Repeat input for the chunk context_ids[span[0]:span[1]]."""
        start, end = span
        if start == 0:
            prompt = list(self.first_prompt_ids)
        else:
            prompt = list(self.later_prompt_ids) + list(context_ids[max(0, start - OVERLAP_TOKENS) : start])
        return prompt + list(self.postfix_ids) + list(context_ids[start:end])
