"""`vllm serve MODEL --kv-compression ...` with the OpenAI client: chat, streaming, completions,
per-request settings (vllm_xargs) and their HTTP 400s.  The server is the session fixture `server`
(tests/conftest.py)."""

from __future__ import annotations

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
