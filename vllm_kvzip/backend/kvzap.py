"""KVzap inside vLLM: surrogate scores computed during the normal forward pass.

A forward pre-hook on every decoder layer's attention module (`self_attn`,
which receives the post-input_layernorm hidden states) hands the step's
hidden states to the custom op `vllm_kvzip::kvzap_score_and_record`, which
runs that layer's KVzap surrogate and records the predicted log-scores in a
per-layer *score cache* laid out like the KV cache (`[num_blocks, H, bs]`,
flat index `(block * H + head) * bs + offset`), at the tokens' KV slots.  No
extra forward pass; the compressor later reads the scores of a request's
context from its blocks.  The recording is one Triton launch per layer on
CUDA (`vllm_kvzip.backend.ops.record_scores`; the torch reference it equals
launched about a dozen kernels per layer and step).

Why one opaque op for both the surrogate and the write: the surrogate's
weights are not parameters of vLLM's model, so torch.compile would have to
trace them as constants of every compiled piece (and Inductor bakes
constants into its generated code); inside the op, Dynamo and Inductor see
one call per layer and nothing else.  The op looks the slot mapping up in
vLLM's forward context by layer name (as vLLM's own attention op does) and
is declared as mutating its `marker` argument so the compiler keeps it.  Its
kernels are captured by CUDA graphs with the persistent slot-mapping buffer.
"""

from __future__ import annotations

import torch

from vllm_kvzip.backend.ops import record_scores
from vllm_kvzip.scoring.kvzap_model import (
    KVzapCheckpointError,
    KVzapSurrogate,
    ModelShape,
    default_checkpoint_name,
    shipped_checkpoint,
)

def surrogate_source(config, model_name: str) -> str:
    """Folder or hub id of the KVzap weights for `model_name` (config.surrogate wins)."""
    if config.surrogate is not None:
        return config.surrogate
    kind = config.method.removeprefix("kvzap-")
    basename = model_name.rstrip("/").split("/")[-1]
    shipped = shipped_checkpoint(basename, kind)
    return str(shipped) if shipped is not None else default_checkpoint_name(model_name, kind)


def load_surrogate(config, model_config, device: str = "cpu") -> KVzapSurrogate:
    """The configured surrogate; `device="meta"` only checks it (no weights read: see KVzapSurrogate.load)."""
    source = surrogate_source(config, model_config.model)
    shape = ModelShape.from_config(model_config.hf_config)
    return KVzapSurrogate.load(source, shape=shape, device=device)


def attention_module_names(layer_names: list[str]) -> list[str]:
    """`model.layers.3.self_attn.attn` -> `model.layers.3.self_attn` (the module fed hidden states)."""
    return [name.rsplit(".", 1)[0] for name in layer_names]


# Surrogate layer per attention layer name, installed by KVzapRecorder in the worker.
_SURROGATE_LAYERS: dict[str, torch.nn.Module] = {}


@torch.library.custom_op("vllm_kvzip::kvzap_score_and_record", mutates_args=("marker",))
def kvzap_score_and_record(hidden_states: torch.Tensor, marker: torch.Tensor, layer_name: str) -> None:
    """Score `hidden_states [num_tokens, hidden]` with the layer's surrogate; record them at the KV slots."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    from vllm_kvzip.backend.state import get_state

    state = get_state()
    if state is None or not is_forward_context_available():
        return
    slot_mappings = get_forward_context().slot_mapping
    slot_mapping = slot_mappings.get(layer_name) if isinstance(slot_mappings, dict) else None
    cache = state.score_caches.get(layer_name)
    surrogate_layer = _SURROGATE_LAYERS.get(layer_name)
    if slot_mapping is None or cache is None or surrogate_layer is None:
        return  # profiling / dummy run: nothing to record
    num_tokens = slot_mapping.shape[0]
    scores = surrogate_layer(hidden_states[:num_tokens])
    record_scores(cache, scores, slot_mapping, state.num_kv_heads, state.block_size)


@kvzap_score_and_record.register_fake
def _(hidden_states, marker, layer_name):
    return None


class KVzapRecorder:
    """Installs the pre-hooks on a loaded vLLM model and owns the score caches."""

    def __init__(self, surrogate: KVzapSurrogate, model: torch.nn.Module, layer_names: list[str], dtype, device):
        self.surrogate = surrogate.to(device=device, dtype=dtype).eval()
        self.layer_names = layer_names
        self.markers = {}
        modules = dict(model.named_modules())
        for index, (layer_name, module_name) in enumerate(zip(layer_names, attention_module_names(layer_names))):
            module = _find_module(modules, module_name)
            marker = torch.zeros(1, device=device)
            self.markers[layer_name] = marker
            _SURROGATE_LAYERS[layer_name] = self.surrogate.layers[index]
            module.register_forward_pre_hook(self._hook(layer_name, marker), with_kwargs=True)

    @staticmethod
    def _hook(layer_name: str, marker: torch.Tensor):
        def hook(module, args, kwargs):
            hidden_states = kwargs.get("hidden_states")
            if hidden_states is None and len(args) >= 2:
                hidden_states = args[1]  # forward(positions, hidden_states)
            if hidden_states is None:
                raise RuntimeError(f"vllm-kvzip: {type(module).__name__}.forward got no hidden_states")
            hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
            torch.ops.vllm_kvzip.kvzap_score_and_record(hidden_states, marker, layer_name)
            return None

        return hook


def _find_module(modules: dict, name: str) -> torch.nn.Module:
    if name in modules:
        return modules[name]
    # vLLM sometimes wraps the model (e.g. `model.` prefixes differ): match by suffix.
    matches = [module for full, module in modules.items() if full.endswith(name)]
    if len(matches) != 1:
        raise KVzapCheckpointError(f"vllm-kvzip: cannot find the attention module {name!r} in the model")
    return matches[0]


def allocate_score_caches(state, kv_caches: dict[str, torch.Tensor]) -> None:
    """One score cache per layer, laid out like its KV cache (plus `H` trash entries).

    They are the rows of one `[L, entries]` buffer (`state.score_buffer`, rows in
    `state.layer_names` order), so a folding reads every layer's scores of its tokens with one
    gather instead of one per layer.
    """
    shapes = {tuple(kv_caches[name].shape[:3]) for name in state.layer_names}
    if len(shapes) != 1:
        raise RuntimeError(f"vllm-kvzip: attention layers with different KV cache shapes {sorted(shapes)}")
    num_blocks, heads, block_size = shapes.pop()
    device = kv_caches[state.layer_names[0]].device
    state.score_buffer = torch.zeros(
        len(state.layer_names), num_blocks * heads * block_size + heads, dtype=torch.float32, device=device
    )
    for index, name in enumerate(state.layer_names):
        state.score_caches[name] = state.score_buffer[index]
