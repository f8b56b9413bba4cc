"""vLLM 0.26.0 scheduler-side KV-cache classes that vllm-kvzip builds on."""

from __future__ import annotations

from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: F401  (re-exported)
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager  # noqa: F401
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: F401
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry


def register_spec(spec_cls, manager_cls) -> None:
    """Register a FullAttentionSpec subclass and its manager (grouped with full attention).

    The registry fills in vLLM's built-in specs only while it is empty, so they
    must be registered before ours.
    """
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=FullAttentionSpec)


def install_kv_cache_hooks() -> None:
    """Make compressed layers report KVzipAttentionSpec and tell its manager about admissions."""
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention, "_vllm_kvzip_hooked", False):
        return
    from vllm_kvzip.adapter.engine import kv_compression_config
    from vllm_kvzip.block_manager.vllm_manager import KVzipAttentionSpec, KVzipManager
    from vllm_kvzip.adapter.runner_hooks import freed_block_ranges_of
    from vllm_kvzip.config import request_keep_ratio, request_uses_threshold

    original_get_kv_cache_spec = Attention.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = original_get_kv_cache_spec(self, vllm_config)
        config = kv_compression_config(vllm_config)
        if config.enabled and type(spec) is FullAttentionSpec:
            spec = KVzipAttentionSpec.from_full_attention(spec, config)
        return spec

    original_allocate_slots = KVCacheManager.allocate_slots

    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        if request.num_computed_tokens == 0:
            # (Re)admission: the prefill that follows covers request.num_tokens
            # tokens (prompt, plus generated tokens after a preemption).
            for manager in self.coordinator.single_type_managers:
                if isinstance(manager, KVzipManager):
                    extra_args = getattr(request.sampling_params, "extra_args", None)
                    ratio = request_keep_ratio(manager.compression, extra_args)
                    threshold = request_uses_threshold(manager.compression, extra_args)
                    manager.note_admission(request.request_id, request.num_tokens, ratio, threshold_mode=threshold)
        return original_allocate_slots(self, request, num_new_tokens, *args, **kwargs)

    from vllm.v1.core.sched.scheduler import Scheduler

    original_update_from_output = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        # Threshold mode: the worker decided which blocks its compaction emptied.
        # Free them before vLLM processes the step (which may finish the request).
        ranges = freed_block_ranges_of(model_runner_output)
        if ranges:
            for manager in self.kv_cache_manager.coordinator.single_type_managers:
                if isinstance(manager, KVzipManager):
                    for request_id, report in ranges.items():
                        manager.free_worker_ranges(
                            request_id, report["admission"], report["ranges"], report["kept_entries"]
                        )
        return original_update_from_output(self, scheduler_output, model_runner_output)

    Attention.get_kv_cache_spec = get_kv_cache_spec
    KVCacheManager.allocate_slots = allocate_slots
    Scheduler.update_from_output = update_from_output
    Attention._vllm_kvzip_hooked = True


def install_shared_kv_buffer() -> None:
    """With compression on, allocate every layer's KV cache as a slice of one buffer (layer-major).

    vLLM 0.26's `GPUModelRunner._allocate_kv_cache_tensors` (the CPU runner
    inherits it) gives each layer its own int8 tensor of `NB * page_size`
    bytes.  Here the same bytes come from one buffer instead: layer l's raw
    tensor is `buffer[l * layer_bytes : (l + 1) * layer_bytes]`, so vLLM's
    reshape still makes an ordinary contiguous `[NB, H, bs, 2 * head_size]`
    tensor per layer (dense prefill paths see no change), and the plugin can
    view the whole cache as `[L * NB, H, bs, 2 * head_size]` and pack a
    request's head pages across layers (docs/design.md).  The total is what
    vLLM would have allocated.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._allocate_kv_cache_tensors, "_vllm_kvzip_hooked", False):
        return
    original = GPUModelRunner._allocate_kv_cache_tensors

    def _allocate_kv_cache_tensors(self, kv_cache_config):
        from vllm_kvzip.adapter.engine import kv_compression_config

        if not kv_compression_config(self.vllm_config).enabled:
            return original(self, kv_cache_config)
        return allocate_shared_kv_buffer(kv_cache_config, self.device)

    _allocate_kv_cache_tensors._vllm_kvzip_hooked = True
    GPUModelRunner._allocate_kv_cache_tensors = _allocate_kv_cache_tensors


def allocate_shared_kv_buffer(kv_cache_config, device) -> dict:
    """Layer name -> int8 slice of one zeroed buffer, in the KV cache group's layer order.

    Only the layout the plugin's scheduler side assumes is accepted: one KV
    cache group of `KVzipAttentionSpec` layers, one unshared, unpacked tensor
    per layer, all of one size.  Anything else raises: the scheduler would free
    blocks whose head pages the worker could not place.
    """
    import torch

    from vllm_kvzip.block_manager.vllm_manager import KVzipAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, KVzipAttentionSpec):
        raise RuntimeError(
            "vllm-kvzip: KV compression needs every attention layer in one KV cache group of full attention; "
            f"got {len(groups)} group(s) of {[type(group.kv_cache_spec).__name__ for group in groups]}"
        )
    size_of: dict[str, int] = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        if tensor.block_stride or len(tensor.shared_by) != 1:
            raise RuntimeError("vllm-kvzip: KV compression needs one unshared, unpacked KV cache tensor per layer")
        size_of[tensor.shared_by[0]] = tensor.size
    layer_names = list(groups[0].layer_names)
    if set(layer_names) != set(size_of) or len(set(size_of.values())) != 1:
        raise RuntimeError("vllm-kvzip: KV compression needs one KV cache tensor of one size for every layer of the group")
    layer_bytes = size_of[layer_names[0]]
    buffer = torch.zeros(layer_bytes * len(layer_names), dtype=torch.int8, device=device)
    return {name: buffer[index * layer_bytes : (index + 1) * layer_bytes] for index, name in enumerate(layer_names)}
