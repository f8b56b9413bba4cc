"""The one place where vllm-kvzip touches vLLM internals.

Everything version-specific (class names, private hooks, argument names of
vLLM 0.26.0) is imported or patched here, so a vLLM bump changes this
package only.  `install()` runs from the `vllm.general_plugins` entry point in
every vLLM process.
"""

from __future__ import annotations

import threading

_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Register the backends and the CLI/engine hooks once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from vllm_kvzip.adapter import cli, engine, kv_cache_api, registry, runner_hooks, stats_api, vllm_api

        vllm_api.check_vllm_version()
        registry.register_attention_backends()
        cli.install_engine_args_hooks()
        engine.install_request_validation()
        kv_cache_api.install_kv_cache_hooks()
        runner_hooks.install_runner_hooks()
        stats_api.install_stats_hooks()
        # Registers KVzipAttentionSpec -> KVzipManager with vLLM's spec registry.
        import vllm_kvzip.block_manager.vllm_manager  # noqa: F401
        _installed = True
