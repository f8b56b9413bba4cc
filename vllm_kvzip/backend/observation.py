"""SnapKV inside vLLM: the observation pass over a request's paged KV.

SnapKV scores every prompt token by the attention it receives from the last
`snapkv_window` prompt tokens (the observation window), post-RoPE, softmax over
the whole prompt (causal inside the window), averaged over the window, average
pooled along the keys and averaged over the GQA group
(`vllm_kvzip.scoring.functional.snapkv_scores`, what the scoring library's
SnapKV scorer calls).

vLLM's prefill does not keep its queries, so after a request's prefill the
worker feeds the window's tokens once more through vLLM's own model, at their
own positions, over the request's cached (still dense) KV of the tokens before
them.  Same prefix KV, same positions, same tokens: every layer recomputes the
queries the prefill had for those tokens.  Each attention layer receives an
`ObservationMetadata` (a `ReconstructionMetadata`, so the CPU and CUDA impls
route it to `reconstruction_attention` unchanged), which

* gathers the prompt K/V before the window from the paged cache and computes
  the layer's real attention output for the window tokens (causal), so later
  layers see the prefill's hidden states,
* scores the prompt with `snapkv_scores` over [cached keys | the window's own
  keys].

The forward runs with no slot mapping: nothing is written into the paged
cache.  Cost: one forward of `snapkv_window` tokens (vs. KVzip's prompt-sized
reconstruction), and per layer the [G, w, T] logits of one KV head at a time.

Interaction with the plugin's geometry: only the positions before the dense
tail (`evictable`) are kept from the scores.  The window is the end of the
prompt, so with the default settings (window 64 <= --kv-compression-window)
it lies in the always-kept dense tail; window tokens that fall in the
evictable span get their head's maximum score, as in the library.  The sinks
get their real score (the keep policy protects them anyway).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from vllm_kvzip.backend.reconstruction import ForwardFn, ReconstructionMetadata
from vllm_kvzip.scoring.functional import snapkv_scores


@dataclass
class ObservationMetadata(ReconstructionMetadata):
    """What every attention layer gets during SnapKV's observation forward.

    num_tokens: the window's w tokens, at positions [context_len, context_len + w).
    context_len: prompt tokens before the window (read from the cache).
    span: (0, scored_end) prompt positions whose scores are kept.
    """

    kernel_size: int = 5

    def score_layer(
        self, layer_name: str, queries: Tensor, keys: Tensor, context_keys: Tensor, context_values: Tensor, scale: float
    ) -> None:
        layer = self.layer_index[layer_name]
        start, end = self.span
        all_keys = torch.cat([context_keys, keys.to(context_keys.dtype)], dim=1)  # [H, T, d]
        scores = snapkv_scores(queries, all_keys, scaling=scale, kernel_size=self.kernel_size)
        self.scores[layer, :, start:end] = scores[:, start:end]


def observation_input(token_ids: Sequence[int], num_tokens: int, window: int) -> tuple[list[int], int]:
    """The window's token ids and the position of the first one (the last `window` of `num_tokens`)."""
    window = min(window, num_tokens)
    if len(token_ids) < num_tokens:
        raise ValueError(f"{len(token_ids)} token ids do not cover the {num_tokens} prefilled tokens")
    return list(token_ids[num_tokens - window : num_tokens]), num_tokens - window


class ObservationScorer:
    """Runs SnapKV's observation pass for one request and returns its scores.

    Same interface as `ReconstructionScorer` (the compressor calls either).
    """

    def __init__(self, *, window: int, kernel_size: int, forward: ForwardFn, num_kv_heads: int, device: torch.device) -> None:
        self.window = window
        self.kernel_size = kernel_size
        self.forward = forward
        self.num_kv_heads = num_kv_heads
        self.device = device
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
        """[L, H, scored_end] SnapKV scores of prompt positions [0, scored_end), layers in `layer_names` order.

        token_ids / block_ids: the request's tokens and blocks (at least its
        `num_tokens` prefill tokens, all in the cache).
        """
        started = time.perf_counter()
        input_ids, first_position = observation_input(token_ids, num_tokens, self.window)
        scores = torch.full(
            (len(layer_names), self.num_kv_heads, scored_end), float("nan"), dtype=torch.float32, device=self.device
        )
        metadata = ObservationMetadata(
            num_tokens=len(input_ids),
            block_ids=torch.tensor(list(block_ids), dtype=torch.int64, device=self.device),
            context_len=first_position,
            span=(0, scored_end),
            sink=(0, 0),
            scores=scores,
            layer_index={name: index for index, name in enumerate(layer_names)},
            kernel_size=self.kernel_size,
        )
        self.forward(input_ids, first_position, metadata)
        missing = set(layer_names) - metadata.layers_done
        if missing:
            raise RuntimeError(
                f"vllm-kvzip: {len(missing)} attention layers did not run SnapKV's observation pass "
                f"(e.g. {sorted(missing)[0]}); is vllm-kvzip's attention backend in use?"
            )
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)  # the pass's real cost, not its launch time
        self.total_seconds += time.perf_counter() - started
        self.total_passes += 1
        return scores
