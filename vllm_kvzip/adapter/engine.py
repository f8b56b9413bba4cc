"""Engine-level checks and adaptations when KV compression is on.

`prepare_engine_args` runs on the `EngineArgs` before vLLM builds its config;
`validate_engine_config` runs on the finished `VllmConfig` (the model's config
is known then) and still before any weights load.  Every refusal names the
flag that caused it and what would work instead.
"""

from __future__ import annotations

import os
from typing import Any

from vllm_kvzip.adapter.vllm_api import get_logger, is_cpu_platform
from vllm_kvzip.config import FLAG_OF_FIELD, KVCompressionConfig, KVCompressionConfigError

ADDITIONAL_CONFIG_KEY = "kv_compression"
# Decoder-only architectures whose attention the scorers and kernels handle
# (full causal attention with RoPE, GQA, no sliding window, no MLA).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_HEAD_SIZES = (64, 128)
CUSTOM_BACKEND = "CUSTOM"
# Methods the vLLM path scores today (the scoring library has them all).
VLLM_METHODS = ("kvzip", "kvzip-plus", "snapkv", "streaming", "random", "head", "kvzap-linear", "kvzap-mlp")

logger = get_logger(__name__)


def kv_compression_config(vllm_config: Any) -> KVCompressionConfig:
    """The validated settings of a running engine (any vLLM process)."""
    additional = getattr(vllm_config, "additional_config", None) or {}
    raw = additional.get(ADDITIONAL_CONFIG_KEY) if isinstance(additional, dict) else None
    return KVCompressionConfig.parse(raw)


def _backend_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "name", value)).upper()


def prepare_engine_args(engine_args: Any) -> KVCompressionConfig:
    """Validate the settings and adapt the engine arguments (idempotent)."""
    additional = engine_args.additional_config
    raw = additional.get(ADDITIONAL_CONFIG_KEY) if isinstance(additional, dict) else None
    config = KVCompressionConfig.parse(raw)
    if not config.enabled:
        return config

    def refuse(flag: str, why: str) -> None:
        raise KVCompressionConfigError(f"{flag} cannot be combined with --kv-compression {config.method}: {why}")

    if config.method not in VLLM_METHODS:
        raise KVCompressionConfigError(
            f"--kv-compression {config.method} is not available inside vLLM yet (the transformers API in "
            f"vllm_kvzip.scoring has it); methods available in vLLM: {', '.join(VLLM_METHODS)}"
        )
    if not config.is_observation:
        for field in ("snapkv_window", "snapkv_kernel"):
            if getattr(config, field) != KVCompressionConfig.model_fields[field].default:
                flag = FLAG_OF_FIELD[field]
                raise KVCompressionConfigError(
                    f"{flag} applies only to --kv-compression snapkv (got --kv-compression {config.method})"
                )

    if engine_args.enable_prefix_caching:
        refuse(
            "--enable-prefix-caching",
            "compressed requests rewrite their first blocks, so they cannot be shared; "
            "drop the flag (vllm-kvzip turns prefix caching off)",
        )
    if engine_args.speculative_config:
        refuse("--speculative-config", "speculative decoding is not supported with compressed KV yet")
    if (engine_args.tensor_parallel_size or 1) > 1:
        refuse("--tensor-parallel-size", "only --tensor-parallel-size 1 is supported yet")
    if (engine_args.pipeline_parallel_size or 1) > 1:
        refuse("--pipeline-parallel-size", "only --pipeline-parallel-size 1 is supported yet")
    if engine_args.kv_cache_dtype not in (None, "auto"):
        refuse("--kv-cache-dtype", f"{engine_args.kv_cache_dtype!r}: only the model dtype (auto) is supported yet")
    if engine_args.kv_transfer_config is not None:
        refuse("--kv-transfer-config", "KV connectors are not supported with compressed KV yet")

    install_serving_validation()

    if engine_args.enable_prefix_caching is None:
        logger.info("vllm-kvzip: prefix caching is not supported with KV compression yet; switched off")
        engine_args.enable_prefix_caching = False

    if not is_cpu_platform():
        selected = _backend_name(engine_args.attention_backend) or _backend_name(
            getattr(engine_args.attention_config, "backend", None)
        )
        if selected not in (None, CUSTOM_BACKEND):
            refuse(
                "--attention-backend",
                f"{selected} does not read compressed pages; vllm-kvzip selects its own backend (CUSTOM)",
            )
        if engine_args.attention_backend is None:
            engine_args.attention_backend = CUSTOM_BACKEND
    # The CPU platform always builds CPU_ATTN, which vllm-kvzip overrides.

    # The plugin's runner hooks target vLLM's V1 model runner (the CPU
    # platform's runner); MRV2 is the CUDA default for dense models in 0.26.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") not in (None, "0"):
        refuse("VLLM_USE_V2_MODEL_RUNNER=1", "vllm-kvzip hooks vLLM's V1 model runner; unset it")
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-kvzip: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")

    # Ship the validated, normalised settings to every vLLM process.
    engine_args.additional_config = {**(additional or {}), ADDITIONAL_CONFIG_KEY: config.to_dict()}
    return config


