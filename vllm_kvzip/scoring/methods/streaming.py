"""StreamingLLM (arXiv 2309.17453): attention sinks + the most recent tokens."""

from __future__ import annotations

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, register_scorer
from vllm_kvzip.scoring.functional import streaming_scores


@register_scorer
class StreamingScorer(Scorer):
    """Scores = position (newer is better), sinks = +inf."""

    name = "streaming"

    def score(self, inputs: LayerInputs) -> Tensor:
        return streaming_scores(inputs.target_positions, inputs.num_kv_heads, self.context.config.sink_tokens)
