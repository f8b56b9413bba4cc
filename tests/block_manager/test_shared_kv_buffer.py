"""One KV buffer for all layers: vLLM's per-layer allocation replaced, the worker's whole-cache view."""

from __future__ import annotations

import pytest
import torch

from tests.scheduler_harness import HEAD_SIZE, NUM_KV_HEADS, NUM_LAYERS

BLOCK = 16
NUM_BLOCKS = 10


def _kv_cache_config(spec, layer_names, groups=None):
    from vllm.v1.core.kv_cache_utils import create_kv_cache_group_specs
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor

    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * NUM_BLOCKS, shared_by=[n]) for n in layer_names],
        kv_cache_groups=groups or create_kv_cache_group_specs({name: spec for name in layer_names}, [layer_names]),
    )


def _specs():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvzip.block_manager.vllm_manager import KVzipAttentionSpec
    from vllm_kvzip.config import KVCompressionConfig

    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    return full, KVzipAttentionSpec.from_full_attention(full, KVCompressionConfig.parse("streaming"))


def _state(layer_names):
    from vllm_kvzip.backend.state import WorkerCompressionState
    from vllm_kvzip.config import KVCompressionConfig

    return WorkerCompressionState(
        KVCompressionConfig.parse("streaming"), layer_names, NUM_KV_HEADS, HEAD_SIZE, BLOCK, 4, torch.device("cpu")
    )


def _layer_views(raw: dict, layer_names) -> dict:
    """What vLLM's reshape makes of the raw tensors (HND: [NB, H, bs, 2D], contiguous)."""
    return {
        name: raw[name].view(torch.float32).view(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD_SIZE) for name in layer_names
    }


def test_layers_are_consecutive_slices_of_one_buffer_of_vllms_size():
    from vllm_kvzip.adapter.kv_cache_api import allocate_shared_kv_buffer

    _, spec = _specs()
    layer_names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    config = _kv_cache_config(spec, layer_names)
    assert config.kv_cache_groups[0].kv_cache_spec.num_layers == NUM_LAYERS  # merged by vLLM's own code
    raw = allocate_shared_kv_buffer(config, torch.device("cpu"))
    assert list(raw) == layer_names
    layer_bytes = spec.page_size_bytes * NUM_BLOCKS
    assert sum(tensor.numel() for tensor in raw.values()) == sum(t.size for t in config.kv_cache_tensors)
    base = raw[layer_names[0]].data_ptr()
    for index, name in enumerate(layer_names):
        assert raw[name].dtype == torch.int8 and raw[name].numel() == layer_bytes
        assert raw[name].data_ptr() == base + index * layer_bytes
        assert raw[name].untyped_storage().data_ptr() == raw[layer_names[0]].untyped_storage().data_ptr()

    # The worker views the whole cache: flat block l * NB + b is layer l's block b.
    state = _state(layer_names)
    views = _layer_views(raw, layer_names)
    state.attach_kv_cache(views)
    assert state.kv_cache.shape == (NUM_LAYERS * NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD_SIZE)
    assert state.num_blocks_per_layer == NUM_BLOCKS
    views[layer_names[2]][7, 1, 3, 5] = 42.0
    assert state.kv_cache[2 * NUM_BLOCKS + 7, 1, 3, 5] == 42.0
    state.kv_cache[3 * NUM_BLOCKS + 0, 0, 0, 0] = -1.0
    assert views[layer_names[3]][0, 0, 0, 0] == -1.0


def test_layers_not_in_one_buffer_are_refused():
    _, spec = _specs()
    layer_names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    state = _state(layer_names)
    separate = {name: torch.zeros(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * HEAD_SIZE) for name in layer_names}
    with pytest.raises(RuntimeError, match="not slice 1 of one shared buffer"):
        state.attach_kv_cache(separate)
    # One buffer, but the layers in another order than the worker's.
    from vllm_kvzip.adapter.kv_cache_api import allocate_shared_kv_buffer

    raw = allocate_shared_kv_buffer(_kv_cache_config(spec, list(reversed(layer_names))), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="shared buffer"):
        state.attach_kv_cache(_layer_views(raw, layer_names))


def test_allocation_refuses_layouts_the_scheduler_does_not_assume():
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    from vllm_kvzip.adapter.kv_cache_api import allocate_shared_kv_buffer

    full, spec = _specs()
    names = ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="one KV cache group"):
        allocate_shared_kv_buffer(_kv_cache_config(full, names), torch.device("cpu"))
    two_groups = [KVCacheGroupSpec(names[:2], spec), KVCacheGroupSpec(names[2:], spec)]
    with pytest.raises(RuntimeError, match="one KV cache group"):
        allocate_shared_kv_buffer(_kv_cache_config(spec, names, groups=two_groups), torch.device("cpu"))


def test_worker_refuses_a_spec_that_stands_for_other_layers():
    from types import SimpleNamespace

    from vllm_kvzip.backend.state import install_state
    from vllm_kvzip.config import KVCompressionConfig

    _, spec = _specs()
    vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4), model_config=None)
    with pytest.raises(RuntimeError, match="stands for 1 layers but the attention group has 2"):
        install_state(KVCompressionConfig.parse("streaming"), spec, ["a", "b"], vllm_config, "cpu")
