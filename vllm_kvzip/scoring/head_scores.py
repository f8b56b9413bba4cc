"""Context-independent head-level scores (snu-mllab/KVzip `--level head`).

head_score[l, h] = max over the calibration text's positions of the pair-level
KVzip score, then max over calibration texts (the reference keeps one file per
calibration set and `load_head_score` takes the max over files).  At inference
every token of head (l, h) gets that score, so the global policy keeps or drops
whole heads.

    python -m vllm_kvzip.scoring.head_scores --model DIR --out FILE.safetensors

Deviation: the reference calibrates on one 88K-token SCBench En.QA book (and
optionally RepoQA code); we cannot download those, so we use the seeded
generated texts of `vllm_kvzip.eval.textgen` (prose, code, key-value lists,
numbers, dialogue), one text per kind by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vllm_kvzip.scoring.kvzap_model import ModelShape

TENSOR_NAME = "head_scores"
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "head_scores"


def shipped_head_scores(model_basename: str) -> Path | None:
    path = DATA_DIR / f"{model_basename}.safetensors"
    return path if path.is_file() else None


def save_head_scores(path: str | Path, head_scores: Tensor, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({TENSOR_NAME: head_scores.float().contiguous().cpu()}, str(path), metadata=metadata or {})
    return path


def load_head_scores(path: str | None, model_name: str, shape: ModelShape) -> Tensor:
    """[L, H] head scores from `path`, else the file shipped for this model; checked against the model."""
    if path is None:
        basename = model_name.rstrip("/").split("/")[-1]
        shipped = shipped_head_scores(basename) if basename else None
        if shipped is None:
            raise FileNotFoundError(
                f"no head scores shipped for model {model_name!r}; compute them with "
                "`python -m vllm_kvzip.scoring.head_scores --model M --out FILE` and pass "
                "--kv-compression-head-scores FILE"
            )
        path = str(shipped)
    with safe_open(path, "pt") as handle:
        if TENSOR_NAME not in handle.keys():
            raise ValueError(f"{path} has no {TENSOR_NAME!r} tensor")
        head_scores = handle.get_tensor(TENSOR_NAME)
    expected = (shape.num_layers, shape.num_kv_heads)
    if tuple(head_scores.shape) != expected:
        raise ValueError(f"head scores in {path} have shape {tuple(head_scores.shape)}; this model needs {expected} (layers, KV heads)")
    return head_scores.float()


@torch.no_grad()
def compute_head_scores(kvzip_model, texts: list[str], chunk_size: int = 2000) -> Tensor:
    """Max over positions and texts of the pair-level KVzip scores: [L, H]."""
    head_scores = None
    for text in texts:
        kv = kvzip_model.prefill(text, {"method": "kvzip", "chunk_size": chunk_size})
        per_text = kv.scores["kvzip"].amax(dim=-1)
        head_scores = per_text if head_scores is None else torch.maximum(head_scores, per_text)
    return head_scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local transformers model folder (or hub id when a hub is reachable)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--model-name", default=None, help="name recorded in the file (default: the folder's basename)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts-per-kind", type=int, default=1)
    parser.add_argument("--chars", type=int, default=6000, help="characters per calibration text")
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvzip.eval.textgen import GENERATORS, calibration_texts
    from vllm_kvzip.scoring.hf import KVzipModel

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model_name = args.model_name or args.model.rstrip("/").split("/")[-1]
    kvzip_model = KVzipModel(model, tokenizer, model_name=model_name)
    texts = [text for _, text in calibration_texts(args.seed, args.texts_per_kind * len(GENERATORS), args.chars)]
    from tqdm.auto import tqdm

    head_scores = None
    for text in tqdm(texts, desc="head scores"):
        per_text = compute_head_scores(kvzip_model, [text], args.chunk_size)
        head_scores = per_text if head_scores is None else torch.maximum(head_scores, per_text)
    metadata = {
        "model": model_name,
        "calibration": json.dumps({"seed": args.seed, "texts": len(texts), "chars": args.chars, "kinds": list(GENERATORS)}),
        "chunk_size": str(args.chunk_size),
    }
    path = save_head_scores(args.out, head_scores, metadata)
    print(f"wrote {tuple(head_scores.shape)} head scores to {path}")


if __name__ == "__main__":
    main()
