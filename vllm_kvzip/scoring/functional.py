"""Pure tensor functions behind every scorer (no transformers, no vLLM).

The vLLM worker calls these with tensors it gathers from its own paged cache;
the transformers path (`vllm_kvzip.scoring.hf`) calls the same functions with
tensors captured from a Hugging Face forward pass, so both paths compute the
same numbers.

Shapes use H = KV heads, G = query heads per KV head (GQA group), d = head
dim, D = hidden size.  Queries are grouped as `[H, G, q, d]`: query head
`h * G + g` reads KV head `h`, as transformers' `repeat_kv` does.  Every
function takes POST-RoPE queries and keys (and, for Qwen3, post q_norm /
k_norm), i.e. exactly what the attention kernel sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class KVzipPlusTerms:
    """The extra inputs KVzip+ needs (KVzap paper, Eq. 3).

    values_chunk: [H, m, d] values of the scored chunk tokens.
    o_proj_weight: [D, H*G*d] the attention output projection (nn.Linear layout).
    hidden_norms: [q] L2 norm of the attention input (after input_layernorm) of every
        repeat-input token, i.e. of every query row.
    o_proj_gram: instead of o_proj_weight, its per-query-head Gram matrices
        [H, G, d, d] (`output_projection_gram`): all the norms need, D/d times smaller.
    """

    values_chunk: Tensor
    o_proj_weight: Tensor | None
    hidden_norms: Tensor
    o_proj_gram: Tensor | None = None


def output_projection_gram(o_proj_weight: Tensor, num_kv_heads: int, group_size: int) -> Tensor:
    """W_O^(qh)^T W_O^(qh) for every query head qh = h * G + g: [D, H*G*d] -> [H, G, d, d] (float32)."""
    hidden_size = o_proj_weight.shape[0]
    head_dim = o_proj_weight.shape[1] // (num_kv_heads * group_size)
    weight = o_proj_weight.float().view(hidden_size, num_kv_heads, group_size, head_dim)
    return torch.einsum("Dhgi,Dhgj->hgij", weight, weight)


def output_value_norms(
    values: Tensor, o_proj_weight: Tensor | None, group_size: int, *, gram: Tensor | None = None
) -> Tensor:
    """||W_O^(query head) v_i||_2 for every query head and value: [H, n, d] -> [H, G, n].

    W_O^(qh) is the slice of the output projection that multiplies the attention
    output of query head qh.  ||W v||^2 = v^T (W^T W) v, so we build the d x d Gram
    matrix per query head instead of the D x n product: O(G d^2 + G n d^2) memory
    O(G d^2) rather than O(G n D).  `gram` (from `output_projection_gram`) skips
    building it.
    """
    if gram is None:
        if o_proj_weight is None:
            raise ValueError("output_value_norms needs the output projection or its Gram matrices")
        gram = output_projection_gram(o_proj_weight, values.shape[0], group_size)  # [H, G, d, d]
    values32 = values.float()
    squared = torch.einsum("hni,hgij,hnj->hgn", values32, gram.float(), values32)
    return squared.clamp_min(0.0).sqrt()


def kvzip_plus_factors(plus: KVzipPlusTerms, group_size: int) -> tuple[Tensor, Tensor]:
    """KVzip+'s two factors of a weight a_ji: 1 / ||h_j|| per repeat query [q] and ||W_O^(qh) v_i||
    per query head and chunk value [H, G, m] (float32; the first is constant over keys, the
    second over queries, so a score may apply them before or after its max)."""
    value_norms = output_value_norms(plus.values_chunk, plus.o_proj_weight, group_size, gram=plus.o_proj_gram)
    inverse_hidden = 1.0 / plus.hidden_norms.float().clamp_min(torch.finfo(torch.float32).tiny)
    return inverse_hidden, value_norms


def kvzip_chunk_scores(
    queries: Tensor,
    keys_sink: Tensor,
    keys_chunk: Tensor,
    keys_repeat: Tensor,
    *,
    scaling: float,
    plus: KVzipPlusTerms | None = None,
    score_rows: tuple[int, int] | None = None,
    max_elements: int = 2**24,
) -> Tensor:
    """KVzip reconstruction scores of one context chunk: [H, m] (float32).

    queries: [H, G, q, d] queries of the repeat input (instruction, overlap tokens,
        chat postfix, then the chunk itself), positioned after the whole context.
    keys_sink: [H, s, d] keys always inside the softmax (the system prompt).
    keys_chunk: [H, m, d] keys of the chunk being scored.
    keys_repeat: [H, q, d] keys of the repeat input itself (causal block).

    As in snu-mllab/KVzip (attention/score.py) the softmax is normalised over
    [sink | chunk | repeat (causal)] only, the chunk's columns are kept and the
    score is the max over all q repeat queries and the G query heads of the group.
    With `plus`, each weight a_ji is multiplied by ||W_O^(qh) v_i|| and divided
    by ||h_j|| before the max (KVzip+).  `score_rows=(start, end)` limits the max
    to those repeat rows (kvpress's KVzap targets use only the repeated prompt).

    Deviation: the reference takes the softmax in the model dtype (bf16); we
    take it in float32 so that the oracle does not depend on the dtype.
    Memory is O(G q (s + m + q)) per KV head: chunk x chunk, never context^2;
    KV heads are batched only while their logits stay under `max_elements`.
    """
    num_kv_heads, group_size, num_queries, _ = queries.shape
    num_sink, num_chunk = keys_sink.shape[1], keys_chunk.shape[1]
    if keys_repeat.shape[1] != num_queries:
        raise ValueError(f"keys_repeat has {keys_repeat.shape[1]} tokens but there are {num_queries} repeat queries")
    rows = slice(*score_rows) if score_rows is not None else slice(0, num_queries)
    # Repeat query j sees repeat key i only if i <= j.
    hidden_from = ~torch.ones(num_queries, num_queries, dtype=torch.bool, device=queries.device).tril()
    if plus is not None:
        inverse_hidden, value_norms = kvzip_plus_factors(plus, group_size)
    scores = torch.empty(num_kv_heads, num_chunk, dtype=torch.float32, device=queries.device)
    per_head = group_size * num_queries * (num_sink + num_chunk + num_queries)
    step = max(1, min(num_kv_heads, max_elements // max(1, per_head)))
    for first in range(0, num_kv_heads, step):
        heads = slice(first, min(first + step, num_kv_heads))
        keys = torch.cat([keys_sink[heads], keys_chunk[heads], keys_repeat[heads]], dim=1).float()  # [h, K, d]
        logits = torch.matmul(queries[heads].float(), keys[:, None].transpose(-1, -2)) * scaling  # [h, G, q, K]
        logits[..., num_sink + num_chunk :].masked_fill_(hidden_from, float("-inf"))
        weights = logits.softmax(dim=-1)[..., num_sink : num_sink + num_chunk]  # [h, G, q, m]
        if plus is not None:
            weights = weights * inverse_hidden[None, None, :, None] * value_norms[heads][:, :, None, :]
        scores[heads] = weights[:, :, rows].amax(dim=(1, 2))
    return scores


def snapkv_scores(
    window_queries: Tensor,
    keys: Tensor,
    *,
    scaling: float,
    kernel_size: int = 5,
    max_elements: int = 2**24,
) -> Tensor:
    """SnapKV scores of every key from an observation window: [H, T] (float32).

    window_queries: [H, G, w, d] queries of the last w tokens of the prompt, which
    are also the last w of the T keys (causal among themselves).  As kvpress's
    SnapKVPress: softmax over all keys, mean over the window queries, 1-D average
    pooling (`kernel_size`, zero padding kernel_size // 2, padding counted) along
    the keys before the window, mean over the GQA group; the window's own keys get
    the maximum score of their head (they are the observation).

    Deviation: kvpress gives the window the maximum over all heads of the layer;
    per head it is the same keep-set under every per-head budget, and the window
    is usually inside the always-kept dense tail anyway.
    Memory is O(G w T) per KV head; KV heads are batched only while their logits
    stay under `max_elements`.
    """
    num_kv_heads, group_size, window, _ = window_queries.shape
    total = keys.shape[1]
    if window > total:
        raise ValueError(f"observation window of {window} tokens is longer than the {total} keys")
    context = total - window
    causal = torch.ones(window, window, dtype=torch.bool, device=keys.device).tril()
    scores = torch.empty(num_kv_heads, total, dtype=torch.float32, device=keys.device)
    step = max(1, min(num_kv_heads, max_elements // max(1, group_size * window * total)))
    for first in range(0, num_kv_heads, step):
        heads = slice(first, min(first + step, num_kv_heads))
        count = heads.stop - heads.start
        logits = torch.einsum("hgwd,htd->hgwt", window_queries[heads].float(), keys[heads].float()) * scaling
        logits[..., context:].masked_fill_(~causal, float("-inf"))
        weights = logits.softmax(dim=-1)[..., :context].mean(dim=2)  # [h, G, T - w]
        if context > 0:
            pooled = F.avg_pool1d(
                weights.reshape(count * group_size, 1, -1), kernel_size, stride=1, padding=kernel_size // 2
            ).reshape(count, group_size, -1)[..., :context]
            context_scores = pooled.mean(dim=1)
            window_score = context_scores.amax(dim=-1, keepdim=True)
        else:
            context_scores = weights.new_zeros(count, 0)
            window_score = weights.new_ones(count, 1)
        scores[heads, :context] = context_scores
        scores[heads, context:] = window_score
    return scores


def streaming_scores(positions: Tensor, num_kv_heads: int, sink_tokens: int) -> Tensor:
    """StreamingLLM as scores: sinks first, then recency.  [H, n] (float32).

    The `sink_tokens` first positions of the sequence score +inf and every other
    token scores its position, so any top-k keeps the sinks and the newest tokens.
    """
    # torch.where, not a masked assignment: that one counts the mask's entries on the host.
    scores = torch.where(positions < sink_tokens, float("inf"), positions.float())
    return scores.expand(num_kv_heads, -1).clone()


def random_scores(positions: Tensor, num_kv_heads: int, *, seed: int, layer_idx: int) -> Tensor:
    """Seeded uniform scores [H, n] that depend only on (seed, layer, position, head).

    Hashing the position (instead of drawing a stream) makes the scores
    independent of how the prompt was split into prefill steps.
    """
    heads = torch.arange(num_kv_heads, device=positions.device, dtype=torch.int64)[:, None]
    mixed = (positions.to(torch.int64)[None, :] * 0x9E3779B1 + heads * 0x85EBCA77 + layer_idx * 0xC2B2AE3D + seed) & 0xFFFFFFFF
    # xorshift-multiply finaliser (murmur3 fmix32) to spread the bits.
    mixed = ((mixed ^ (mixed >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    mixed = ((mixed ^ (mixed >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    mixed = mixed ^ (mixed >> 16)
    return mixed.float() / float(2**32)
