"""Transformers-level KVzip API (research use, and the oracle the vLLM path is tested against).

    kvzip = KVzipModel(model, tokenizer)
    kv = kvzip.prefill(context, KVCompressionConfig(method="kvzip", keep_ratio=0.3))
    kv.prune()                        # or kv.prune(keep_ratio=0.3)
    answer = kvzip.generate(query, kv, update_cache=False)
    kv.kv_bytes()                     # bytes of K/V really held

How it works
  * Prompt layout as snu-mllab/KVzip: [template prefix (system prompt + user
    header + instruction)] [context] then, per query, "\\n\\n" + query + the
    chat template's assistant postfix.  Only the context is scored/evictable.
  * Prefill runs in steps of `config.chunk_size` tokens with a DynamicCache and a
    capturing attention function (sdpa + a callback that sees the post-RoPE
    queries, the full keys/values and, through a pre-hook, the attention input),
    so scores use exactly the tensors the model computes, for every architecture
    that goes through transformers' AttentionInterface (Llama, Qwen2, Qwen3).
  * KVzip / KVzip+ then run one reconstruction forward per context chunk at
    positions after the context, score the chunk in every layer and crop the
    repeat tokens off the cache again.
  * The cache is then held per (layer, KV head) with variable lengths: a
    flattened `[sum_h n_h, d]` tensor per layer (head-major, as the reference's
    varlen layout), plus a dense tail for tokens appended later (queries,
    answers), which every head keeps.  `prune()` gathers the kept rows into new,
    smaller tensors; the attention function computes each KV head's attention
    over its own rows (plain torch; a joint softmax over [kept rows | tail]).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.base import LayerInputs, Scorer, build_scorer, group_queries
from vllm_kvzip.scoring.kvzap_model import ModelShape
from vllm_kvzip.scoring.policies import KeepSet, keep_by_ratio, keep_by_threshold
from vllm_kvzip.scoring.reconstruction import RepeatPrompt, chunk_spans

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# snu-mllab/KVzip model/template.py: the instruction that opens the user turn.
DEFAULT_INSTRUCTION = "Given the context, answer to the following question or request without explanation.\n\n"
CAPTURE_IMPLEMENTATION = "vllm_kvzip_capture"
RAGGED_IMPLEMENTATION = "vllm_kvzip_ragged"
# SnapKV's observation window must fit in the last prefill step (at least this many tokens,
# more with a larger KVCompressionConfig.snapkv_window).
_MIN_LAST_PREFILL_STEP = 64
_PLACEHOLDER = "\u2063KVZIP_CONTEXT\u2063"


# ---------------------------------------------------------------------------------
# Prompt template
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    """prefix = everything before the context; postfix = end of user turn + assistant header."""

    prefix: str
    postfix: str

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, system_prompt: str = DEFAULT_SYSTEM_PROMPT, instruction: str = DEFAULT_INSTRUCTION
    ) -> "PromptTemplate":
        """Split the tokenizer's chat template around the user message.

        Deviation: snu-mllab/KVzip hard-codes one template per model family; we
        derive it from the chat template (with enable_thinking=False, which gives
        Qwen3 the same empty <think></think> block as the reference's postfix).
        """
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass a PromptTemplate to KVzipModel")
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": instruction + _PLACEHOLDER},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        prefix, postfix = text.split(_PLACEHOLDER)
        return cls(prefix=prefix, postfix=postfix)

    def query_text(self, query: str, answer_prefix: str = "") -> str:
        return "\n\n" + query + self.postfix + answer_prefix


# ---------------------------------------------------------------------------------
# Attention functions registered with transformers
# ---------------------------------------------------------------------------------
LayerCallback = Callable[[nn.Module, Tensor, Tensor, Tensor, float], None]
# The attention function is a global registration, so the active scoring
# callback is module state: one capture at a time per process (batch size 1).
_active_callback: LayerCallback | None = None


def _capture_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """sdpa attention that first shows its inputs to the active scoring callback."""
    if _active_callback is not None:
        scaling = kwargs.get("scaling")
        _active_callback(module, query, key, value, module.scaling if scaling is None else scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _ragged_attention(module: nn.Module, query: Tensor, key: "RaggedLayer", value: "RaggedLayer", attention_mask, **kwargs):
    """Attention of q new tokens over a RaggedLayer: per KV head, [its kept rows | the tail (causal)]."""
    if not isinstance(key, RaggedLayer):
        raise TypeError("the vllm_kvzip_ragged attention needs a RaggedKVCache as past_key_values")
    if query.shape[0] != 1:
        raise ValueError("the ragged KV cache holds one sequence (batch size 1)")
    scaling = kwargs.get("scaling") or module.scaling
    layer = key
    _, num_heads, num_queries, head_dim = query.shape
    grouped = group_queries(query[0], layer.num_kv_heads)  # [H, G, q, d]
    tail_length = layer.tail_keys.shape[1]
    # New token i (the last q of the tail) sees tail token j iff j <= tail_length - q + i.
    rows = torch.arange(num_queries, device=query.device)[:, None] + (tail_length - num_queries)
    tail_visible = torch.arange(tail_length, device=query.device)[None, :] <= rows
    output = torch.empty_like(grouped)
    for head in range(layer.num_kv_heads):
        kept_keys, kept_values = layer.head_rows(head)
        logits = torch.cat(
            [
                torch.einsum("gqd,nd->gqn", grouped[head], kept_keys),
                torch.einsum("gqd,nd->gqn", grouped[head], layer.tail_keys[head]).masked_fill(~tail_visible, float("-inf")),
            ],
            dim=-1,
        )
        # Softmax in at least float32 (bf16/fp16 models), float64 stays float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scaling
        probs = logits.softmax(dim=-1).to(kept_values.dtype)
        num_kept = kept_keys.shape[0]
        output[head] = probs[..., :num_kept] @ kept_values + probs[..., num_kept:] @ layer.tail_values[head]
    return output.reshape(1, num_heads, num_queries, head_dim).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, _capture_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
# No mask function for the ragged implementation: transformers then builds no
# mask and _ragged_attention applies its own causality.
ALL_ATTENTION_FUNCTIONS.register(RAGGED_IMPLEMENTATION, _ragged_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers (model.get_decoder().layers)")
    return [layer.self_attn for layer in layers]


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily route every attention module of `model` through implementation `name`."""
    configs = {id(module.config): module.config for module in attention_modules(model)}
    configs[id(model.config)] = model.config
    previous = {key: config._attn_implementation_internal for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation_internal = name
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = previous[key]


@contextlib.contextmanager
def capture_layers(model: nn.Module, callback: Callable[[int, nn.Module, Tensor, Tensor, Tensor, Tensor, float], None]):
    """Call `callback(layer_idx, module, queries, keys, values, hidden_states, scaling)` in every layer.

    queries [Hq, q, d] post-RoPE; keys/values [H, T, d] after the cache update;
    hidden_states [q, D] the attention input.  Batch size must be 1.
    """
    global _active_callback
    modules = attention_modules(model)
    hidden: dict[int, Tensor] = {}

    def pre_hook(module: nn.Module, args, kwargs):
        hidden[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def on_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> None:
        callback(module.layer_idx, module, query[0], key[0], value[0], hidden.pop(module.layer_idx)[0], scaling)

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True) for module in modules]
    previous = _active_callback
    _active_callback = on_attention
    try:
        with attention_implementation(model, CAPTURE_IMPLEMENTATION):
            yield
    finally:
        _active_callback = previous
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------
# Ragged per-head cache
# ---------------------------------------------------------------------------------
class RaggedLayer(CacheLayerMixin):
    """One layer's KV: kept rows of each KV head (flattened, head-major) + a shared dense tail.

    keys/values: [sum_h n_h, d]; lengths: [H]; positions: [sum_h n_h] original
    positions of the kept rows; tail_keys/tail_values: [H, t, d] tokens appended
    after the cache was built (every head keeps them).
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: Tensor, values: Tensor, lengths: Tensor, positions: Tensor, num_kv_heads: int, logical_length: int):
        super().__init__()
        self.keys, self.values = keys, values
        self.lengths, self.positions = lengths, positions
        self.num_kv_heads = num_kv_heads
        self.prefix_length = logical_length  # tokens seen before the tail
        self.offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).tolist()
        head_dim = keys.shape[-1]
        self.tail_keys = keys.new_zeros(num_kv_heads, 0, head_dim)
        self.tail_values = values.new_zeros(num_kv_heads, 0, values.shape[-1])
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    @classmethod
    def from_dense(cls, keys: Tensor, values: Tensor) -> "RaggedLayer":
        """From a dense [1, H, T, d] layer: every head keeps all T tokens."""
        _, num_kv_heads, length, head_dim = keys.shape
        positions = torch.arange(length, device=keys.device).repeat(num_kv_heads)
        lengths = torch.full((num_kv_heads,), length, dtype=torch.int64, device=keys.device)
        return cls(
            keys[0].reshape(-1, head_dim).clone(),
            values[0].reshape(-1, values.shape[-1]).clone(),
            lengths,
            positions,
            num_kv_heads,
            length,
        )

    def head_rows(self, head: int) -> tuple[Tensor, Tensor]:
        start, end = self.offsets[head], self.offsets[head + 1]
        return self.keys[start:end], self.values[start:end]

    def select(self, keep: Tensor) -> "RaggedLayer":
        """A new layer keeping, per head, the rows whose original position p has keep[h, p]."""
        if self.tail_keys.shape[1]:
            raise ValueError("cannot prune a cache that already holds appended tokens (update_cache=True)")
        heads = torch.repeat_interleave(torch.arange(self.num_kv_heads, device=self.keys.device), self.lengths)
        rows = keep.to(self.keys.device)[heads, self.positions]
        lengths = torch.stack([rows[start:end].sum() for start, end in zip(self.offsets[:-1], self.offsets[1:])])
        return RaggedLayer(
            self.keys[rows], self.values[rows], lengths, self.positions[rows], self.num_kv_heads, self.prefix_length
        )

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Built initialised; never called."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple["RaggedLayer", "RaggedLayer"]:
        """Append new tokens to the tail; the attention function reads the layer itself."""
        self.tail_keys = torch.cat([self.tail_keys, key_states[0]], dim=1)
        self.tail_values = torch.cat([self.tail_values, value_states[0]], dim=1)
        return self, self

    def truncate_tail(self, length: int) -> None:
        self.tail_keys = self.tail_keys[:, :length]
        self.tail_values = self.tail_values[:, :length]

    def get_seq_length(self) -> int:
        """Logical length (positions continue from here), not the number of kept rows."""
        return self.prefix_length + self.tail_keys.shape[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.tail_keys, self.tail_values)
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class RaggedKVCache(Cache):
    """A transformers Cache whose layers keep a different number of tokens per KV head."""

    def __init__(self, layers: list[RaggedLayer]):
        super().__init__(layers=layers)

    @classmethod
    def from_dynamic(cls, cache: DynamicCache) -> "RaggedKVCache":
        return cls([RaggedLayer.from_dense(layer.keys, layer.values) for layer in cache.layers])

    @property
    def tail_length(self) -> int:
        return self.layers[0].tail_keys.shape[1]

    def truncate_tail(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate_tail(length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ---------------------------------------------------------------------------------
# User-facing KV object
# ---------------------------------------------------------------------------------
class KVzipCache:
    """A prefilled context: its KV (ragged per head), its scores, and prune()."""

    def __init__(
        self,
        cache: RaggedKVCache,
        token_ids: list[int],
        prefix_length: int,
        scores: dict[str, Tensor],
        config: KVCompressionConfig,
        log_space_methods: frozenset[str] = frozenset(),
    ):
        self.cache = cache
        self.token_ids = token_ids  # tokens whose KV is in the cache (logical order)
        self.prefix_length = prefix_length
        self.context_length = len(token_ids) - prefix_length
        self.scores = scores  # method -> [L, H, context_length] float32
        self.config = config
        self.log_space_methods = log_space_methods
        self.keep_set: KeepSet | None = None
        self.full_kv_bytes = cache.nbytes()
        # update_cache=True: the last generated token, fed with the next query.
        self.pending_ids: list[int] = []

    def kv_bytes(self) -> int:
        """Bytes of K and V actually held (kept rows + appended tail)."""
        return self.cache.nbytes()

    def report(self) -> dict[str, float | int]:
        """KV bytes held vs. before pruning, and the kept fraction of the context's (layer, head, token) pairs."""
        kept = 1.0 if self.keep_set is None else float(self.keep_set.mask.float().mean())
        return {
            "kv_bytes": self.kv_bytes(),
            "full_kv_bytes": self.full_kv_bytes,
            "kv_bytes_fraction": self.kv_bytes() / self.full_kv_bytes,
            "context_kept_fraction": kept,
            "context_tokens": self.context_length,
            "prefix_tokens": self.prefix_length,
        }

    def keep_set_for(
        self,
        keep_ratio: float | None = None,
        *,
        threshold: float | None = None,
        method: str | None = None,
        policy: str | None = None,
    ) -> KeepSet:
        """The keep-set over the context tokens that prune() would apply."""
        method = method or self.config.method
        sink_tokens = max(0, self.config.sink_tokens - self.prefix_length)  # the sinks lie in the template prefix
        num_layers, num_heads = len(self.cache.layers), self.cache.layers[0].num_kv_heads
        if method == "none":
            mask = torch.ones(num_layers, num_heads, self.context_length, dtype=torch.bool)
            return KeepSet(mask, mask.sum(-1))
        if method not in self.scores:
            raise ValueError(f"no {method!r} scores for this context; scored methods: {', '.join(self.scores) or 'none'}")
        scores = self.scores[method]
        if threshold is None and keep_ratio is None and self.config.threshold_mode:
            threshold = self.config.threshold
        if threshold is not None:
            if method not in self.log_space_methods:
                raise ValueError(f"a threshold applies to KVzap log-scores; {method!r} is not thresholdable")
            return keep_by_threshold(scores, threshold, sink_tokens=sink_tokens, window=self.config.window)
        ratio = self.config.effective_keep_ratio if keep_ratio is None else keep_ratio
        return keep_by_ratio(
            scores, ratio, policy or self.config.effective_policy, sink_tokens=sink_tokens, window=self.config.window
        )

    def prune(
        self,
        keep_ratio: float | None = None,
        *,
        threshold: float | None = None,
        method: str | None = None,
        policy: str | None = None,
    ) -> KeepSet:
        """Evict in place: the evicted KV is dropped (new, smaller tensors).  Returns the keep-set.

        The template prefix (system prompt) is always kept and the ratio counts
        only the context's evictable tokens (see vllm_kvzip.scoring.policies).
        """
        keep_set = self.keep_set_for(keep_ratio, threshold=threshold, method=method, policy=policy)
        self.cache = RaggedKVCache([layer.select(self._full_mask(keep_set, index)) for index, layer in enumerate(self.cache.layers)])
        self.keep_set = keep_set
        return keep_set

    def pruned(self, keep_ratio: float | None = None, **kwargs: Any) -> "KVzipCache":
        """A pruned copy; this cache is left untouched (for sweeping ratios over one prefill)."""
        clone = copy.copy(self)
        clone.pending_ids = list(self.pending_ids)
        clone.token_ids = list(self.token_ids)
        clone.prune(keep_ratio, **kwargs)
        return clone

    def _full_mask(self, keep_set: KeepSet, layer_idx: int) -> Tensor:
        context_mask = keep_set.mask[layer_idx]
        prefix = torch.ones(context_mask.shape[0], self.prefix_length, dtype=torch.bool, device=context_mask.device)
        return torch.cat([prefix, context_mask], dim=-1)


# ---------------------------------------------------------------------------------
# The model wrapper
# ---------------------------------------------------------------------------------
class KVzipModel:
    """Wrap a transformers causal LM (Llama-3.x, Qwen2/2.5, Qwen3, SmolLM2) for KVzip-style prefill/prune/generate."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        model_name: str | None = None,
        template: PromptTemplate | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "name_or_path", "") or ""
        self.template = template or PromptTemplate.from_tokenizer(tokenizer)
        self.shape = ModelShape.from_config(model.config)
        self.repeat_prompt = RepeatPrompt.from_tokenizer(tokenizer, self.template.postfix)
        self._scorers: dict[tuple[str, KVCompressionConfig], Scorer] = {}

    # ---- helpers ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def scorer(self, method: str, config: KVCompressionConfig) -> Scorer:
        """Build (once per method and config) the scorer for `method`."""
        key = (method, config)
        if key not in self._scorers:
            self._scorers[key] = build_scorer(method, config, self.shape, self.model_name)
        return self._scorers[key]

    def _forward(self, input_ids: list[int], start_position: int, cache: Cache) -> None:
        """Run the decoder (no LM head) on input_ids at positions start_position..."""
        ids = torch.tensor([input_ids], device=self.device)
        positions = torch.arange(start_position, start_position + len(input_ids), device=self.device)[None]
        self.model.get_decoder()(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)

    # ---- prefill + scoring --------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        context: str | Sequence[int],
        config: KVCompressionConfig | dict | str | None = None,
        *,
        methods: Sequence[str] | None = None,
    ) -> KVzipCache:
        """Prefill [template prefix | context] and score the context with config.method (or every name in `methods`)."""
        config = KVCompressionConfig.parse(config)
        if methods is None:
            methods = [config.method] if config.enabled else []
        scorers = {method: self.scorer(method, config) for method in methods}
        prefix_ids = self.encode(self.template.prefix)
        context_ids = self.encode(context) if isinstance(context, str) else list(context)
        if not context_ids:
            raise ValueError("empty context")
        token_ids = prefix_ids + context_ids
        prefix_length, total = len(prefix_ids), len(token_ids)
        scores = {
            method: torch.zeros(self.shape.num_layers, self.shape.num_kv_heads, len(context_ids))
            for method in scorers
        }
        cache = DynamicCache(config=self.model.config)

        by_kind = {kind: {m: s for m, s in scorers.items() if s.pass_kind == kind} for kind in ("prefill", "prefill_end", "reconstruction")}
        min_last = max(_MIN_LAST_PREFILL_STEP, config.snapkv_window if by_kind["prefill_end"] else 0)
        steps = _prefill_steps(total, config.chunk_size, min_last)
        for step_start, step_end in steps:
            is_last = step_end == total
            targets: list[tuple[dict[str, Scorer], tuple[int, int]]] = []
            if by_kind["prefill"] and step_end > prefix_length:
                targets.append((by_kind["prefill"], (max(step_start, prefix_length), step_end)))
            if by_kind["prefill_end"] and is_last:
                targets.append((by_kind["prefill_end"], (prefix_length, total)))

            def on_prefill_layer(layer_idx, module, queries, keys, values, hidden, scaling, targets=targets):
                for group, target in targets:
                    inputs = self._layer_inputs(layer_idx, module, queries, keys, values, hidden, scaling, target)
                    for method, scorer in group.items():
                        scores[method][layer_idx, :, target[0] - prefix_length : target[1] - prefix_length] = scorer.score(inputs).cpu()

            with capture_layers(self.model, on_prefill_layer):
                self._forward(token_ids[step_start:step_end], step_start, cache)

        if by_kind["reconstruction"]:
            for chunk in chunk_spans(len(context_ids), config.chunk_size):
                repeat_ids = self.repeat_prompt.input_ids(context_ids, chunk)
                target = (prefix_length + chunk[0], prefix_length + chunk[1])

                def on_repeat_layer(layer_idx, module, queries, keys, values, hidden, scaling, target=target, chunk=chunk):
                    inputs = self._layer_inputs(
                        layer_idx, module, queries, keys, values, hidden, scaling, target, sink=(0, prefix_length)
                    )
                    for method, scorer in by_kind["reconstruction"].items():
                        scores[method][layer_idx, :, chunk[0] : chunk[1]] = scorer.score(inputs).cpu()

                with capture_layers(self.model, on_repeat_layer):
                    # The repeat tokens sit after the whole context, as in the reference.
                    self._forward(repeat_ids, total, cache)
                # transformers 5 crops by a negative count of tokens to remove.
                cache.crop(-(cache.get_seq_length() - total))

        log_space = frozenset(method for method, scorer in scorers.items() if scorer.log_space)
        return KVzipCache(RaggedKVCache.from_dynamic(cache), token_ids, prefix_length, scores, config, log_space)

    def _layer_inputs(self, layer_idx, module, queries, keys, values, hidden, scaling, target, sink=(0, 0)) -> LayerInputs:
        return layer_inputs(layer_idx, module, queries, keys, values, hidden, scaling, target, sink)

    # ---- generation ---------------------------------------------------------------
    def stop_token_ids(self) -> set[int]:
        stops: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                stops.update(value if isinstance(value, (list, tuple)) else [value])
        return stops

    @torch.no_grad()
    def generate_ids(
        self,
        query_ids: Sequence[int],
        kv: KVzipCache,
        *,
        update_cache: bool = False,
        max_new_tokens: int = 64,
        stop_strings: Sequence[str] = (),
    ) -> list[int]:
        """Greedy decoding of query_ids after the cached context; returns the new token ids.

        Stops at an end-of-turn token, after max_new_tokens, or once the decoded
        answer contains one of `stop_strings`.
        """
        tail_before = kv.cache.tail_length
        input_ids = list(kv.pending_ids) + list(query_ids)
        fed: list[int] = []
        generated: list[int] = []
        stops = self.stop_token_ids()
        with attention_implementation(self.model, RAGGED_IMPLEMENTATION):
            while len(generated) < max_new_tokens:
                start = len(kv.token_ids) + len(fed)
                ids = torch.tensor([input_ids], device=self.device)
                positions = torch.arange(start, start + len(input_ids), device=self.device)[None]
                logits = self.model(
                    input_ids=ids, position_ids=positions, past_key_values=kv.cache, use_cache=True, logits_to_keep=1
                ).logits
                fed.extend(input_ids)
                token = int(logits[0, -1].argmax())
                generated.append(token)
                if token in stops:
                    break
                if stop_strings and any(stop in self.tokenizer.decode(generated) for stop in stop_strings):
                    break
                input_ids = [token]
        if update_cache:
            kv.token_ids.extend(fed)
            kv.pending_ids = [generated[-1]] if generated else []
        else:
            kv.cache.truncate_tail(tail_before)
        return generated

    def generate(
        self,
        query: str,
        kv: KVzipCache,
        *,
        update_cache: bool = False,
        max_new_tokens: int = 64,
        answer_prefix: str = "",
        stop_strings: Sequence[str] = (),
    ) -> str:
        """Answer `query` from the (pruned) cache.  update_cache=False drops the query/answer KV afterwards.

        `answer_prefix` starts the assistant's turn (e.g. "The number is"), as RULER does.
        """
        query_ids = self.encode(self.template.query_text(query, answer_prefix))
        generated = self.generate_ids(
            query_ids, kv, update_cache=update_cache, max_new_tokens=max_new_tokens, stop_strings=stop_strings
        )
        return self.tokenizer.decode(generated, skip_special_tokens=True)


def layer_inputs(layer_idx, module, queries, keys, values, hidden, scaling, target, sink=(0, 0)) -> LayerInputs:
    """`LayerInputs` from what `capture_layers` shows one layer (batch of one)."""
    num_kv_heads = keys.shape[0]
    return LayerInputs(
        layer_idx=layer_idx,
        queries=group_queries(queries, num_kv_heads),
        keys=keys,
        values=values,
        hidden_states=hidden,
        positions=torch.arange(keys.shape[1], device=keys.device),
        target=target,
        scaling=float(scaling),
        o_proj_weight=module.o_proj.weight,
        sink=sink,
    )


def _prefill_steps(total: int, step_size: int, min_last: int) -> list[tuple[int, int]]:
    """Prefill steps of step_size tokens, except that the last one has at least min_last tokens."""
    steps = chunk_spans(total, step_size)
    if len(steps) > 1 and steps[-1][1] - steps[-1][0] < min_last:
        last_start = max(0, total - min_last)
        steps = [(start, min(end, last_start)) for start, end in steps[:-1] if start < last_start]
        steps.append((last_start, total))
    return steps
