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
* `sample_tokens(grammar_output)`: after the step, plans the compression of
  the requests whose prefill completed (keep-ratio mode: scores, keep set and
  moves, all on the device, `vllm_kvzip.backend.compressor`); the end of the
  next `_prepare_inputs` launches the moves, before that step's attention
  metadata and forward.  Threshold mode folds at once.  A step whose output
  does not go through `sample_tokens` is caught up at the next
  `_update_states`, still before the next forward pass.
* `load_model` / `initialize_kv_cache`: KVzap's surrogate hooks on the loaded
  model, and its score caches next to the KV caches; for KVzip / KVzip+ the
  reconstruction pass and for SnapKV the observation pass
  (`vllm_kvzip.adapter.reconstruction_pass`), which the compressor runs
  before it chooses what to keep; the whole KV cache (one buffer for all
  layers, `kv_cache_api.install_shared_kv_buffer`) handed to the worker state.

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
            reached_by_request = {}
            for row, request_id in enumerate(request_ids):
                entry = state.requests.get(request_id)
                if entry is None:
                    continue
                reached = int(computed[row]) + int(num_scheduled_tokens[row])
                reached_by_request[request_id] = reached
                if entry.compressed:
                    continue
                # The prefill (prompt, or prompt + outputs after a preemption)
                # is complete once every known token is computed.
                if reached >= self.requests[request_id].num_tokens:
                    completing[request_id] = reached
            state.step = StepBatch(request_ids=request_ids, completing=completing, reached=reached_by_request)
            state.pending.update(completing)
        result = original_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if state is not None and state.planned:
            # Compactions planned after the previous forward: launched before this step's
            # attention metadata and forward, as late as possible, so that the host has prepared
            # this step's inputs while the previous forward ran before it waits for the plans'
            # numbers (they follow that forward).
            apply_planned_compactions(state)
        return result

    def sample_tokens(self, grammar_output, *args, **kwargs):
        output = original_sample_tokens(self, grammar_output, *args, **kwargs)
        state = get_state()
        if state is not None:
            if state.pending:
                run_pending_compressions(self, state)
            if state.config.decode_eviction:
                run_decode_evictions(self, state)
            if state.freed_block_ranges and output is not None and not _is_shared_empty_output(output):
                attach_freed_block_ranges(output, state.take_freed_block_ranges())
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
        from vllm_kvzip.adapter.engine import kv_compression_config

        if state is not None and kv_compression_config(self.vllm_config).enabled:
            # One buffer for all layers (install_shared_kv_buffer): compaction and decode address it whole.
            state.attach_kv_cache(attention_kv_caches(self, state.layer_names))
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
    from vllm_kvzip.adapter.kv_cache_api import install_shared_kv_buffer

    install_shared_kv_buffer()
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
    """The scoring pass of KVzip / KVzip+ (`_vllm_kvzip_reconstruction`) or SnapKV (`_vllm_kvzip_observation`)."""
    from vllm_kvzip.adapter.engine import kv_compression_config

    config = kv_compression_config(runner.vllm_config)
    if config.is_reconstruction:
        from vllm_kvzip.adapter.reconstruction_pass import build_reconstruction_scorer

        runner._vllm_kvzip_reconstruction = build_reconstruction_scorer(runner, config, attention_layer_names(runner))
    elif config.is_observation:
        from vllm_kvzip.adapter.reconstruction_pass import build_observation_scorer

        runner._vllm_kvzip_observation = build_observation_scorer(runner, config, attention_layer_names(runner))


def scoring_pass(runner):
    """The worker's post-prefill scoring pass (KVzip's reconstruction, SnapKV's observation) or None."""
    return getattr(runner, "_vllm_kvzip_reconstruction", None) or getattr(runner, "_vllm_kvzip_observation", None)


def request_token_ids(request) -> list[int]:
    """Every known token of a request (prompt, then outputs: a resumed request's prefill covers both)."""
    return list(request.prompt_token_ids or ()) + list(request.output_token_ids)


