// CUDA kernel of chol_logdet: one block per matrix runs the right-looking Cholesky shared with
// the CPU kernel (chol_logdet_common.h): per column, one thread takes the pivot, then the block
// scales the column and updates the trailing lower triangle in parallel. The matrix lives in shared
// memory when it fits (opt-in size), else it is factorised in place in the output. A failed
// pivot is reported in `info`; nothing syncs with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../chol_logdet.h"
#include "../chol_logdet_common.h"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cholesky_kernel(T* L, int* info, int64_t d, bool in_shared) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int failed;
  T* global = L + blockIdx.x * d * d;
  T* A = in_shared ? reinterpret_cast<T*>(smem_raw) : global;
  if (in_shared)
    for (int64_t e = threadIdx.x; e < d * d; e += kThreads) A[e] = global[e];
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  for (int64_t j = 0; j < d; ++j) {
    if (threadIdx.x == 0 && !chol_pivot(A, d, j)) failed = static_cast<int>(j + 1);
    __syncthreads();
    if (failed) break;
    for (int64_t i = j + 1 + threadIdx.x; i < d; i += kThreads) chol_scale(A, d, j, i);
    __syncthreads();
    const int64_t m = d - j - 1;
    for (int64_t e = threadIdx.x; e < m * m; e += kThreads) {
      const int64_t i = j + 1 + e / m, k = j + 1 + e % m;
      if (k <= i) chol_update(A, d, j, i, k);
    }
    __syncthreads();
  }
  if (in_shared)
    for (int64_t e = threadIdx.x; e < d * d; e += kThreads) global[e] = A[e];
  if (threadIdx.x == 0) info[blockIdx.x] = failed;
}

template <typename T>
void launch_cholesky(at::Tensor& L, at::Tensor& info) {
  const int64_t batch = L.size(0), d = L.size(-1);
  if (batch == 0 || d == 0) return;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t bytes = d * d * static_cast<int64_t>(sizeof(T));
  const bool in_shared = bytes <= static_cast<int64_t>(props->sharedMemPerBlockOptin) - 1024;
  const int64_t smem = in_shared ? bytes : 0;
  C10_CUDA_CHECK(cudaFuncSetAttribute(cholesky_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  cholesky_kernel<T><<<static_cast<unsigned>(batch), kThreads, smem,
                       at::cuda::getCurrentCUDAStream()>>>(L.data_ptr<T>(), info.data_ptr<int>(), d,
                                                          in_shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

CholLogdetOutput chol_logdet_cuda(const at::Tensor& M) {
  check_chol_input(M);
  const c10::cuda::CUDAGuard guard(M.device());
  const int64_t d = M.size(-1);
  at::Tensor L = M.reshape({-1, d, d}).contiguous().clone();
  at::Tensor info = at::zeros({L.size(0)}, L.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "chol_logdet_cuda", [&] { launch_cholesky<scalar_t>(L, info); });
  return chol_output(M, L.tril(), info);   // the kernel leaves the upper triangle as it was
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) { m.impl("chol_logdet", &chol_logdet_cuda); }

}  // namespace llama_fast
