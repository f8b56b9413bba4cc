"""The transformers oracle of the vLLM path: same geometry, scores, keep-sets, then greedy decoding.

vLLM prefills the whole prompt with full attention, samples the first token
from it, and only then compresses the cache: the newest tokens (a dense tail of
at least `window` tokens, block aligned) are kept whole, the evictable prefix
keeps `CompressionGeometry.kept_tokens` tokens over all (layer, KV head) pairs
under the budget policy (`--kv-compression-policy`, default global), and
decoding attends each KV head's kept tokens plus the tail.  Threshold mode
folds the tail under the worker's rules, whose "does this folding free a
block?" test counts head pages packed across layers, with the room a re-pack
leaves each pair (`plan_retirement_layout`, the function the worker decides
with).  `generate_like_vllm` does exactly that with a transformers model, its
dense cache turned into vllm_kvzip's ragged per-head cache, so the vLLM path's
keep-sets and greedy outputs can be checked against it token for token.

KVzip / KVzip+ score with the scoring library's own scorers: one
reconstruction forward per chunk (`prompt_reconstruction_chunks`, the plan the
vLLM worker follows) through the transformers model, captured layer by layer,
its repeat tokens cropped off the cache again (`reconstruction_scores`).
SnapKV scores with the library's SnapKV scorer on the queries and keys of the
prompt's own (single, full) prefill: the observation window is the last
`snapkv_window` prompt tokens, the scored columns the whole prompt, of which
the evictable ones are kept (the vLLM worker re-runs only the window instead).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from vllm_kvzip.block_manager.geometry import CompressionGeometry
from vllm_kvzip.block_manager.plan import plan_retirement_layout
from vllm_kvzip.config import KVCompressionConfig, request_keep_ratio, request_uses_threshold
from vllm_kvzip.scoring.context import context_scores
from vllm_kvzip.scoring.base import build_scorer
from vllm_kvzip.scoring.hf import (
    RAGGED_IMPLEMENTATION,
    RaggedKVCache,
    RaggedLayer,
    attention_implementation,
    attention_modules,
    capture_layers,
    layer_inputs,
)
from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.policies import keep_by_ratio
from vllm_kvzip.scoring.reconstruction import RepeatPrompt, prompt_reconstruction_chunks


@dataclass
class ReferenceResult:
    token_ids: list[int]
    geometry: CompressionGeometry | None
    keep: Tensor | None  # [L, H, num_prompt_tokens] bool; None when the request stayed dense
    # Threshold mode: [L, H, folded tokens] decisions of every folding, and the blocks each one freed.
    folded_blocks: list[tuple[int, int, int]] | None = None  # (first block, end block, blocks freed)
    scores: Tensor | None = None  # [L, H, evictable] (threshold mode: [L, H, folded]) the scores the keep-set came from


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
    # SnapKV: scores of every prompt position from the prefill's last queries, by layer.
    snapkv = build_scorer(config.method, config, ModelShape.from_config(model.config)) if config.is_observation else None
    observed: dict[int, Tensor] = {}

    def on_layer(layer_idx, module, queries, keys, values, hidden_states, scaling):
        hidden[layer_idx] = hidden_states
        if snapkv is not None:
            inputs = layer_inputs(layer_idx, module, queries, keys, values, hidden_states, scaling, (0, num_tokens))
            observed[layer_idx] = snapkv.score(inputs)

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([list(prompt_ids)], device=device)
    with capture_layers(model, on_layer):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    first_token = int(logits[0, -1].argmax())

    ragged = RaggedKVCache.from_dynamic(cache)
    num_layers, num_kv_heads = len(ragged.layers), ragged.layers[0].num_kv_heads
    if request_uses_threshold(config, extra_args):
        if surrogate is None:
            raise ValueError("threshold mode needs the KVzap surrogate")
        prompt_scores = [surrogate.layer_scores(layer, hidden[layer]) for layer in range(num_layers)]
        return _generate_with_folding(
            model, ragged, prompt_scores, first_token, num_tokens, config, block_size=block_size,
            max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, surrogate=surrogate,
        )
    keep_ratio = request_keep_ratio(config, extra_args)
    geometry, keep, scores = None, None, None
    if keep_ratio is not None:
        geometry = CompressionGeometry(
            num_tokens=num_tokens,
            block_size=block_size,
            window=config.window,
            keep_ratio=keep_ratio,
            num_kv_heads=num_kv_heads,
            num_layers=num_layers,
            policy=config.effective_policy,
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
        elif config.is_observation:
            recorded = torch.stack([observed[layer][:, :evictable] for layer in range(num_layers)])
        scores = context_scores(
            config, positions, num_layers, num_kv_heads, head_scores=head_scores, recorded_scores=recorded
        )
        kept = keep_by_ratio(
            scores, keep_ratio, config.effective_policy, sink_tokens=config.sink_tokens, window=0
        ).mask
        tail = torch.ones(num_layers, num_kv_heads, num_tokens - evictable, dtype=torch.bool, device=kept.device)
        keep = torch.cat([kept, tail], dim=-1)
        ragged = RaggedKVCache([layer.select(keep[index]) for index, layer in enumerate(ragged.layers)])

    generated = [first_token]
    stops = set(stop_token_ids)
    # Nothing evicted: the dense cache decodes the same tokens, much faster than the ragged one.
    past, implementation = (cache, None) if keep is None else (ragged, RAGGED_IMPLEMENTATION)
    with attention_implementation(model, implementation) if implementation else contextlib.nullcontext():
        while len(generated) < max_new_tokens and generated[-1] not in stops:
            generated.append(_greedy_step(model, past, generated[-1], num_tokens + len(generated) - 1))
    return ReferenceResult(token_ids=generated, geometry=geometry, keep=keep, scores=scores)


def _greedy_step(model: nn.Module, past, token: int, position: int) -> int:
    """Feed `token` at `position` through the cache `past`; the argmax of the next token."""
    device = next(model.parameters()).device
    step_ids = torch.tensor([[token]], device=device)
    positions = torch.tensor([[position]], device=device)
    logits = model(input_ids=step_ids, position_ids=positions, past_key_values=past, use_cache=True, logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


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


# ---------------------------------------------------------------------------------
# Threshold mode (KVzap thresholds, DMS decode-time eviction)
# ---------------------------------------------------------------------------------
def _fold_layer(layer: RaggedLayer, keep: Tensor) -> RaggedLayer:
    """Rows (kept ones and the tail) whose position p has keep[h, p]; the tail becomes part of the rows."""
    num_kv_heads = layer.num_kv_heads
    tail = layer.tail_keys.shape[1]
    keys, values, positions, lengths = [], [], [], []
    for head in range(num_kv_heads):
        head_keys, head_values = layer.head_rows(head)
        start, end = layer.offsets[head], layer.offsets[head + 1]
        head_positions = torch.cat(
            [layer.positions[start:end], torch.arange(layer.prefix_length, layer.prefix_length + tail, device=keep.device)]
        )
        rows = keep[head, head_positions]
        keys.append(torch.cat([head_keys, layer.tail_keys[head]])[rows])
        values.append(torch.cat([head_values, layer.tail_values[head]])[rows])
        positions.append(head_positions[rows])
        lengths.append(int(rows.sum()))
    return RaggedLayer(
        torch.cat(keys), torch.cat(values), torch.tensor(lengths, device=keep.device), torch.cat(positions),
        num_kv_heads, layer.prefix_length + tail,
    )


def _generate_with_folding(
    model, ragged, prompt_scores, first_token, num_tokens, config, *, block_size, max_new_tokens, stop_token_ids, surrogate
) -> ReferenceResult:
    """The worker's threshold-mode schedule: fold the dense tail into the head pages right after the
    prefill and (with decode eviction) whenever the tail has grown by `window` tokens, skipping a
    folding that would free no block -- the rules of `vllm_kvzip.backend.compressor`."""
    device = prompt_scores[0].device
    num_layers, num_kv_heads = len(ragged.layers), ragged.layers[0].num_kv_heads
    scores = [layer_scores for layer_scores in prompt_scores]  # per layer [H, tokens so far]
    decided = torch.zeros(num_layers, num_kv_heads, 0, dtype=torch.bool)  # decisions for [0, dense start)
    kept_len = torch.zeros(num_layers, num_kv_heads, dtype=torch.int64)
    page_start = torch.zeros_like(kept_len)
    containers = 0
    dense_start_block = 0
    interval = max(1, config.window // block_size)
    next_block = 0
    folded: list[tuple[int, int, int]] = []

    def fold(total_tokens: int) -> None:
        nonlocal decided, kept_len, page_start, containers, dense_start_block, next_block, ragged
        end_block = max(0, (total_tokens - config.window) // block_size)
        first_block = dense_start_block
        next_block = max(end_block, first_block) + interval
        if end_block <= first_block:
            return
        span = torch.arange(first_block * block_size, end_block * block_size, device=device)
        layer_scores = torch.stack([scores[layer][:, span] for layer in range(num_layers)])
        keep = (layer_scores >= config.threshold) | (span < config.sink_tokens)
        layout = plan_retirement_layout(
            kept_len, page_start, containers, keep.sum(-1).cpu(), span.numel(), end_block - first_block, block_size,
            interval * block_size,
        )
        freed = (end_block - first_block) - layout.new_container_blocks
        if freed <= 0:
            return
        decided = torch.cat([decided, keep.cpu()], dim=-1)
        full = torch.ones(num_layers, num_kv_heads, total_tokens, dtype=torch.bool, device=device)
        full[:, :, : decided.shape[-1]] = decided.to(device)
        ragged = RaggedKVCache([_fold_layer(layer, full[index]) for index, layer in enumerate(ragged.layers)])
        kept_len, page_start, containers = layout.kept_len, layout.page_start, layout.num_container_blocks
        dense_start_block = end_block
        folded.append((first_block, end_block, freed))

    fold(num_tokens)
    generated = [first_token]
    stops = set(stop_token_ids)
    hidden: dict[int, Tensor] = {}

    def pre_hook(module, args, kwargs):
        hidden[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True) for module in attention_modules(model)]
    try:
        with attention_implementation(model, RAGGED_IMPLEMENTATION):
            while len(generated) < max_new_tokens and generated[-1] not in stops:
                position = num_tokens + len(generated) - 1
                generated.append(_greedy_step(model, ragged, generated[-1], position))
                for layer in range(num_layers):
                    scores[layer] = torch.cat([scores[layer], surrogate.layer_scores(layer, hidden[layer][0]).to(device)], dim=-1)
                if config.decode_eviction and max(0, (position + 1 - config.window) // block_size) >= next_block:
                    fold(position + 1)
    finally:
        for handle in handles:
            handle.remove()
    keep = decided if decided.shape[-1] else None
    # The scores of every decided token, so a caller on other kernels can tell a flip at the
    # threshold (float noise) from a wrong decision.
    decided_scores = torch.stack([layer_scores[:, : decided.shape[-1]] for layer_scores in scores]).cpu()
    return ReferenceResult(
        token_ids=generated, geometry=None, keep=keep, folded_blocks=folded,
        scores=decided_scores if keep is not None else None,
    )
