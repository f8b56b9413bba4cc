"""SnapKV (arXiv 2404.14469): the observation window is the end of the prompt.

Through the transformers API (`KVzipModel.prefill`) the prompt is the context, so
SnapKV is query-agnostic there; inside vLLM the prompt usually ends with the
question, which makes it the original, query-aware SnapKV.
"""

from __future__ import annotations

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, register_scorer
from vllm_kvzip.scoring.functional import snapkv_scores


@register_scorer
class SnapKVScorer(Scorer):
    """Attention of the last prompt tokens to every key, average-pooled.

    Settings: `snapkv_window` (observation window, default 64) and `snapkv_kernel`
    (pooling kernel, default 5), kvpress's SnapKVPress defaults.
    """

    name = "snapkv"
    pass_kind = "prefill_end"

    def score(self, inputs: LayerInputs) -> Tensor:
        start, end = inputs.target
        config = self.context.config
        window = min(config.snapkv_window, inputs.queries.shape[2], end - start)
        # Keys after the window's last query are not visible to it; the pass's
        # tokens end the key list, so the window is the last `window` keys.
        scores = snapkv_scores(
            inputs.queries[:, :, -window:], inputs.keys, scaling=inputs.scaling, kernel_size=config.snapkv_kernel
        )
        return scores[:, start:end]
