"""vllm-kvzip: KVzip / KVzap KV-cache compression for vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in the
CLI / API-server process, in the engine-core process and in every worker.
It must stay idempotent and cheap; everything that touches vLLM internals
lives in `vllm_kvzip.adapter`.
"""

from vllm_kvzip.config import KVCompressionConfig, KVCompressionConfigError

__version__ = "0.1.0"
__all__ = ["KVCompressionConfig", "KVCompressionConfigError", "register", "__version__"]


def register() -> None:
    """Wire vllm-kvzip into the running vLLM (idempotent)."""
    import os

    from vllm_kvzip.adapter import install

    dump_after = os.environ.get("VLLM_KVZIP_DUMP_STACKS_AFTER")
    if dump_after:
        # Diagnosis of a slow or stuck start: every vLLM process (API server, engine core,
        # workers) prints all its threads' stacks once, this many seconds after loading the plugin.
        import faulthandler

        faulthandler.dump_traceback_later(float(dump_after), repeat=False)
    install()
