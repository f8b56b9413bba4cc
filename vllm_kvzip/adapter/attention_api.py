"""vLLM 0.26.0 attention-backend classes that vllm-kvzip builds on.

Backend modules import vLLM attention internals from here only.  This module
imports CUDA-only code lazily (`triton_backend()`), so the CPU backend can
import it on a machine without a GPU.
"""

from __future__ import annotations

from vllm.v1.attention.backend import (  # noqa: F401  (re-exported)
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)


def triton_backend():
    """vLLM's TRITON_ATTN triad (backend, builder, impl, metadata)."""
    from vllm.v1.attention.backends import triton_attn

    return (
        triton_attn.TritonAttentionBackend,
        triton_attn.TritonAttentionMetadataBuilder,
        triton_attn.TritonAttentionImpl,
        triton_attn.TritonAttentionMetadata,
    )


def cpu_backend():
    """vLLM's CPU_ATTN triad (backend, builder, impl, metadata)."""
    from vllm.v1.attention.backends import cpu_attn

    return (
        cpu_attn.CPUAttentionBackend,
        cpu_attn.CPUAttentionMetadataBuilder,
        cpu_attn.CPUAttentionBackendImpl,
        cpu_attn.CPUAttentionMetadata,
    )


def current_vllm_config():
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


DENSE_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


def dense_backend(name: str | None = None, dtype=None):
    """(backend, builder, impl) of the vLLM backend that runs prefill rows.

    FLASH_ATTN (FlashAttention-3 on Hopper) when vLLM can load it and it supports
    the model's `dtype` (fp16 / bf16), else TRITON_ATTN (which also runs float32);
    `name` forces one of DENSE_BACKENDS.
    """
    if name not in (None, "", *DENSE_BACKENDS):
        raise ValueError(f"VLLM_KVZIP_PREFILL_BACKEND={name!r}; valid values: {', '.join(DENSE_BACKENDS)}")
    if name in (None, "", "FLASH_ATTN"):
        try:
            from vllm.v1.attention.backends import flash_attn

            backend = flash_attn.FlashAttentionBackend
            if name == "FLASH_ATTN" or dtype is None or dtype in backend.supported_dtypes:
                return backend, flash_attn.FlashAttentionMetadataBuilder, flash_attn.FlashAttentionImpl
        except Exception:
            if name == "FLASH_ATTN":
                raise
    backend, builder, impl, _ = triton_backend()
    return backend, builder, impl


def slice_common_metadata(metadata, first_row: int, end_row: int, first_token: int):
    """CommonAttentionMetadata of rows [first_row, end_row) (tokens from first_token on)."""
    from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

    token_end = int(metadata.query_start_loc_cpu[end_row])
    return _make_metadata_with_slice(UBatchSlice(slice(first_row, end_row), slice(first_token, token_end)), metadata)


def current_layer_metadata(layer_name: str):
    """The attention metadata vLLM's forward context holds for `layer_name` (None outside a forward)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, dict):
        return metadata.get(layer_name)
    return metadata
