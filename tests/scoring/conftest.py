"""Tiny random Llama / Qwen3 models and a byte-level chat tokenizer, all built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]
# ChatML, with Qwen3's empty think block when thinking is disabled.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (plus ChatML specials): token counts are predictable."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(architecture: str, vocab_size: int, *, layers: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A random 2-layer GQA model (4 query heads, 2 KV heads, head_dim 16)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        # Large weights give peaked attention, so that wrong scores are visible.
        initializer_range=0.15,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))  # q/k/v biases
    elif architecture == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, use_sliding_window=False))
        # Non-trivial q_norm / k_norm weights, so that skipping them would show.
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.data.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.data.uniform_(0.5, 1.5)
    else:
        raise ValueError(architecture)
    model.config._attn_implementation = "sdpa"
    return model.to(dtype).eval()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes minutes on CPU (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def embedded_model_dir() -> str | None:
    """VLLM_KVZIP_MODEL_DIR, else vllm_kvzip.models.ensure_embedded_model() when it exists."""
    folder = os.environ.get("VLLM_KVZIP_MODEL_DIR")
    if folder:
        return folder if Path(folder, "config.json").is_file() else None
    try:
        from vllm_kvzip.models import ensure_embedded_model
    except ImportError:
        return None
    return ensure_embedded_model()
