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
