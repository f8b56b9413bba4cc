"""`python -m vllm_kvzip.demo`: the main job on the embedded model.

Starts vLLM's offline engine on SmolLM2-135M-Instruct with KV compression on
(`additional_config`, no plugin-specific import), asks the seeded synthetic
long-context questions twice in one batch -- compressed, and with the
per-request opt-out `{"kv_compression": "none"}` as the full-cache baseline --
and prints the answers, the accuracy of both and the KV memory kept and freed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvzip.demo", description=__doc__)
    parser.add_argument("--method", default="kvzap-mlp", help="--kv-compression method (default: kvzap-mlp)")
    parser.add_argument("--keep-ratio", type=float, default=0.3)
    parser.add_argument("--examples-per-task", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=1000, help="context length of each example, in tokens")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    args = parser.parse_args(argv)

    # vLLM's CPU build on a small machine: a 1 GiB KV pool, both cores, engine in
    # this process (so the demo can read the plugin's counters).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.eval.synthetic import is_correct, make_dataset
    from vllm_kvzip.models import ensure_embedded_model

    model = args.model or ensure_embedded_model()
    settings = {"method": args.method, "keep_ratio": args.keep_ratio}
    started = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        block_size=16,
        additional_config={"kv_compression": settings},
    )
    print(f"engine ready in {time.perf_counter() - started:.0f} s with kv_compression={settings}")
    tokenizer = llm.get_tokenizer()
    examples = make_dataset(
        seed=0,
        examples_per_task=args.examples_per_task,
        token_budget=args.token_budget,
        count_tokens=lambda text: len(tokenizer.encode(text)),
    )
    conversations, questions = [], []
    for example in examples:
        for question in example.questions[:1]:
            messages = [{"role": "user", "content": example.context + "\n\n" + question.text}]
            conversations.append(messages)
            questions.append((example.task, question))
    greedy = dict(temperature=0, max_tokens=24)
    params = [SamplingParams(**greedy)] * len(conversations) + [
        SamplingParams(**greedy, extra_args={"kv_compression": "none"})
    ] * len(conversations)
    prefixes = [question.answer_prefix for _, question in questions] * 2
    outputs = _chat_with_prefixes(llm, conversations * 2, prefixes, params)

    count = len(conversations)
    correct_compressed = correct_full = 0
    for index, (task, question) in enumerate(questions):
        compressed = outputs[index].outputs[0].text.strip()
        full = outputs[count + index].outputs[0].text.strip()
        ok_compressed, ok_full = is_correct(compressed, question), is_correct(full, question)
        correct_compressed += ok_compressed
        correct_full += ok_full
        print(f"[{task:8}] {question.text[:70]}")
        print(f"    compressed [{'ok' if ok_compressed else '--'}] {question.answer_prefix}{compressed[:60]!r}")
        print(f"    full cache [{'ok' if ok_full else '--'}] {question.answer_prefix}{full[:60]!r}")
    state = get_state()
    print(f"\naccuracy: compressed {correct_compressed}/{count}, full cache {correct_full}/{count}")
    if state is not None and state.total_evictable_tokens:
        kept = state.total_kept_tokens / state.total_evictable_tokens
        print(
            f"{state.total_compressed} requests compressed with {args.method}: kept {kept:.1%} of the context KV "
            f"before the {state.config.window}-token window, {state.total_freed_blocks} blocks freed to vLLM"
        )
    return 0


def _chat_with_prefixes(llm, conversations, prefixes, params):
    """Render each chat with its assistant answer prefix (as RULER does), then generate."""
    from vllm import TokensPrompt

    tokenizer = llm.get_tokenizer()
    prompts = []
    for messages, prefix in zip(conversations, prefixes):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        prompts.append(TokensPrompt(prompt_token_ids=tokenizer.encode(text, add_special_tokens=False)))
    return llm.generate(prompts, params, use_tqdm=False)


if __name__ == "__main__":
    sys.exit(main())
