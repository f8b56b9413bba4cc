"""KVzap surrogate models (KVzapLinear / KVzapMLP) and their checkpoint format.

A surrogate maps the attention input of a token at layer l (the output of the
decoder layer's input_layernorm, [D]) to one predicted log KVzip+ score per KV
head ([H]).  One small module per layer:
  * linear: nn.Linear(D, H)
  * mlp:    nn.Linear(D, D // 8) -> GELU -> nn.Linear(D // 8, H)

Checkpoints use exactly the layout of the published `nvidia/KVzap-*` models
(kvpress's `KVzapModel` / `KVzapConfig`, a transformers PreTrainedModel saved
with `save_pretrained`): a folder with `model.safetensors` holding
`layers.{i}.weight|bias` (linear) or `layers.{i}.0.weight|bias` and
`layers.{i}.2.weight|bias` (mlp), and a `config.json` with model_type "kvzap",
input_dim, output_dim, hidden_dim (null for linear) and n_modules.  We read and
write that format with plain json + safetensors, so that the vLLM worker needs
no transformers config class (kvpress PR #270 had to make KVzapConfig
constructible without arguments for transformers 5; our loader never builds a
transformers config, and the files we write load with kvpress's fixed class).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "kvzap"
ARCHITECTURE = "KVzapModel"
# MLP width of the paper and of the published checkpoints: hidden_size / 8.
MLP_WIDTH_DIVISOR = 8


class KVzapCheckpointError(ValueError):
    """A KVzap checkpoint cannot be found, read or used with this model."""


@dataclass(frozen=True)
class ModelShape:
    """What a surrogate must match in the host model."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers (or vLLM hf_config) model config."""
        text_config = getattr(config, "text_config", None) or config
        return cls(
            num_layers=int(text_config.num_hidden_layers),
            hidden_size=int(text_config.hidden_size),
            num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads),
        )


class KVzapSurrogate(nn.Module):
    """Per-layer KVzap surrogate; `hidden_dim=None` is KVzap-Linear, else KVzap-MLP."""

    def __init__(self, input_dim: int, output_dim: int, n_modules: int, hidden_dim: int | None = None):
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.n_modules = n_modules
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.layers = nn.ModuleList(nn.Linear(input_dim, output_dim) for _ in range(n_modules))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))
                for _ in range(n_modules)
            )

    @staticmethod
    def for_model(shape: ModelShape, kind: str) -> "KVzapSurrogate":
        """A fresh (untrained) KVzapLinear or KVzapMLP sized for a host model."""
        if kind == "linear":
            return KVzapLinear(shape.hidden_size, shape.num_kv_heads, shape.num_layers)
        if kind == "mlp":
            return KVzapMLP(shape.hidden_size, shape.num_kv_heads, shape.num_layers)
        raise ValueError(f"KVzap kind must be 'linear' or 'mlp', got {kind!r}")

    @property
    def kind(self) -> str:
        return "linear" if self.hidden_dim is None else "mlp"

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[N, L, D] -> [N, L, H] log-scores (the kvpress KVzapModel.forward contract)."""
        return torch.stack([layer(hidden_states[:, index]) for index, layer in enumerate(self.layers)], dim=1)

    @torch.no_grad()
    def layer_scores(self, layer_idx: int, hidden_states: Tensor) -> Tensor:
        """Predicted log KVzip+ scores of n tokens at one layer: [n, D] -> [H, n] (float32)."""
        layer = self.layers[layer_idx]
        weight = next(layer.parameters())
        return layer(hidden_states.to(device=weight.device, dtype=weight.dtype)).float().transpose(0, 1)

    def validate(self, shape: ModelShape, source: str = "KVzap checkpoint") -> None:
        """Raise KVzapCheckpointError unless this surrogate fits the host model."""
        problems = []
        if self.n_modules != shape.num_layers:
            problems.append(f"{self.n_modules} layers (model has {shape.num_layers})")
        if self.input_dim != shape.hidden_size:
            problems.append(f"input_dim {self.input_dim} (model hidden_size is {shape.hidden_size})")
        if self.output_dim != shape.num_kv_heads:
            problems.append(f"output_dim {self.output_dim} (model has {shape.num_kv_heads} KV heads)")
        if problems:
            raise KVzapCheckpointError(f"{source} does not fit this model: it has {', '.join(problems)}")

    # ---- checkpoint I/O -----------------------------------------------------------
    def config_dict(self) -> dict:
        config = {
            "architectures": [ARCHITECTURE],
            "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
            "hidden_dim": self.hidden_dim,
            "input_dim": self.input_dim,
            "model_type": MODEL_TYPE,
            "n_modules": self.n_modules,
            "output_dim": self.output_dim,
        }
        try:
            import transformers

            config["transformers_version"] = transformers.__version__
        except ImportError:  # the format does not need it; transformers writes it
            pass
        return config

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` in the nvidia/KVzap-* layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(
        cls, name_or_path: str | os.PathLike, *, shape: ModelShape | None = None, device: str | torch.device = "cpu"
    ) -> "KVzapSurrogate":
        """Load a local folder, or a hub id (e.g. nvidia/KVzap-mlp-Qwen3-8B) when a hub is reachable.

        Returns a KVzapLinear or KVzapMLP (from config.json), whatever class it is called on.
        `device="meta"` checks the checkpoint without reading its weights: config.json and the
        safetensors header (tensor names, shapes, dtype), and returns a weightless module. That is
        what vLLM's front-end process uses: there the weights are not needed, and when it read them
        the engine core forked from it hung in its first parallel op on an H100 (session 5; the
        likely cause, an OpenMP pool started before the fork, did not reproduce on the CPU).
        """
        folder = resolve_checkpoint_folder(str(name_or_path))
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KVzapCheckpointError(f"cannot read {folder / CONFIG_NAME}: {exc}") from None
        if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise KVzapCheckpointError(f"{folder} has model_type {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
        missing = [key for key in ("input_dim", "output_dim", "n_modules") if not config.get(key)]
        if missing:
            raise KVzapCheckpointError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}")
        dims = (int(config["input_dim"]), int(config["output_dim"]), int(config["n_modules"]))
        hidden_dim = config.get("hidden_dim")
        weightless = torch.device(device).type == "meta"
        with torch.device("meta"):
            # Built without storage: the weights come from the file (or not at all when weightless).
            surrogate = KVzapLinear(*dims) if hidden_dim is None else KVzapMLP(*dims, hidden_dim=int(hidden_dim))
        weights_file = folder / WEIGHTS_NAME
        tensors = _safetensors_header(weights_file) if weightless else _read_safetensors(weights_file)
        expected = dict(surrogate.state_dict())
        unknown = sorted(set(tensors) - set(expected))
        absent = sorted(set(expected) - set(tensors))
        if unknown or absent:
            raise KVzapCheckpointError(
                f"{weights_file} does not match its config.json: missing {absent[:4]}, unexpected {unknown[:4]}"
            )
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise KVzapCheckpointError(
                    f"{weights_file}: {name} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(expected[name].shape)}"
                )
        dtype = next(iter(tensors.values())).dtype
        if weightless:
            surrogate.to(dtype=dtype)
        else:
            surrogate.load_state_dict(tensors, assign=True)
            surrogate.to(device=device, dtype=dtype)
        surrogate.eval()
        if shape is not None:
            surrogate.validate(shape, source=f"KVzap checkpoint {name_or_path}")
        return surrogate


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except OSError as exc:
        raise KVzapCheckpointError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # safetensors' own error type: a corrupt or truncated file
        raise KVzapCheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    """Names -> meta tensors of the stored shape and dtype, read from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {}
            for name in handle.keys():
                stored = handle.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(stored.get_dtype())
                if dtype is None:
                    raise KVzapCheckpointError(f"{path}: {name} has dtype {stored.get_dtype()}, not a float type")
                tensors[name] = torch.empty(stored.get_shape(), dtype=dtype, device="meta")
            return tensors
    except OSError as exc:
        raise KVzapCheckpointError(f"cannot read {path}: {exc}") from None
    except KVzapCheckpointError:
        raise
    except Exception as exc:  # safetensors' own error type: a corrupt or truncated header
        raise KVzapCheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class KVzapLinear(KVzapSurrogate):
    """KVzap-Linear: one nn.Linear(hidden_size, kv_heads) per layer."""

    def __init__(self, input_dim: int, output_dim: int, n_modules: int):
        super().__init__(input_dim, output_dim, n_modules, hidden_dim=None)


