"""`python -m vllm_kvzip.demo`: the main job on the embedded model.

Starts vLLM (offline `LLM`) on SmolLM2-135M-Instruct with vllm-kvzip enabled
through `additional_config` -- no plugin-specific import is needed for that --
and asks questions about a short profile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# SmolLM2-135M is small: it answers questions phrased this way reliably.
PROFILE = (
    "Profile: My name is Ana. I live in Porto. I have a cat named Whiskers and a dog named Rex. "
    "I work as a nurse."
)
QUESTIONS = [
    ("What is my cat's name? Answer with the name only.", "Whiskers"),
    ("Which city do I live in? Answer with the city only.", "Porto"),
    ("What is my job? Answer with the job only.", "nurse"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvzip.demo", description=__doc__)
    parser.add_argument("--method", default="streaming", help="--kv-compression method (default: streaming)")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)

    # Settings that make vLLM's CPU build usable on a small machine.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from vllm_kvzip.models import ensure_embedded_model

    model = args.model or ensure_embedded_model()
    from vllm import LLM, SamplingParams

    settings = {"method": args.method, "keep_ratio": args.keep_ratio}
    started = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        additional_config={"kv_compression": settings},
    )
    print(f"engine ready in {time.perf_counter() - started:.0f} s with kv_compression={settings}")
    conversations = [[{"role": "user", "content": f"{PROFILE}\n\nQuestion: {question}"}] for question, _ in QUESTIONS]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=24))
    correct = 0
    for (question, expected), output in zip(QUESTIONS, outputs):
        answer = output.outputs[0].text.strip()
        ok = expected.lower() in answer.lower()
        correct += ok
        print(f"[{'ok' if ok else '--'}] {question}\n     -> {answer}")
    print(f"{correct}/{len(QUESTIONS)} answered correctly")
    return 0 if correct == len(QUESTIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
