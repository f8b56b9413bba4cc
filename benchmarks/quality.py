"""Accuracy against keep ratio for every scoring method on the seeded synthetic set (embedded model, CPU).

    PYTHONPATH=. python benchmarks/quality.py            # default run (~20 min on 2 idle CPU cores)
    PYTHONPATH=. python benchmarks/quality.py --quick    # smoke run (< 3 min)

One prefill per example scores the context with every method at once (KVzip
and KVzip+ share the reconstruction passes); each (method, keep ratio) then
answers the example's questions from a really pruned copy of the cache
(policy "global", window 128, sinks 4: KVCompressionConfig defaults).  The
keep ratio counts only the evictable context tokens (the last 128 context
tokens are always kept, see vllm_kvzip.scoring.policies), so the column
"kept" reports the fraction of the context's KV actually kept.  At keep ratio
1.0 every method keeps every token, which the script checks, so those rows
reuse the full-cache answers instead of regenerating them.

Writes benchmarks/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.eval.hf_eval import answer_example
from vllm_kvzip.eval.synthetic import TASKS, make_dataset, score_answer

METHODS = ("kvzip", "kvzip-plus", "kvzap-mlp", "kvzap-linear", "head", "snapkv", "streaming", "random")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.5, 1.0)
# Examples per task in the default run.  uuid_kv and variable have long answers
# (a UUID, three names) that cost 3-4x more decoding on CPU, so they get one
# example each to keep the default run near 20 minutes.
DEFAULT_EXAMPLES = {"needle": 2, "multikey": 2, "uuid_kv": 1, "variable": 1, "profile": 2}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def model_dir() -> str:
    folder = os.environ.get("VLLM_KVZIP_MODEL_DIR")
    if folder:
        return folder
    try:
        from vllm_kvzip.models import ensure_embedded_model
    except ImportError:
        sys.exit("set VLLM_KVZIP_MODEL_DIR to a transformers folder of SmolLM2-135M-Instruct")
    return ensure_embedded_model()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="needle, multikey, profile x 1 short example, ratios 0.2 / 0.5 / 1.0")
    parser.add_argument("--ratios", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS)
    parser.add_argument("--examples-per-task", type=int, default=None)
    parser.add_argument("--token-budget", type=int, default=None, help="context tokens per example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    ratios = tuple(args.ratios or ((0.2, 0.5, 1.0) if args.quick else DEFAULT_RATIOS))
    tasks = tuple(args.tasks or (("needle", "multikey", "profile") if args.quick else TASKS))
    if args.examples_per_task is not None or args.quick:
        examples_per_task = {task: args.examples_per_task or 1 for task in tasks}
    else:
        examples_per_task = {task: DEFAULT_EXAMPLES[task] for task in tasks}
    token_budget = args.token_budget or (500 if args.quick else 800)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvzip.scoring.hf import KVzipModel

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    kvzip_model = KVzipModel(model, tokenizer, model_name="SmolLM2-135M-Instruct")
    config = KVCompressionConfig(method="kvzip")
    count_tokens = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    examples = [
        example
        for task in tasks
        for example in make_dataset(args.seed, examples_per_task[task], (task,), token_budget, count_tokens)
    ]

    started = time.time()
    records = []  # one per (example, question, method, ratio)
    for example_index, example in enumerate(examples):
        kv = kvzip_model.prefill(example.context, config, methods=args.methods)
        full_answers = answer_example(kvzip_model, kv, example)
        for question, answer in zip(example.questions, full_answers):
            records.append({"example": example_index, "task": example.task, "method": "full", "ratio": 1.0, "kept": 1.0, "score": score_answer(answer, question), "answer": answer})
        for method in args.methods:
            for ratio in ratios:
                pruned = kv.pruned(ratio, method=method)
                kept = float(pruned.keep_set.mask.float().mean())
                if ratio == 1.0:
                    if not pruned.keep_set.mask.all():
                        raise AssertionError(f"{method} at keep ratio 1.0 evicted tokens")
                    answers = full_answers
                else:
                    answers = answer_example(kvzip_model, pruned, example)
                for question, answer in zip(example.questions, answers):
                    records.append({"example": example_index, "task": example.task, "method": method, "ratio": ratio, "kept": kept, "score": score_answer(answer, question), "answer": answer})
        elapsed = time.time() - started
        print(f"[{example_index + 1}/{len(examples)}] {example.task} done, {elapsed:.0f}s", flush=True)

    summary = summarise(records, args.methods, ratios)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "model": "SmolLM2-135M-Instruct (embedded, dequantized Q4_1 GGUF, float32)",
        "settings": {
            "quick": args.quick,
            "tasks": tasks,
            "examples_per_task": examples_per_task,
            "token_budget": token_budget,
            "seed": args.seed,
            "policy": config.effective_policy,
            "window": config.window,
            "sink_tokens": config.sink_tokens,
            "chunk_size": config.chunk_size,
            "questions": sum(len(example.questions) for example in examples),
            "seconds": round(time.time() - started, 1),
        },
        "summary": summary,
        "records": records,
    }
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, ratios, out_dir / "quality.png", result["settings"])
    print(table(summary, ratios))


def summarise(records: list[dict], methods: list[str], ratios: tuple[float, ...]) -> dict:
    """method -> ratio -> {accuracy (mean string_match_all, %), kept (% of context KV), per_task}."""
    summary: dict = {}
    for method in ["full", *methods]:
        summary[method] = {}
        for ratio in ([1.0] if method == "full" else ratios):
            rows = [r for r in records if r["method"] == method and r["ratio"] == ratio]
            per_task = {}
            for task in sorted({r["task"] for r in rows}):
                task_rows = [r for r in rows if r["task"] == task]
                per_task[task] = round(100 * sum(r["score"] for r in task_rows) / len(task_rows), 1)
            summary[method][str(ratio)] = {
                "accuracy": round(100 * sum(r["score"] for r in rows) / len(rows), 1),
                "kept": round(100 * sum(r["kept"] for r in rows) / len(rows), 1),
                "per_task": per_task,
            }
    return summary


def table(summary: dict, ratios: tuple[float, ...]) -> str:
    header = "| method | " + " | ".join(f"{ratio:g}" for ratio in ratios) + " |"
    lines = [header, "|" + "---|" * (len(ratios) + 1)]
    full = summary["full"]["1.0"]["accuracy"]
    lines.append("| full | " + " | ".join(f"{full:.1f}" for _ in ratios) + " |")
    for method, by_ratio in summary.items():
        if method != "full":
            lines.append(f"| {method} | " + " | ".join(f"{by_ratio[str(ratio)]['accuracy']:.1f}" for ratio in ratios) + " |")
    kept = next(by_ratio for method, by_ratio in summary.items() if method != "full")
    lines.append("| kept % of context KV | " + " | ".join(f"{kept[str(ratio)]['kept']:.0f}" for ratio in ratios) + " |")
    return "\n".join(lines)


def plot(summary: dict, ratios: tuple[float, ...], path: Path, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    full = summary["full"]["1.0"]["accuracy"]
    axis.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
    for method, by_ratio in summary.items():
        if method == "full":
            continue
        axis.plot(ratios, [by_ratio[str(ratio)]["accuracy"] for ratio in ratios], marker="o", label=method)
    axis.set_xlabel("keep ratio (fraction of the evictable context KV kept)")
    axis.set_ylabel("accuracy (%, string match)")
    axis.set_title(f"SmolLM2-135M-Instruct, synthetic set ({settings['questions']} questions, ~{settings['token_budget']} tokens)")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
