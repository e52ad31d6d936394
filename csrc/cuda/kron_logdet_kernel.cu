// CUDA kernels of the kron_logdet reductions. One launch covers every layer and task: a block
// per (layer, task) sums the shared per-pair terms (kron_logdet_common.h) over all (p, q) with a
// block reduction into partial[l][t]; the weights kernel gives each thread one eigenvalue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../kron_logdet.h"
#include "../kron_logdet_common.h"
#include "../llama_fast.h"
#include "block_reduce.cuh"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLayers = 48;

struct KronLayer {
  const void* evals_A;  // [T, a], contiguous
  const void* evals_G;  // [T, g], contiguous
  void* w_A;            // [T, a] (weights kernel only)
  void* w_G;            // [T, g]
  int64_t a;
  int64_t g;
};

struct KronBatch {
  KronLayer layers[kMaxLayers];
  const void* damping;  // [T]
  void* partial;        // [layers, T]
  int64_t tasks;
  double scale;
  KronReduction what;
};

// The eigenvalues and damping of the (layer, task) that this block owns.
template <typename T>
struct BlockEigs {
  const KronLayer& layer;
  int64_t task;
  const T* lambda;  // eigenvalues of A, [a]
  const T* mu;      // eigenvalues of G, [g]
  at::opmath_type<T> delta;
};

template <typename T>
__device__ BlockEigs<T> block_eigs(const KronBatch& batch) {
  const KronLayer& layer = batch.layers[blockIdx.x / batch.tasks];
  const int64_t t = blockIdx.x % batch.tasks;
  return {layer, t, static_cast<const T*>(layer.evals_A) + t * layer.a,
          static_cast<const T*>(layer.evals_G) + t * layer.g, static_cast<const T*>(batch.damping)[t]};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_pairs_kernel(const __grid_constant__ KronBatch batch) {
  using acc_t = at::opmath_type<T>;
  const BlockEigs<T> e = block_eigs<T>(batch);
  const KronLayer& layer = e.layer;
  acc_t local = 0;
  for (int64_t k = threadIdx.x; k < layer.a * layer.g; k += kThreads)
    local += kron_term<acc_t>(batch.what, e.mu[k / layer.a], e.lambda[k % layer.a], batch.scale, e.delta);
  const acc_t total = block_sum<kThreads>(local);
  if (threadIdx.x == 0) static_cast<T*>(batch.partial)[blockIdx.x] = static_cast<T>(total);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) weights_kernel(const __grid_constant__ KronBatch batch) {
  using acc_t = at::opmath_type<T>;
  const BlockEigs<T> e = block_eigs<T>(batch);
  const KronLayer& layer = e.layer;
  T* w_A = static_cast<T*>(layer.w_A) + e.task * layer.a;
  T* w_G = static_cast<T*>(layer.w_G) + e.task * layer.g;
  for (int64_t q = threadIdx.x; q < layer.a; q += kThreads)
    w_A[q] = static_cast<T>(kron_weight<acc_t>(e.lambda[q], e.mu, layer.g, batch.scale, e.delta));
  for (int64_t p = threadIdx.x; p < layer.g; p += kThreads)
    w_G[p] = static_cast<T>(kron_weight<acc_t>(e.mu[p], e.lambda, layer.a, batch.scale, e.delta));
}

// Runs `kernel` over every (layer, task) in launches of at most kMaxLayers layers; returns
// partial [layers, T] (filled only by the reduction kernel).
template <typename Launch>
at::Tensor for_layer_groups(const std::vector<at::Tensor>& eA, const std::vector<at::Tensor>& eG,
                            const std::vector<at::Tensor>* wA, const std::vector<at::Tensor>* wG,
                            const at::Tensor& damping, double scale, KronReduction what,
                            Launch launch) {
  const int64_t layers = static_cast<int64_t>(eA.size());
  const int64_t tasks = damping.size(0);
  at::Tensor partial = at::zeros({layers, tasks}, damping.options());
  for (int64_t first = 0; first < layers && tasks > 0; first += kMaxLayers) {
    KronBatch batch{};
    const int64_t count = std::min<int64_t>(kMaxLayers, layers - first);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t l = first + i;
      batch.layers[i] = {eA[l].data_ptr(), eG[l].data_ptr(), wA ? (*wA)[l].data_ptr() : nullptr,
                         wG ? (*wG)[l].data_ptr() : nullptr, eA[l].size(1), eG[l].size(1)};
    }
    batch.damping = damping.data_ptr();
    batch.partial = partial[first].data_ptr();
    batch.tasks = tasks;
    batch.scale = scale;
    batch.what = what;
    launch(batch, static_cast<unsigned>(count * tasks));
  }
  return partial;
}

at::Tensor kron_logdet_from_eigs_cuda(at::TensorList evals_A, at::TensorList evals_G,
                                      const at::Tensor& damping, double scale) {
  check_kron_eigs(evals_A, evals_G, damping);
  const c10::cuda::CUDAGuard guard(damping.device());
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_logdet_cuda", [&] {
    partial = for_layer_groups(eA, eG, nullptr, nullptr, delta, scale, KronReduction::kLog,
                               [&](const KronBatch& batch, unsigned blocks) {
                                 reduce_pairs_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(batch);
                                 C10_CUDA_KERNEL_LAUNCH_CHECK();
                               });
  });
  return partial.sum(0);
}

KronLogdetWeightsOutput kron_logdet_weights_cuda(
    at::TensorList evals_A, at::TensorList evals_G, const at::Tensor& damping, double scale) {
  check_kron_eigs(evals_A, evals_G, damping);
  const c10::cuda::CUDAGuard guard(damping.device());
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> wA, wG;
  for (size_t l = 0; l < eA.size(); ++l) {
    wA.push_back(at::empty_like(eA[l]));
    wG.push_back(at::empty_like(eG[l]));
  }
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_logdet_weights_cuda", [&] {
    for_layer_groups(eA, eG, &wA, &wG, delta, scale, KronReduction::kInverse,
                     [&](const KronBatch& batch, unsigned blocks) {
                       weights_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(batch);
                       C10_CUDA_KERNEL_LAUNCH_CHECK();
                     });
    partial = for_layer_groups(eA, eG, nullptr, nullptr, delta, scale, KronReduction::kInverse,
                               [&](const KronBatch& batch, unsigned blocks) {
                                 reduce_pairs_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(batch);
                                 C10_CUDA_KERNEL_LAUNCH_CHECK();
                               });
  });
  return {wA, wG, partial.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("kron_logdet_from_eigs", &kron_logdet_from_eigs_cuda);
  m.impl("kron_logdet_weights", &kron_logdet_weights_cuda);
}

}  // namespace llama_fast
