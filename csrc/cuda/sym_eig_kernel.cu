// CUDA kernel of sym_eig: one block per matrix runs the parallel-order Jacobi solver shared
// with the CPU kernel (sym_eig_common.h). Each round's n/2 rotations are independent: the threads
// first compute all rotations, then rotate all row pairs, then all column pairs of A and V.
// A and V live in shared memory when they fit (opt-in size, up to ~227 KB on Hopper), else in
// a global workspace. Convergence failures are reported in `info`; nothing syncs with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../sym_eig.h"
#include "../sym_eig_common.h"
#include "block_reduce.cuh"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T sum_squares(const T* A, int64_t d, bool off_diagonal_only) {
  T local = 0;
  for (int64_t e = threadIdx.x; e < d * d; e += kThreads) {
    if (!off_diagonal_only || e / d != e % d) local += A[e] * A[e];
  }
  return block_sum<kThreads>(local);
}

template <typename T>
__device__ void jacobi_round(T* A, T* V, int64_t d, int64_t n, int64_t round, JacobiRound<T> r) {
  const int64_t pairs = n / 2;
  for (int64_t k = threadIdx.x; k < pairs; k += kThreads) jacobi_pair_rotation(A, d, round, k, n, r);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < pairs * d; e += kThreads) {
    int64_t p, q;
    jacobi_pair(round, e / d, n, p, q);
    if (q < d) jacobi_rotate_rows(A, d, p, q, r.c[e / d], r.s[e / d], e % d);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < pairs * d; e += kThreads) {
    int64_t p, q;
    jacobi_pair(round, e / d, n, p, q);
    if (q < d) {
      jacobi_rotate_cols(A, d, p, q, r.c[e / d], r.s[e / d], e % d);
      jacobi_rotate_cols(V, d, p, q, r.c[e / d], r.s[e / d], e % d);
    }
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < pairs; k += kThreads) jacobi_set_block(A, d, round, k, n, r);
  __syncthreads();
}

// Dynamic shared memory: [A, V if in_shared] then the rotations c, s, diag_p, diag_q [n/2 each].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    jacobi_eig_kernel(const T* M, T* evals, T* evecs, int* info, T* workspace, int64_t d,
                      bool in_shared) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t n = jacobi_even(d);
  const int64_t b = blockIdx.x;
  T* A = in_shared ? smem : workspace + b * 2 * d * d;
  T* V = A + d * d;
  T* rotations = in_shared ? smem + 2 * d * d : smem;
  const JacobiRound<T> r{rotations, rotations + n / 2, rotations + n, rotations + 3 * n / 2};

  T local_max = 0;
  for (int64_t e = threadIdx.x; e < d * d; e += kThreads)
    local_max = max_abs_step(local_max, M[b * d * d + e]);
  const T max_abs = block_reduce<kThreads>(local_max, [](T a, T c) { return nan_max(a, c); });
  if (!isfinite(max_abs)) {  // the same value in every thread: the whole block leaves here
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t e = threadIdx.x; e < d; e += kThreads) evals[b * d + e] = nan;
    for (int64_t e = threadIdx.x; e < d * d; e += kThreads) evecs[b * d * d + e] = nan;
    if (threadIdx.x == 0) info[b] = 1;
    return;
  }
  const int shift = jacobi_exponent(max_abs);  // sym_eig_common.h: the sweeps run on M * 2^-shift
  for (int64_t e = threadIdx.x; e < d * d; e += kThreads) {
    A[e] = ldexp(M[b * d * d + e], -shift);
    V[e] = (e / d == e % d) ? T(1) : T(0);
  }
  __syncthreads();
  const T norm_sq = sum_squares(A, d, false);
  bool converged = false;
  for (int sweep = 0; sweep <= kJacobiMaxSweeps; ++sweep) {
    converged = jacobi_converged(sum_squares(A, d, true), norm_sq, d);
    if (converged || sweep == kJacobiMaxSweeps) break;
    for (int64_t round = 0; round < n - 1; ++round) jacobi_round(A, V, d, n, round, r);
  }
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const int64_t r = ascending_rank(A, d, i);
    evals[b * d + r] = ldexp(A[i * d + i], shift);
    for (int64_t row = 0; row < d; ++row) evecs[b * d * d + row * d + r] = V[row * d + i];
  }
  if (threadIdx.x == 0) info[b] = converged ? 0 : 1;
}

template <typename T>
void launch_jacobi(const at::Tensor& flat, const at::Tensor& evals, const at::Tensor& evecs,
                   const at::Tensor& info) {
  const int64_t batch = flat.size(0);
  const int64_t d = flat.size(-1);
  if (batch == 0 || d == 0) return;
  const int64_t rotations_bytes = 2 * jacobi_even(d) * static_cast<int64_t>(sizeof(T));
  const int64_t matrices_bytes = 2 * d * d * static_cast<int64_t>(sizeof(T));
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t limit = static_cast<int64_t>(props->sharedMemPerBlockOptin) - 1024;
  const bool in_shared = matrices_bytes + rotations_bytes <= limit;
  const int64_t smem = rotations_bytes + (in_shared ? matrices_bytes : 0);
  at::Tensor workspace;
  if (!in_shared) workspace = at::empty({batch, 2, d, d}, flat.options());
  TORCH_CHECK(smem <= limit, "sym_eig: matrices of size ", d, " need more shared memory than ",
              "this GPU offers for the Jacobi rotations");
  C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_eig_kernel<T>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  jacobi_eig_kernel<T><<<static_cast<unsigned>(batch), kThreads, smem,
                         at::cuda::getCurrentCUDAStream()>>>(
      flat.data_ptr<T>(), evals.data_ptr<T>(), evecs.data_ptr<T>(), info.data_ptr<int>(),
      in_shared ? nullptr : workspace.data_ptr<T>(), d, in_shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

SymEigOutput sym_eig_cuda(const at::Tensor& M) {
  check_sym_eig_input(M);
  const c10::cuda::CUDAGuard guard(M.device());
  const int64_t d = M.size(-1);
  const at::Tensor flat = M.reshape({-1, d, d}).contiguous();
  at::Tensor evals = at::empty({flat.size(0), d}, flat.options());
  at::Tensor evecs = at::empty({flat.size(0), d, d}, flat.options());
  at::Tensor info = at::empty({flat.size(0)}, flat.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "sym_eig_cuda",
                             [&] { launch_jacobi<scalar_t>(flat, evals, evecs, info); });
  return unflatten_sym_eig(M, evals, evecs, info);
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) { m.impl("sym_eig", &sym_eig_cuda); }

}  // namespace llama_fast
