"""KVCompressionConfig: every bad value is refused with the flag's name and the valid values."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_kvzip.config import METHODS, KVCompressionConfig, KVCompressionConfigError


def test_defaults_are_off():
    config = KVCompressionConfig.parse(None)
    assert config.method == "none" and not config.enabled
    assert config.window == 128 and config.sink_tokens == 4


@pytest.mark.parametrize("method", METHODS)
def test_every_method_parses(method):
    config = KVCompressionConfig.parse({"method": method})
    assert config.method == method
    assert config.enabled == (method != "none")


def test_method_name_alone_and_aliases():
    assert KVCompressionConfig.parse("kvzap_mlp").method == "kvzap-mlp"
    config = KVCompressionConfig.parse({"method": "kvzip", "ratio": "0.25"})
    assert config.keep_ratio == 0.25 and config.effective_keep_ratio == 0.25
    assert KVCompressionConfig.parse({"method": "kvzip"}).effective_keep_ratio == 0.3


@pytest.mark.parametrize(
    "settings, flag, fragment",
    [
        ({"method": "zip"}, "--kv-compression ", "valid values: none, kvzip, kvzip-plus"),
        ({"method": "kvzip", "keep_ratio": 0}, "--kv-compression-ratio", "0 < ratio <= 1"),
        ({"method": "kvzip", "keep_ratio": 1.01}, "--kv-compression-ratio", "0 < ratio <= 1"),
        ({"method": "kvzip", "keep_ratio": -0.5}, "--kv-compression-ratio", "0 < ratio <= 1"),
        ({"method": "kvzip", "keep_ratio": "half"}, "--kv-compression-ratio", "0 < ratio <= 1"),
        ({"method": "kvzip", "keep_ratio": float("nan")}, "--kv-compression-ratio", "0 < ratio <= 1"),
        ({"method": "kvzap-mlp", "threshold": float("nan")}, "--kv-compression-threshold", "finite"),
        ({"method": "kvzap-mlp", "threshold": "inf"}, "--kv-compression-threshold", "finite"),
        ({"method": "kvzip", "threshold": -4}, "--kv-compression-threshold", "kvzap-linear, kvzap-mlp"),
        ({"method": "kvzap-mlp", "threshold": -4, "keep_ratio": 0.3}, "--kv-compression-ratio", "not both"),
        ({"method": "kvzip", "window": -1}, "--kv-compression-window", "0..1048576"),
        ({"method": "kvzip", "window": 10**9}, "--kv-compression-window", "0..1048576"),
        ({"method": "kvzip", "window": 12.5}, "--kv-compression-window", "not an integer"),
        ({"method": "kvzip", "sink_tokens": -2}, "--kv-compression-sink-tokens", "0..4096"),
        ({"method": "kvzip", "policy": "best"}, "--kv-compression-policy", "global, layer, head, adakv"),
        ({"method": "kvzip", "surrogate": "/tmp/x"}, "--kv-compression-surrogate", "kvzap-linear, kvzap-mlp"),
        ({"method": "kvzip", "head_scores": "/tmp/x"}, "--kv-compression-head-scores", "applies only to --kv-compression head"),
        ({"method": "kvzip", "decode_eviction": True}, "--kv-compression-decode-eviction", "threshold mode"),
        ({"method": "kvzip", "colour": "red"}, "kv_compression", "unknown setting(s) colour"),
        ({"method": "snapkv", "snapkv_window": 0}, "--kv-compression-snapkv-window", "1..65536"),
        ({"method": "snapkv", "snapkv_window": "wide"}, "--kv-compression-snapkv-window", "not an integer"),
        ({"method": "snapkv", "snapkv_kernel": 4}, "--kv-compression-snapkv-kernel", "odd integers 1..255"),
        ({"method": "snapkv", "snapkv_kernel": 0}, "--kv-compression-snapkv-kernel", "1..255"),
        ({"method": "snapkv", "snapkv_kernel": 257}, "--kv-compression-snapkv-kernel", "1..255"),
    ],
)
def test_bad_values_name_the_flag(settings, flag, fragment):
    with pytest.raises(KVCompressionConfigError) as error:
        KVCompressionConfig.parse(settings)
    message = str(error.value)
    assert flag in message, message
    assert fragment in message, message


def test_not_a_dict():
    with pytest.raises(KVCompressionConfigError, match="method name or a dict"):
        KVCompressionConfig.parse(3)


def test_frozen():
    config = KVCompressionConfig.parse({"method": "kvzip"})
    with pytest.raises(Exception):
        config.keep_ratio = 0.5  # type: ignore[misc]


def test_pickle_round_trip():
    config = KVCompressionConfig.parse(
        {"method": "kvzap-mlp", "threshold": -4.5, "window": 64, "surrogate": "/models/kvzap", "decode_eviction": True}
    )
    restored = pickle.loads(pickle.dumps(config))
    assert restored == config
    assert restored.threshold_mode and restored.decode_eviction
    # The dict form is what travels inside vLLM's additional_config.
    assert KVCompressionConfig.parse(pickle.loads(pickle.dumps(config.to_dict()))) == config


@given(
    method=st.sampled_from(METHODS),
    ratio=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    window=st.one_of(st.integers(-10, 2_000_000), st.text(max_size=4)),
)
def test_fuzzed_settings_either_parse_or_raise_the_config_error(method, ratio, window):
    settings = {"method": method, "keep_ratio": ratio, "window": window}
    try:
        config = KVCompressionConfig.parse(settings)
    except KVCompressionConfigError as error:
        assert "--kv-compression" in str(error)
        return
    assert config.keep_ratio is None or (0 < config.keep_ratio <= 1 and math.isfinite(config.keep_ratio))
    assert 0 <= config.window <= 1 << 20


def test_snapkv_settings():
    config = KVCompressionConfig.parse({"method": "snapkv"})
    assert (config.snapkv_window, config.snapkv_kernel) == (64, 5)  # kvpress's SnapKVPress defaults
    assert config.is_observation and config.has_scoring_pass and not config.is_reconstruction
    config = KVCompressionConfig.parse({"method": "snapkv", "snapkv_window": "32", "snapkv_kernel": 7})
    assert (config.snapkv_window, config.snapkv_kernel) == (32, 7)
    assert KVCompressionConfig.parse(config.to_dict()) == config
    assert KVCompressionConfig.parse("kvzip").has_scoring_pass
    assert not KVCompressionConfig.parse("kvzap-mlp").has_scoring_pass
