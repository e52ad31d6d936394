// Block-wide reductions for the CUDA kernels: warp shuffles, then one partial per warp in
// shared memory. Every thread of the block must call them; every thread gets the result.
#pragma once

namespace llama_fast {

template <int kThreads, typename T, typename Combine>
__device__ T block_reduce(T value, Combine combine) {
  static_assert(kThreads % 32 == 0, "block size must be a whole number of warps");
  __shared__ T partials[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2)
    value = combine(value, __shfl_down_sync(0xffffffffu, value, offset));
  if (threadIdx.x % 32 == 0) partials[threadIdx.x / 32] = value;
  __syncthreads();
  T total = partials[0];
  for (int w = 1; w < kThreads / 32; ++w) total = combine(total, partials[w]);
  __syncthreads();  // partials may be reused by the next call
  return total;
}

template <int kThreads, typename T>
__device__ T block_sum(T value) {
  return block_reduce<kThreads>(value, [](T a, T b) { return a + b; });
}

}  // namespace llama_fast
