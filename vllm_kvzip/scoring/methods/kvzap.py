"""KVzap (arXiv 2601.07891): a per-layer surrogate predicts log KVzip+ scores from hidden states."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, ScorerContext, register_scorer
from vllm_kvzip.scoring.kvzap_model import (
    KVzapCheckpointError,
    KVzapSurrogate,
    default_checkpoint_name,
    shipped_checkpoint,
)


def load_surrogate(context: ScorerContext, kind: str) -> KVzapSurrogate:
    """`config.surrogate` if given, else a checkpoint shipped for this model, else kvpress's hub name."""
    source = context.config.surrogate
    if source is None:
        basename = context.model_name.rstrip("/").split("/")[-1]
        shipped = shipped_checkpoint(basename, kind) if basename else None
        if shipped is not None:
            source = str(shipped)
        elif basename:
            source = default_checkpoint_name(context.model_name, kind)
        else:
            raise KVzapCheckpointError(
                "no KVzap surrogate given (--kv-compression-surrogate) and the model name is unknown, "
                "so no default checkpoint can be chosen"
            )
    return KVzapSurrogate.load(source, shape=context.shape)


class _KVzapScorer(Scorer):
    kind: ClassVar[str]
    log_space = True

    def __init__(self, context: ScorerContext, surrogate: KVzapSurrogate | None = None):
        super().__init__(context)
        self.surrogate = surrogate if surrogate is not None else load_surrogate(context, self.kind)
        self.surrogate.validate(context.shape)

    def score(self, inputs: LayerInputs) -> Tensor:
        return self.surrogate.layer_scores(inputs.layer_idx, inputs.target_hidden_states)


@register_scorer
class KVzapLinearScorer(_KVzapScorer):
    """KVzap-Linear: nn.Linear(hidden_size, kv_heads) per layer."""

    name = "kvzap-linear"
    kind = "linear"


@register_scorer
class KVzapMLPScorer(_KVzapScorer):
    """KVzap-MLP: Linear(hidden_size, hidden_size / 8) -> GELU -> Linear(., kv_heads) per layer."""

    name = "kvzap-mlp"
    kind = "mlp"
