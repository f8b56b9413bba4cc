"""Plain-torch reference implementations of the ragged-KV kernels.

These functions are the ground truth the Triton kernels are tested against,
and they are also the production implementation on the CPU platform, so they
are vectorised over heads and tokens (Python loops only run over request rows
and over chunks of a few thousand tokens).

KV cache layout (one buffer for all layers, "HND")
--------------------------------------------------
Every layer's cache is ``[NB, H, bs, 2 * head_size]``, contiguous, and the
layers lie one after another in one buffer, so the kernels take the whole
cache as ``kv_cache: [L * NB, H, bs, 2 * head_size]`` (``L = num_layers``):
*flat block* ``l * NB + b`` is layer ``l``'s share of vLLM's block ``b``.
``kv_cache[f, s, t]`` is the row ``[K | V]`` of one token; a *head page* is a
``(flat block f, head slot s)`` pair: ``bs`` consecutive rows.  The flat
token-slot index of ``(f, s, offset)`` is ``(f * H + s) * bs + offset`` into
``kv_cache.view(-1, 2 * head_size)``.  A call attends for one ``layer``.

Per request row ``r`` (all int32):

* ``block_table[r, j]``: physical block id of the row's logical block ``j``.
* ``seq_lens[r]``: logical length, including the current decode token(s).
* ``dense_start[r]`` (a multiple of ``bs``): the *dense* region holds logical
  positions ``[dense_start, seq_len)``; position ``p`` of KV head ``h`` is at
  flat block ``layer * NB + block_table[r, p // bs]``, slot ``h``, offset
  ``p % bs`` (vLLM's normal layout, in the layer's own share).
* ``kept_len[r, h]`` / ``page_start[r, h]`` (this layer's entries): the
  *ragged* region of KV head ``h`` keeps ``kept_len`` tokens; its ``j``-th
  token lives in global page ``P = page_start + j // bs`` at offset ``j % bs``.
  Pages are numbered over all (layer, head) pairs of the request; page ``P``
  is in container ``c = P // H``, head slot ``P % H``, and container ``c`` is
  flat block ``(c % L) * NB + block_table[r, c // L]``: a head's pages may lie
  in any layer's share of the request's first blocks.

The keys attended by KV head ``h`` form its *virtual sequence*: the ragged
tokens ``j = 0 .. kept_len - 1`` followed by the dense tokens.  Keys already
carry RoPE, so attention needs no positions except for causal masking among
several query tokens of one row (the query tokens are the last dense tokens).
"""

from __future__ import annotations

from typing import Callable

import torch

# Virtual positions gathered per step of the chunked softmax: bounds the fp32
# temporaries to about H * CHUNK * 2 * head_size * 4 bytes (8 MiB for 8 heads
# of 128), whatever the context length.
DEFAULT_CHUNK_TOKENS = 1024
# The batched decode path gathers [rows, H, chunk, 2 * head_size] at once: at
# most this many elements, however large the batch.  Measured on CPU: 1M
# (4 MiB of fp32, cache-sized) was 2x faster than 16M per token.
DECODE_CHUNK_ELEMENTS = 2**20


