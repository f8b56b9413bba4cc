"""SnapKV (arXiv 2404.14469), query-agnostic: the observation window is the end of the prompt."""

from __future__ import annotations

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, register_scorer
from vllm_kvzip.scoring.functional import snapkv_scores

# kvpress's SnapKVPress defaults.
OBSERVATION_WINDOW = 64
POOLING_KERNEL = 5


@register_scorer
class SnapKVScorer(Scorer):
    """Attention of the last prompt tokens to every key, average-pooled."""

    name = "snapkv"
    pass_kind = "prefill_end"

    def score(self, inputs: LayerInputs) -> Tensor:
        start, end = inputs.target
        window = min(OBSERVATION_WINDOW, inputs.queries.shape[2], end - start)
        # Keys after the window's last query are not visible to it; the pass's
        # tokens end the key list, so the window is the last `window` keys.
        scores = snapkv_scores(inputs.queries[:, :, -window:], inputs.keys, scaling=inputs.scaling, kernel_size=POOLING_KERNEL)
        return scores[:, start:end]
