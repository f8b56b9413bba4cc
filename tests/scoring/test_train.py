"""KVzap training: KVzip+ targets vs brute force, ridge vs normal equations, MLP fit, CLI end to end."""

from __future__ import annotations

import json

import torch

from tests.scoring.conftest import tiny_model
from tests.scoring.test_hf import layer_qkv
from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.train import PairData, fit_ridge, kvzip_plus_targets, main, r2_per_layer, repeat_prompt_spans, train_linear, train_mlp


def test_repeat_prompt_spans_locate_text_and_repetition(tokenizer):
    text = "alpha beta gamma"
    ids, (start, end), (repeat_start, repeat_end) = repeat_prompt_spans(tokenizer, text)
    assert tokenizer.decode(ids[start:end]) == text
    assert tokenizer.decode(ids[repeat_start:repeat_end]) == text
    assert "Repeat the previous context exactly." in tokenizer.decode(ids[end:repeat_start])


def test_kvzip_plus_targets_match_full_softmax_brute_force(tokenizer):
    model = tiny_model("qwen3", len(tokenizer), seed=3)
    text = "Numbers 12 and 34 sit by the river."
    features, targets = kvzip_plus_targets(model, tokenizer, text)
    ids, (start, end), (repeat_start, repeat_end) = repeat_prompt_spans(tokenizer, text)
    for layer_idx, (q, k, v, h) in enumerate(layer_qkv(model, ids)):
        torch.testing.assert_close(features[:, layer_idx].double(), h[start:end], rtol=1e-5, atol=1e-6)
        num_heads, _, head_dim = q.shape
        num_kv_heads = k.shape[0]
        group = num_heads // num_kv_heads
        o_proj = model.model.layers[layer_idx].self_attn.o_proj.weight.double()
        expected = torch.zeros(end - start, num_kv_heads, dtype=torch.float64)
        for query_head in range(num_heads):
            kv_head = query_head // group
            w_o = o_proj[:, query_head * head_dim : (query_head + 1) * head_dim]
            value_norms = (v[kv_head, start:end] @ w_o.T).norm(dim=-1)
            for row in range(repeat_start, repeat_end):
                weights = torch.softmax(k[kv_head, : row + 1] @ q[query_head, row] / head_dim**0.5, dim=0)
                score = weights[start:end] * value_norms / h[row].norm()
                expected[:, kv_head] = torch.maximum(expected[:, kv_head], score)
        torch.testing.assert_close(targets[:, layer_idx].double(), expected.log(), rtol=1e-4, atol=1e-4)


def test_ridge_matches_augmented_normal_equations():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 6, generator=generator)
    targets = features @ torch.randn(6, 3, generator=generator) + 0.5 + 0.1 * torch.randn(200, 3, generator=generator)
    weight, bias = fit_ridge(features, targets, alpha=2.0)
    augmented = torch.cat([features.double(), torch.ones(200, 1, dtype=torch.float64)], dim=1)
    penalty = torch.diag(torch.tensor([2.0] * 6 + [0.0], dtype=torch.float64))  # intercept not penalised
    solution = torch.linalg.solve(augmented.T @ augmented + penalty, augmented.T @ targets.double())
    torch.testing.assert_close(weight.double(), solution[:6].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias.double(), solution[6], rtol=1e-4, atol=1e-5)


def synthetic_pairs(nonlinear: bool) -> tuple[PairData, PairData, ModelShape]:
    generator = torch.Generator().manual_seed(1)
    # hidden_size 64 gives the MLP hidden_size / 8 = 8 GELU units.
    shape = ModelShape(num_layers=2, hidden_size=64, num_kv_heads=2)
    features = torch.randn(3000, 2, 64, generator=generator)
    mixing = torch.randn(2, 64, 2, generator=generator) / 8
    targets = torch.einsum("nld,ldh->nlh", features, mixing)
    if nonlinear:
        targets = torch.tanh(targets) * 2 - 4
    data = PairData(features, targets, torch.arange(3000))
    return data.subset(torch.arange(3000) < 2500), data.subset(torch.arange(3000) >= 2500), shape


def test_linear_and_mlp_training_fit_held_out_data():
    train, test, shape = synthetic_pairs(nonlinear=False)
    assert min(r2_per_layer(train_linear(train, shape), test)) > 0.99
    train, test, shape = synthetic_pairs(nonlinear=True)
    mlp, history = train_mlp(train, shape, epochs=15, batch_size=64)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(r2_per_layer(mlp, test)) > 0.8


def test_cli_trains_and_writes_a_loadable_checkpoint(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer), dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    main(["--model", str(tmp_path / "model"), "--kind", "mlp", "--out", str(tmp_path / "out"), "--texts", "6", "--chars", "120", "--tokens-per-text", "16", "--epochs", "2"])
    loaded = KVzapSurrogate.load(tmp_path / "out", shape=ModelShape.from_config(model.config))
    assert loaded.kind == "mlp"
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert len(report["r2_per_layer"]) == 2 and report["test_pairs"] > 0 and report["train_pairs"] > report["test_pairs"]
