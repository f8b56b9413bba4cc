"""`vllm serve MODEL --kv-compression ...` with the OpenAI client: chat, streaming, completions,
per-request settings (vllm_xargs) and their HTTP 400s.  The server is the session fixture `server`
(tests/conftest.py)."""

from __future__ import annotations

import os
import time

import pytest

from vllm_kvzip.eval.synthetic import make_example

pytestmark = pytest.mark.engine


def _long_question():
    example = make_example("profile", 3, token_budget=500)
    question = example.questions[0]
    return example.context + "\n\n" + question.text, question


def test_chat_streaming_and_completions(server):
    from openai import OpenAI

    base, log_path = server
    log_before = len(log_path.read_text())  # the server may have served other tests' requests
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    content, _ = _long_question()
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": content}], max_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 200

    chunks = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": content}], max_tokens=16, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == reply.choices[0].message.content  # greedy: same answer with or without streaming

    completion = client.completions.create(model="smollm2", prompt=content, max_tokens=8, temperature=0)
    assert completion.choices[0].text

    log = log_path.read_text()
    assert "vllm-kvzip: KV compression streaming (keep ratio 0.3, window 64" in log
    assert log.count("compressed (streaming)") >= 3
    from vllm_kvzip.eval.server import keep_sets_in_log

    ours = log[log_before:]
    digests = [digest for found in keep_sets_in_log(ours).values() for digest in found]
    assert len(digests) == ours.count("compressed (streaming)") == 3
    # The same chat prompt with and without streaming: the same tokens kept; the raw completion
    # prompt (no chat template) is another sequence.
    assert digests[0] == digests[1] != digests[2]


def test_per_request_settings_and_their_errors(server):
    import openai
    from openai import OpenAI

    base, log_path = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    content, _ = _long_question()
    messages = [{"role": "user", "content": content}]
    before = log_path.read_text().count("compressed (streaming)")
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=4, extra_body={"vllm_xargs": {"kv_compression": "none"}}
    )
    assert reply.choices[0].message.content is not None
    assert log_path.read_text().count("compressed (streaming)") == before  # opted out: stayed dense

    for bad, fragment in (
        ({"kv_compression_ratio": 1.5}, "0 < ratio <= 1"),
        ({"kv_compression": "kvzip"}, "not available per request"),
    ):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=4, extra_body={"vllm_xargs": bad}
            )
        assert fragment in str(error.value)
    # The engine is still serving.
    again = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=4)
    assert again.choices[0].message.content is not None


def _scrape(base) -> dict:
    """/metrics as {(sample name, frozenset(labels)): value}."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_match_the_geometry(server, embedded_model):
    """vllm:kvzip_* on /metrics (API server process) count what the engine core freed, exactly."""
    import json

    from openai import OpenAI

    from vllm_kvzip.block_manager.geometry import CompressionGeometry

    base, log_path = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    model_config = json.loads(open(os.path.join(embedded_model, "config.json")).read())
    num_kv_heads, num_layers = model_config["num_key_value_heads"], model_config["num_hidden_layers"]
    labels = {"model_name": "smollm2", "engine": "0", "method": "streaming"}

    def value(snapshot, name, **extra):
        return snapshot.get((name, frozenset({**labels, **extra}.items())), 0.0)

    before = _scrape(base)
    assert ("vllm:kvzip_freed_blocks_total", frozenset(labels.items())) in before  # exposed from the start
    assert ("vllm:num_requests_running", frozenset({"model_name": "smollm2", "engine": "0"}.items())) in before

    def ask(budget, seed, extra=None):
        example = make_example("needle", seed, token_budget=budget)
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": example.context + "\n\n" + example.questions[0].text}],
            max_tokens=4, temperature=0, extra_body={"vllm_xargs": extra} if extra else None,
        )
        return reply.usage.prompt_tokens

    compressed = []  # (prompt tokens, keep ratio)
    for budget, seed, ratio in ((300, 0, None), (600, 1, None), (450, 2, 0.5)):
        compressed.append((ask(budget, seed, {"kv_compression_ratio": ratio} if ratio else None), ratio or 0.3))
    opted_out_tokens = ask(400, 3, {"kv_compression": "none"})
    short = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert opted_out_tokens > 200 and short.usage.prompt_tokens < 64 + 16  # below window + one block

    geometries = [
        CompressionGeometry(num_tokens=tokens, block_size=16, window=64, keep_ratio=ratio,
                            num_kv_heads=num_kv_heads, num_layers=num_layers, policy="global", sink_tokens=4)
        for tokens, ratio in compressed
    ]
    assert all(geometry.compresses for geometry in geometries)
    deadline = time.time() + 30
    while True:  # the stats of the last step may still be on their way to the API server
        after = _scrape(base)
        delta = {key: after[key] - before.get(key, 0.0) for key in after}
        if value(delta, "vllm:kvzip_requests_total", outcome="too_short") >= 1 or time.time() > deadline:
            break
        time.sleep(0.5)

    assert value(delta, "vllm:kvzip_requests_total", outcome="compressed") == 3
    assert value(delta, "vllm:kvzip_requests_total", outcome="opted_out") == 1
    assert value(delta, "vllm:kvzip_requests_total", outcome="too_short") == 1
    assert value(delta, "vllm:kvzip_kept_ratio_count") == 3
    # Kept per (layer, KV head) on average: the default "global" policy keeps
    # floor(r * L * H * scored) + L * H * sinks tokens over the request, plus the dense tail.
    kept = [g.kept_tokens / g.num_pairs + g.num_tokens - g.evictable_tokens for g in geometries]
    ratios = [k / g.num_tokens for k, g in zip(kept, geometries)]
    assert value(delta, "vllm:kvzip_kept_ratio_sum") == pytest.approx(sum(ratios), abs=1e-9)
    assert value(delta, "vllm:kvzip_freed_blocks_total") == sum(g.freed_blocks for g in geometries)
    assert value(delta, "vllm:kvzip_context_tokens_total") == sum(g.num_tokens for g in geometries)
    assert value(delta, "vllm:kvzip_kept_tokens_total") == pytest.approx(sum(kept), abs=1e-9)

    # The worker's per-request log line states the same numbers, from its real keep-sets.
    log = log_path.read_text()
    for keep, geometry in zip(kept, geometries):
        text = f"{keep:.0f}" if float(keep).is_integer() else f"{keep:.2f}"
        assert f"kept {text} of {geometry.num_tokens} context tokens (ratio {keep / geometry.num_tokens:.4f};" in log
        assert f"freed {geometry.freed_blocks} of {-(-geometry.num_tokens // 16)} blocks" in log
