"""Registry, head-level scores, and the threshold / streaming / random paths through the transformers API."""

from __future__ import annotations

import pytest
import torch

from tests.scoring.conftest import tiny_model
from vllm_kvzip.config import METHODS, KVCompressionConfig
from vllm_kvzip.scoring.base import scorer_names
from vllm_kvzip.scoring.functional import random_scores, streaming_scores
from vllm_kvzip.scoring.head_scores import compute_head_scores, load_head_scores, save_head_scores
from vllm_kvzip.scoring.hf import KVzipModel
from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.policies import protected_mask

TEXT = "Sixty-four tokens of text, give or take, to be scored by every method."


@pytest.fixture(scope="module")
def kvzip(tokenizer):
    return KVzipModel(tiny_model("llama", len(tokenizer)), tokenizer, model_name="tiny-llama")


def test_every_configurable_method_has_a_scorer():
    assert set(scorer_names()) == set(METHODS) - {"none"}


def test_head_scores_are_the_max_of_pair_scores_and_drive_the_head_method(kvzip, tmp_path):
    texts = [TEXT, TEXT[::-1]]
    head_scores = compute_head_scores(kvzip, texts, chunk_size=32)
    expected = torch.stack([kvzip.prefill(text, {"method": "kvzip", "chunk_size": 32}).scores["kvzip"].amax(-1) for text in texts]).amax(0)
    torch.testing.assert_close(head_scores, expected)
    path = save_head_scores(tmp_path / "heads.safetensors", head_scores)
    shape = ModelShape.from_config(kvzip.model.config)
    torch.testing.assert_close(load_head_scores(str(path), "", shape), head_scores)
    with pytest.raises(ValueError, match="this model needs"):
        load_head_scores(str(path), "", ModelShape(shape.num_layers + 1, shape.hidden_size, shape.num_kv_heads))
    kv = kvzip.prefill(TEXT, {"method": "head", "head_scores": str(path), "window": 8, "sink_tokens": 0})
    assert torch.equal(kv.scores["head"], head_scores[:, :, None].expand_as(kv.scores["head"]))
    # Global policy on head scores keeps whole heads (one boundary head may be cut).
    kept = kv.prune(0.5, policy="global").mask[..., : kv.context_length - 8].sum(-1).flatten().tolist()
    evictable = kv.context_length - 8
    assert sum(0 < count < evictable for count in kept) <= 1
    assert 0 in kept and evictable in kept


def test_threshold_mode_prunes_by_kvzap_log_scores(kvzip, tmp_path):
    shape = ModelShape.from_config(kvzip.model.config)
    torch.manual_seed(1)
    KVzapSurrogate.for_model(shape, "linear").double().save(tmp_path)
    config = KVCompressionConfig(method="kvzap-linear", threshold=0.0, window=8, sink_tokens=0, surrogate=str(tmp_path))
    kv = kvzip.prefill(TEXT, config)
    scores = kv.scores["kvzap-linear"]
    keep = kv.prune()
    expected = (scores >= 0.0) | protected_mask(kv.context_length, 0, 8)
    assert torch.equal(keep.mask, expected)
    assert 0 < keep.kept_fraction < 1
    assert kv.report()["kv_bytes_fraction"] < 1.0
    with pytest.raises(ValueError, match="not thresholdable"):
        kvzip.prefill(TEXT, {"method": "kvzip"}).prune(threshold=0.0)


def test_positional_methods_through_the_transformers_path(kvzip):
    config = KVCompressionConfig(method="streaming", seed=5, chunk_size=16, window=4)
    kv = kvzip.prefill(TEXT, config, methods=["streaming", "random"])
    positions = torch.arange(kv.prefix_length, len(kv.token_ids))
    for layer in range(kvzip.shape.num_layers):
        torch.testing.assert_close(kv.scores["streaming"][layer], streaming_scores(positions, kvzip.shape.num_kv_heads, 4))
        torch.testing.assert_close(kv.scores["random"][layer], random_scores(positions, kvzip.shape.num_kv_heads, seed=5, layer_idx=layer))
    # Streaming keeps the most recent tokens of the context (the sinks are in the template prefix).
    keep = kv.pruned(0.5, method="streaming", policy="head").keep_set.mask
    kept_positions = torch.nonzero(keep[0, 0]).flatten()
    assert len(kept_positions) < kv.context_length
    assert kept_positions.tolist() == list(range(kv.context_length - len(kept_positions), kv.context_length))
