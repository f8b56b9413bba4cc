"""The optional CUDA kernels of csrc/ (built by setup.py when nvcc and CUDA torch are present).

`VLLM_KVZIP_COMPACTION_KERNEL` picks the compaction kernel on CUDA caches:
`triton` (default, vllm_kvzip/backend/ops/compaction.py) or `cuda`
(csrc/compaction.cu).  Asking for `cuda` when the extension was not built is an
error, never a silent fallback.  Triton stays the default until the GPU
benchmark (benchmarks/compaction_kernel.py) shows the CUDA kernel ahead.
"""

from __future__ import annotations

import os

import torch

from vllm_kvzip.backend.ops.reference import compaction_moves, compaction_scratch

COMPACTION_KERNEL_ENV = "VLLM_KVZIP_COMPACTION_KERNEL"
COMPACTION_KERNELS = ("triton", "cuda")


def cuda_extension():
    """The compiled `vllm_kvzip._cuda_ops` module, or None when it was not built."""
    try:
        from vllm_kvzip import _cuda_ops  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _cuda_ops


def compaction_kernel() -> str:
    """The compaction kernel for CUDA caches, from `VLLM_KVZIP_COMPACTION_KERNEL` (validated)."""
    choice = os.environ.get(COMPACTION_KERNEL_ENV, "triton").strip().lower()
    if choice not in COMPACTION_KERNELS:
        raise ValueError(f"{COMPACTION_KERNEL_ENV}={choice!r} is not valid; valid values: {', '.join(COMPACTION_KERNELS)}")
    if choice == "cuda" and cuda_extension() is None:
        raise RuntimeError(
            f"{COMPACTION_KERNEL_ENV}=cuda, but vllm_kvzip._cuda_ops was not built (it needs nvcc and a CUDA build "
            "of torch at `pip install` time, and VLLM_KVZIP_NO_CUDA unset); valid values: triton, cuda"
        )
    return choice


def compact_kv_cuda(
    kv_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    scratch: torch.Tensor | None = None,
    num_staged: int | None = None,
) -> torch.Tensor:
    """Same contract as the Triton `compact_kv` (csrc/compaction.cu). Returns `kv_cache`."""
    extension = cuda_extension()
    if extension is None:
        raise RuntimeError("vllm_kvzip._cuda_ops was not built (nvcc and a CUDA build of torch are needed at install time)")
    _, num_staged = compaction_moves(src_slots, dst_slots, num_staged)
    scratch = compaction_scratch(kv_cache, num_staged, scratch)
    extension.compact_kv(
        kv_cache, src_slots.to(torch.int64).contiguous(), dst_slots.to(torch.int64).contiguous(), scratch, num_staged
    )
    return kv_cache
