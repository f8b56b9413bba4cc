"""Random eviction baseline (seeded by KVCompressionConfig.seed)."""

from __future__ import annotations

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, register_scorer
from vllm_kvzip.scoring.functional import random_scores


@register_scorer
class RandomScorer(Scorer):
    """Uniform scores from a hash of (seed, layer, head, position)."""

    name = "random"

    def score(self, inputs: LayerInputs) -> Tensor:
        return random_scores(
            inputs.target_positions, inputs.num_kv_heads, seed=self.context.config.seed, layer_idx=inputs.layer_idx
        )
