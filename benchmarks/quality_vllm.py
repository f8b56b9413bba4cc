"""Answers through the real vLLM engine with compression, against the full cache in the same engine.

    PYTHONPATH=. python benchmarks/quality_vllm.py            # default run (CPU: ~20 min on 2 idle cores)
    PYTHONPATH=. python benchmarks/quality_vllm.py --quick    # smoke run

`benchmarks/quality.py` measures the scoring methods with the transformers API
(compress the context, then ask).  This script measures what a user of
`vllm serve` / `LLM()` gets: one request = context + question, prefilled by
vLLM, compressed by the plugin after the prefill (the question sits in the
always-kept newest `window` tokens), then decoded over the ragged pages.

One engine per method, each in a fresh subprocess.  Inside an engine every
question is asked at every keep ratio (`SamplingParams.extra_args
{"kv_compression_ratio": r}`) and once with the per-request opt-out
`{"kv_compression": "none"}`: the full-cache baseline runs in the same engine,
the same batch.  Reported per (method, ratio): accuracy, the ratio against the
full cache's accuracy, the fraction of the questions the full cache answers
that the compressed cache also answers (`retained`), the fraction of answers
identical to the full cache's, and the KV blocks the request still holds
(`kv_blocks_fraction`: 1 - blocks the worker freed / blocks of the prompts, measured
per ratio: each ratio runs as its own batch).

Writes benchmarks/results/quality_vllm.json and quality_vllm.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Methods that run inside vLLM and take a keep ratio.
METHODS = ("kvzip", "kvzip-plus", "kvzap-mlp", "kvzap-linear", "head", "snapkv", "streaming", "random")
DEFAULT_METHODS = ("kvzip", "kvzap-mlp", "kvzap-linear", "snapkv", "head", "streaming", "random")
DEFAULT_RATIOS = (0.2, 0.3, 0.5)
# 8 examples x 3 questions = 24 questions, as benchmarks/quality.py.
DEFAULT_EXAMPLES = {"needle": 2, "multikey": 2, "uuid_kv": 1, "variable": 1, "profile": 2}
BLOCK_SIZE = 16
OPT_OUT = "full"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="kvzap-mlp and streaming, ratio 0.3, one example per task")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="keep ratios (0 < r < 1)")
    parser.add_argument("--examples-per-task", type=int, default=None)
    parser.add_argument("--tasks", nargs="+", default=None, choices=tuple(DEFAULT_EXAMPLES))
    parser.add_argument("--token-budget", type=int, default=1000, help="context tokens per example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=128, help="--kv-compression-window")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--tag", default="", help="suffix of the output files (quality_vllm_TAG.json)")
    parser.add_argument("--engine-method", default=None, help=argparse.SUPPRESS)  # child process: one engine
    parser.add_argument("--engine-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for ratio in args.ratios or ():
        if not 0 < ratio < 1:
            parser.error(f"--ratios: {ratio} is not in (0, 1); the full cache (1.0) is always measured")
    return args


def settings_of(args: argparse.Namespace) -> dict:
    ratios = tuple(args.ratios or ((0.3,) if args.quick else DEFAULT_RATIOS))
    methods = tuple(args.methods or (("kvzap-mlp", "streaming") if args.quick else DEFAULT_METHODS))
    if args.quick or args.examples_per_task is not None:
        examples = {task: args.examples_per_task or 1 for task in DEFAULT_EXAMPLES}
    else:
        examples = dict(DEFAULT_EXAMPLES)
    if args.tasks:
        examples = {task: count for task, count in examples.items() if task in args.tasks}
    return {
        "methods": methods, "ratios": ratios, "examples_per_task": examples, "token_budget": args.token_budget,
        "seed": args.seed, "window": args.window, "dtype": args.dtype, "block_size": BLOCK_SIZE,
    }


def run_engine(args: argparse.Namespace) -> None:
    """Child process: one engine with `--kv-compression <method>`, every question at every ratio + full cache."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_kvzip.demo import _chat_with_prefixes
    from vllm_kvzip.eval.synthetic import make_dataset, score_answer
    from vllm_kvzip.models import ensure_embedded_model

    settings = settings_of(args)
    method = args.engine_method
    started = time.perf_counter()
    llm = LLM(
        model=args.model or ensure_embedded_model(),
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=4096,
        block_size=BLOCK_SIZE,
        seed=0,
        additional_config={"kv_compression": {"method": method, "keep_ratio": settings["ratios"][0], "window": args.window}},
    )
    startup_seconds = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    count_tokens = lambda text: len(tokenizer.encode(text))  # noqa: E731
    examples = [
        example
        for task, count in settings["examples_per_task"].items()
        for example in make_dataset(settings["seed"], count, (task,), settings["token_budget"], count_tokens)
    ]
    from vllm_kvzip.backend.state import get_state

    variants = [(OPT_OUT, {"kv_compression": "none"})] + [
        (ratio, {"kv_compression_ratio": ratio}) for ratio in settings["ratios"]
    ]
    questions = [(example_index, question_index) for example_index, example in enumerate(examples)
                 for question_index in range(len(example.questions))]
    conversations, prefixes, max_tokens = [], [], []
    for example_index, question_index in questions:
        example = examples[example_index]
        question = example.questions[question_index]
        conversations.append([{"role": "user", "content": example.context + "\n\n" + question.text}])
        prefixes.append(question.answer_prefix)
        max_tokens.append(sum(len(tokenizer.encode(" " + answer)) + 2 for answer in question.answers) + 4)

    records, blocks_fraction, generate_seconds = [], {}, 0.0
    for variant, extra_args in variants:
        # One batch per variant, so the blocks the worker freed for it are measured, not computed.
        state = get_state()
        freed_before = state.total_freed_blocks if state is not None else 0
        params = [SamplingParams(temperature=0, max_tokens=n, stop=["\n", '"'], extra_args=extra_args) for n in max_tokens]
        started = time.perf_counter()
        outputs = _chat_with_prefixes(llm, conversations, prefixes, params)
        generate_seconds += time.perf_counter() - started
        freed = (state.total_freed_blocks if state is not None else 0) - freed_before
        blocks = sum(-(-len(output.prompt_token_ids) // BLOCK_SIZE) for output in outputs)
        blocks_fraction[str(variant)] = round(1 - freed / blocks, 4)
        if variant == OPT_OUT and freed:
            raise AssertionError(f"opted-out requests freed {freed} blocks")
        if variant != OPT_OUT and not freed:
            raise AssertionError(f"--kv-compression {method} at ratio {variant} freed no block")
        for (example_index, question_index), output in zip(questions, outputs):
            example = examples[example_index]
            question = example.questions[question_index]
            answer = output.outputs[0].text
            records.append({
                "method": method, "ratio": variant, "example": example_index, "task": example.task,
                "question": question_index, "prompt_tokens": len(output.prompt_token_ids),
                "score": score_answer(answer, question), "answer": answer,
            })

    state = get_state()
    result = {
        "method": method, "records": records, "startup_seconds": round(startup_seconds, 1),
        "generate_seconds": round(generate_seconds, 1), "requests": len(records),
        "compressed_requests": state.total_compressed if state is not None else 0,
        "kv_blocks_fraction": blocks_fraction,
        "engine_stats": state.stats() if state is not None else None,
    }
    Path(args.engine_out).write_text(json.dumps(result))


def summarise(engine_results: list[dict], ratios: tuple[float, ...]) -> dict:
    summary = {}
    for result in engine_results:
        records = result["records"]
        full = {(r["example"], r["question"]): r for r in records if r["ratio"] == OPT_OUT}
        full_correct = [key for key, r in full.items() if r["score"] == 1.0]
        full_accuracy = sum(r["score"] for r in full.values()) / len(full)
        per_ratio = {}
        for ratio in ratios:
            rows = [r for r in records if r["ratio"] == ratio]
            by_key = {(r["example"], r["question"]): r for r in rows}
            accuracy = sum(r["score"] for r in rows) / len(rows)
            per_ratio[str(ratio)] = {
                "accuracy": round(accuracy, 4),
                "vs_full_cache": round(accuracy / full_accuracy, 4) if full_accuracy else None,
                "retained": round(sum(by_key[key]["score"] == 1.0 for key in full_correct) / len(full_correct), 4)
                if full_correct else None,
                "same_answer_as_full_cache": round(
                    sum(by_key[key]["answer"].strip() == full[key]["answer"].strip() for key in full) / len(full), 4
                ),
                "kv_blocks_fraction": result["kv_blocks_fraction"][str(ratio)],
            }
        summary[result["method"]] = {
            "full_cache_accuracy": round(full_accuracy, 4), "questions": len(full), "ratios": per_ratio,
            "startup_seconds": result["startup_seconds"], "generate_seconds": result["generate_seconds"],
            "compressed_requests": result["compressed_requests"],
        }
    return summary


def table(summary: dict, ratios: tuple[float, ...]) -> str:
    lines = [f"{'method':14} {'full':>6} " + " ".join(f"{'r=' + str(r):>22}" for r in ratios)]
    lines.append(f"{'':14} {'acc':>6} " + " ".join(f"{'acc  vs-full  blocks':>22}" for _ in ratios))
    for method, row in summary.items():
        cells = []
        for ratio in ratios:
            cell = row["ratios"][str(ratio)]
            cells.append(f"{cell['accuracy']:5.1%} {cell['vs_full_cache'] or 0:7.2f}x {cell['kv_blocks_fraction']:6.1%}")
        lines.append(f"{method:14} {row['full_cache_accuracy']:6.1%} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def plot(summary: dict, ratios: tuple[float, ...], path: Path, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    full = [row["full_cache_accuracy"] for row in summary.values()]
    axis.axhline(sum(full) / len(full), color="black", linestyle="--", label="full cache (opt-out, same engines)")
    for method, row in summary.items():
        xs = [row["ratios"][str(r)]["kv_blocks_fraction"] for r in ratios]
        ys = [row["ratios"][str(r)]["accuracy"] for r in ratios]
        axis.plot(xs, ys, marker="o", label=method)
    axis.set_xlabel("KV blocks still held after compression (fraction of the request's blocks)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.02)
    questions = next(iter(summary.values()))["questions"]
    axis.set_title(f"vLLM engine, SmolLM2-135M, {questions} questions, ~{settings['token_budget']}-token contexts")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_method:
        run_engine(args)
        return 0
    settings = settings_of(args)
    started = time.time()
    engine_results = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in settings["methods"]:
            out = Path(scratch) / f"{method}.json"
            child = [sys.executable, __file__, "--engine-method", method, "--engine-out", str(out)]
            child += [a for a in (argv if argv is not None else sys.argv[1:])]
            print(f"[{time.time() - started:5.0f}s] engine with --kv-compression {method} ...", flush=True)
            subprocess.run(child, check=True)
            engine_results.append(json.loads(out.read_text()))
    summary = summarise(engine_results, settings["ratios"])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality_vllm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "model": "SmolLM2-135M-Instruct (embedded, dequantized Q4_1 GGUF)",
        "command": command.strip(),
        "settings": {**settings, "seconds": round(time.time() - started, 1)},
        "summary": summary,
        "records": [record for result in engine_results for record in result["records"]],
    }
    stem = ("quality_vllm_quick" if args.quick else "quality_vllm") + (f"_{args.tag}" if args.tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, settings["ratios"], out_dir / f"{stem}.png", settings)
    print(table(summary, settings["ratios"]))
    print(f"wrote {out_dir / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
