"""`vllm serve MODEL --kv-compression ...` with the OpenAI client: chat, streaming, completions,
per-request settings (vllm_xargs) and their HTTP 400s."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from vllm_kvzip.eval.synthetic import make_example

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(embedded_model, tmp_path_factory):
    import requests

    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", embedded_model,
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--block-size", "16", "--served-model-name", "smollm2",
        "--kv-compression", "streaming", "--kv-compression-ratio", "0.3", "--kv-compression-window", "64",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            raise TimeoutError(f"vllm serve did not become healthy:\n{log_path.read_text()[-4000:]}")
        yield base, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


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
