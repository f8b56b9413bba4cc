"""KVzap surrogate checkpoints: round trip, nvidia/KVzap-* layout, transformers compatibility, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.base import LayerInputs, build_scorer
from vllm_kvzip.scoring.kvzap_model import KVzapCheckpointError, KVzapLinear, KVzapMLP, KVzapSurrogate, ModelShape

SHAPE = ModelShape(num_layers=3, hidden_size=32, num_kv_heads=2)


def trained_like(kind: str) -> KVzapSurrogate:
    torch.manual_seed(11)
    surrogate = KVzapSurrogate.for_model(SHAPE, kind)
    for parameter in surrogate.parameters():
        parameter.data.normal_()
    return surrogate


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_round_trip_gives_identical_scores(tmp_path, kind):
    surrogate = trained_like(kind)
    surrogate.save(tmp_path / kind)
    loaded = KVzapSurrogate.load(tmp_path / kind, shape=SHAPE)
    assert type(loaded) is (KVzapLinear if kind == "linear" else KVzapMLP)
    hidden = torch.randn(7, SHAPE.hidden_size)
    for layer in range(SHAPE.num_layers):
        assert torch.equal(surrogate.layer_scores(layer, hidden), loaded.layer_scores(layer, hidden))
    batch = torch.randn(5, SHAPE.num_layers, SHAPE.hidden_size)
    assert torch.equal(surrogate(batch), loaded(batch))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_files_follow_the_published_layout(tmp_path, kind):
    trained_like(kind).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "kvzap" and config["architectures"] == ["KVzapModel"]
    assert (config["input_dim"], config["output_dim"], config["n_modules"]) == (32, 2, 3)
    assert config["hidden_dim"] == (None if kind == "linear" else 32 // 8)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    if kind == "linear":
        expected = {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    else:
        expected = {f"layers.{i}.{j}.{p}" for i in range(3) for j in (0, 2) for p in ("weight", "bias")}
    assert names == expected


class ReferenceStyleConfig(PretrainedConfig):
    """A transformers config written like kvpress's fixed KVzapConfig (constructible without arguments)."""

    model_type = "kvzap"

    def __init__(self, input_dim: int = 0, output_dim: int = 0, n_modules: int = 0, hidden_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim, self.n_modules, self.hidden_dim = input_dim, output_dim, n_modules, hidden_dim


class ReferenceStyleModel(PreTrainedModel):
    config_class = ReferenceStyleConfig

    def __init__(self, config):
        super().__init__(config)
        self.all_tied_weights_keys = {}
        if config.hidden_dim is None:
            self.layers = nn.ModuleList(nn.Linear(config.input_dim, config.output_dim) for _ in range(config.n_modules))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(config.input_dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, config.output_dim))
                for _ in range(config.n_modules)
            )


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_transformers_pretrained_model_reads_and_writes_our_format(tmp_path, kind):
    ours = trained_like(kind)
    ours.save(tmp_path / "ours")
    theirs = ReferenceStyleModel.from_pretrained(tmp_path / "ours")
    hidden = torch.randn(4, SHAPE.hidden_size)
    for layer in range(SHAPE.num_layers):
        torch.testing.assert_close(theirs.layers[layer](hidden).T, ours.layer_scores(layer, hidden))
    theirs.save_pretrained(tmp_path / "theirs")
    back = KVzapSurrogate.load(tmp_path / "theirs", shape=SHAPE)
    assert torch.equal(back.layer_scores(1, hidden), ours.layer_scores(1, hidden))


def test_shape_validation_names_the_mismatch(tmp_path):
    trained_like("mlp").save(tmp_path)
    with pytest.raises(KVzapCheckpointError, match=r"3 layers \(model has 4\)"):
        KVzapSurrogate.load(tmp_path, shape=ModelShape(4, 32, 2))
    with pytest.raises(KVzapCheckpointError, match="hidden_size is 64"):
        KVzapSurrogate.load(tmp_path, shape=ModelShape(3, 64, 2))
    with pytest.raises(KVzapCheckpointError, match="8 KV heads"):
        KVzapSurrogate.load(tmp_path, shape=ModelShape(3, 32, 8))


def test_unreachable_hub_id_fails_with_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVzapCheckpointError, match="nvidia/KVzap-mlp-Nonexistent-Model"):
        KVzapSurrogate.load("nvidia/KVzap-mlp-Nonexistent-Model")


def test_kvzap_scorer_scores_the_pass_tokens_from_hidden_states(tmp_path):
    trained_like("linear").save(tmp_path)
    config = KVCompressionConfig(method="kvzap-linear", threshold=-4.0, surrogate=str(tmp_path))
    scorer = build_scorer("kvzap-linear", config, SHAPE)
    hidden = torch.randn(6, SHAPE.hidden_size)
    inputs = LayerInputs(
        layer_idx=2,
        queries=torch.zeros(2, 1, 6, 4),
        keys=torch.zeros(2, 10, 4),
        values=torch.zeros(2, 10, 4),
        hidden_states=hidden,
        positions=torch.arange(10),
        target=(6, 10),  # the last 4 of the pass's 6 tokens
        scaling=0.5,
    )
    expected = scorer.surrogate.layers[2](hidden[2:]).T
    torch.testing.assert_close(scorer.score(inputs), expected)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_meta_load_checks_the_header_without_weights(tmp_path, kind):
    trained_like(kind).to(torch.bfloat16).save(tmp_path / kind)
    checked = KVzapSurrogate.load(tmp_path / kind, shape=SHAPE, device="meta")
    assert type(checked) is (KVzapLinear if kind == "linear" else KVzapMLP)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in checked.parameters())
    with pytest.raises(KVzapCheckpointError, match="8 KV heads"):
        KVzapSurrogate.load(tmp_path / kind, shape=ModelShape(3, 32, 8), device="meta")


def test_meta_load_reports_header_problems(tmp_path):
    trained_like("mlp").save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["hidden_dim"] = 8  # the stored first layer is 32 -> 4
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    for device in ("meta", "cpu"):
        with pytest.raises(KVzapCheckpointError, match=r"has shape \(4,.*config.json implies \(8,"):
            KVzapSurrogate.load(tmp_path / "a", device=device)
    trained_like("mlp").save(tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])  # truncated: the header promises more bytes
    for device in ("meta", "cpu"):
        with pytest.raises(KVzapCheckpointError, match="not a readable safetensors file"):
            KVzapSurrogate.load(tmp_path / "b", device=device)