def run_pending_compressions(runner, state, skip=()) -> None:
    if not state.pending:
        return
    from vllm_kvzip.backend.compressor import compress_threshold_request, plan_compression

    pending, state.pending = state.pending, {}
    reconstruction = scoring_pass(runner)
    for request_id, num_tokens in pending.items():
        request = runner.requests.get(request_id)
        if request is None or request_id in skip:
            continue  # finished (or aborted) before its compaction: nothing to save
        entry = state.requests.get(request_id)
        if entry is not None and entry.threshold_mode:
            compress_threshold_request(
                state, request_id, num_tokens, list(request.block_ids[0]),
                lambda rid, first, ids: set_worker_block_ids(runner, rid, first, ids),
            )
        else:
            plan_compression(
                state,
                request_id,
                num_tokens,
                list(request.block_ids[0]),
                token_ids=request_token_ids(request) if reconstruction is not None else None,
                reconstruction=reconstruction,
            )


def apply_planned_compactions(state) -> None:
    """Launch the keep-ratio compactions planned in an earlier step (`compressor.plan_compression`)."""
    from vllm_kvzip.backend.compressor import apply_planned_compaction

    planned, state.planned = state.planned, {}
    for compaction in planned.values():
        apply_planned_compaction(state, compaction)


def run_decode_evictions(runner, state) -> None:
    """DMS: fold the dense tail of threshold-mode requests whose tail has grown by about `window` tokens."""
    from vllm_kvzip.backend.compressor import retire_dense_blocks, retirement_target_block

    for request_id, reached in state.step.reached.items():
        entry = state.requests.get(request_id)
        if entry is None or not entry.threshold_mode or not entry.compressed:
            continue
        if retirement_target_block(state, reached) < entry.next_retire_block:
            continue
        request = runner.requests.get(request_id)
        if request is None:
            continue
        retire_dense_blocks(
            state, request_id, reached, list(request.block_ids[0]),
            lambda rid, first, ids: set_worker_block_ids(runner, rid, first, ids),
        )


def set_worker_block_ids(runner, request_id: str, first: int, block_ids: list[int]) -> None:
    """Rewrite logical blocks [first, first + n) of a request in the worker's block table.

    Only the worker's view changes (the scheduler's block list is untouched):
    threshold mode moves container blocks to the front of the row, where the
    decode kernels look for head pages.  Both the request's own block list
    (used when it re-enters the persistent batch) and its current batch row
    are updated; the row reaches the GPU with the next step's block-table copy.
    """
    end = first + len(block_ids)
    request = runner.requests[request_id]
    request.block_ids[0][first:end] = block_ids
    row = runner.input_batch.req_id_to_index.get(request_id)
    if row is not None:
        table = runner.input_batch.block_table[0]
        table.block_table.np[row, first:end] = block_ids


def attach_freed_block_ranges(output, ranges) -> None:
    """Send the worker's freed blocks to the scheduler with the step's ModelRunnerOutput.

    An extra attribute survives vLLM's pickling to the engine core (and the
    in-process path); with async scheduling the output is wrapped and
    materialised later, so the attribute goes on the wrapped object.
    """
    target = getattr(output, "_model_runner_output", output)
    previous = getattr(target, FREED_RANGES_ATTRIBUTE, None) or {}
    for request_id, report in ranges.items():
        earlier = previous.get(request_id)
        if earlier is not None and earlier["admission"] == report["admission"]:
            report = {
                "admission": report["admission"],
                "ranges": earlier["ranges"] + report["ranges"],
                "kept_entries": earlier["kept_entries"] if earlier["kept_entries"] is not None else report["kept_entries"],
            }
        previous[request_id] = report
    setattr(target, FREED_RANGES_ATTRIBUTE, previous)


FREED_RANGES_ATTRIBUTE = "vllm_kvzip_freed_block_ranges"


def _is_shared_empty_output(output) -> bool:
    # vLLM returns one module-level object for steps without tokens: never decorate it.
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    return output is EMPTY_MODEL_RUNNER_OUTPUT


def freed_block_ranges_of(model_runner_output) -> dict:
    """What `attach_freed_block_ranges` put on an output (scheduler side)."""
    return getattr(model_runner_output, FREED_RANGES_ATTRIBUTE, None) or {}
