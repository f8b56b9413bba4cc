// CUDA KV compaction: move flat token rows src_slots[i] -> dst_slots[i] of the KV cache.
//
// Same contract as the Triton kernel in vllm_kvzip/backend/ops/compaction.py
// and the torch reference compact_kv_ref: the cache is viewed as rows of
// 2 * head_size elements ([K | V] of one token of one KV head); the first
// `num_staged` moves go through a scratch buffer (all their sources are read
// before any destination is written, since compaction moves rows within the
// blocks they already occupy, across layers too); the remaining moves'
// sources are never destinations, so they are copied directly in between.
//
// Why a CUDA version: a compaction is a pure row copy, so the kernel is a
// 16-byte vectorised memcpy with one warp per row and no per-dtype code
// (rows are moved as bytes). Which of the two the worker uses is decided by
// benchmarks/compaction_kernel.py on the GPU (see csrc/README.md).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

// MODE 0: gather   scratch[i]             = cache[src_index[i]]
// MODE 1: scatter  cache[dst_index[i]]    = scratch[i]
// MODE 2: direct   cache[dst_index[i]]    = cache[src_index[i]]
template <int MODE>
__global__ void copy_rows_kernel(const uint4* src, uint4* dst,  // may alias (MODE 2)
                                 const int64_t* __restrict__ src_index,
                                 const int64_t* __restrict__ dst_index, int64_t num_rows,
                                 int64_t row_vectors) {
  // One warp per row, rows_per_block warps per block; lanes stride over the row's 16-byte vectors.
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_rows) return;
  const int64_t src_row = (MODE == 1) ? row : src_index[row];
  const int64_t dst_row = (MODE == 0) ? row : dst_index[row];
  const uint4* src_ptr = src + src_row * row_vectors;
  uint4* dst_ptr = dst + dst_row * row_vectors;
  for (int64_t v = lane; v < row_vectors; v += 32) {
    dst_ptr[v] = src_ptr[v];
  }
}

constexpr int kThreads = 256;  // 8 warps, 8 rows per block

template <int MODE>
void launch(const void* src, void* dst, const int64_t* src_index, const int64_t* dst_index,
            int64_t num_rows, int64_t row_vectors, cudaStream_t stream) {
  if (num_rows == 0) return;
  const int64_t rows_per_block = kThreads / 32;
  const int64_t blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  copy_rows_kernel<MODE><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<const uint4*>(src), static_cast<uint4*>(dst), src_index, dst_index, num_rows,
      row_vectors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// kv_cache: contiguous [num_blocks, H, block_size, 2 * head_size] on CUDA;
// src_slots / dst_slots: int64 [N] on the same device; scratch: contiguous
// [>= num_staged, 2 * head_size] of the cache's dtype.
void compact_kv(torch::Tensor kv_cache, torch::Tensor src_slots, torch::Tensor dst_slots,
                torch::Tensor scratch, int64_t num_staged) {
  TORCH_CHECK(kv_cache.is_cuda() && kv_cache.dim() == 4 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous CUDA [num_blocks, H, block_size, 2*head_size] tensor");
  TORCH_CHECK(src_slots.scalar_type() == torch::kInt64 && dst_slots.scalar_type() == torch::kInt64,
              "src_slots and dst_slots must be int64");
  TORCH_CHECK(src_slots.dim() == 1 && src_slots.sizes() == dst_slots.sizes(),
              "src_slots and dst_slots must be equal 1-D shapes");
  TORCH_CHECK(src_slots.is_contiguous() && dst_slots.is_contiguous(), "slots must be contiguous");
  TORCH_CHECK(src_slots.device() == kv_cache.device() && dst_slots.device() == kv_cache.device(),
              "slots must be on the cache's device");
  const int64_t num_moves = src_slots.size(0);
  TORCH_CHECK(0 <= num_staged && num_staged <= num_moves, "num_staged is outside 0..N");
  const int64_t row_bytes = kv_cache.size(3) * kv_cache.element_size();
  TORCH_CHECK(row_bytes % 16 == 0, "a KV row must be a multiple of 16 bytes");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0, "kv_cache must be 16-byte aligned");
  if (num_staged > 0) {
    TORCH_CHECK(scratch.is_cuda() && scratch.is_contiguous() && scratch.scalar_type() == kv_cache.scalar_type() &&
                    scratch.dim() == 2 && scratch.size(0) >= num_staged && scratch.size(1) == kv_cache.size(3),
                "scratch must be a contiguous [>= num_staged, 2*head_size] tensor of the cache's dtype");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(scratch.data_ptr()) % 16 == 0, "scratch must be 16-byte aligned");
  }
  if (num_moves == 0) return;
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_vectors = row_bytes / 16;
  const int64_t* src = src_slots.data_ptr<int64_t>();
  const int64_t* dst = dst_slots.data_ptr<int64_t>();
  void* cache = kv_cache.data_ptr();
  // Stream order makes the three launches sequential: every staged source is in
  // scratch before the direct copies and the scatter write anything.
  if (num_staged > 0) {
    launch<0>(cache, scratch.data_ptr(), src, dst, num_staged, row_vectors, stream);
  }
  launch<2>(cache, cache, src + num_staged, dst + num_staged, num_moves - num_staged, row_vectors, stream);
  if (num_staged > 0) {
    launch<1>(scratch.data_ptr(), cache, src, dst, num_staged, row_vectors, stream);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compact_kv", &compact_kv,
        "Move flat KV rows src_slots[i] -> dst_slots[i] in place; the first num_staged through scratch");
}
