"""Scorer interface and registry (kvpress style).

A scoring method is one small class with a registry name and one `score()`
override.  Adding a method = adding one module under
`vllm_kvzip/scoring/methods/` that defines a `@register_scorer` class; the
package is discovered automatically, nothing else needs editing.

`score()` is called once per layer and per forward *pass* with the tensors of
that layer (`LayerInputs`) and returns one score per KV head for the key
columns `inputs.target`.  Which passes a scorer needs is its `pass_kind`:

  * "prefill": every prefill step; the target is the step's own context tokens
    (KVzap, StreamingLLM, random, head-level).
  * "prefill_end": once, in the last prefill step, whose last queries are the
    end of the prompt; the target is the whole scored span (SnapKV).
  * "reconstruction": one pass per context chunk through KVzip's repeat input;
    the target is the chunk (KVzip, KVzip+).

The transformers path (`vllm_kvzip.scoring.hf`) and the vLLM worker both build
`LayerInputs` from their own caches and call the same classes.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.kvzap_model import ModelShape

PassKind = Literal["prefill", "prefill_end", "reconstruction"]


@dataclass(frozen=True)
class LayerInputs:
    """What one layer's attention saw in one forward pass (batch of one request).

    queries: [H, G, q, d] post-RoPE queries of the q tokens of this pass.
    keys, values: [H, T, d] every key/value the pass attends to (cache + the pass's
        own tokens, which are the last q).
    hidden_states: [q, D] attention input (after input_layernorm) of the q tokens.
    positions: [T] absolute positions of the keys.
    target: [start, end) key columns to score.
    sink: [start, end) key columns that are always inside KVzip's softmax (the
        system prompt); reconstruction passes only.
    score_rows: for reconstruction passes, the query rows the max runs over
        (None = all q rows, as snu-mllab/KVzip).
    """

    layer_idx: int
    queries: Tensor
    keys: Tensor
    values: Tensor
    hidden_states: Tensor
    positions: Tensor
    target: tuple[int, int]
    scaling: float
    o_proj_weight: Tensor | None = None
    sink: tuple[int, int] = (0, 0)
    score_rows: tuple[int, int] | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def target_positions(self) -> Tensor:
        return self.positions[self.target[0] : self.target[1]]

    @property
    def target_hidden_states(self) -> Tensor:
        """Hidden states of the target columns; they must be tokens of this pass."""
        first_own = self.keys.shape[1] - self.queries.shape[2]
        if self.target[0] < first_own:
            raise ValueError("target columns are not tokens of this pass; their hidden states are not available")
        return self.hidden_states[self.target[0] - first_own : self.target[1] - first_own]


@dataclass(frozen=True)
class ScorerContext:
    """What a scorer may need to know about the host model when it is built."""

    config: KVCompressionConfig
    shape: ModelShape
    model_name: str = ""


class Scorer(ABC):
    """One KV-importance scoring method.  Higher score = more worth keeping."""

    name: ClassVar[str]
    pass_kind: ClassVar[PassKind] = "prefill"
    # Scores are log-scores that a threshold (KVzap / DMS) can be applied to.
    log_space: ClassVar[bool] = False

    def __init__(self, context: ScorerContext):
        self.context = context

    @abstractmethod
    def score(self, inputs: LayerInputs) -> Tensor:
        """Scores of the target columns: [H, target_end - target_start], float32."""


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make `cls` available under `cls.name`."""
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise ValueError(f"scorer name {cls.name!r} is registered twice ({SCORERS[cls.name].__name__}, {cls.__name__})")
    SCORERS[cls.name] = cls
    return cls


_discovered = False


def _discover_methods() -> None:
    global _discovered
    if _discovered:
        return
    from vllm_kvzip.scoring import methods

    for module in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{module.name}")
    _discovered = True


def scorer_names() -> list[str]:
    _discover_methods()
    return sorted(SCORERS)


def get_scorer_class(name: str) -> type[Scorer]:
    _discover_methods()
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scoring method {name!r}; registered: {', '.join(sorted(SCORERS))}") from None


def build_scorer(name: str, config: KVCompressionConfig | dict[str, Any] | None, shape: ModelShape, model_name: str = "") -> Scorer:
    """Instantiate the scorer registered as `name` for a host model."""
    return get_scorer_class(name)(ScorerContext(KVCompressionConfig.parse(config), shape, model_name))


def group_queries(queries: Tensor, num_kv_heads: int) -> Tensor:
    """[Hq, q, d] -> [H, G, q, d] (query head h * G + g reads KV head h)."""
    num_heads, num_queries, head_dim = queries.shape
    return queries.reshape(num_kv_heads, num_heads // num_kv_heads, num_queries, head_dim)


__all__ = [
    "LayerInputs",
    "PassKind",
    "SCORERS",
    "Scorer",
    "ScorerContext",
    "build_scorer",
    "get_scorer_class",
    "group_queries",
    "register_scorer",
    "scorer_names",
]
