"""Hooks into vLLM 0.26.0's V1 model runner (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`).

The attention backend sees tensors, not requests, so three runner methods are
wrapped (class-level, in every worker process; each wrapper is a no-op when no
compression state exists, i.e. when compression is off):

* `_update_states(scheduler_output)`: request lifecycle.  Finished, aborted and
  preempted requests are forgotten (vLLM frees their blocks); new and resumed
  requests are registered with their keep ratio.
* `_prepare_inputs(scheduler_output, num_scheduled_tokens)`: stashes the
  step's request ids in attention-row order (the builder maps rows to page
  tables with them) and notes which requests complete their prefill.
* `sample_tokens(grammar_output)`: after the step, compresses the requests
  whose prefill completed.  A step whose output does not go through
  `sample_tokens` is caught up at the next `_update_states`, still before the
  next forward pass.
* `load_model` / `initialize_kv_cache`: KVzap's surrogate hooks on the loaded
  model, and its score caches next to the KV caches; for KVzip / KVzip+ the
  reconstruction pass (`vllm_kvzip.adapter.reconstruction_pass`), which the
  compressor runs before it chooses what to keep.

vLLM 0.26 also has a second model runner (MRV2, `vllm.v1.worker.gpu`); with
compression on the engine hook selects the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0),
which is also the runner of the CPU platform, so one set of hooks serves both.
"""

from __future__ import annotations

from vllm_kvzip.backend.state import StepBatch, get_state


def install_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_vllm_kvzip_hooked", False):
        return
    original_update_states = GPUModelRunner._update_states
    original_prepare_inputs = GPUModelRunner._prepare_inputs
    original_sample_tokens = GPUModelRunner.sample_tokens

    def _update_states(self, scheduler_output):
        state = get_state()
        if state is None:
            return original_update_states(self, scheduler_output)
        # Before vLLM drops them: compactions still due from the previous step.
        ended = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        run_pending_compressions(self, state, skip=ended)
        # Forget ended requests first: an aborted id may come back as new in this step.
        for request_id in scheduler_output.finished_req_ids:
            state.drop_request(request_id)
        for request_id in scheduler_output.preempted_req_ids or ():
            state.drop_request(request_id)
        result = original_update_states(self, scheduler_output)
        for new_request in scheduler_output.scheduled_new_reqs:
            params = new_request.sampling_params
            state.add_request(new_request.req_id, getattr(params, "extra_args", None))
        for request_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            params = self.requests[request_id].sampling_params
            state.add_request(request_id, getattr(params, "extra_args", None))
        return result

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        state = get_state()
        if state is not None:
            batch = self.input_batch
            request_ids = list(batch.req_ids[: batch.num_reqs])
            computed = batch.num_computed_tokens_cpu
            completing = {}
            for row, request_id in enumerate(request_ids):
                entry = state.requests.get(request_id)
                if entry is None or entry.compressed:
                    continue
                reached = int(computed[row]) + int(num_scheduled_tokens[row])
                # The prefill (prompt, or prompt + outputs after a preemption)
                # is complete once every known token is computed.
                if reached >= self.requests[request_id].num_tokens:
                    completing[request_id] = reached
            state.step = StepBatch(request_ids=request_ids, completing=completing)
            state.pending.update(completing)
        return original_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    def sample_tokens(self, grammar_output, *args, **kwargs):
        output = original_sample_tokens(self, grammar_output, *args, **kwargs)
        state = get_state()
        if state is not None and state.pending:
            run_pending_compressions(self, state)
        return output

    def wrap_load_model(original):
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            install_kvzap_hooks(self)
            install_reconstruction_pass(self)
            return result

        return load_model

    original_initialize_kv_cache = GPUModelRunner.initialize_kv_cache

    def initialize_kv_cache(self, *args, **kwargs):
        result = original_initialize_kv_cache(self, *args, **kwargs)
        state = get_state()
        if state is not None and state.config.is_kvzap:
            from vllm_kvzip.backend.kvzap import allocate_score_caches

            allocate_score_caches(state, attention_kv_caches(self, state.layer_names))
        return result

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner.load_model = wrap_load_model(GPUModelRunner.load_model)
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if "load_model" in vars(CPUModelRunner):
        CPUModelRunner.load_model = wrap_load_model(CPUModelRunner.load_model)
    GPUModelRunner._vllm_kvzip_hooked = True


def attention_kv_caches(runner, layer_names: list[str]) -> dict:
    forward_context = runner.compilation_config.static_forward_context
    return {name: forward_context[name].kv_cache for name in layer_names}


def attention_layer_names(runner) -> list[str]:
    """Names of the model's attention layers, in layer order."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    forward_context = runner.compilation_config.static_forward_context
    names = [name for name, module in forward_context.items() if isinstance(module, Attention)]
    return sorted(names, key=extract_layer_index)


def install_kvzap_hooks(runner) -> None:
    from vllm_kvzip.adapter.engine import kv_compression_config

    config = kv_compression_config(runner.vllm_config)
    if not config.is_kvzap:
        return
    from vllm_kvzip.backend.kvzap import KVzapRecorder, load_surrogate

    surrogate = load_surrogate(config, runner.vllm_config.model_config)
    runner._vllm_kvzip_kvzap = KVzapRecorder(
        surrogate, runner.model, attention_layer_names(runner), runner.vllm_config.model_config.dtype, runner.device
    )


def install_reconstruction_pass(runner) -> None:
    from vllm_kvzip.adapter.engine import kv_compression_config

    config = kv_compression_config(runner.vllm_config)
    if not config.is_reconstruction:
        return
    from vllm_kvzip.adapter.reconstruction_pass import build_reconstruction_scorer

    runner._vllm_kvzip_reconstruction = build_reconstruction_scorer(runner, config, attention_layer_names(runner))


def request_token_ids(request) -> list[int]:
    """Every known token of a request (prompt, then outputs: a resumed request's prefill covers both)."""
    return list(request.prompt_token_ids or ()) + list(request.output_token_ids)


def run_pending_compressions(runner, state, skip=()) -> None:
    if not state.pending:
        return
    from vllm_kvzip.backend.compressor import compress_request

    pending, state.pending = state.pending, {}
    kv_caches = attention_kv_caches(runner, state.layer_names)
    reconstruction = getattr(runner, "_vllm_kvzip_reconstruction", None)
    for request_id, num_tokens in pending.items():
        request = runner.requests.get(request_id)
        if request is None or request_id in skip:
            continue  # finished (or aborted) before its compaction: nothing to save
        compress_request(
            state,
            request_id,
            num_tokens,
            list(request.block_ids[0]),
            kv_caches,
            token_ids=request_token_ids(request) if reconstruction is not None else None,
            reconstruction=reconstruction,
        )
