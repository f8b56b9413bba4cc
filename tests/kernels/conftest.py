"""Kernel tests run Triton on CPU through its interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e.
before vllm_kvzip.backend.ops.decode_attention / compaction are imported;
pytest imports this conftest before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config) -> None:
    # The Triton interpreter itself triggers a NumPy deprecation warning per launch.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
