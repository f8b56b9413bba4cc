"""vllm-kvzip's attention backend on CUDA, registered as AttentionBackendEnum.CUSTOM.

Until the integration lands this is vLLM's TRITON_ATTN with one change that
the compressed layout needs: the KV cache is always laid out HND
(`[num_blocks, num_kv_heads, block_size, 2 * head_size]`, contiguous), so that
each (block, KV head) pair is one contiguous head page.
"""

from __future__ import annotations

from vllm_kvzip.adapter.attention_api import triton_backend

_TritonBackend, _TritonBuilder, _TritonImpl, _TritonMetadata = triton_backend()


class KVzipAttentionMetadataBuilder(_TritonBuilder):
    pass


class KVzipAttentionImpl(_TritonImpl):
    pass


class KVzipAttentionBackend(_TritonBackend):
    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to the enum member the backend is registered as.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KVzipAttentionImpl]:
        return KVzipAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVzipAttentionMetadataBuilder]:
        return KVzipAttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # Always HND: a head page must be contiguous whatever VLLM_KV_CACHE_LAYOUT says.
        if include_num_layers_dimension:
            return (1, 2, 0, 3, 4)
        return (0, 1, 2, 3)
