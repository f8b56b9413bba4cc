"""Train a KVzap surrogate (linear or MLP) for a transformers model, on CPU if need be.

    python -m vllm_kvzip.scoring.train --model DIR --kind mlp|linear --out DIR

Data (as kvpress kvzap/data.py, with generated instead of downloaded text):
  * texts: `vllm_kvzip.eval.textgen.calibration_texts` — seeded prose, code,
    key-value lists, numbers and dialogue (kvpress uses 750-1250-token samples of
    nvidia/Nemotron-Pretraining-Dataset-sample, which we cannot download).
  * each text is wrapped with the chat template as
        user: <text>\\n\\nRepeat the previous context exactly.   assistant: <text>
    and run once through the model (full causal softmax, no chunking);
  * target of a text token i at layer l, KV head h: log max_{j, g} a_ji * ||W_O^(g) v_i|| / ||h_j||
    over the query rows j of the *repeated* text and the GQA group g (KVzip+);
  * feature: the attention input (after input_layernorm) of token i at layer l.
  * `--tokens-per-text` random tokens per text; whole texts are held out for the R^2.

Fitting (as kvpress kvzap/train.py, without scikit-learn / skorch):
  * linear: ridge regression per layer, closed form, alpha = 1 (sklearn's default),
    unpenalised intercept;
  * mlp: AdamW (lr 5e-3), cosine annealing over the epochs, gradient-norm clipping
    at 1, batch 512, 15 epochs, MSE on the log-scores, 5% of the training pairs as
    a validation split (reported, not used for early stopping).

Output: the surrogate in the nvidia/KVzap-* format, plus `training_report.json`
(R^2 per layer on the held-out texts, data sizes, settings).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vllm_kvzip.scoring.functional import KVzipPlusTerms, kvzip_chunk_scores
from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.reconstruction import FIRST_CHUNK_PROMPT

RIDGE_ALPHA = 1.0


@dataclass
class PairData:
    """features [N, L, D], log-score targets [N, L, H], and the text each pair comes from [N]."""

    features: Tensor
    targets: Tensor
    text_index: Tensor

    def subset(self, mask: Tensor) -> "PairData":
        return PairData(self.features[mask], self.targets[mask], self.text_index[mask])


# ---------------------------------------------------------------------------------
# Data collection
# ---------------------------------------------------------------------------------
def repeat_prompt_spans(tokenizer, text: str) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """Token ids of the chat-templated repeat prompt and the [start, end) of the text and of its repetition."""
    text = text.strip()
    messages = [
        {"role": "user", "content": text + FIRST_CHUNK_PROMPT},
        {"role": "assistant", "content": text},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    starts = torch.tensor([start for start, _ in encoded["offset_mapping"]])
    first = rendered.index(text)
    second = rendered.index(text, first + len(text))

    def token_at(char: int) -> int:
        return int(torch.nonzero(starts >= char)[0])

    prompt = (token_at(first), token_at(first + len(text)))
    repeated = (token_at(second), token_at(second + len(text)))
    return list(encoded["input_ids"]), prompt, repeated


@torch.no_grad()
def kvzip_plus_targets(model, tokenizer, text: str) -> tuple[Tensor, Tensor]:
    """(attention inputs [n, L, D], log KVzip+ scores [n, L, H]) for the n tokens of `text`."""
    from vllm_kvzip.scoring.hf import capture_layers

    input_ids, (prompt_start, prompt_end), (repeat_start, repeat_end) = repeat_prompt_spans(tokenizer, text)
    shape = ModelShape.from_config(model.config)
    features = torch.empty(prompt_end - prompt_start, shape.num_layers, shape.hidden_size)
    targets = torch.empty(prompt_end - prompt_start, shape.num_layers, shape.num_kv_heads)

    def on_layer(layer_idx, module, queries, keys, values, hidden, scaling):
        num_kv_heads = keys.shape[0]
        repeat_queries = queries[:, prompt_end:].reshape(num_kv_heads, -1, queries.shape[1] - prompt_end, queries.shape[2])
        scores = kvzip_chunk_scores(
            repeat_queries,
            keys[:, :prompt_start],
            keys[:, prompt_start:prompt_end],
            keys[:, prompt_end:],
            scaling=scaling,
            plus=KVzipPlusTerms(values[:, prompt_start:prompt_end], module.o_proj.weight, hidden[prompt_end:].float().norm(dim=-1)),
            # Only the rows of the repeated text, as kvpress's collector.
            score_rows=(repeat_start - prompt_end, repeat_end - prompt_end),
        )
        features[:, layer_idx] = hidden[prompt_start:prompt_end].float().cpu()
        targets[:, layer_idx] = scores.clamp_min(torch.finfo(torch.float32).tiny).log().T.cpu()

    device = next(model.parameters()).device
    with capture_layers(model, on_layer):
        model.get_decoder()(input_ids=torch.tensor([input_ids], device=device), use_cache=False)
    return features, targets


def collect_pairs(model, tokenizer, texts: list[str], tokens_per_text: int, seed: int) -> PairData:
    generator = torch.Generator().manual_seed(seed)
    features, targets, text_index = [], [], []
    for index, text in enumerate(tqdm(texts, desc="collecting KVzip+ targets")):
        text_features, text_targets = kvzip_plus_targets(model, tokenizer, text)
        chosen = torch.randperm(text_features.shape[0], generator=generator)[:tokens_per_text]
        features.append(text_features[chosen])
        targets.append(text_targets[chosen])
        text_index.append(torch.full((len(chosen),), index))
    return PairData(torch.cat(features), torch.cat(targets), torch.cat(text_index))


# ---------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------
def fit_ridge(features: Tensor, targets: Tensor, alpha: float = RIDGE_ALPHA) -> tuple[Tensor, Tensor]:
    """Closed-form ridge with an unpenalised intercept: [N, D], [N, H] -> weight [H, D], bias [H]."""
    x, y = features.double(), targets.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc)  # [D, H]
    bias = y_mean - x_mean @ weight
    return weight.T.float(), bias.float()


def train_linear(data: PairData, shape: ModelShape) -> KVzapSurrogate:
    surrogate = KVzapSurrogate.for_model(shape, "linear")
    for layer_idx in tqdm(range(shape.num_layers), desc="ridge per layer"):
        weight, bias = fit_ridge(data.features[:, layer_idx], data.targets[:, layer_idx])
        surrogate.layers[layer_idx].weight.data.copy_(weight)
        surrogate.layers[layer_idx].bias.data.copy_(bias)
    return surrogate.eval()


def train_mlp(
    data: PairData,
    shape: ModelShape,
    *,
    epochs: int = 15,
    lr: float = 5e-3,
    batch_size: int = 512,
    validation_fraction: float = 0.05,
    seed: int = 42,
) -> tuple[KVzapSurrogate, list[dict]]:
    torch.manual_seed(seed)
    surrogate = KVzapSurrogate.for_model(shape, "mlp")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.features.shape[0], generator=generator)
    num_validation = max(1, int(validation_fraction * len(order)))
    validation, train = order[:num_validation], order[num_validation:]
    optimizer = torch.optim.AdamW(surrogate.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.MSELoss()
    history = []
    for epoch in (progress := tqdm(range(epochs), desc="MLP epochs")):
        surrogate.train()
        shuffled = train[torch.randperm(len(train), generator=generator)]
        total, count = 0.0, 0
        for start in range(0, len(shuffled), batch_size):
            batch = shuffled[start : start + batch_size]
            loss = loss_fn(surrogate(data.features[batch]), data.targets[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(surrogate.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        schedule.step()
        surrogate.eval()
        with torch.no_grad():
            validation_loss = float(loss_fn(surrogate(data.features[validation]), data.targets[validation]))
        history.append({"epoch": epoch + 1, "train_loss": total / count, "validation_loss": validation_loss})
        progress.set_postfix(train=f"{total / count:.3f}", valid=f"{validation_loss:.3f}")
    return surrogate.eval(), history


@torch.no_grad()
def r2_per_layer(surrogate: KVzapSurrogate, data: PairData) -> list[float]:
    """R^2 per layer = mean over KV heads of 1 - SS_res / SS_tot (the paper averages over heads)."""
    predictions = surrogate(data.features).double()
    targets = data.targets.double()
    residual = ((targets - predictions) ** 2).sum(dim=0)
    total = ((targets - targets.mean(dim=0)) ** 2).sum(dim=0)
    return (1.0 - residual / total).mean(dim=-1).tolist()


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local transformers model folder (or hub id when a hub is reachable)")
    parser.add_argument("--kind", required=True, choices=["linear", "mlp"])
    parser.add_argument("--out", required=True, help="output folder (nvidia/KVzap-* layout)")
    parser.add_argument("--texts", type=int, default=150, help="number of generated texts")
    parser.add_argument("--chars", type=int, default=1200, help="characters per text (+-25%%)")
    parser.add_argument("--tokens-per-text", type=int, default=128)
    parser.add_argument("--test-fraction", type=float, default=0.1, help="fraction of the texts held out for R^2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-cache", default=None, help="reuse / store the collected pairs in this .pt file")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvzip.eval.textgen import calibration_texts

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    shape = ModelShape.from_config(model.config)
    texts = [text for _, text in calibration_texts(args.seed, args.texts, args.chars)]
    cache = Path(args.data_cache) if args.data_cache else None
    if cache is not None and cache.is_file():
        stored = torch.load(cache)
        data = PairData(stored["features"], stored["targets"], stored["text_index"])
    else:
        data = collect_pairs(model, tokenizer, texts, args.tokens_per_text, args.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": data.features, "targets": data.targets, "text_index": data.text_index}, cache)

    test_texts = set(random.Random(args.seed).sample(range(args.texts), max(1, math.ceil(args.test_fraction * args.texts))))
    is_test = torch.tensor([int(index) in test_texts for index in data.text_index])
    train_data, test_data = data.subset(~is_test), data.subset(is_test)

    history: list[dict] = []
    if args.kind == "linear":
        surrogate = train_linear(train_data, shape)
    else:
        surrogate, history = train_mlp(train_data, shape, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    r2 = r2_per_layer(surrogate, test_data)
    out = surrogate.save(args.out)
    report = {
        "model": args.model.rstrip("/").split("/")[-1],
        "kind": args.kind,
        "r2_per_layer": r2,
        "r2_mean": sum(r2) / len(r2),
        "train_pairs": int(train_data.features.shape[0]),
        "test_pairs": int(test_data.features.shape[0]),
        "texts": args.texts,
        "test_texts": len(test_texts),
        "chars_per_text": args.chars,
        "tokens_per_text": args.tokens_per_text,
        "seed": args.seed,
        "history": history,
        "seconds": round(time.time() - started, 1),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"R^2 on held-out texts: mean {report['r2_mean']:.3f}; per layer " + " ".join(f"{value:.2f}" for value in r2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
