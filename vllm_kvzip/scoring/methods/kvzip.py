"""KVzip (arXiv 2505.23416) and KVzip+ (KVzap paper, arXiv 2601.07891, Eq. 3)."""

from __future__ import annotations

from torch import Tensor

from vllm_kvzip.scoring.base import LayerInputs, Scorer, register_scorer
from vllm_kvzip.scoring.functional import KVzipPlusTerms, kvzip_chunk_scores


def _chunk_scores(inputs: LayerInputs, plus: bool) -> Tensor:
    start, end = inputs.target
    num_queries = inputs.queries.shape[2]
    plus_terms = None
    if plus:
        if inputs.o_proj_weight is None:
            raise ValueError("KVzip+ needs the attention output projection (LayerInputs.o_proj_weight)")
        plus_terms = KVzipPlusTerms(
            values_chunk=inputs.values[:, start:end],
            o_proj_weight=inputs.o_proj_weight,
            hidden_norms=inputs.hidden_states.float().norm(dim=-1),
        )
    return kvzip_chunk_scores(
        inputs.queries,
        inputs.keys[:, inputs.sink[0] : inputs.sink[1]],
        inputs.keys[:, start:end],
        inputs.keys[:, -num_queries:],
        scaling=inputs.scaling,
        plus=plus_terms,
        score_rows=inputs.score_rows,
    )


@register_scorer
class KVzipScorer(Scorer):
    """Max attention a chunk receives while the model repeats it (context reconstruction)."""

    name = "kvzip"
    pass_kind = "reconstruction"

    def score(self, inputs: LayerInputs) -> Tensor:
        return _chunk_scores(inputs, plus=False)


@register_scorer
class KVzipPlusScorer(Scorer):
    """KVzip with each weight scaled by ||W_O v_i|| / ||h_j|| (the token's contribution to the residual)."""

    name = "kvzip-plus"
    pass_kind = "reconstruction"

    def score(self, inputs: LayerInputs) -> Tensor:
        return _chunk_scores(inputs, plus=True)
