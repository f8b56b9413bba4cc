"""KV-cache kernels of vllm-kvzip: ragged decode attention, in-place compaction, KVzap score recording.

Entry points pick the implementation from the tensors' device: Triton for
CUDA tensors, the plain-torch reference (``reference.py``, also the CPU
production path) otherwise.  ``use_triton=True`` forces Triton, which on a
CPU tensor needs ``TRITON_INTERPRET=1`` set before Triton is imported (tests).
Triton modules are imported lazily so the CPU path works without Triton.

Layout of the cache (one buffer for all layers, pages packed across layers)
and of the per-row metadata: see ``reference.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_kvzip.backend.ops.reference import (
    compact_kv_ref,
    gather_head_kv,
    ragged_attention_ref,
    ragged_decode_attention_ref,
    record_scores_ref,
    virtual_token_slots,
)

if TYPE_CHECKING:
    from vllm_kvzip.backend.ops.decode_attention import RaggedDecodeWorkspace

__all__ = [
    "RaggedDecodeWorkspace",
    "compact_kv",
    "compact_kv_ref",
    "gather_head_kv",
    "ragged_attention_ref",
    "ragged_decode_attention",
    "ragged_decode_attention_ref",
    "record_scores",
    "record_scores_ref",
    "virtual_token_slots",
]


def __getattr__(name: str) -> Any:
    # RaggedDecodeWorkspace lives with the Triton kernel; import it on first use.
    if name == "RaggedDecodeWorkspace":
        from vllm_kvzip.backend.ops.decode_attention import RaggedDecodeWorkspace

        return RaggedDecodeWorkspace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ragged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    kept_len: torch.Tensor,
    page_start: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    workspace: "RaggedDecodeWorkspace | None" = None,
    use_triton: bool | None = None,
    num_splits: int | None = None,
    *,
    layer: int,
    num_layers: int,
) -> torch.Tensor:
    """Decode attention of ``layer`` over ragged pages + dense tail; writes and returns ``out``.

    ``kv_cache`` is the whole cache of all ``num_layers`` layers
    ``[L * NB, H, bs, 2 * head_size]``; ``kept_len`` / ``page_start`` are the
    layer's ``[rows, H]`` entries (pages numbered over every layer).

    Triton when ``use_triton`` (default: ``query.is_cuda``), which needs a
    ``workspace`` (``RaggedDecodeWorkspace``, allocate it once; one is made on
    the fly if None, which is not CUDA-graph safe); else the torch reference.
    """
    if out is None:
        out = torch.empty_like(query)
    if use_triton is None:
        use_triton = query.is_cuda
    if not use_triton:
        return ragged_decode_attention_ref(
            query, kv_cache, block_table, seq_lens, dense_start, kept_len, page_start, scale, out=out,
            layer=layer, num_layers=num_layers,
        )
    from vllm_kvzip.backend.ops.decode_attention import RaggedDecodeWorkspace
    from vllm_kvzip.backend.ops.decode_attention import ragged_decode_attention as triton_decode

    if workspace is None:
        workspace = RaggedDecodeWorkspace(query.shape[0], query.shape[1], query.shape[2], device=query.device)
    return triton_decode(
        query, kv_cache, block_table, seq_lens, dense_start, kept_len, page_start, scale, out, workspace,
        num_splits=num_splits, layer=layer, num_layers=num_layers,
    )


def compact_kv(
    kv_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    use_triton: bool | None = None,
    scratch: torch.Tensor | None = None,
    num_staged: int | None = None,
) -> torch.Tensor:
    """Move flat token rows ``src_slots[i] -> dst_slots[i]`` in place (overlaps allowed).

    The sources of the first ``num_staged`` moves (default: all) are read
    before any destination is written, so one call may move rows across layers
    of the whole cache ``[L * NB, H, bs, 2D]``; the other moves' sources must
    not be destinations (they are copied directly, without scratch memory).

    Triton when ``use_triton`` (default: ``kv_cache.is_cuda``), else the torch
    reference; on CUDA caches ``VLLM_KVZIP_COMPACTION_KERNEL=cuda`` selects the
    CUDA kernel of csrc/ instead of Triton (``cuda_ops.compaction_kernel``).
    Returns ``kv_cache``.
    """
    if use_triton is None:
        use_triton = kv_cache.is_cuda
    if not use_triton:
        return compact_kv_ref(kv_cache, src_slots, dst_slots, num_staged)
    if kv_cache.is_cuda:
        from vllm_kvzip.backend.ops.cuda_ops import compact_kv_cuda, compaction_kernel

        if compaction_kernel() == "cuda":
            return compact_kv_cuda(kv_cache, src_slots, dst_slots, scratch=scratch, num_staged=num_staged)
    from vllm_kvzip.backend.ops.compaction import compact_kv as triton_compact

    return triton_compact(kv_cache, src_slots, dst_slots, scratch=scratch, num_staged=num_staged)


def record_scores(
    cache: torch.Tensor,
    scores: torch.Tensor,
    slot_mapping: torch.Tensor,
    heads: int,
    block_size: int,
    use_triton: bool | None = None,
) -> None:
    """Write ``scores [num_tokens, heads]`` into a layer's score cache at the tokens' KV slots.

    Triton when ``use_triton`` (default: ``cache.is_cuda``), else the torch
    reference (``record_scores_ref``, which defines the layout).
    """
    if use_triton is None:
        use_triton = cache.is_cuda
    if not use_triton:
        return record_scores_ref(cache, scores, slot_mapping, heads, block_size)
    from vllm_kvzip.backend.ops.score_record import record_scores as triton_record

    return triton_record(cache, scores, slot_mapping, heads, block_size)
