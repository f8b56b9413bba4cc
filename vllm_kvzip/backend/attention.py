"""vllm-kvzip's attention backend on CUDA, registered as AttentionBackendEnum.CUSTOM.

The backend / metadata builder / impl triad of vLLM's own backends:

* `KVzipAttentionBackend`: TRITON_ATTN's shapes and checks, with the KV cache
  always HND (`[num_blocks, num_kv_heads, block_size, 2 * head_size]`, one
  contiguous head page per (block, KV head)).
* `KVzipAttentionMetadataBuilder`: asks vLLM for decode-first batches, gathers
  the decode rows' page layout from the worker's `RaggedPageTable` into
  persistent buffers (so full CUDA graphs of decode batches replay it), and
  builds the dense backend's metadata for the prefill rows.
* `KVzipAttentionImpl`: decode rows -> `ragged_decode_attention` (Triton,
  ragged head pages + dense tail over the whole cache of all layers, since
  head pages are packed across layers; an uncompressed row is all dense tail);
  prefill rows -> the dense backend (FlashAttention-3 where vLLM has it, else
  TRITON_ATTN), whose KV-cache write is used for every row; KVzip's
  reconstruction forwards (`ReconstructionMetadata`, no slot mapping) ->
  `reconstruction_attention`, the torch code the CPU backend shares.
"""

from __future__ import annotations

import inspect
import os

import torch

from vllm_kvzip.adapter.attention_api import (
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    current_vllm_config,
    dense_backend,
    slice_common_metadata,
    triton_backend,
)
from vllm_kvzip.adapter.engine import kv_compression_config
from vllm_kvzip.backend.common import KVzipAttentionMetadata, RowGatherBuffers, count_decode_rows
from vllm_kvzip.backend.ops import ragged_decode_attention
from vllm_kvzip.backend.reconstruction import ReconstructionMetadata, reconstruction_attention
from vllm_kvzip.backend.state import get_state, install_state

_TritonBackend, _TritonBuilder, _TritonImpl, _TritonMetadata = triton_backend()

# Which vLLM backend runs the prefill rows: FLASH_ATTN (FA3) when available.
PREFILL_BACKEND_ENV = "VLLM_KVZIP_PREFILL_BACKEND"


def _dense_triad(dtype=None):
    """The prefill backend for the model's dtype (FlashAttention has no float32)."""
    if dtype is None:
        model_config = getattr(current_vllm_config(), "model_config", None)
        dtype = getattr(model_config, "dtype", None)
    return dense_backend(os.environ.get(PREFILL_BACKEND_ENV), dtype)


class KVzipAttentionMetadataBuilder(AttentionMetadataBuilder):
    # Full CUDA graphs for pure-decode batches; prefills run piecewise (eager attention).
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decode rows first: they take the ragged kernel, the rest the dense path.
        self._init_reorder_batch_threshold(1)
        _, dense_builder_cls, _ = _dense_triad(vllm_config.model_config.dtype)
        self.dense_builder = dense_builder_cls(kv_cache_spec, layer_names, vllm_config, device)
        self.compression = kv_compression_config(vllm_config)
        state = install_state(self.compression, kv_cache_spec, layer_names, vllm_config, device)
        from vllm_kvzip.backend.ops.decode_attention import RaggedDecodeWorkspace

        state.decode_workspace = RaggedDecodeWorkspace(
            max_rows=state.table.num_slots - 1,
            num_q_heads=vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config),
            head_size=kv_cache_spec.head_size,
            num_kv_heads=kv_cache_spec.num_kv_heads,
            device=device,
        )
        self.rows = RowGatherBuffers(state, state.table.num_slots - 1)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> KVzipAttentionMetadata:
        metadata = common_attn_metadata
        num_rows = metadata.num_reqs
        num_decode_rows, num_decode_tokens = count_decode_rows(metadata.query_start_loc_cpu, num_rows)
        decode = None
        if num_decode_rows:
            self.rows.gather(self.rows.state.step.request_ids, num_decode_rows, num_decode_rows)
            decode = self.rows.rows(num_decode_rows, metadata.seq_lens, metadata.block_table_tensor)
        prefill = None
        if num_decode_rows < num_rows:
            dense_metadata = (
                metadata
                if num_decode_rows == 0
                else slice_common_metadata(metadata, num_decode_rows, num_rows, num_decode_tokens)
            )
            prefill = self.dense_builder.build(0, dense_metadata, fast_build)
        return KVzipAttentionMetadata(
            num_actual_tokens=metadata.num_actual_tokens,
            slot_mapping=metadata.slot_mapping,
            num_decode_rows=num_decode_rows,
            num_decode_tokens=num_decode_tokens,
            decode=decode,
            prefill=prefill,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata) -> KVzipAttentionMetadata:
        # Captured with dense rows; replays read whatever build() gathered into the same buffers.
        return self.build(0, common_attn_metadata)


class KVzipAttentionImpl(AttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        _, _, dense_impl_cls = _dense_triad()
        # The layer passes what TRITON_ATTN (our backend's base) accepts; keep
        # only the keyword arguments the dense backend's impl takes.
        accepted = inspect.signature(dense_impl_cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            kwargs = {key: value for key, value in kwargs.items() if key in accepted}
        self.dense = dense_impl_cls(*args, **kwargs)
        self.num_heads = self.dense.num_heads
        self.num_kv_heads = self.dense.num_kv_heads
        self.head_size = self.dense.head_size
        self.scale = self.dense.scale
        self.layer_index: int | None = None

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        hook = getattr(self.dense, "process_weights_after_loading", None)
        if hook is not None:
            hook(act_dtype)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        self.dense.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-kvzip: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output
        if isinstance(attn_metadata, ReconstructionMetadata):  # KVzip's scoring pass (eager, no KV writes)
            return reconstruction_attention(
                layer.layer_name, query, key, value, kv_cache, attn_metadata, self.scale, output
            )
        state = get_state()
        if self.layer_index is None:
            self.layer_index = state.layer_index[layer.layer_name]
        decode_tokens = attn_metadata.num_decode_tokens
        if attn_metadata.decode is not None:
            rows = attn_metadata.decode
            # Head pages may lie in any layer's share of a block: the kernel reads the whole cache.
            ragged_decode_attention(
                query[:decode_tokens],
                state.kv_cache,
                rows.block_table,
                rows.seq_lens,
                rows.dense_start,
                rows.kept_len[:, self.layer_index],
                rows.page_start[:, self.layer_index],
                self.scale,
                out=output[:decode_tokens],
                workspace=state.decode_workspace,
                layer=self.layer_index,
                num_layers=state.num_layers,
            )
        if attn_metadata.prefill is not None:
            end = attn_metadata.num_actual_tokens
            self.dense.forward(
                layer,
                query[decode_tokens:end],
                key[decode_tokens:end] if key is not None else None,
                value[decode_tokens:end] if value is not None else None,
                kv_cache,
                attn_metadata.prefill,
                output[decode_tokens:end],
            )
        return output


class KVzipAttentionBackend(_TritonBackend):
    forward_includes_kv_cache_update = False

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
            return (0, 1, 2, 3, 4)
        return (0, 1, 2, 3)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in (64, 128)

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"
