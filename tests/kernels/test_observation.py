"""SnapKV's observation pass (`vllm_kvzip.backend.observation`) against the scoring library's SnapKV.

The pass re-runs only the prompt's last `snapkv_window` tokens, at their own
positions, over the prompt's K/V read from a paged cache, through the same
`reconstruction_attention` the CPU and CUDA backends call.  Here a tiny random
transformers model plays vLLM's model: its attention layers call
`reconstruction_attention` with the pass's `ObservationMetadata` over a
shuffled paged cache filled from the model's own prefill.  The oracle is the
library's SnapKV scorer on that full prefill (every query of the prompt,
captured layer by layer), as `vllm_kvzip.scoring.vllm_reference` uses it.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tests.scoring.conftest import tiny_model
from vllm_kvzip.backend.observation import ObservationMetadata, ObservationScorer, observation_input
from vllm_kvzip.backend.reconstruction import reconstruction_attention
from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.base import build_scorer
from vllm_kvzip.scoring.functional import snapkv_scores
from vllm_kvzip.scoring.hf import attention_implementation, capture_layers, layer_inputs
from vllm_kvzip.scoring.kvzap_model import ModelShape

BLOCK_SIZE = 16
PAGED_IMPLEMENTATION = "vllm_kvzip_test_paged_observation"
_pass: dict = {}


def _paged_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention -> vLLM's layout -> reconstruction_attention over the paged cache."""
    q, k, v = (tensor[0].transpose(0, 1).contiguous() for tensor in (query, key, value))  # [q, heads, d]
    out = torch.zeros_like(q)
    layer = module.layer_idx
    reconstruction_attention(
        f"layer.{layer}", q, k, v, _pass["caches"][layer], _pass["metadata"], scaling or module.scaling, out
    )
    return out[None], None


ALL_ATTENTION_FUNCTIONS.register(PAGED_IMPLEMENTATION, _paged_attention)


def _prefill(model, token_ids, config):
    """The oracle: one full prefill; per layer the library SnapKV scores of every prompt position."""
    scorer = build_scorer("snapkv", config, ModelShape.from_config(model.config))
    num_tokens = len(token_ids)
    scores = {}

    def on_layer(layer_idx, module, queries, keys, values, hidden, scaling):
        inputs = layer_inputs(layer_idx, module, queries, keys, values, hidden, scaling, (0, num_tokens))
        scores[layer_idx] = scorer.score(inputs)

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), capture_layers(model, on_layer):
        model.model(input_ids=torch.tensor([token_ids]), past_key_values=cache, use_cache=True)
    return torch.stack([scores[layer] for layer in range(len(scores))]), cache


