"""Scores of a request's evictable context, as the vLLM path computes them.

The vLLM worker (`vllm_kvzip.backend.compressor`) and its transformers oracle
(`vllm_kvzip.scoring.vllm_reference`) both call `context_scores`, so the two
can only differ in the tensors they feed in (KVzap log-scores recorded during
the prefill, KVzip / KVzip+ reconstruction scores, SnapKV observation-window
scores, or saved head scores),
never in how those become scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.functional import random_scores, streaming_scores

# Methods the vLLM path runs today (vllm_kvzip.adapter.engine refuses the others).
CONTEXT_METHODS = ("streaming", "random", "head", "kvzap-linear", "kvzap-mlp", "kvzip", "kvzip-plus", "snapkv")
# Methods whose scores come from outside (`recorded_scores`).
RECORDED_METHODS = ("kvzap-linear", "kvzap-mlp", "kvzip", "kvzip-plus", "snapkv")


def context_scores(
    config: KVCompressionConfig,
    positions: Tensor,
    num_layers: int,
    num_kv_heads: int,
    *,
    head_scores: Tensor | None = None,
    recorded_scores: Tensor | None = None,
) -> Tensor:
    """[L, H, n] scores (higher = keep) of the tokens at `positions`.

    head_scores: [L, H] for method "head"; recorded_scores: [L, H, n] KVzap
    log-scores for kvzap-linear / kvzap-mlp, reconstruction scores for kvzip /
    kvzip-plus (`vllm_kvzip.backend.reconstruction`), observation-window scores
    for snapkv (`vllm_kvzip.backend.observation`).
    """
    method = config.method
    if method == "streaming":
        return streaming_scores(positions, num_kv_heads, config.sink_tokens).expand(num_layers, -1, -1)
    if method == "random":
        return torch.stack(
            [random_scores(positions, num_kv_heads, seed=config.seed, layer_idx=layer) for layer in range(num_layers)]
        )
    if method == "head":
        if head_scores is None:
            raise ValueError("method 'head' needs head_scores")
        return head_scores.float().to(positions.device)[:, :, None].expand(-1, -1, positions.numel())
    if method in RECORDED_METHODS:
        if recorded_scores is None:
            source = {"kvzap": "KVzap scores recorded during the prefill", "kvzip": "reconstruction scores"}.get(
                method.split("-")[0], "observation-window scores"
            )
            raise ValueError(f"method {method!r} needs the {source}")
        if recorded_scores.shape[-1] != positions.numel():
            raise ValueError(f"{recorded_scores.shape[-1]} recorded scores for {positions.numel()} positions")
        return recorded_scores.float()
    raise ValueError(f"method {method!r} is not scored on the vLLM path; valid values: {', '.join(CONTEXT_METHODS)}")
