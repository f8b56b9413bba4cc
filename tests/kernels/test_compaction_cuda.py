"""The CUDA compaction kernel of csrc/ equals the torch reference (GPU machine, extension built).

The selection through VLLM_KVZIP_COMPACTION_KERNEL is checked everywhere:
a bad value or `cuda` without the extension is an error that names the
variable and the valid values, never a silent fallback.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernels.test_compaction import BLOCK_SIZE, NUM_BLOCKS, NUM_KV_HEADS, NUM_SLOTS, expected_after_move, large_cuda_moves
from vllm_kvzip.backend.ops import compact_kv, compact_kv_ref
from vllm_kvzip.backend.ops.cuda_ops import COMPACTION_KERNEL_ENV, compact_kv_cuda, compaction_kernel, cuda_extension

BUILT = cuda_extension() is not None
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and BUILT),
    reason="needs a CUDA device and vllm_kvzip._cuda_ops (built by `pip install -e .` where nvcc and CUDA torch are)",
)


def test_kernel_choice_is_validated(monkeypatch):
    monkeypatch.delenv(COMPACTION_KERNEL_ENV, raising=False)
    assert compaction_kernel() == "triton"
    monkeypatch.setenv(COMPACTION_KERNEL_ENV, "cutlass")
    with pytest.raises(ValueError, match=f"{COMPACTION_KERNEL_ENV}='cutlass'.*valid values: triton, cuda"):
        compaction_kernel()
    monkeypatch.setenv(COMPACTION_KERNEL_ENV, "cuda")
    if BUILT:
        assert compaction_kernel() == "cuda"
    else:
        with pytest.raises(RuntimeError, match="was not built"):
            compaction_kernel()


@needs_cuda_kernel
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    data=st.data(),
    num_moves=st.integers(min_value=1, max_value=NUM_SLOTS // 2),
    head_size=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_cuda_compaction_equals_the_reference(data, num_moves, head_size, dtype):
    """Staged moves overlap their destinations freely; direct moves read rows no move writes."""
    slots = data.draw(st.permutations(range(NUM_SLOTS)))
    dst = slots[:num_moves]
    num_staged = data.draw(st.integers(0, num_moves))
    staged_src = data.draw(st.permutations(range(NUM_SLOTS)))[:num_staged]
    direct_src = slots[num_moves : num_moves + (num_moves - num_staged)]
    src_t = torch.tensor(staged_src + direct_src, dtype=torch.int64, device="cuda")
    dst_t = torch.tensor(dst, dtype=torch.int64, device="cuda")
    generator = torch.Generator().manual_seed(num_moves)
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * head_size, generator=generator).to(dtype=dtype, device="cuda")
    reference = cache.clone()
    compact_kv_ref(reference, src_t, dst_t, num_staged=num_staged)
    assert torch.equal(reference, expected_after_move(cache, src_t, dst_t))
    compact_kv_cuda(cache, src_t, dst_t, num_staged=num_staged)
    assert torch.equal(cache, reference)


@needs_cuda_kernel
def test_cuda_compaction_large_and_selected_by_the_environment(monkeypatch):
    cache, src, dst = large_cuda_moves()
    reference = cache.clone()
    compact_kv_ref(reference, src, dst)
    monkeypatch.setenv(COMPACTION_KERNEL_ENV, "cuda")
    compact_kv(cache, src, dst)  # the dispatcher, as the worker calls it
    assert torch.equal(cache, reference)
    # Zero moves and an exactly-full page of moves (16 rows of one head).
    compact_kv_cuda(cache, src[:0], dst[:0])
    assert torch.equal(cache, reference)
    block = torch.arange(16, device="cuda")
    compact_kv_cuda(cache, block + 16, block, num_staged=16)
    compact_kv_ref(reference, block + 16, block, num_staged=16)
    assert torch.equal(cache, reference)