def flat_kv_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """View of the cache as ``[num_blocks * H * bs, 2 * head_size]`` token rows."""
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be [num_blocks, num_kv_heads, block_size, 2*head_size], got {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (HND layout)")
    return kv_cache.view(-1, kv_cache.shape[-1])


def blocks_per_layer(kv_cache: torch.Tensor, num_layers: int) -> int:
    """NB of a whole-cache tensor ``[L * NB, H, bs, 2D]``."""
    if num_layers < 1 or kv_cache.shape[0] % num_layers:
        raise ValueError(f"kv_cache has {kv_cache.shape[0]} blocks, not a multiple of num_layers {num_layers}")
    return kv_cache.shape[0] // num_layers


def batched_virtual_token_slots(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    block_size: int,
    start: int,
    length: int,
    *,
    layer: int,
    num_layers: int,
    num_blocks_per_layer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat slots of virtual positions ``[start, start + length)`` of every (row, KV head) of ``layer``.

    ``block_table [R, W]``, ``seq_lens / dense_start [R]``, ``kept_len /
    page_start [R, H]`` (the layer's entries).  Returns ``(slots [R, H, length]
    int64, valid [R, H, length] bool, logical_pos [R, H, length] int64)``.
    ``logical_pos`` is the logical position of dense tokens and -1 for ragged
    ones (they precede every query token, so they are always visible).
    Invalid entries (past the head's virtual length) hold slot 0 and must be
    masked by the caller.
    """
    device = block_table.device
    num_rows, num_kv_heads = kept_len.shape
    heads = torch.arange(num_kv_heads, device=device, dtype=torch.int64)[None, :, None]
    virtual_pos = torch.arange(start, start + length, device=device, dtype=torch.int64)[None, None, :]
    kept = kept_len.to(device=device, dtype=torch.int64)[:, :, None]
    first_page = page_start.to(device=device, dtype=torch.int64)[:, :, None]
    row_dense_start = dense_start.to(device=device, dtype=torch.int64)[:, None, None]
    dense_len = (seq_lens.to(device=device, dtype=torch.int64)[:, None, None] - row_dense_start).clamp_(min=0)

    is_ragged = virtual_pos < kept
    valid = virtual_pos < kept + dense_len

    # Ragged token j = virtual_pos: global page -> container -> (block, layer share, slot).
    linear_page = first_page + virtual_pos // block_size
    container = linear_page // num_kv_heads
    # Dense token: logical position p, vLLM's own paging for head h in this layer's share.
    logical_pos = row_dense_start + (virtual_pos - kept)
    table_index = torch.where(is_ragged, container // num_layers, logical_pos // block_size)
    table_index = torch.where(valid, table_index, torch.zeros_like(table_index))
    table_index = table_index.clamp_(0, block_table.shape[1] - 1)
    block = block_table.to(torch.int64).gather(1, table_index.view(num_rows, -1)).view(table_index.shape)
    share = torch.where(is_ragged, container % num_layers, torch.full_like(container, layer))
    flat_block = share * num_blocks_per_layer + block
    head_slot = torch.where(is_ragged, linear_page % num_kv_heads, heads)
    # Both regions start page-aligned, so the in-page offset is the same formula.
    offset = torch.where(is_ragged, virtual_pos % block_size, logical_pos % block_size)

    slots = (flat_block * num_kv_heads + head_slot) * block_size + offset
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    logical_pos = torch.where(is_ragged, torch.full_like(logical_pos, -1), logical_pos)
    return slots, valid, logical_pos


def virtual_token_slots(
    block_table_row: torch.Tensor,
    seq_len: int,
    dense_start: int,
    kept_len_row: torch.Tensor,
    page_start_row: torch.Tensor,
    num_kv_heads: int,
    block_size: int,
    start: int,
    length: int,
    *,
    layer: int,
    num_layers: int,
    num_blocks_per_layer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batched_virtual_token_slots`` for one row: returns ``[H, length]`` tensors."""
    device = block_table_row.device
    if kept_len_row.shape[0] != num_kv_heads:
        raise ValueError(f"kept_len_row has {kept_len_row.shape[0]} heads, expected {num_kv_heads}")
    slots, valid, logical_pos = batched_virtual_token_slots(
        block_table_row[None, :],
        torch.tensor([seq_len], device=device),
        torch.tensor([dense_start], device=device),
        kept_len_row[None, :],
        page_start_row[None, :],
        block_size,
        start,
        length,
        layer=layer,
        num_layers=num_layers,
        num_blocks_per_layer=num_blocks_per_layer,
    )
    return slots[0], valid[0], logical_pos[0]


def gather_head_kv(
    kv_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    seq_len: int,
    dense_start: int,
    kept_len_row: torch.Tensor,
    page_start_row: torch.Tensor,
    head: int,
    *,
    layer: int,
    num_layers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one KV head of ``layer`` for one row, in virtual order, as dense tensors.

    ``kv_cache``: the whole cache ``[L * NB, H, bs, 2D]``; ``kept_len_row`` /
    ``page_start_row``: the layer's ``[H]`` entries.  Returns ``(keys [n,
    head_size], values [n, head_size])`` with ``n = kept_len[head] + seq_len -
    dense_start``, in the cache dtype.
    """
    num_kv_heads, block_size, head_size = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    length = int(kept_len_row[head]) + max(int(seq_len) - int(dense_start), 0)
    slots, _, _ = virtual_token_slots(
        block_table_row, int(seq_len), int(dense_start), kept_len_row, page_start_row,
        num_kv_heads, block_size, 0, length,
        layer=layer, num_layers=num_layers, num_blocks_per_layer=blocks_per_layer(kv_cache, num_layers),
    )
    rows = flat_kv_rows(kv_cache)[slots[head]]
    return rows[:, :head_size], rows[:, head_size:]


def ragged_attention_ref(
    query: torch.Tensor,
    query_start_loc: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    *,
    layer: int,
    num_layers: int,
) -> torch.Tensor:
    """Attention of several query tokens per row over ragged pages + dense tail, for ``layer``.

    ``query: [num_tokens, num_q_heads, head_size]``; the query tokens of row
    ``r`` are ``query[query_start_loc[r] : query_start_loc[r + 1]]`` and sit at
    the last logical positions ``seq_len - q_len .. seq_len - 1`` (their K/V is
    already in the dense region).  Query token ``i`` sees every ragged token
    and the dense tokens at logical positions ``<= seq_len - q_len + i``.
    Softmax in fp32; a query that sees no key gets a zero output.
    Returns ``out [num_tokens, num_q_heads, head_size]`` in the query dtype.
    Rows with one query token are batched through
    ``ragged_decode_attention_ref``; the others are processed one by one.
    ``kv_cache`` is the whole cache ``[L * NB, H, bs, 2D]``, ``kept_len`` /
    ``page_start`` the layer's ``[rows, H]`` entries.
    """
    num_tokens, num_q_heads, head_size = query.shape
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    layer_blocks = blocks_per_layer(kv_cache, num_layers)
    if kv_cache.shape[3] != 2 * head_size:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[3]} != 2 * head_size {2 * head_size}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    kv_rows = flat_kv_rows(kv_cache)

    # One host copy of the small per-row metadata (this is the CPU path).
    starts = query_start_loc.tolist()
    num_rows = len(starts) - 1
    seq_lens_host = seq_lens[:num_rows].tolist()
    dense_start_host = dense_start[:num_rows].tolist()
    max_kept_host = kept_len[:num_rows].max(dim=1).values.tolist() if kept_len.numel() else [0] * num_rows

    # Rows with one query token (decodes) go through the batched decode path
    # together; the others (prefills, multi-token steps) one by one below.
    decode_rows = [row for row in range(num_rows) if starts[row + 1] - starts[row] == 1]
    if len(decode_rows) > 1:
        rows_index = torch.tensor(decode_rows, device=query.device)
        tokens_index = torch.tensor([starts[row] for row in decode_rows], device=query.device)
        metadata_index = rows_index.to(block_table.device)
        out[tokens_index] = ragged_decode_attention_ref(
            query[tokens_index], kv_cache, block_table[metadata_index], seq_lens[metadata_index],
            dense_start[metadata_index], kept_len[metadata_index], page_start[metadata_index], scale,
            layer=layer, num_layers=num_layers,
        )
    batched = set(decode_rows) if len(decode_rows) > 1 else set()
    one_by_one = [row for row in range(num_rows) if row not in batched]

    for row in one_by_one:
        first_token, end_token = starts[row], starts[row + 1]
        q_len = end_token - first_token
        if q_len == 0:
            continue
        seq_len, row_dense_start = int(seq_lens_host[row]), int(dense_start_host[row])
        dense_len = max(seq_len - row_dense_start, 0)
        virtual_len = int(max_kept_host[row]) + dense_len

        # [H, G, q_len, D] in fp32
        q = query[first_token:end_token].float().view(q_len, num_kv_heads, group, head_size).permute(1, 2, 0, 3)
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)  # [q_len]
        running_max = torch.full((num_kv_heads, group, q_len), float("-inf"), device=query.device)
        running_sum = torch.zeros((num_kv_heads, group, q_len), device=query.device)
        acc = torch.zeros((num_kv_heads, group, q_len, head_size), device=query.device)

        for chunk_start in range(0, virtual_len, chunk_tokens):
            chunk_len = min(chunk_tokens, virtual_len - chunk_start)
            slots, valid, logical_pos = virtual_token_slots(
                block_table[row], seq_len, row_dense_start, kept_len[row], page_start[row],
                num_kv_heads, block_size, chunk_start, chunk_len,
                layer=layer, num_layers=num_layers, num_blocks_per_layer=layer_blocks,
            )
            rows = kv_rows[slots].float()  # [H, C, 2D]
            # Zero what lies outside the head's sequence: padding slots may hold
            # garbage (even NaN) that would leak through 0 * NaN.
            rows = torch.where(valid[..., None], rows, torch.zeros((), device=rows.device))
            keys, values = rows[..., :head_size], rows[..., head_size:]
            scores = torch.einsum("hgqd,hcd->hgqc", q, keys) * scale
            visible = valid[:, None, None, :] & (logical_pos[:, None, None, :] <= query_pos[None, None, :, None])
            scores = scores.masked_fill(~visible, float("-inf"))
            running_max, running_sum, acc = _online_softmax_step(
                running_max, running_sum, acc, scores, lambda probs: torch.einsum("hgqc,hcd->hgqd", probs, values)
            )

        denom = torch.where(running_sum > 0, running_sum, torch.ones_like(running_sum))
        result = acc / denom[..., None]  # [H, G, q_len, D]
        out[first_token:end_token] = result.permute(2, 0, 1, 3).reshape(q_len, num_q_heads, head_size).to(out.dtype)
    return out


def ragged_decode_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    *,
    layer: int,
    num_layers: int,
) -> torch.Tensor:
    """Decode attention (one query token per row) over ragged pages + dense tail, for ``layer``.

    ``query: [num_rows, num_q_heads, head_size]``; query head ``qh`` uses KV
    head ``qh // (num_q_heads // num_kv_heads)``.  Every key is visible.  fp32
    accumulation; a head with no key at all (0 kept, empty dense region) gets
    a zero output.  Returns ``out`` (allocated when None) in the query dtype.

    All rows are processed together, ``chunk_tokens`` virtual positions at a
    time (default: as many as keep the gathered fp32 K/V of the chunk under
    ``DECODE_CHUNK_ELEMENTS``), so the Python overhead does not grow with the
    batch.
    """
    num_rows, num_q_heads, head_size = query.shape
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if kv_cache.shape[3] != 2 * head_size:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[3]} != 2 * head_size {2 * head_size}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    if num_rows == 0:
        return out
    kv_rows = flat_kv_rows(kv_cache)
    layer_blocks = blocks_per_layer(kv_cache, num_layers)
    seq_lens, dense_start = seq_lens[:num_rows], dense_start[:num_rows]
    kept_len, page_start, block_table = kept_len[:num_rows], page_start[:num_rows], block_table[:num_rows]

    dense_len = (seq_lens.long() - dense_start.long()).clamp(min=0)
    max_virtual_len = int((kept_len.long() + dense_len[:, None]).max())
    if chunk_tokens is None:
        chunk_tokens = max(block_size, DECODE_CHUNK_ELEMENTS // (num_rows * num_kv_heads * 2 * head_size))

    device = query.device
    q = query.float().view(num_rows, num_kv_heads, group, head_size)
    running_max = torch.full((num_rows, num_kv_heads, group), float("-inf"), device=device)
    running_sum = torch.zeros((num_rows, num_kv_heads, group), device=device)
    acc = torch.zeros((num_rows, num_kv_heads, group, head_size), device=device)
    for chunk_start in range(0, max_virtual_len, chunk_tokens):
        chunk_len = min(chunk_tokens, max_virtual_len - chunk_start)
        slots, valid, _ = batched_virtual_token_slots(
            block_table, seq_lens, dense_start, kept_len, page_start, block_size, chunk_start, chunk_len,
            layer=layer, num_layers=num_layers, num_blocks_per_layer=layer_blocks,
        )
        rows = kv_rows[slots]  # [R, H, C, 2D] in the cache dtype
        keys = rows[..., :head_size].float()
        # Padding slots may hold garbage (even NaN): their scores are replaced
        # by -inf below, but their values must be zeroed, or 0 * NaN leaks.
        values = torch.where(valid[..., None], rows[..., head_size:].float(), torch.zeros((), device=device))
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [R, H, G, C]
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        running_max, running_sum, acc = _online_softmax_step(
            running_max, running_sum, acc, scores, lambda probs: torch.matmul(probs, values)
        )

    denom = torch.where(running_sum > 0, running_sum, torch.ones_like(running_sum))
    out.copy_((acc / denom[..., None]).view(num_rows, num_q_heads, head_size))
    return out


def _online_softmax_step(
    running_max: torch.Tensor,
    running_sum: torch.Tensor,
    acc: torch.Tensor,
    scores: torch.Tensor,
    weigh_values: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one chunk of (masked, -inf) scores into the running softmax state.

    ``weigh_values(probs)`` returns the probability-weighted sum of the chunk's
    values, shaped like ``acc``.
    """
    new_max = torch.maximum(running_max, scores.amax(dim=-1))
    # A query that has seen no key yet keeps max -inf: shift by 0 instead so
    # that exp() gives 0, not NaN.
    safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    probs = torch.exp(scores - safe_max[..., None])
    correction = torch.exp(running_max - safe_max)
    running_sum = running_sum * correction + probs.sum(dim=-1)
    acc = acc * correction[..., None] + weigh_values(probs)
    return new_max, running_sum, acc


def compaction_moves(src_slots: torch.Tensor, dst_slots: torch.Tensor, num_staged: int | None) -> tuple[int, int]:
    """(number of moves, number staged) of a compaction, checked; every implementation's contract."""
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError(f"src_slots {tuple(src_slots.shape)} and dst_slots {tuple(dst_slots.shape)} must be equal 1-D shapes")
    num_moves = src_slots.shape[0]
    num_staged = num_moves if num_staged is None else num_staged
    if not 0 <= num_staged <= num_moves:
        raise ValueError(f"num_staged {num_staged} is outside 0..{num_moves}")
    return num_moves, num_staged


def compaction_scratch(kv_cache: torch.Tensor, num_staged: int, scratch: torch.Tensor | None) -> torch.Tensor:
    """The GPU kernels' staging buffer: `scratch` checked, or a new `[max(num_staged, 1), 2 * head_size]` one."""
    row_width = kv_cache.shape[-1]
    if scratch is None:
        return torch.empty((max(num_staged, 1), row_width), dtype=kv_cache.dtype, device=kv_cache.device)
    if scratch.shape[0] < num_staged or scratch.shape[1] != row_width or scratch.dtype != kv_cache.dtype or not scratch.is_contiguous():
        raise ValueError(f"scratch must be a contiguous [>= {num_staged}, {row_width}] {kv_cache.dtype} tensor")
    return scratch


def compact_kv_ref(
    kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor, num_staged: int | None = None
) -> torch.Tensor:
    """Move token rows ``src_slots[i] -> dst_slots[i]`` of the flat cache, in place.

    The first ``num_staged`` moves (all of them when None) are staged: their
    sources are all read before any destination is written (gather, then
    scatter), so they may overlap the destinations, as in an in-place
    compaction.  The other moves copy directly; their sources must not be
    destinations of any move (a compaction reads them from blocks it does not
    write, so they need no staging memory).  ``dst_slots`` must not repeat (a
    repeated destination gets an unspecified one of its sources).  Rows not
    named in ``dst_slots`` are left unchanged.  Returns ``kv_cache``.
    """
    num_moves, num_staged = compaction_moves(src_slots, dst_slots, num_staged)
    kv_rows = flat_kv_rows(kv_cache)
    if num_moves == 0:
        return kv_cache
    src = src_slots.to(device=kv_rows.device, dtype=torch.int64)
    dst = dst_slots.to(device=kv_rows.device, dtype=torch.int64)
    staged = kv_rows.index_select(0, src[:num_staged])
    if num_staged < num_moves:
        kv_rows.index_copy_(0, dst[num_staged:], kv_rows.index_select(0, src[num_staged:]))
    kv_rows.index_copy_(0, dst[:num_staged], staged)
    return kv_cache


def record_scores_ref(
    cache: torch.Tensor, scores: torch.Tensor, slot_mapping: torch.Tensor, heads: int, block_size: int
) -> None:
    """Write ``scores [num_tokens, heads]`` into a score cache at the tokens' KV slots, in place.

    A score cache is one layer's ``[NB * heads * block_size + heads]`` float
    entries laid out like that layer's KV cache: token ``t`` of KV head ``h``
    goes to ``(slot // bs * heads + h) * bs + slot % bs`` (``slot =
    slot_mapping[t]``).  Padding tokens (slot -1) write to the ``heads`` trash
    entries at the end, which nothing reads.
    """
    slots = slot_mapping.to(torch.int64)
    head_index = torch.arange(heads, device=slots.device)[None, :]
    index = ((slots // block_size)[:, None] * heads + head_index) * block_size + (slots % block_size)[:, None]
    trash = cache.numel() - heads + head_index
    index = torch.where(slots[:, None] >= 0, index, trash)
    cache.view(-1).index_copy_(0, index.reshape(-1), scores.reshape(-1).to(cache.dtype))
