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


@dataclass(frozen=True)
class ReconstructionChunk:
    """One reconstruction forward of a whole prompt (the vLLM path and its oracle).

    input_ids: the repeat input (instruction [+ overlap], assistant postfix, chunk).
    start_position: position of input_ids[0]; the repeat tokens sit after the whole prompt.
    span: [start, end) prompt positions this pass scores.
    sink: [start, end) prompt positions always inside KVzip's softmax.
    """

    input_ids: tuple[int, ...]
    start_position: int
    span: tuple[int, int]
    sink: tuple[int, int]


def prompt_reconstruction_chunks(
    token_ids: Sequence[int],
    num_tokens: int,
    scored_end: int,
    sink_tokens: int,
    chunk_size: int,
    repeat_prompt: RepeatPrompt,
    max_positions: int | None = None,
) -> list[ReconstructionChunk]:
    """KVzip's reconstruction passes over prompt positions [0, scored_end) of a `num_tokens`-token prompt.

    A vLLM request is one token sequence with no marked system prompt, so, as
    kvpress's KVzipPress does, the first `sink_tokens` positions play the
    reference's system prompt (always inside the softmax, never scored: the
    policies keep them anyway) and positions [sinks, scored_end) are the
    context, split into chunks of `chunk_size` tokens.  The repeat input of a
    chunk sits at positions num_tokens, num_tokens + 1, ... (after the whole
    prompt, dense tail included, as the reference places it after the whole
    context); `max_positions` (the model's RoPE table) moves it earlier when
    it would not fit.
    """
    sinks = min(sink_tokens, scored_end)
    context = list(token_ids[sinks:scored_end])
    if len(context) != scored_end - sinks:
        raise ValueError(f"{len(token_ids)} token ids do not cover the {scored_end} scored positions")
    chunks = []
    for span in chunk_spans(len(context), chunk_size):
        input_ids = tuple(repeat_prompt.input_ids(context, span))
        start = num_tokens
        if max_positions is not None and start + len(input_ids) > max_positions:
            start = max_positions - len(input_ids)
            if start < 0:
                raise ValueError(f"a reconstruction input of {len(input_ids)} tokens exceeds {max_positions} positions")
        chunks.append(ReconstructionChunk(input_ids, start, (sinks + span[0], sinks + span[1]), (0, sinks)))
    return chunks


def repeat_prompt_overhead(repeat_prompt: RepeatPrompt) -> int:
    """Tokens a repeat input holds besides its chunk (the longest instruction, overlap and postfix)."""
    instruction = max(len(repeat_prompt.first_prompt_ids), len(repeat_prompt.later_prompt_ids) + OVERLAP_TOKENS)
    return instruction + len(repeat_prompt.postfix_ids)
