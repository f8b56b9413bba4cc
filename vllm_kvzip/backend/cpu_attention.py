"""vllm-kvzip's attention backend on the CPU platform (takes over CPU_ATTN).

vLLM's CPU platform always builds CPU_ATTN, so the plugin registers this class
in that slot for every engine of the process:

* compression off: exactly vLLM's CPU backend (every method defers to it);
* compression on: a plain-torch path over vllm-kvzip's page layout -- KV
  written row by row (`[K | V]` per token, as on CUDA), every row of the batch
  attended by `ragged_attention_ref` over the whole cache of all layers (dense
  causal attention for prefills, ragged pages packed across layers + dense
  tail for compressed decodes).  It is the same reference
  code the Triton kernels are tested against, so CI exercises the real layout
  end to end through vLLM's engine.  KVzip's reconstruction forwards
  (`ReconstructionMetadata`) go to `reconstruction_attention`, shared with CUDA.
"""

from __future__ import annotations

import torch

from vllm_kvzip.adapter.attention_api import cpu_backend
from vllm_kvzip.adapter.engine import kv_compression_config
from vllm_kvzip.backend.common import KVzipAttentionMetadata, RowGatherBuffers
from vllm_kvzip.backend.ops.reference import flat_kv_rows, ragged_attention_ref
from vllm_kvzip.backend.reconstruction import ReconstructionMetadata, reconstruction_attention
from vllm_kvzip.backend.state import get_state, install_state

_CPUBackend, _CPUBuilder, _CPUImpl, _CPUMetadata = cpu_backend()


class KVzipCPUAttentionMetadataBuilder(_CPUBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.compression = kv_compression_config(vllm_config)
        if not self.compression.enabled:
            return
        state = install_state(self.compression, kv_cache_spec, layer_names, vllm_config, device)
        self.rows = RowGatherBuffers(state, state.table.num_slots - 1)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        if not self.compression.enabled:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata = common_attn_metadata
        num_rows = metadata.num_reqs
        self.rows.gather(self.rows.state.step.request_ids, num_rows, num_rows)
        return KVzipAttentionMetadata(
            num_actual_tokens=metadata.num_actual_tokens,
            slot_mapping=metadata.slot_mapping,
            num_decode_rows=0,
            num_decode_tokens=0,
            decode=self.rows.rows(num_rows, metadata.seq_lens, metadata.block_table_tensor),
            prefill=None,
            query_start_loc=metadata.query_start_loc[: num_rows + 1],
            seq_lens=metadata.seq_lens[:num_rows],
            block_table=metadata.block_table_tensor[:num_rows],
        )


class KVzipCPUAttentionImpl(_CPUImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm_kvzip.adapter.attention_api import current_vllm_config

        self.compression = kv_compression_config(current_vllm_config())
        self.layer_index: int | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.compression.enabled:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        write_kv_rows(kv_cache, key, value, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if not self.compression.enabled:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if isinstance(attn_metadata, ReconstructionMetadata):  # KVzip's scoring pass
            return reconstruction_attention(
                layer.layer_name, query, key, value, kv_cache, attn_metadata, self.scale, output
            )
        assert isinstance(attn_metadata, KVzipAttentionMetadata)
        layer_index = self._layer_index(layer)
        state = get_state()
        rows = attn_metadata.decode
        num_tokens = attn_metadata.num_actual_tokens
        # Head pages may lie in any layer's share of a block: attend over the whole cache.
        ragged_attention_ref(
            query[:num_tokens],
            attn_metadata.query_start_loc,
            state.kv_cache,
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            rows.dense_start,
            rows.kept_len[:, layer_index],
            rows.page_start[:, layer_index],
            self.scale,
            out=output[:num_tokens],
            layer=layer_index,
            num_layers=state.num_layers,
        )
        return output

    def _layer_index(self, layer) -> int:
        if self.layer_index is None:
            self.layer_index = get_state().layer_index[layer.layer_name]
        return self.layer_index


def write_kv_rows(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's `[K | V]` row at its flat slot; negative slots are padding."""
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    valid = slot_mapping >= 0
    rows = torch.cat([key, value], dim=-1).to(kv_cache.dtype)  # [tokens, H, 2D]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    blocks, offsets = slots // block_size, slots % block_size
    heads = torch.arange(num_kv_heads, device=slots.device)
    # Flat row of (block, head, offset) in the HND layout.
    flat = (blocks[:, None] * num_kv_heads + heads[None, :]) * block_size + offsets[:, None]
    flat_rows = flat_kv_rows(kv_cache)
    if bool(valid.all()):
        flat_rows[flat.reshape(-1)] = rows.reshape(-1, rows.shape[-1])
    else:
        flat_rows[flat[valid].reshape(-1)] = rows[valid].reshape(-1, rows.shape[-1])


class KVzipCPUAttentionBackend(_CPUBackend):
    # get_name() stays "CPU_ATTN": the layer maps the name back to the enum slot.

    @staticmethod
    def get_impl_cls() -> type[KVzipCPUAttentionImpl]:
        return KVzipCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVzipCPUAttentionMetadataBuilder]:
        return KVzipCPUAttentionMetadataBuilder
