"""vllm-kvzip's attention backend on the CPU platform (takes over CPU_ATTN).

vLLM's CPU platform always builds CPU_ATTN, so the plugin registers this class
in that slot for every engine in the process.  With compression off it must be
exactly vLLM's CPU backend: it only subclasses it.
"""

from __future__ import annotations

from vllm_kvzip.adapter.attention_api import cpu_backend

_CPUBackend, _CPUBuilder, _CPUImpl, _CPUMetadata = cpu_backend()


class KVzipCPUAttentionMetadataBuilder(_CPUBuilder):
    pass


class KVzipCPUAttentionImpl(_CPUImpl):
    pass


class KVzipCPUAttentionBackend(_CPUBackend):
    # get_name() stays "CPU_ATTN": the layer maps the name back to the enum slot.

    @staticmethod
    def get_impl_cls() -> type[KVzipCPUAttentionImpl]:
        return KVzipCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVzipCPUAttentionMetadataBuilder]:
        return KVzipCPUAttentionMetadataBuilder
