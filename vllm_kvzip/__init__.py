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

    _arm_stack_dump(os.environ.get("VLLM_KVZIP_DUMP_STACKS_AFTER"))
    install()


_stack_dump_armed = False


def _arm_stack_dump(seconds: str | None) -> None:
    """Diagnosis of a slow or stuck start (VLLM_KVZIP_DUMP_STACKS_AFTER=seconds).

    Every vLLM process prints all its threads' stacks once, that many seconds
    after loading the plugin. A forked engine core or worker does not load
    plugins again and does not inherit the watchdog thread, so the dump is
    re-armed in every forked child too.
    """
    global _stack_dump_armed
    if not seconds or _stack_dump_armed:
        return
    import faulthandler
    import os

    try:
        delay = float(seconds)
    except ValueError:
        raise ValueError(f"VLLM_KVZIP_DUMP_STACKS_AFTER must be a number of seconds, got {seconds!r}") from None
    faulthandler.dump_traceback_later(delay, repeat=False)
    os.register_at_fork(after_in_child=lambda: faulthandler.dump_traceback_later(delay, repeat=False))
    _stack_dump_armed = True
