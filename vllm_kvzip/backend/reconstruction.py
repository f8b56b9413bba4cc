"""KVzip / KVzip+ inside vLLM: the context-reconstruction pass over a request's paged KV.

After a request's prefill the worker feeds KVzip's repeat input ("Repeat the
previous context exactly." + the chat template's assistant postfix + a chunk
of the prompt; `vllm_kvzip.scoring.reconstruction`) through vLLM's own model,
one forward per chunk, positioned after the whole prompt.  Every attention
layer receives a `ReconstructionMetadata` instead of its normal metadata; the
CPU and CUDA attention impls hand it to `reconstruction_attention` (this
module: the one implementation both use), which

* gathers the request's prompt K/V from the paged cache (still dense: the
  compaction runs after scoring) through its block table,
* computes the layer's real attention output for the repeat tokens (over the
  whole prompt plus the repeat input, causal), so later layers see the hidden
  states the reference model computes,
* scores the chunk with `vllm_kvzip.scoring.functional.kvzip_chunk_scores`, the
  function the scoring library's KVzip / KVzip+ scorers call: softmax over
  [sink | chunk | repeat input (causal)], max over repeat queries and the GQA
  group (KVzip+: each weight times ||W_O v|| / ||h||).

The forward runs with no slot mapping, so vLLM never writes the repeat tokens'
K/V into the paged cache: they exist only as the `key` / `value` tensors the
layer hands to the impl.  KVzip+ needs ||h|| of each repeat token's attention
input, which the attention op does not see: a pre-hook on every `self_attn`
records it through the `vllm_kvzip::record_hidden_norms` op (a no-op outside
reconstruction passes).

Memory per layer: the request's K/V gathered once ([H, T, d] each), the
chunk-scoring logits of one KV head ([G, q, s + m + q] fp32, q ~ chunk), and
for the attention output a fused SDPA kernel (CUDA, half precision) or query
blocks of bounded logits: chunk x context at most, never context^2.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from vllm_kvzip.block_manager.geometry import cdiv
from vllm_kvzip.scoring.functional import KVzipPlusTerms, kvzip_chunk_scores, output_projection_gram
from vllm_kvzip.scoring.reconstruction import RepeatPrompt, prompt_reconstruction_chunks

# Logits one SDPA call may materialise off the fused CUDA path: at most this many elements.
BLOCKED_ATTENTION_ELEMENTS = 2**24
# How many layer calls took each attention path ("fused": one flash kernel; "fused-repeated": the
# same with K/V repeated per query head, if the GQA call failed; "blocks": bounded query blocks).
ATTENTION_PATHS: Counter[str] = Counter()


@dataclass
class ReconstructionMetadata:
    """What every attention layer gets during one reconstruction forward.

    block_ids: the request's blocks (int64, covering positions [0, context_len)).
    context_len: prompt tokens in the cache; the repeat tokens attend all of them.
    span / sink: prompt positions scored by this pass / always in KVzip's softmax.
    scores: [L, H, n] float32 output; column p = prompt position p.
    """

    num_tokens: int
    block_ids: Tensor
    context_len: int
    span: tuple[int, int]
    sink: tuple[int, int]
    scores: Tensor
    layer_index: dict[str, int]
    plus: bool = False
    # KVzip+: per-query-head Gram matrices of the output projection [H, G, d, d], by layer name.
    o_proj_grams: dict[str, Tensor] | None = None
    # KVzip+: ||h|| of the repeat tokens' attention input, by layer name (pre-hook).
    hidden_norms: dict[str, Tensor] = field(default_factory=dict)
    layers_done: set[str] = field(default_factory=set)

    def score_layer(
        self, layer_name: str, queries: Tensor, keys: Tensor, context_keys: Tensor, context_values: Tensor, scale: float
    ) -> None:
        """Score one layer into `scores`: queries [H, G, q, d] and keys [H, q, d] of the pass's own
        tokens, context_keys / context_values [H, context_len, d] from the cache.  Subclasses score
        other ways (SnapKV's observation pass, `vllm_kvzip.backend.observation`)."""
        score_kvzip_chunk(self, layer_name, queries, keys, context_keys, context_values, scale)


def gather_context_kv(kv_cache: Tensor, block_ids: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Keys and values [H, length, d] of positions [0, length) from vLLM's dense paged layout.

    kv_cache: [num_blocks, H, block_size, 2 * d] (the plugin's HND layout, `[K | V]` per row).
    """
    num_kv_heads, block_size, width = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3]
    num_blocks = cdiv(length, block_size)
    blocks = block_ids[:num_blocks].to(device=kv_cache.device, dtype=torch.int64)
    rows = kv_cache.index_select(0, blocks).transpose(0, 1).reshape(num_kv_heads, num_blocks * block_size, width)[:, :length]
    head_size = width // 2
    return rows[..., :head_size], rows[..., head_size:]


def repeat_attention(
    query: Tensor,
    context_keys: Tensor,
    context_values: Tensor,
    repeat_keys: Tensor,
    repeat_values: Tensor,
    scale: float,
    *,
    max_logits: int | None = None,
) -> Tensor:
    """Attention output [q, Hq, d] of q repeat queries over [context | repeat input (causal)].

    query: [q, Hq, d]; context_keys / context_values: [H, T, d];
    repeat_keys / repeat_values: [q, H, d] (the pass's own tokens, last in the sequence).
    Query i sees every context key and repeat keys 0..i.

    One `scaled_dot_product_attention` call per block of queries with a
    lower-right causal mask: queries [a, b) see keys [0, T + b), the mask of a
    block being exactly `causal_lower_right(b - a, T + b)`.  On CUDA in half
    precision that is one fused (flash) kernel for all queries; elsewhere the
    kernel may materialise the logits, so blocks hold at most `max_logits`
    (default BLOCKED_ATTENTION_ELEMENTS) of them: chunk x context, never more.
    """
    num_queries, num_heads, _ = query.shape
    context_len = context_keys.shape[1]
    keys = torch.cat([context_keys, repeat_keys.transpose(0, 1).to(context_keys.dtype)], dim=1)[None]
    values = torch.cat([context_values, repeat_values.transpose(0, 1).to(context_values.dtype)], dim=1)[None]
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    queries = query.transpose(0, 1)[None]  # [1, Hq, q, d]
    if max_logits is None and _flash_available(queries, keys, values):
        group = num_heads // keys.shape[1]
        try:
            with fused_kernels_only():
                out = _attend_blocks(queries, keys, values, context_len, num_queries, scale)
            ATTENTION_PATHS["fused"] += 1
            return out
        except RuntimeError as exc:  # a flash kernel that takes no GQA through this call
            _warn_once(f"vllm-kvzip: fused GQA reconstruction attention failed ({exc}); repeating K/V heads")
        try:  # K/V repeated per query head: context x Hq x d more memory, still one flash kernel
            with fused_kernels_only():
                out = _attend_blocks(
                    queries, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1),
                    context_len, num_queries, scale,
                )
            ATTENTION_PATHS["fused-repeated"] += 1
            return out
        except RuntimeError as exc:
            _warn_once(f"vllm-kvzip: fused reconstruction attention failed ({exc}); using bounded query blocks")
    limit = BLOCKED_ATTENTION_ELEMENTS if max_logits is None else max_logits
    block = max(1, min(num_queries, limit // (num_heads * (context_len + num_queries))))
    ATTENTION_PATHS["blocks"] += 1
    return _attend_blocks(queries, keys, values, context_len, block, scale)


def _attend_blocks(queries: Tensor, keys: Tensor, values: Tensor, context_len: int, block: int, scale: float) -> Tensor:
    from torch.nn.attention.bias import causal_lower_right

    num_queries = queries.shape[2]
    out = queries.new_empty(num_queries, queries.shape[1], queries.shape[3])
    for start in range(0, num_queries, block):
        end = min(start + block, num_queries)
        visible = context_len + end
        attended = torch.nn.functional.scaled_dot_product_attention(
            queries[:, :, start:end],
            keys[:, :, :visible],
            values[:, :, :visible],
            attn_mask=causal_lower_right(end - start, visible),
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = attended[0].transpose(0, 1)
    return out


def _flash_available(queries: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether to try the fused path: CUDA in half precision.

    The fused calls run under `fused_kernels_only()`, so SDPA either picks a
    kernel that never materialises the logits (flash or memory-efficient) or
    raises, and the caller falls back to bounded query blocks.  (Asking
    `can_use_flash_attention` up front is brittle: on torch 2.11 / H100 the
    check came out negative for this call, and every pass took the slower
    bounded blocks.)
    """
    return queries.is_cuda and queries.dtype in (torch.float16, torch.bfloat16)


def fused_kernels_only():
    """SDPA restricted to the kernels that never hold a [q, T] logits matrix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        from vllm_kvzip.backend.state import logger

        logger().warning(message)


def reconstruction_attention(
    layer_name: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kv_cache: Tensor,
    metadata: ReconstructionMetadata,
    scale: float,
    output: Tensor,
) -> Tensor:
    """One layer of a scoring forward: write the attention output, then `metadata.score_layer`
    (KVzip: score the chunk; SnapKV's observation pass: score the prompt)."""
    num_tokens = metadata.num_tokens
    query, key, value = query[:num_tokens], key[:num_tokens], value[:num_tokens]
    num_kv_heads = kv_cache.shape[1]
    num_heads, head_size = query.shape[1], query.shape[2]
    context_keys, context_values = gather_context_kv(kv_cache, metadata.block_ids, metadata.context_len)
    attended = repeat_attention(query, context_keys, context_values, key, value, scale)
    output[:num_tokens] = attended.reshape(output[:num_tokens].shape).to(output.dtype)

    grouped = query.transpose(0, 1).reshape(num_kv_heads, num_heads // num_kv_heads, num_tokens, head_size)
    metadata.score_layer(layer_name, grouped, key.transpose(0, 1), context_keys, context_values, scale)
    metadata.layers_done.add(layer_name)
    return output


def score_kvzip_chunk(
    metadata: ReconstructionMetadata,
    layer_name: str,
    grouped: Tensor,
    repeat_keys: Tensor,
    context_keys: Tensor,
    context_values: Tensor,
    scale: float,
) -> None:
    """KVzip / KVzip+ scores of the pass's chunk in one layer, into `metadata.scores`."""
    layer = metadata.layer_index[layer_name]
    start, end = metadata.span
    plus = None
    if metadata.plus:
        hidden_norms = metadata.hidden_norms.pop(layer_name, None)
        if hidden_norms is None:
            raise RuntimeError(f"vllm-kvzip: no attention-input norms recorded for {layer_name} (KVzip+ hook missing)")
        plus = KVzipPlusTerms(
            values_chunk=context_values[:, start:end],
            o_proj_weight=None,
            hidden_norms=hidden_norms,
            o_proj_gram=metadata.o_proj_grams[layer_name],
        )
    score_chunk = kvzip_chunk_scores
    if grouped.is_cuda:
        # The fused kernel: the torch definition's float32 logits per KV head were most of a pass.
        from vllm_kvzip.backend.ops.chunk_scores import kvzip_chunk_scores_triton as score_chunk
    metadata.scores[layer, :, start:end] = score_chunk(
        grouped,
        context_keys[:, metadata.sink[0] : metadata.sink[1]],
        context_keys[:, start:end],
        repeat_keys,
        scaling=scale,
        plus=plus,
    )


# The model forward a reconstruction pass runs: (input_ids, first position, metadata) -> None.
ForwardFn = Callable[[Sequence[int], int, ReconstructionMetadata], None]


class ReconstructionScorer:
    """Runs KVzip's reconstruction passes for one request and returns its scores."""

    def __init__(
        self,
        *,
        plus: bool,
        chunk_size: int,
        sink_tokens: int,
        repeat_prompt: RepeatPrompt,
        forward: ForwardFn,
        num_kv_heads: int,
        device: torch.device,
        max_positions: int | None = None,
        o_proj_grams: dict[str, Tensor] | None = None,
    ) -> None:
        if plus and o_proj_grams is None:
            raise ValueError("KVzip+ needs every layer's attention output projection (its Gram matrices)")
        self.plus = plus
        self.chunk_size = chunk_size
        self.sink_tokens = sink_tokens
        self.repeat_prompt = repeat_prompt
        self.forward = forward
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.max_positions = max_positions
        self.o_proj_grams = o_proj_grams
        self.total_seconds = 0.0
        self.total_passes = 0

    @torch.inference_mode()
    def score(
        self,
        token_ids: Sequence[int],
        num_tokens: int,
        block_ids: Sequence[int],
        scored_end: int,
        layer_names: Sequence[str],
    ) -> Tensor:
        """[L, H, scored_end] scores of prompt positions [0, scored_end), layers in `layer_names` order.

        token_ids / block_ids: the request's tokens and blocks (at least its
        `num_tokens` prefill tokens, all in the cache).  The sinks score +inf.
        """
        started = time.perf_counter()
        layer_index = {name: index for index, name in enumerate(layer_names)}
        chunks = prompt_reconstruction_chunks(
            token_ids, num_tokens, scored_end, self.sink_tokens, self.chunk_size, self.repeat_prompt, self.max_positions
        )
        scores = torch.full(
            (len(layer_names), self.num_kv_heads, scored_end), float("inf"), dtype=torch.float32, device=self.device
        )
        block_table = torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)
        for chunk in chunks:
            metadata = ReconstructionMetadata(
                num_tokens=len(chunk.input_ids),
                block_ids=block_table,
                context_len=num_tokens,
                span=chunk.span,
                sink=chunk.sink,
                scores=scores,
                layer_index=layer_index,
                plus=self.plus,
                o_proj_grams=self.o_proj_grams,
            )
            self.forward(chunk.input_ids, chunk.start_position, metadata)
            missing = set(layer_names) - metadata.layers_done
            if missing:
                raise RuntimeError(
                    f"vllm-kvzip: {len(missing)} attention layers did not run the reconstruction pass "
                    f"(e.g. {sorted(missing)[0]}); is vllm-kvzip's attention backend in use?"
                )
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)  # the pass's real cost, not its launch time
        self.total_seconds += time.perf_counter() - started
        self.total_passes += len(chunks)
        return scores


# ---- KVzip+: the attention input's norm, recorded by a pre-hook on every self_attn -------------------
@torch.library.custom_op("vllm_kvzip::record_hidden_norms", mutates_args=("marker",))
def record_hidden_norms(hidden_states: Tensor, marker: Tensor, layer_name: str) -> None:
    """During a KVzip+ reconstruction forward, store ||h|| of each token for `layer_name`'s attention."""
    from vllm_kvzip.adapter.attention_api import current_layer_metadata

    metadata = current_layer_metadata(layer_name)
    if not isinstance(metadata, ReconstructionMetadata) or not metadata.plus:
        return  # a normal step (or profiling): nothing to record
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])[: metadata.num_tokens]
    metadata.hidden_norms[layer_name] = hidden.float().norm(dim=-1)


@record_hidden_norms.register_fake
def _(hidden_states, marker, layer_name):
    return None


def install_hidden_norm_hooks(
    model: torch.nn.Module, layer_names: Sequence[str], num_kv_heads: int, num_heads: int, head_size: int, device
) -> dict[str, Tensor]:
    """KVzip+: pre-hooks feeding ||h|| to the reconstruction pass; returns each layer's W_O Gram matrices.

    `layer_names` are the attention layers (`model.layers.3.self_attn.attn`); their
    parent module (`...self_attn`) receives the post-input_layernorm hidden states
    and owns `o_proj`.  Must run before the model's first (compiled) forward.
    """
    from vllm_kvzip.backend.kvzap import _find_module, attention_module_names

    modules = dict(model.named_modules())
    grams = {}
    for layer_name, module_name in zip(layer_names, attention_module_names(layer_names)):
        module = _find_module(modules, module_name)
        o_proj = getattr(module, "o_proj", None)
        if o_proj is None:
            raise ValueError(f"--kv-compression kvzip-plus: {module_name} has no o_proj")
        weight = linear_weight(o_proj, num_heads * head_size)
        grams[layer_name] = output_projection_gram(weight, num_kv_heads, num_heads // num_kv_heads)
        marker = torch.zeros(1, device=device)
        module.register_forward_pre_hook(_norm_hook(layer_name, marker), with_kwargs=True)
    return grams


@torch.inference_mode()
def linear_weight(linear: torch.nn.Module, in_features: int) -> Tensor:
    """[out, in] matrix of a (vLLM) linear layer, read through its own matmul applied to the identity.

    vLLM's CPU platform repacks linear weights for oneDNN and drops `.weight`,
    and quantized layers hold no plain matrix either; their `quant_method.apply`
    (bias left out: exact) works for all.  Other modules go through forward,
    with linear(0) (the bias) subtracted.
    """
    reference = next(iter(linear.parameters()), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    device = reference.device if reference is not None else None
    identity = torch.eye(in_features, dtype=dtype, device=device)
    quant_method = getattr(linear, "quant_method", None)
    if quant_method is not None and hasattr(quant_method, "apply"):
        return quant_method.apply(linear, identity, None).T

    def apply(inputs: Tensor) -> Tensor:
        result = linear(inputs)
        return result[0] if isinstance(result, tuple) else result

    product = apply(identity)
    if getattr(linear, "bias", None) is not None:
        product = product - apply(torch.zeros_like(identity[:1]))
    return product.T


def _norm_hook(layer_name: str, marker: Tensor):
    def hook(module, args, kwargs):
        hidden_states = kwargs.get("hidden_states")
        if hidden_states is None and len(args) >= 2:
            hidden_states = args[1]  # forward(positions, hidden_states)
        if hidden_states is None:
            raise RuntimeError(f"vllm-kvzip: {type(module).__name__}.forward got no hidden_states")
        torch.ops.vllm_kvzip.record_hidden_norms(hidden_states, marker, layer_name)
        return None

    return hook