def _paged_caches(cache, num_blocks, generator):
    """Every layer's prompt K/V in vLLM's [blocks, H, block_size, 2d] layout, in shuffled blocks."""
    first = cache.layers[0].keys
    _, num_kv_heads, length, head_dim = first.shape
    needed = -(-length // BLOCK_SIZE)
    block_ids = torch.randperm(num_blocks, generator=generator)[:needed]
    caches = []
    for layer in cache.layers:
        paged = torch.randn(num_blocks, num_kv_heads, BLOCK_SIZE, 2 * head_dim, generator=generator, dtype=first.dtype)
        for logical, block in enumerate(block_ids.tolist()):
            part = slice(logical * BLOCK_SIZE, min(length, (logical + 1) * BLOCK_SIZE))
            rows = part.stop - part.start
            paged[block, :, :rows, :head_dim] = layer.keys[0, :, part]
            paged[block, :, :rows, head_dim:] = layer.values[0, :, part]
        caches.append(paged)
    return caches, block_ids.tolist()


def _model_forward(model, caches, position_shift=0):
    """What `vllm_kvzip.adapter.reconstruction_pass.model_forward` does with vLLM's model."""

    def forward(input_ids, start_position, metadata):
        _pass.update(caches=caches, metadata=metadata)
        positions = torch.arange(start_position, start_position + len(input_ids))[None] + position_shift
        with torch.no_grad(), attention_implementation(model, PAGED_IMPLEMENTATION):
            model.model(input_ids=torch.tensor([list(input_ids)]), position_ids=positions, use_cache=False)

    return forward


@pytest.mark.parametrize(
    "architecture, num_tokens, window, kernel, scored_end",
    [
        ("llama", 90, 16, 5, 64),  # the window inside the dense tail (positions 74..89)
        ("qwen3", 90, 16, 5, 64),  # q_norm / k_norm
        ("qwen2", 77, 24, 3, 64),  # q/k/v biases; the window reaches into the scored span (53..76)
        ("llama", 40, 64, 7, 32),  # window longer than the prompt: every token is observed
    ],
)
def test_observation_pass_matches_the_library_snapkv(architecture, num_tokens, window, kernel, scored_end):
    model = tiny_model(architecture, vocab_size=97)
    generator = torch.Generator().manual_seed(num_tokens + window)
    token_ids = torch.randint(0, 97, (num_tokens,), generator=generator).tolist()
    config = KVCompressionConfig(method="snapkv", snapkv_window=window, snapkv_kernel=kernel)
    expected, cache = _prefill(model, token_ids, config)
    caches, block_ids = _paged_caches(cache, num_blocks=12, generator=generator)
    before = [paged.clone() for paged in caches]
    layer_names = [f"layer.{index}" for index in range(len(caches))]
    scorer = ObservationScorer(
        window=window, kernel_size=kernel, forward=_model_forward(model, caches), num_kv_heads=2, device=torch.device("cpu")
    )

    got = scorer.score(token_ids + [5, 6], num_tokens, block_ids + [0], scored_end, layer_names)

    assert all(torch.equal(a, b) for a, b in zip(before, caches)), "the observation pass wrote into the paged cache"
    assert got.shape == (len(caches), 2, scored_end) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected[:, :, :scored_end], rtol=1e-5, atol=1e-9)
    assert scorer.total_passes == 1 and scorer.total_seconds > 0
    if window >= num_tokens:  # all observation, no context: every token gets its head's maximum, 1
        assert torch.equal(got, torch.ones_like(got))
        return
    # The scores must depend on what the pass computes: the window at the wrong positions gives other scores.
    shifted = ObservationScorer(
        window=window, kernel_size=kernel, forward=_model_forward(model, caches, position_shift=7),
        num_kv_heads=2, device=torch.device("cpu"),
    ).score(token_ids, num_tokens, block_ids, scored_end, layer_names)
    assert not torch.allclose(shifted, got, rtol=1e-3, atol=1e-6)


def test_observation_metadata_scores_only_its_layer_and_span():
    generator = torch.Generator().manual_seed(3)
    num_kv_heads, group, window, context, head_dim = 2, 3, 5, 19, 8
    queries = torch.randn(num_kv_heads, group, window, head_dim, generator=generator)
    own_keys = torch.randn(num_kv_heads, window, head_dim, generator=generator)
    context_keys = torch.randn(num_kv_heads, context, head_dim, generator=generator)
    scores = torch.full((2, num_kv_heads, 16), float("nan"))
    metadata = ObservationMetadata(
        num_tokens=window, block_ids=torch.zeros(1, dtype=torch.int64), context_len=context, span=(0, 16),
        sink=(0, 0), scores=scores, layer_index={"a": 0, "b": 1}, kernel_size=3,
    )
    metadata.score_layer("b", queries, own_keys, context_keys, context_keys, 0.3)
    expected = snapkv_scores(queries, torch.cat([context_keys, own_keys], dim=1), scaling=0.3, kernel_size=3)
    torch.testing.assert_close(scores[1], expected[:, :16])
    assert torch.isnan(scores[0]).all()


def test_observation_input_is_the_end_of_the_prefill():
    assert observation_input(list(range(100, 130)), 25, 8) == (list(range(117, 125)), 17)
    assert observation_input(list(range(10)), 10, 64) == (list(range(10)), 0)
    with pytest.raises(ValueError, match="do not cover"):
        observation_input([1, 2], 3, 2)
