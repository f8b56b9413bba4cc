"""Drive vLLM 0.26.0's real Scheduler and KVCacheManager without a model.

The "model" samples token 7 for every request that finishes its prefill or
decodes, so the scheduler's own bookkeeping (admission, chunked prefill,
preemption, block freeing) runs exactly as in an engine.
"""

from __future__ import annotations

import itertools

import torch

NUM_LAYERS = 4
NUM_KV_HEADS = 2
HEAD_SIZE = 64


def build_scheduler(
    model: str,
    kv_compression: dict | None,
    num_blocks: int = 256,
    block_size: int = 16,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 16,
    max_model_len: int = 2048,
):
    import vllm_kvzip
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.kv_cache_utils import create_kv_cache_group_specs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheTensor
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_kvzip.adapter.engine import kv_compression_config
    from vllm_kvzip.block_manager.vllm_manager import KVzipAttentionSpec

    vllm_kvzip.register()
    engine_args = EngineArgs(
        model=model,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        enable_chunked_prefill=True,
        async_scheduling=False,
        enable_prefix_caching=False,
        additional_config={"kv_compression": kv_compression or {"method": "none"}},
    )
    vllm_config = engine_args.create_engine_config()
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float16)
    config = kv_compression_config(vllm_config)
    if config.enabled:
        spec = KVzipAttentionSpec.from_full_attention(spec, config)
    layer_names = [f"layers.{i}.self_attn" for i in range(NUM_LAYERS)]
    # One group of every layer, its spec merged by vLLM's own code (the merged
    # KVzipAttentionSpec counts the layers: head pages are packed across them).
    groups = create_kv_cache_group_specs({name: spec for name in layer_names}, [layer_names])
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=spec.page_size_bytes * num_blocks, shared_by=[n]) for n in layer_names],
        kv_cache_groups=groups,
    )
    scheduler = Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=True,
    )
    return scheduler


_request_ids = itertools.count()


def make_request(num_prompt_tokens: int, max_tokens: int, extra_args: dict | None = None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)
    request = Request(
        request_id=f"req-{next(_request_ids)}",
        prompt_token_ids=[(i % 500) + 10 for i in range(num_prompt_tokens)],
        sampling_params=params,
        pooling_params=None,
    )
    return request


def step(scheduler, engine_outputs: list | None = None):
    """One engine step: schedule, 'run the model', feed the output back. Returns the output.

    `engine_outputs` collects what the step hands to the front end (EngineCoreOutputs).
    """
    from vllm.v1.outputs import ModelRunnerOutput

    output = scheduler.schedule()
    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        # A token is sampled once the request has computed all its known tokens.
        done_prefill = request.num_computed_tokens >= request.num_tokens
        sampled.append([7] if done_prefill else [])
    runner_output = ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
    )
    outputs = scheduler.update_from_output(output, runner_output)
    if engine_outputs is not None:
        engine_outputs.extend(outputs.values())
    return output


def kvzip_manager(scheduler):
    from vllm_kvzip.block_manager.vllm_manager import KVzipManager

    managers = [m for m in scheduler.kv_cache_manager.coordinator.single_type_managers if isinstance(m, KVzipManager)]
    return managers[0] if managers else None


def free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