class KVzapMLP(KVzapSurrogate):
    """KVzap-MLP: Linear(hidden_size, hidden_size / 8) -> GELU -> Linear(., kv_heads) per layer."""

    def __init__(self, input_dim: int, output_dim: int, n_modules: int, hidden_dim: int | None = None):
        super().__init__(input_dim, output_dim, n_modules, hidden_dim=hidden_dim or input_dim // MLP_WIDTH_DIVISOR)


def resolve_checkpoint_folder(name_or_path: str) -> Path:
    """A local folder as is; otherwise a hub id downloaded with huggingface_hub."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise KVzapCheckpointError(f"KVzap checkpoint {name_or_path} is a file; expected a folder with {CONFIG_NAME}")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise KVzapCheckpointError(f"KVzap checkpoint {name_or_path!r} is neither a local folder nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        downloaded = snapshot_download(repo_id=name_or_path, allow_patterns=[CONFIG_NAME, "*.safetensors"])
    except Exception as exc:  # offline, unknown repo, auth... all mean "not available here"
        raise KVzapCheckpointError(
            f"KVzap checkpoint {name_or_path!r} is not a local folder and could not be fetched from the Hugging Face "
            f"hub ({type(exc).__name__}: {exc}). Download it where a hub is reachable "
            f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and pass DIR instead."
        ) from None
    return Path(downloaded)


def default_checkpoint_name(model_name_or_path: str, kind: str) -> str:
    """kvpress's naming rule: nvidia/KVzap-{kind}-{basename of the host model}."""
    return f"nvidia/KVzap-{kind}-{model_name_or_path.rstrip('/').split('/')[-1]}"


def shipped_checkpoint(model_basename: str, kind: str) -> Path | None:
    """Folder of a checkpoint shipped inside this package (vllm_kvzip/data/kvzap), if any."""
    folder = Path(__file__).resolve().parent.parent / "data" / "kvzap" / f"{model_basename}-{kind}"
    return folder if (folder / CONFIG_NAME).is_file() else None
