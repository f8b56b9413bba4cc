"""`vllm serve ... --kv-compression METHOD` and friends.

vLLM 0.26.0 has no hook for plugin CLI flags, but it loads general plugins in
`AsyncEngineArgs.add_cli_args()` before it builds the serve parser, and every
entry point (serve, run-batch, `LLM()`) funnels through
`EngineArgs.from_cli_args()` / `EngineArgs.create_engine_config()`.  We wrap
those three:

* `add_cli_args`: adds the `KVCompressionConfig` flag group;
* `from_cli_args`: folds the flags into `additional_config["kv_compression"]`,
  the dict that vLLM already ships to its engine and worker processes;
* `create_engine_config`: validates the settings once, before any model
  loads, and adapts the engine (attention backend, prefix caching).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vllm_kvzip.config import (
    METHODS,
    POLICIES,
    KVCompressionConfig,
    KVCompressionConfigError,
)

GROUP_TITLE = "KVCompressionConfig"
GROUP_DESCRIPTION = (
    "KV-cache compression by vllm-kvzip: after prefill, score every cached token (KVzip, KVzap, ...), "
    "evict what no future query needs and keep the rest in per-head ragged pages; the newest "
    "--kv-compression-window tokens are always kept. Offline: LLM(..., additional_config="
    '{"kv_compression": {"method": "kvzap-mlp", "keep_ratio": 0.3}}).'
)

# Flag -> (field, argparse kwargs).  Defaults are argparse.SUPPRESS so that only
# flags the user typed reach additional_config (and the help shows the real
# defaults from the help text, not "None"); the config model supplies defaults.
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--kv-compression": (
        "method",
        dict(
            type=str,
            metavar="{" + ",".join(METHODS) + "}",
            help="Compression method (default: none). kvzip: reconstruction scoring (extra prefill-sized pass); "
            "kvzip-plus: KVzip with the ||W_O v||/||h|| normalisation; kvzap-linear / kvzap-mlp: learned "
            "surrogate of KVzip+ on hidden states (no extra pass); head: saved per-head scores; snapkv: "
            "attention from the prompt's last tokens (extra pass of --kv-compression-snapkv-window tokens); "
            "streaming, random: baselines.",
        ),
    ),
    "--kv-compression-ratio": (
        "keep_ratio",
        dict(type=str, metavar="RATIO", help="Fraction of the context KV kept, 0 < RATIO <= 1 (default 0.3)."),
    ),
    "--kv-compression-threshold": (
        "threshold",
        dict(
            type=str,
            metavar="TAU",
            help="KVzap only: keep a token for a KV head when its predicted log-score >= TAU (DMS-style); "
            "the alternative to --kv-compression-ratio. Typical: -4 (Qwen3), -7 (Llama-3.1).",
        ),
    ),
    "--kv-compression-window": (
        "window",
        dict(type=str, metavar="TOKENS", help="Newest tokens always kept (default 128)."),
    ),
    "--kv-compression-surrogate": (
        "surrogate",
        dict(
            type=str,
            metavar="PATH_OR_HUB_ID",
            help="KVzap weights: a local folder or a hub id such as nvidia/KVzap-mlp-Qwen3-8B "
            "(default: weights shipped for the model, else nvidia/KVzap-{linear,mlp}-<model name>).",
        ),
    ),
    "--kv-compression-head-scores": (
        "head_scores",
        dict(type=str, metavar="FILE", help="--kv-compression head only: file of saved (layer, head) scores."),
    ),
    "--kv-compression-policy": (
        "policy",
        dict(
            type=str,
            metavar="{" + ",".join(POLICIES) + "}",
            help="How a keep ratio is spread: global (default: one threshold across layers and heads, as KVzip), "
            "layer (same count per layer), head (same count per head), adakv (per layer, AdaKV safeguard).",
        ),
    ),
    "--kv-compression-sink-tokens": (
        "sink_tokens",
        dict(type=str, metavar="TOKENS", help="First tokens always kept (attention sinks, default 4)."),
    ),
    "--kv-compression-chunk-size": (
        "chunk_size",
        dict(type=str, metavar="TOKENS", help="KVzip: context chunk reconstructed per scoring pass (default 2000)."),
    ),
    "--kv-compression-snapkv-window": (
        "snapkv_window",
        dict(
            type=str,
            metavar="TOKENS",
            help="SnapKV only: observation window, the last prompt tokens whose attention scores the cache "
            "(default 64; at most --max-num-batched-tokens).",
        ),
    ),
    "--kv-compression-snapkv-kernel": (
        "snapkv_kernel",
        dict(type=str, metavar="SIZE", help="SnapKV only: average-pooling kernel over the scores, odd (default 5)."),
    ),
    "--kv-compression-seed": (
        "seed",
        dict(type=str, metavar="SEED", help="Seed of --kv-compression random (default 0)."),
    ),
    "--kv-compression-decode-eviction": (
        "decode_eviction",
        dict(
            action=argparse.BooleanOptionalAction,
            help="KVzap threshold mode: also evict decoded tokens once they leave the window (DMS; default off).",
        ),
    ),
}


def add_kv_compression_args(parser) -> None:
    group = parser.add_argument_group(title=GROUP_TITLE, description=GROUP_DESCRIPTION)
    for flag, (field, kwargs) in _FLAGS.items():
        group.add_argument(flag, dest=_dest(field), default=argparse.SUPPRESS, **kwargs)


def _dest(field: str) -> str:
    return f"kv_compression__{field}"


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The kv-compression settings the user typed on the command line."""
    settings = {}
    for _, (field, _) in _FLAGS.items():
        value = getattr(args, _dest(field), None)
        if value is not None:
            settings[field] = value
    return settings


def merge_into_additional_config(additional_config: Any, cli_settings: dict[str, Any]) -> dict[str, Any]:
    """Fold CLI flags into additional_config["kv_compression"] (flags win)."""
    merged = dict(additional_config or {})
    existing = merged.get("kv_compression")
    if isinstance(existing, str):
        existing = {"method": existing}
    elif isinstance(existing, KVCompressionConfig):
        existing = existing.to_dict()
    merged["kv_compression"] = {**(existing or {}), **cli_settings}
    return merged


def install_engine_args_hooks() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_vllm_kvzip_hooked", False):
        return
    from vllm_kvzip.adapter.engine import prepare_engine_args, validate_engine_config

    original_add_cli_args = EngineArgs.add_cli_args
    original_from_cli_args = EngineArgs.from_cli_args.__func__
    original_create_engine_config = EngineArgs.create_engine_config

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add_cli_args(parser, *args, **kwargs)
        if not any(action.dest == _dest("method") for action in parser._actions):
            add_kv_compression_args(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from_cli_args(cls, args)
        cli_settings = settings_from_args(args)
        if cli_settings:
            engine_args.additional_config = merge_into_additional_config(engine_args.additional_config, cli_settings)
            try:
                # Fail while still in the CLI process, with the flag's name.
                KVCompressionConfig.parse(engine_args.additional_config["kv_compression"])
            except KVCompressionConfigError as exc:
                sys.exit(f"vllm-kvzip: error: {exc}")
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        kv_config = prepare_engine_args(self)
        vllm_config = original_create_engine_config(self, *args, **kwargs)
        validate_engine_config(vllm_config, kv_config)
        return vllm_config

    add_cli_args.__doc__ = original_add_cli_args.__doc__
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._vllm_kvzip_hooked = True

