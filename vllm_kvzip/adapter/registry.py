"""Registration of vllm-kvzip's attention backends with vLLM's backend registry."""

from __future__ import annotations

from vllm_kvzip.adapter.vllm_api import is_cpu_platform

# Import paths, not classes: vLLM resolves them lazily in each process, and the
# CUDA backend must not be imported on a CPU-only machine.
GPU_BACKEND_PATH = "vllm_kvzip.backend.attention.KVzipAttentionBackend"
CPU_BACKEND_PATH = "vllm_kvzip.backend.cpu_attention.KVzipCPUAttentionBackend"


def register_attention_backends() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    # On GPUs the plugin is selected explicitly as the CUSTOM backend (the
    # engine hook sets --attention-backend CUSTOM when compression is on).
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND_PATH)
    if is_cpu_platform():
        # The CPU platform ignores any backend selection and always builds
        # CPU_ATTN, so the plugin takes over that slot.  The override is global
        # to the process: with compression off it is a pure pass-through.
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
