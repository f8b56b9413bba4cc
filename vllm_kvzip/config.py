"""`KVCompressionConfig`: every user-facing setting of vllm-kvzip, validated once.

The same model is built from `vllm serve --kv-compression ...` flags, from
`LLM(additional_config={"kv_compression": {...}})` and from the
transformers-level API, so a setting has one name, one default and one error
message wherever it is given.  Error messages name the CLI flag (the
`additional_config` key is given next to it) and the valid values.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

# Methods a user can ask for, in the order the README lists them.
METHODS: tuple[str, ...] = (
    "none",
    "kvzip",
    "kvzip-plus",
    "kvzap-linear",
    "kvzap-mlp",
    "head",
    "snapkv",
    "streaming",
    "random",
)
KVZAP_METHODS: tuple[str, ...] = ("kvzap-linear", "kvzap-mlp")
# Methods scored by KVzip's context-reconstruction pass (an extra forward pass per chunk).
RECONSTRUCTION_METHODS: tuple[str, ...] = ("kvzip", "kvzip-plus")
# Methods scored from the queries of the prompt's last tokens (SnapKV's observation window):
# inside vLLM, one extra forward of those tokens over the request's cached KV.
OBSERVATION_METHODS: tuple[str, ...] = ("snapkv",)
# SnapKV defaults (kvpress's SnapKVPress): observation window and average-pooling kernel.
DEFAULT_SNAPKV_WINDOW = 64
DEFAULT_SNAPKV_KERNEL = 5
MAX_SNAPKV_WINDOW = 1 << 16
MAX_SNAPKV_KERNEL = 255

# How scores turn into keep-sets when a keep ratio is given (see
# vllm_kvzip.scoring.policies).  Every policy keeps a total fixed before
# scoring, which is all the vLLM path's cross-layer page packing needs to know
# (docs/design.md); "global" (one threshold across layers and heads, KVzip's
# default) is the default everywhere (`KVCompressionConfig.effective_policy`).
POLICIES: tuple[str, ...] = ("global", "layer", "head", "adakv")

MethodName = Literal[
    "none", "kvzip", "kvzip-plus", "kvzap-linear", "kvzap-mlp", "head", "snapkv", "streaming", "random"
]
PolicyName = Literal["global", "layer", "head", "adakv"]

# Upper bound for --kv-compression-window: far beyond any useful window, low
# enough to catch a typo (the engine also checks it against max_model_len).
MAX_WINDOW = 1 << 20
DEFAULT_KEEP_RATIO = 0.3

# CLI flag for each field, so errors say what the user typed.
FLAG_OF_FIELD: dict[str, str] = {
    "method": "--kv-compression",
    "keep_ratio": "--kv-compression-ratio",
    "threshold": "--kv-compression-threshold",
    "window": "--kv-compression-window",
    "surrogate": "--kv-compression-surrogate",
    "head_scores": "--kv-compression-head-scores",
    "policy": "--kv-compression-policy",
    "sink_tokens": "--kv-compression-sink-tokens",
    "chunk_size": "--kv-compression-chunk-size",
    "decode_eviction": "--kv-compression-decode-eviction",
    "seed": "--kv-compression-seed",
    "snapkv_window": "--kv-compression-snapkv-window",
    "snapkv_kernel": "--kv-compression-snapkv-kernel",
}


class KVCompressionConfigError(ValueError):
    """A bad vllm-kvzip setting; the message names the flag and the valid values."""


def _flag(field: str) -> str:
    return f"{FLAG_OF_FIELD.get(field, field)} (additional_config kv_compression.{field})"


class KVCompressionConfig(BaseModel):
    """All vllm-kvzip settings.

    `keep_ratio` is the fraction of the *context* KV that is kept (0.3 keeps
    30%), as in snu-mllab/KVzip; kvpress's `compression_ratio` is 1 - keep_ratio.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    method: MethodName = "none"
    keep_ratio: float | None = None
    threshold: float | None = None
    window: int = 128
    surrogate: str | None = None
    head_scores: str | None = None
    policy: PolicyName | None = None
    sink_tokens: int = 4
    chunk_size: int = 2000
    decode_eviction: bool = False
    seed: int = 0
    snapkv_window: int = DEFAULT_SNAPKV_WINDOW
    snapkv_kernel: int = DEFAULT_SNAPKV_KERNEL

    # ---- field checks -------------------------------------------------------------
    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower().replace("_", "-")
        if value not in METHODS:
            raise ValueError(f"{_flag('method')}: {value!r} is not a method; valid values: {', '.join(METHODS)}")
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> Any:
        if value is not None and value not in POLICIES:
            raise ValueError(f"{_flag('policy')}: {value!r} is not a policy; valid values: {', '.join(POLICIES)}")
        return value

    @field_validator("keep_ratio", mode="before")
    @classmethod
    def _keep_ratio(cls, value: Any) -> Any:
        if value is None:
            return None
        ratio = _as_float(value, "keep_ratio", "a number with 0 < ratio <= 1")
        if not (0.0 < ratio <= 1.0):
            raise ValueError(f"{_flag('keep_ratio')}: {value!r} is outside the valid range 0 < ratio <= 1")
        return ratio

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        if value is None:
            return None
        threshold = _as_float(value, "threshold", "a finite number (a log-score, e.g. -4 for Qwen3, -7 for Llama-3.1)")
        if not math.isfinite(threshold):
            raise ValueError(
                f"{_flag('threshold')}: {value!r} is not finite; valid values: a finite log-score such as -4"
            )
        return threshold

    @field_validator("window", "sink_tokens", "chunk_size", "seed", "snapkv_window", "snapkv_kernel", mode="before")
    @classmethod
    def _integers(cls, value: Any, info) -> Any:
        name = info.field_name
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"{_flag(name)}: {value!r} is not an integer")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{_flag(name)}: {value!r} is not an integer") from None
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{_flag(name)}: {value!r} is not an integer")
        number = int(number)
        limits = {
            "window": (0, MAX_WINDOW),
            "sink_tokens": (0, 4096),
            "chunk_size": (16, 1 << 17),
            "seed": (0, 2**63 - 1),
            "snapkv_window": (1, MAX_SNAPKV_WINDOW),
            "snapkv_kernel": (1, MAX_SNAPKV_KERNEL),
        }[name]
        if not (limits[0] <= number <= limits[1]):
            raise ValueError(f"{_flag(name)}: {value!r} is outside the valid range {limits[0]}..{limits[1]}")
        if name == "snapkv_kernel" and number % 2 == 0:
            # An even kernel with padding kernel // 2 shifts the pooled scores by one token.
            raise ValueError(f"{_flag(name)}: {value!r} is even; valid values: odd integers 1..{limits[1]}")
        return number

    @field_validator("surrogate", "head_scores", mode="before")
    @classmethod
    def _paths(cls, value: Any, info) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{_flag(info.field_name)}: {value!r} is not a folder path or hub id")
        return value.strip()

    # ---- combinations -------------------------------------------------------------
    @model_validator(mode="after")
    def _combination(self) -> "KVCompressionConfig":
        is_kvzap = self.method in KVZAP_METHODS
        if self.threshold is not None and not is_kvzap:
            raise ValueError(
                f"{_flag('threshold')} applies only to {', '.join(KVZAP_METHODS)}; "
                f"with --kv-compression {self.method} use {FLAG_OF_FIELD['keep_ratio']}"
            )
        if self.threshold is not None and self.keep_ratio is not None:
            raise ValueError(
                f"set either {FLAG_OF_FIELD['keep_ratio']} or {FLAG_OF_FIELD['threshold']}, not both "
                "(threshold mode keeps a data-dependent fraction)"
            )
        if self.threshold is not None and self.policy is not None:
            raise ValueError(
                f"{_flag('policy')} applies to keep-ratio mode; threshold mode decides every (layer, head, token) "
                "on its own"
            )
        if self.surrogate is not None and not is_kvzap:
            raise ValueError(f"{_flag('surrogate')} applies only to {', '.join(KVZAP_METHODS)}")
        if self.head_scores is not None and self.method != "head":
            raise ValueError(f"{_flag('head_scores')} applies only to --kv-compression head")
        if self.decode_eviction and not (is_kvzap and self.threshold is not None):
            raise ValueError(
                f"{_flag('decode_eviction')} needs --kv-compression kvzap-linear|kvzap-mlp in threshold mode "
                f"({FLAG_OF_FIELD['threshold']})"
            )
        return self

    # ---- derived values -----------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def is_kvzap(self) -> bool:
        return self.method in KVZAP_METHODS

    @property
    def is_reconstruction(self) -> bool:
        return self.method in RECONSTRUCTION_METHODS

    @property
    def is_observation(self) -> bool:
        return self.method in OBSERVATION_METHODS

    @property
    def has_scoring_pass(self) -> bool:
        """Scored by an extra forward of vLLM's model after the prefill (KVzip's reconstruction, SnapKV's window)."""
        return self.is_reconstruction or self.is_observation

    @property
    def threshold_mode(self) -> bool:
        return self.is_kvzap and self.threshold is not None

    @property
    def effective_keep_ratio(self) -> float:
        """Keep ratio for ratio mode (the default when the user gave none)."""
        return DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio

    @property
    def effective_policy(self) -> str:
        """Budget policy in ratio mode; KVzip's own default is one global threshold."""
        return self.policy or "global"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_defaults=False)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def parse(cls, value: Any) -> "KVCompressionConfig":
        """Build from a dict, a method name, an existing config or None.

        Raises KVCompressionConfigError with a message that names the flag.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"method": value}
        if not isinstance(value, dict):
            raise KVCompressionConfigError(
                "additional_config kv_compression must be a method name or a dict of settings; got "
                f"{type(value).__name__}"
            )
        data = dict(value)
        # Accept the CLI spelling of the keys too (ratio, kv_compression_ratio, ...).
        for alias, field in (("ratio", "keep_ratio"), ("compression", "method")):
            if alias in data and field not in data:
                data[field] = data.pop(alias)
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise KVCompressionConfigError(
                f"additional_config kv_compression: unknown setting(s) {', '.join(unknown)}; valid settings: "
                f"{', '.join(cls.model_fields)}"
            )
        try:
            return cls(**data)
        except ValidationError as exc:
            raise KVCompressionConfigError(_first_message(exc)) from None


def _as_float(value: Any, field: str, expected: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{_flag(field)}: {value!r} is not {expected}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_flag(field)}: {value!r} is not {expected}") from None


def _first_message(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        message = str(error.get("msg", ""))
        message = message.removeprefix("Value error, ")
        if error.get("type") == "literal_error" or "Input should be" in message:
            field = ".".join(str(part) for part in error.get("loc", ()))
            message = f"{_flag(field)}: {message}"
        messages.append(message)
    return "; ".join(messages)


# ---- per-request settings ---------------------------------------------------------
# A request may override the engine's keep ratio or opt out, through the OpenAI
# API's `vllm_xargs` (SamplingParams.extra_args):
#     {"kv_compression": "none"}          keep this request's KV dense
#     {"kv_compression_ratio": 0.5}       keep half of its evictable context
REQUEST_METHOD_KEY = "kv_compression"
REQUEST_RATIO_KEY = "kv_compression_ratio"


def request_keep_ratio(config: KVCompressionConfig, extra_args: dict[str, Any] | None) -> float | None:
    """Keep ratio for one request in ratio mode; None means the request stays dense.

    Raises KVCompressionConfigError naming the request field for a bad value.
    """
    if not config.enabled:
        return None
    extra_args = extra_args or {}
    method = extra_args.get(REQUEST_METHOD_KEY)
    if method is not None:
        if method not in ("none", config.method):
            raise KVCompressionConfigError(
                f"vllm_xargs {REQUEST_METHOD_KEY}: {method!r} is not available per request; valid values: "
                f"none, {config.method} (the engine's --kv-compression)"
            )
        if method == "none":
            return None
    ratio = extra_args.get(REQUEST_RATIO_KEY)
    if ratio is None:
        return None if config.threshold_mode else config.effective_keep_ratio
    if config.threshold_mode:
        raise KVCompressionConfigError(
            f"vllm_xargs {REQUEST_RATIO_KEY}: the engine runs in threshold mode (--kv-compression-threshold); "
            "a per-request keep ratio is not available"
        )
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(ratio, bool) or not (0.0 < value <= 1.0):
        raise KVCompressionConfigError(
            f"vllm_xargs {REQUEST_RATIO_KEY}: {ratio!r} is outside the valid range 0 < ratio <= 1"
        )
    return value


def request_uses_threshold(config: KVCompressionConfig, extra_args: dict[str, Any] | None) -> bool:
    """Threshold mode (KVzap / DMS) applies to this request: the engine runs in it and the request did not opt out.

    Validates `extra_args` like `request_keep_ratio` (same errors).
    """
    request_keep_ratio(config, extra_args)
    if not config.threshold_mode:
        return False
    return (extra_args or {}).get(REQUEST_METHOD_KEY) != "none"
