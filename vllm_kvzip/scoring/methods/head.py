"""Context-independent head-level KVzip (`--level head` of snu-mllab/KVzip)."""

from __future__ import annotations

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, ScorerContext, register_scorer
from vllm_kvzip.scoring.head_scores import load_head_scores


@register_scorer
class HeadScorer(Scorer):
    """Every token of a (layer, KV head) gets that head's calibrated score: whole heads are kept or dropped."""

    name = "head"

    def __init__(self, context: ScorerContext):
        super().__init__(context)
        self.head_scores = load_head_scores(context.config.head_scores, context.model_name, context.shape)

    def score(self, inputs: LayerInputs) -> Tensor:
        length = inputs.target[1] - inputs.target[0]
        row = self.head_scores[inputs.layer_idx].to(inputs.keys.device, dtype=inputs.keys.dtype).float()
        return row[:, None].expand(-1, length).clone()
