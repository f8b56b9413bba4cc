"""KVzip's reconstruction pass as a forward of vLLM's own model (V1 model runner, vLLM 0.26.0).

`build_reconstruction_scorer(runner)` runs once after the model loads (before
its first, possibly compiled, forward) when the method is kvzip or kvzip-plus;
`build_observation_scorer(runner)` likewise for snapkv, whose observation pass
(`vllm_kvzip.backend.observation`) is the same kind of forward over the last
prompt tokens at their own positions.
It builds the repeat prompt from the served model's tokenizer and chat
template, installs KVzip+'s attention-input hooks, and hands the scorer a
forward function that runs

    runner.model(input_ids=int32[n], positions=int64[n])

under `set_forward_context` with a `ReconstructionMetadata` for every attention
layer, CUDA graphs off (`CUDAGraphMode.NONE`: the compiled pieces run
eagerly, nothing is replayed) and no slot mapping, so vLLM writes no KV for
the repeat tokens.  The hidden states it returns are dropped (no logits).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vllm_kvzip.backend.observation import ObservationScorer
from vllm_kvzip.backend.reconstruction import (
    ReconstructionMetadata,
    ReconstructionScorer,
    install_hidden_norm_hooks,
)
from vllm_kvzip.scoring.reconstruction import RepeatPrompt, repeat_prompt_overhead


def load_tokenizer(model_config: Any):
    """The served model's tokenizer, as vLLM loads it (None with --skip-tokenizer-init)."""
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return cached_tokenizer_from_config(model_config)


def repeat_prompt_for(model_config: Any) -> RepeatPrompt:
    """KVzip's repeat instructions and the chat template's assistant postfix, as token ids."""
    from vllm_kvzip.scoring.hf import PromptTemplate

    tokenizer = load_tokenizer(model_config)
    if tokenizer is None:
        raise ValueError("KVzip's repeat prompt needs the tokenizer; drop --skip-tokenizer-init")
    template = PromptTemplate.from_tokenizer(tokenizer)
    return RepeatPrompt.from_tokenizer(tokenizer, template.postfix)


def max_repeat_input_tokens(chunk_size: int, repeat_prompt: RepeatPrompt) -> int:
    return chunk_size + repeat_prompt_overhead(repeat_prompt)


def rope_positions(model_config: Any) -> int:
    """Positions the model's rotary table holds (the repeat input must stay below)."""
    hf_config = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    return max(int(getattr(hf_config, "max_position_embeddings", 0) or 0), int(model_config.max_model_len))


def build_reconstruction_scorer(runner, config, layer_names: Sequence[str]) -> ReconstructionScorer:
    vllm_config = runner.vllm_config
    model_config = vllm_config.model_config
    repeat_prompt = repeat_prompt_for(model_config)
    plus = config.method == "kvzip-plus"
    parallel_config = vllm_config.parallel_config
    num_kv_heads = model_config.get_num_kv_heads(parallel_config)
    o_proj_grams = None
    if plus:
        o_proj_grams = install_hidden_norm_hooks(
            runner.model,
            layer_names,
            num_kv_heads,
            model_config.get_num_attention_heads(parallel_config),
            model_config.get_head_size(),
            runner.device,
        )
    return ReconstructionScorer(
        plus=plus,
        chunk_size=config.chunk_size,
        sink_tokens=config.sink_tokens,
        repeat_prompt=repeat_prompt,
        forward=model_forward(runner, layer_names),
        num_kv_heads=num_kv_heads,
        device=torch.device(runner.device),
        max_positions=rope_positions(model_config),
        o_proj_grams=o_proj_grams,
    )


def build_observation_scorer(runner, config, layer_names: Sequence[str]) -> ObservationScorer:
    """SnapKV's observation pass (`vllm_kvzip.backend.observation`) through the runner's model."""
    vllm_config = runner.vllm_config
    return ObservationScorer(
        window=config.snapkv_window,
        kernel_size=config.snapkv_kernel,
        forward=model_forward(runner, layer_names),
        num_kv_heads=vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config),
        device=torch.device(runner.device),
    )


def model_forward(runner, layer_names: Sequence[str]):
    """forward(input_ids, start_position, metadata): one eager forward of vLLM's model, no KV writes."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import set_forward_context

    layer_names = list(layer_names)
    max_tokens = runner.vllm_config.scheduler_config.max_num_batched_tokens

    def forward(input_ids: Sequence[int], start_position: int, metadata: ReconstructionMetadata) -> None:
        num_tokens = len(input_ids)
        if not 1 <= num_tokens <= max_tokens:
            raise ValueError(
                f"vllm-kvzip: a scoring forward of {num_tokens} tokens exceeds --max-num-batched-tokens "
                f"{max_tokens}; lower --kv-compression-chunk-size (KVzip) or --kv-compression-snapkv-window (SnapKV)"
            )
        device = runner.device
        ids = torch.tensor(list(input_ids), dtype=torch.int32, device=device)
        positions = torch.arange(start_position, start_position + num_tokens, dtype=torch.int64, device=device)
        with set_forward_context(
            {name: metadata for name in layer_names},
            runner.vllm_config,
            num_tokens=num_tokens,
            cudagraph_runtime_mode=CUDAGraphMode.NONE,
            slot_mapping=None,  # no KV-cache writes for the repeat tokens
        ):
            runner.model(input_ids=ids, positions=positions, intermediate_tensors=None, inputs_embeds=None)

    return forward
