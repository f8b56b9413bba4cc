"""The plugin as vLLM sees it: entry point, CLI flags, engine-config checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from vllm_kvzip.config import KVCompressionConfigError

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def _run(args, timeout=180, env=None):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_vllm_loads_the_plugin_through_its_entry_point():
    script = textwrap.dedent(
        """
        from vllm.plugins import load_general_plugins
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        assert not getattr(EngineArgs, "_vllm_kvzip_hooked", False)
        load_general_plugins()
        assert EngineArgs._vllm_kvzip_hooked
        print("CUSTOM", AttentionBackendEnum.CUSTOM.get_path())
        print("CPU_ATTN", AttentionBackendEnum.CPU_ATTN.get_path())
        print("cpu", current_platform.is_cpu())
        load_general_plugins()  # idempotent
        """
    )
    result = _run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["CUSTOM"] == "vllm_kvzip.backend.attention.KVzipAttentionBackend"
    if lines["cpu"] == "True":
        assert lines["CPU_ATTN"] == "vllm_kvzip.backend.cpu_attention.KVzipCPUAttentionBackend"


def test_plugin_is_skipped_when_vllm_plugins_excludes_it():
    script = "from vllm.plugins import load_general_plugins; from vllm.engine.arg_utils import EngineArgs; " \
        "load_general_plugins(); print(getattr(EngineArgs, '_vllm_kvzip_hooked', False))"
    result = _run([sys.executable, "-c", script], env={"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("False")


FLAGS = [
    "--kv-compression",
    "--kv-compression-ratio",
    "--kv-compression-threshold",
    "--kv-compression-window",
    "--kv-compression-surrogate",
    "--kv-compression-head-scores",
    "--kv-compression-policy",
    "--kv-compression-sink-tokens",
    "--kv-compression-chunk-size",
    "--kv-compression-snapkv-window",
    "--kv-compression-snapkv-kernel",
    "--kv-compression-seed",
    "--kv-compression-decode-eviction",
]


def test_serve_help_lists_the_flags_in_their_own_group():
    overview = _run(VLLM_CLI + ["serve", "--help"])
    assert overview.returncode == 0, overview.stderr[-3000:]
    assert "KVCompressionConfig" in overview.stdout
    group = _run(VLLM_CLI + ["serve", "--help=KVCompressionConfig"])
    assert group.returncode == 0, group.stderr[-3000:]
    assert "KVCompressionConfig:" in group.stdout
    for flag in FLAGS:
        assert flag in group.stdout, flag
    assert "none,kvzip,kvzip-plus,kvzap-linear,kvzap-mlp,head,snapkv,streaming,random" in group.stdout


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--kv-compression", "kvzipp"], "--kv-compression (additional_config kv_compression.method): 'kvzipp'"),
        (["--kv-compression", "kvzip", "--kv-compression-ratio", "0"], "0 < ratio <= 1"),
        (["--kv-compression", "kvzap-mlp", "--kv-compression-threshold", "nan"], "not finite"),
    ],
)
def test_serve_rejects_bad_values_before_starting(embedded_model, flags, expected):
    result = _run(VLLM_CLI + ["serve", embedded_model] + flags, timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Starting vLLM" not in result.stderr


# ---- engine config (no engine is started) -----------------------------------------


def _engine_config(model, kv_compression, **kwargs):
    import vllm_kvzip
    from vllm.engine.arg_utils import EngineArgs

    vllm_kvzip.register()
    args = EngineArgs(
        model=model, max_model_len=2048, additional_config={"kv_compression": kv_compression}, **kwargs
    )
    return args.create_engine_config()


def test_engine_config_carries_the_validated_settings(embedded_model):
    vllm_config = _engine_config(embedded_model, {"method": "streaming", "ratio": "0.25"})
    settings = vllm_config.additional_config["kv_compression"]
    assert settings["method"] == "streaming" and settings["keep_ratio"] == 0.25 and settings["window"] == 128
    assert vllm_config.cache_config.enable_prefix_caching is False


def test_engine_config_untouched_when_compression_is_off(embedded_model):
    vllm_config = _engine_config(embedded_model, {"method": "none"})
    assert vllm_config.additional_config["kv_compression"] == {"method": "none"}


def test_explicit_prefix_caching_is_refused(embedded_model):
    with pytest.raises(KVCompressionConfigError, match="--enable-prefix-caching cannot be combined"):
        _engine_config(embedded_model, {"method": "streaming"}, enable_prefix_caching=True)


def test_window_must_fit_the_model(embedded_model):
    with pytest.raises(KVCompressionConfigError, match=r"--kv-compression-window 4000 .*--max-model-len 2048"):
        _engine_config(embedded_model, {"method": "streaming", "window": 4000})


def _model_variant(embedded_model, tmp_path, **config_changes):
    folder = tmp_path / "variant"
    folder.mkdir()
    for name in os.listdir(embedded_model):
        if name != "model.safetensors":
            shutil.copy(os.path.join(embedded_model, name), folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_unsupported_head_size_is_refused(embedded_model, tmp_path):
    model = _model_variant(embedded_model, tmp_path, head_dim=96, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(KVCompressionConfigError, match="head size 96 is not supported; supported head sizes: 64, 128"):
        _engine_config(model, {"method": "streaming"})


def test_unsupported_architecture_is_refused(embedded_model, tmp_path):
    model = _model_variant(embedded_model, tmp_path, architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(KVCompressionConfigError, match="architecture .*GemmaForCausalLM.* is not supported"):
        _engine_config(model, {"method": "streaming"})


# ---- KVzip's reconstruction pass: what it needs is checked before the model loads -------


def test_kvzip_engine_config_is_accepted(embedded_model):
    vllm_config = _engine_config(embedded_model, {"method": "kvzip-plus", "chunk_size": 512})
    settings = vllm_config.additional_config["kv_compression"]
    assert settings["method"] == "kvzip-plus" and settings["chunk_size"] == 512


def test_kvzip_chunk_must_fit_one_forward(embedded_model):
    with pytest.raises(
        KVCompressionConfigError, match=r"--kv-compression-chunk-size 2000: .* more than --max-num-batched-tokens 1024"
    ):
        _engine_config(embedded_model, {"method": "kvzip"}, max_num_batched_tokens=1024)


def test_kvzip_needs_the_tokenizer(embedded_model):
    with pytest.raises(KVCompressionConfigError, match="--skip-tokenizer-init cannot be combined with --kv-compression kvzip"):
        _engine_config(embedded_model, {"method": "kvzip"}, skip_tokenizer_init=True)


def test_kvzip_needs_a_chat_template(embedded_model, tmp_path):
    model = _model_variant(embedded_model, tmp_path)
    os.remove(os.path.join(model, "chat_template.jinja"))
    with pytest.raises(KVCompressionConfigError, match="--kv-compression kvzip: the tokenizer has no chat template"):
        _engine_config(model, {"method": "kvzip"})
# ---- SnapKV's observation pass ---------------------------------------------------------


def test_snapkv_engine_config_is_accepted(embedded_model):
    vllm_config = _engine_config(embedded_model, {"method": "snapkv", "snapkv_window": 32, "snapkv_kernel": 3})
    settings = vllm_config.additional_config["kv_compression"]
    assert settings["method"] == "snapkv" and settings["snapkv_window"] == 32 and settings["snapkv_kernel"] == 3


def test_snapkv_window_must_fit_one_forward(embedded_model):
    with pytest.raises(
        KVCompressionConfigError, match=r"--kv-compression-snapkv-window 1500: .* --max-num-batched-tokens 1024; valid values: 1..1024"
    ):
        _engine_config(embedded_model, {"method": "snapkv", "snapkv_window": 1500}, max_num_batched_tokens=1024)


def test_snapkv_settings_need_snapkv(embedded_model):
    with pytest.raises(KVCompressionConfigError, match="--kv-compression-snapkv-kernel applies only to --kv-compression snapkv"):
        _engine_config(embedded_model, {"method": "kvzip", "snapkv_kernel": 3})


def test_prefill_backend_follows_the_model_dtype():
    """FlashAttention has no float32: a float32 model prefills through TRITON_ATTN, fp16/bf16 through a
    backend that supports them, and VLLM_KVZIP_PREFILL_BACKEND still forces one."""
    import torch

    from vllm_kvzip.adapter.attention_api import dense_backend

    backend, _, _ = dense_backend(None, torch.float32)
    assert backend.__name__ == "TritonAttentionBackend" and torch.float32 in backend.supported_dtypes
    for dtype in (torch.float16, torch.bfloat16):
        assert dtype in dense_backend(None, dtype)[0].supported_dtypes
    assert dense_backend("TRITON_ATTN", torch.bfloat16)[0].__name__ == "TritonAttentionBackend"
    with pytest.raises(ValueError, match="valid values"):
        dense_backend("FLASHINFER", torch.bfloat16)


# ---- KVzap's surrogate: checked in the front-end process from its header only ---------


def test_kvzap_surrogate_checks_name_the_flag(embedded_model, surrogate_dir, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(KVCompressionConfigError, match="--kv-compression-surrogate: .*no-such-folder"):
        _engine_config(embedded_model, {"method": "kvzap-mlp", "surrogate": str(missing)})

    corrupt = tmp_path / "corrupt"
    shutil.copytree(surrogate_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(KVCompressionConfigError, match="--kv-compression-surrogate: .*not a readable safetensors file"):
        _engine_config(embedded_model, {"method": "kvzap-mlp", "surrogate": str(corrupt)})

    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape

    other_model = tmp_path / "other-model"
    KVzapSurrogate.for_model(ModelShape(num_layers=30, hidden_size=64, num_kv_heads=3), "mlp").save(other_model)
    with pytest.raises(KVCompressionConfigError, match=r"--kv-compression-surrogate: .*does not fit this model"):
        _engine_config(embedded_model, {"method": "kvzap-mlp", "surrogate": str(other_model)})


def test_kvzap_surrogate_check_reads_no_weights(embedded_model, surrogate_dir, monkeypatch):
    # Reading (and converting) the weights in vLLM's front-end process starts torch's OpenMP
    # pool there, and the engine core forked from it hung in its first parallel op on the H100
    # (session 5). The CPU platform spawns its engine core, so this checks the cause: no weights read.
    import vllm_kvzip.scoring.kvzap_model as kvzap_model

    def refuse(*args, **kwargs):
        raise AssertionError("the front-end check read the surrogate's weights")

    monkeypatch.setattr(kvzap_model, "load_file", refuse)
    vllm_config = _engine_config(embedded_model, {"method": "kvzap-mlp", "surrogate": surrogate_dir})
    assert vllm_config.additional_config["kv_compression"]["surrogate"] == surrogate_dir