def validate_engine_config(vllm_config: Any, config: KVCompressionConfig) -> None:
    """Checks that need the model's config; raises before any weights load."""
    if not config.enabled:
        return
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise KVCompressionConfigError(
            f"--kv-compression {config.method}: model architecture {architectures or '(unknown)'} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if model_config.use_mla:
        raise KVCompressionConfigError(f"--kv-compression {config.method}: MLA models are not supported")
    head_size = model_config.get_head_size()
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise KVCompressionConfigError(
            f"--kv-compression {config.method}: head size {head_size} is not supported; "
            f"supported head sizes: {', '.join(map(str, SUPPORTED_HEAD_SIZES))}"
        )
    if model_config.get_sliding_window() is not None:
        raise KVCompressionConfigError(
            f"--kv-compression {config.method}: sliding-window attention models are not supported"
        )
    max_model_len = model_config.max_model_len
    if config.window >= max_model_len:
        raise KVCompressionConfigError(
            f"--kv-compression-window {config.window} must be smaller than the model's max length "
            f"(--max-model-len {max_model_len}); valid values: 0..{max_model_len - 1}"
        )
    _check_method_assets(config, model_config)
    if getattr(getattr(vllm_config, "device_config", None), "device_type", None) == "cuda":
        from vllm_kvzip.backend.ops.cuda_ops import compaction_kernel

        try:
            compaction_kernel()  # a bad VLLM_KVZIP_COMPACTION_KERNEL fails here, not at the first compaction
        except (ValueError, RuntimeError) as exc:
            raise KVCompressionConfigError(f"vllm-kvzip: {exc}") from None
    if config.is_reconstruction:
        _check_reconstruction(config, vllm_config)
    if config.is_observation:
        _check_observation(config, vllm_config)

    mode = f"threshold {config.threshold}" if config.threshold_mode else f"keep ratio {config.effective_keep_ratio}"
    if config.is_observation:
        mode += f", observation window {config.snapkv_window}, pooling kernel {config.snapkv_kernel}"
    logger.info(
        "vllm-kvzip: KV compression %s (%s, window %d, sinks %d) on %s",
        config.method,
        mode,
        config.window,
        config.sink_tokens,
        architectures[0],
    )


def _check_method_assets(config: KVCompressionConfig, model_config: Any) -> None:
    """Load what the method needs once here, so a bad file stops vLLM before the model loads."""
    from vllm_kvzip.scoring.kvzap_model import KVzapCheckpointError, ModelShape

    shape = ModelShape.from_config(model_config.hf_config)
    if config.method == "head":
        from vllm_kvzip.scoring.head_scores import load_head_scores

        if config.head_scores is not None and not os.path.isfile(config.head_scores):
            raise KVCompressionConfigError(f"--kv-compression-head-scores: no file at {config.head_scores!r}")
        try:
            load_head_scores(config.head_scores, model_config.model, shape)
        except (OSError, ValueError) as exc:
            raise KVCompressionConfigError(f"--kv-compression-head-scores: {exc}") from None
    if config.is_kvzap:
        from vllm_kvzip.backend.kvzap import load_surrogate

        try:
            # Header only: this is vLLM's front-end process, which forks the engine core; when it
            # read the weights here that child hung on the H100 (see KVzapSurrogate.load).
            load_surrogate(config, model_config, device="meta")
        except (KVzapCheckpointError, OSError, ValueError) as exc:
            raise KVCompressionConfigError(f"--kv-compression-surrogate: {exc}") from None


def _check_reconstruction(config: KVCompressionConfig, vllm_config: Any) -> None:
    """KVzip's repeat prompt needs the tokenizer's chat template and must fit one forward."""
    from vllm_kvzip.adapter.reconstruction_pass import max_repeat_input_tokens, repeat_prompt_for

    model_config = vllm_config.model_config
    if getattr(model_config, "enable_prompt_embeds", False):
        raise KVCompressionConfigError(
            f"--enable-prompt-embeds cannot be combined with --kv-compression {config.method}: the reconstruction "
            "pass repeats the prompt's tokens"
        )
    if model_config.skip_tokenizer_init:
        raise KVCompressionConfigError(
            f"--skip-tokenizer-init cannot be combined with --kv-compression {config.method}: the reconstruction "
            "prompt is built with the tokenizer's chat template"
        )
    try:
        repeat_prompt = repeat_prompt_for(model_config)
    except (OSError, ValueError) as exc:
        raise KVCompressionConfigError(f"--kv-compression {config.method}: {exc}") from None
    needed = max_repeat_input_tokens(config.chunk_size, repeat_prompt)
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    if needed > budget:
        raise KVCompressionConfigError(
            f"--kv-compression-chunk-size {config.chunk_size}: a reconstruction forward holds up to {needed} tokens "
            f"(chunk + repeat instruction), more than --max-num-batched-tokens {budget}; valid values: "
            f"16..{budget - (needed - config.chunk_size)} (or raise --max-num-batched-tokens)"
        )


def _check_observation(config: KVCompressionConfig, vllm_config: Any) -> None:
    """SnapKV's observation pass re-runs the prompt's last tokens: it needs their ids and one forward."""
    model_config = vllm_config.model_config
    if getattr(model_config, "enable_prompt_embeds", False):
        raise KVCompressionConfigError(
            f"--enable-prompt-embeds cannot be combined with --kv-compression {config.method}: the observation "
            "pass re-runs the prompt's last tokens"
        )
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    if config.snapkv_window > budget:
        raise KVCompressionConfigError(
            f"--kv-compression-snapkv-window {config.snapkv_window}: the observation pass runs the window in one "
            f"forward, more than --max-num-batched-tokens {budget}; valid values: 1..{budget} "
            "(or raise --max-num-batched-tokens)"
        )


def install_request_validation() -> None:
    """Check per-request settings (vllm_xargs / SamplingParams.extra_args) where vLLM checks its own.

    A bad value raises ValueError in the API process: the OpenAI server answers
    HTTP 400 and the engine never sees the request.
    """
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_vllm_kvzip_hooked", False):
        return
    from vllm_kvzip.config import request_keep_ratio

    original_validate_params = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        original_validate_params(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams) and params.extra_args:
            request_keep_ratio(kv_compression_config(self.vllm_config), params.extra_args)

    InputProcessor._validate_params = _validate_params
    InputProcessor._vllm_kvzip_hooked = True


def install_serving_validation() -> None:
    """HTTP 400 for bad per-request settings in streaming requests too (OpenAI server process only).

    The check above runs when the engine client adds the request.  For a stream
    that is after vLLM's OpenAI server has answered HTTP 200 and sent the
    headers, so a bad value would only come back as an error event inside the
    stream.  Checking `vllm_xargs` when the server receives a chat or completion
    request answers streaming and non-streaming requests alike with HTTP 400.
    """
    import sys

    if "vllm.entrypoints.openai.api_server" not in sys.modules:
        return  # offline LLM(), engine core, workers: no OpenAI server here
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    from vllm_kvzip.config import request_keep_ratio

    def checked(original):
        async def create(self, request, *args, **kwargs):
            extra_args = getattr(request, "vllm_xargs", None)
            if extra_args:
                try:
                    request_keep_ratio(kv_compression_config(self.engine_client.vllm_config), extra_args)
                except KVCompressionConfigError as error:
                    return self.create_error_response(str(error))
            return await original(self, request, *args, **kwargs)

        create._vllm_kvzip_hooked = True
        return create

    for cls, name in ((OpenAIServingChat, "create_chat_completion"), (OpenAIServingCompletion, "create_completion")):
        if not getattr(getattr(cls, name), "_vllm_kvzip_hooked", False):
            setattr(cls, name, checked(getattr(cls, name)))
