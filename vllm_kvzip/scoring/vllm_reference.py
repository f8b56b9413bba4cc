"""The transformers oracle of the vLLM path: same geometry, scores, keep-sets, then greedy decoding.

vLLM prefills the whole prompt with full attention, samples the first token
from it, and only then compresses the cache: the newest tokens (a dense tail of
at least `window` tokens, block aligned) are kept whole, the evictable prefix
keeps `CompressionGeometry.per_head_budget` tokens per (layer, KV head) under
the per-layer policy, and decoding attends each KV head's kept tokens plus the
tail.  `generate_like_vllm` does exactly that with a transformers model, its
dense cache turned into vllm_kvzip's ragged per-head cache, so the vLLM path's
keep-sets and greedy outputs can be checked against it token for token.

KVzip / KVzip+ score with the scoring library's own scorers: one
reconstruction forward per chunk (`prompt_reconstruction_chunks`, the plan the
vLLM worker follows) through the transformers model, captured layer by layer,
its repeat tokens cropped off the cache again (`reconstruction_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.config import KVCompressionConfig, request_keep_ratio
from vllm_kvzip.scoring.context import context_scores
from vllm_kvzip.scoring.base import build_scorer
from vllm_kvzip.scoring.hf import (
    RAGGED_IMPLEMENTATION,
    RaggedKVCache,
    attention_implementation,
    capture_layers,
    layer_inputs,
)
from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.policies import keep_by_ratio
from vllm_kvzip.scoring.reconstruction import RepeatPrompt, prompt_reconstruction_chunks

DEFAULT_VLLM_POLICY = "layer"


@dataclass
class ReferenceResult:
    token_ids: list[int]
    geometry: CompressionGeometry | None
    keep: Tensor | None  # [L, H, num_prompt_tokens] bool; None when the request stayed dense
    scores: Tensor | None = None  # [L, H, evictable] the scores the keep-set came from


@torch.no_grad()
def generate_like_vllm(
    model: nn.Module,
    prompt_ids: Sequence[int],
    config: KVCompressionConfig,
    *,
    block_size: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    surrogate: KVzapSurrogate | None = None,
    head_scores: Tensor | None = None,
    extra_args: dict | None = None,
    repeat_prompt: RepeatPrompt | None = None,
) -> ReferenceResult:
    """Greedy decoding as the vLLM path does it; KVzip / KVzip+ need `repeat_prompt`
    (`RepeatPrompt.from_tokenizer(tokenizer, PromptTemplate.from_tokenizer(tokenizer).postfix)`)."""
    device = next(model.parameters()).device
    num_tokens = len(prompt_ids)
    hidden: dict[int, Tensor] = {}

    def on_layer(layer_idx, module, queries, keys, values, hidden_states, scaling):
        hidden[layer_idx] = hidden_states

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([list(prompt_ids)], device=device)
    with capture_layers(model, on_layer):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    first_token = int(logits[0, -1].argmax())

    ragged = RaggedKVCache.from_dynamic(cache)
    num_layers, num_kv_heads = len(ragged.layers), ragged.layers[0].num_kv_heads
    keep_ratio = request_keep_ratio(config, extra_args)
    geometry, keep, scores = None, None, None
    if keep_ratio is not None:
        geometry = CompressionGeometry(
            num_tokens=num_tokens,
            block_size=block_size,
            window=config.window,
            keep_ratio=keep_ratio,
            num_kv_heads=num_kv_heads,
            sink_tokens=config.sink_tokens,
        )
    if geometry is not None and geometry.compresses:
        evictable = geometry.evictable_tokens
        positions = torch.arange(evictable, device=device)
        recorded = None
        if config.is_kvzap:
            if surrogate is None:
                raise ValueError("a kvzap method needs the surrogate")
            recorded = torch.stack(
                [surrogate.layer_scores(layer, hidden[layer][:evictable]) for layer in range(num_layers)]
            )
        elif config.is_reconstruction:
            if repeat_prompt is None:
                raise ValueError(f"method {config.method!r} needs the repeat prompt")
            recorded = reconstruction_scores(model, cache, prompt_ids, evictable, config, repeat_prompt)
        scores = context_scores(
            config, positions, num_layers, num_kv_heads, head_scores=head_scores, recorded_scores=recorded
        )
        kept = keep_by_ratio(
            scores, keep_ratio, config.policy or DEFAULT_VLLM_POLICY, sink_tokens=config.sink_tokens, window=0
        ).mask
        tail = torch.ones(num_layers, num_kv_heads, num_tokens - evictable, dtype=torch.bool, device=kept.device)
        keep = torch.cat([kept, tail], dim=-1)
        ragged = RaggedKVCache([layer.select(keep[index]) for index, layer in enumerate(ragged.layers)])

    generated = [first_token]
    stops = set(stop_token_ids)
    with attention_implementation(model, RAGGED_IMPLEMENTATION):
        while len(generated) < max_new_tokens and generated[-1] not in stops:
            position = num_tokens + len(generated) - 1
            step_ids = torch.tensor([[generated[-1]]], device=device)
            positions = torch.tensor([[position]], device=device)
            logits = model(
                input_ids=step_ids, position_ids=positions, past_key_values=ragged, use_cache=True, logits_to_keep=1
            ).logits
            generated.append(int(logits[0, -1].argmax()))
    return ReferenceResult(token_ids=generated, geometry=geometry, keep=keep, scores=scores)


@torch.no_grad()
def reconstruction_scores(
    model: nn.Module,
    cache: DynamicCache,
    prompt_ids: Sequence[int],
    scored_end: int,
    config: KVCompressionConfig,
    repeat_prompt: RepeatPrompt,
) -> Tensor:
    """[L, H, scored_end] KVzip / KVzip+ scores of a prefilled prompt (the sinks score +inf).

    `cache` holds the whole prompt; each reconstruction forward appends its
    repeat tokens and is cropped back afterwards.
    """
    shape = ModelShape.from_config(model.config)
    scorer = build_scorer(config.method, config, shape)
    num_tokens = len(prompt_ids)
    device = next(model.parameters()).device
    scores = torch.full((shape.num_layers, shape.num_kv_heads, scored_end), float("inf"), device=device)
    decoder = model.get_decoder()
    for chunk in prompt_reconstruction_chunks(
        prompt_ids, num_tokens, scored_end, config.sink_tokens, config.chunk_size, repeat_prompt
    ):
        def on_layer(layer_idx, module, queries, keys, values, hidden_states, scaling, chunk=chunk):
            inputs = layer_inputs(layer_idx, module, queries, keys, values, hidden_states, scaling, chunk.span, chunk.sink)
            scores[layer_idx, :, chunk.span[0] : chunk.span[1]] = scorer.score(inputs)

        ids = torch.tensor([list(chunk.input_ids)], device=device)
        positions = torch.arange(chunk.start_position, chunk.start_position + ids.shape[1], device=device)[None]
        with capture_layers(model, on_layer):
            decoder(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
        # transformers 5 crops by a negative count of tokens to remove.
        cache.crop(-(cache.get_seq_length() - num_tokens))
    return scores
