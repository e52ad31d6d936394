// CUDA kernel of functional_covariance. A block owns one (grid point, task, input) and its
// K x K output. It walks each layer's Jacobian coordinates [K, g*a] in tiles of kTile
// eigenvector pairs: the block stages the tile's K rows and their weights
// (functional_covariance_common.h, shared with the CPU kernel) in shared memory, and each thread
// accumulates the weighted inner products of up to kPairsPerThread (k, j <= k) pairs in
// registers. K beyond what one pass of kThreads * kPairsPerThread pairs covers walks the
// coordinates again for the next pairs. At most kMaxLayers layers go in one launch; further
// launches add to the output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "../functional_covariance.h"
#include "../functional_covariance_common.h"
#include "../kron_logdet.h"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kPairsPerThread = 4;
constexpr int kMaxLayers = 16;
constexpr int kMaxTile = 32;
// Static shared memory stays under the 48 KiB every launch gets without opting in.
constexpr int64_t kSharedBytes = 40 * 1024;

struct CovarianceBatch {
  CovarianceLayer layers[kMaxLayers];
  int count;
  int first_layer;  // index of layers[0] among all L layers (damping and residual are [.., L, ..])
  bool accumulate;  // add to the output (a later group of layers) instead of writing it
  const void* residual;  // [L, T, M, K, K] or nullptr
  const void* damping;   // [D, T, L]
  void* out;             // [D, T, M, K, K]
  CovarianceSizes sizes;
  double scale;
  int tile;  // eigenvector pairs staged per pass (<= kMaxTile, fits kSharedBytes)
};

template <typename T>
__global__ void __launch_bounds__(kThreads) covariance_kernel(const __grid_constant__ CovarianceBatch batch) {
  using Acc = at::opmath_type<T>;
  extern __shared__ unsigned char shared_raw[];
  const CovarianceSizes& n = batch.sizes;
  const int64_t K = n.outputs, pairs = K * (K + 1) / 2, stride = batch.tile + 1;
  Acc* rows = reinterpret_cast<Acc*>(shared_raw);  // [K, tile + 1] (padded: no bank conflicts)
  Acc* weight = rows + K * stride;                 // [tile]
  const int64_t block = blockIdx.x;
  const int64_t m = block % n.inputs, t = (block / n.inputs) % n.tasks, d = block / (n.inputs * n.tasks);
  const T* damping = static_cast<const T*>(batch.damping) + (d * n.tasks + t) * n.layers;
  const T* residual = static_cast<const T*>(batch.residual);
  T* out = static_cast<T*>(batch.out) + block * K * K;
  for (int64_t first = 0; first < pairs; first += int64_t(kThreads) * kPairsPerThread) {
    // Row offsets of each pair's two rows in the staged tile (k * stride, j * stride), and
    // its (k, j) for the output; -1 where the thread has no pair.
    Acc acc[kPairsPerThread];
    int pk[kPairsPerThread], pj[kPairsPerThread];
    LF_UNROLL
    for (int i = 0; i < kPairsPerThread; ++i) {
      acc[i] = Acc(0);
      const int64_t pair = first + int64_t(i) * kThreads + threadIdx.x;
      int64_t k = -1, j = -1;
      if (pair < pairs) pair_of_index(pair, &k, &j);
      pk[i] = static_cast<int>(k);
      pj[i] = static_cast<int>(j);
    }
    for (int c = 0; c < batch.count; ++c) {
      const CovarianceLayer& layer = batch.layers[c];
      const int64_t l = batch.first_layer + c, P = layer.g * layer.a;
      const T* mu = static_cast<const T*>(layer.evals_G) + t * layer.g;
      const T* lambda = static_cast<const T*>(layer.evals_A) + t * layer.a;
      const T* J = static_cast<const T*>(layer.rotated) + (t * n.inputs + m) * K * P;
      const Acc delta = static_cast<Acc>(damping[l]);
      for (int64_t p0 = 0; p0 < P; p0 += batch.tile) {
        const int64_t width = min(static_cast<int64_t>(batch.tile), P - p0);
        for (int64_t e = threadIdx.x; e < K * batch.tile; e += kThreads) {
          const int64_t k = e / batch.tile, p = e % batch.tile;
          rows[k * stride + p] = p < width ? static_cast<Acc>(J[k * P + p0 + p]) : Acc(0);
        }
        for (int64_t p = threadIdx.x; p < batch.tile; p += kThreads) {
          const int64_t pq = p0 + p;
          weight[p] = p < width ? covariance_weight<Acc>(static_cast<Acc>(mu[pq / layer.a]),
                                                          static_cast<Acc>(lambda[pq % layer.a]),
                                                          static_cast<Acc>(batch.scale), delta)
                                : Acc(0);
        }
        __syncthreads();
        LF_UNROLL
        for (int i = 0; i < kPairsPerThread; ++i)
          if (pk[i] >= 0)
            acc[i] += weighted_dot<Acc>(rows + int64_t(pk[i]) * stride, rows + int64_t(pj[i]) * stride, weight, width);
        __syncthreads();
      }
      if (residual != nullptr) {
        const T* R = residual + ((l * n.tasks + t) * n.inputs + m) * K * K;
        LF_UNROLL
        for (int i = 0; i < kPairsPerThread; ++i)
          if (pk[i] >= 0) acc[i] += residual_term<Acc>(static_cast<Acc>(R[int64_t(pk[i]) * K + pj[i]]), delta);
      }
    }
    LF_UNROLL
    for (int i = 0; i < kPairsPerThread; ++i) {
      if (pk[i] < 0) continue;
      const int64_t lower = int64_t(pk[i]) * K + pj[i], upper = int64_t(pj[i]) * K + pk[i];
      const Acc total = batch.accumulate ? acc[i] + static_cast<Acc>(out[lower]) : acc[i];
      out[lower] = out[upper] = static_cast<T>(total);
    }
  }
}

// The widest tile whose K staged rows and weights fit kSharedBytes.
template <typename Acc>
int tile_for(int64_t outputs) {
  const int64_t fit = kSharedBytes / static_cast<int64_t>(sizeof(Acc)) / (outputs + 1) - 1;
  TORCH_CHECK(fit >= 1, "functional_covariance: K=", outputs,
              " outputs do not fit the CUDA kernel's shared memory (at most ",
              kSharedBytes / static_cast<int64_t>(sizeof(Acc)) / 2 - 1, ")");
  return static_cast<int>(std::min<int64_t>(kMaxTile, fit));
}

at::Tensor functional_covariance_cuda(at::TensorList rotated, at::TensorList evals_G,
                                      at::TensorList evals_A, const std::optional<at::Tensor>& residual,
                                      const at::Tensor& damping, double scale) {
  const CovarianceSizes n = check_functional_covariance(rotated, evals_G, evals_A, residual, damping);
  const c10::cuda::CUDAGuard guard(damping.device());
  const auto J = contiguous_all(rotated), eG = contiguous_all(evals_G), eA = contiguous_all(evals_A);
  const at::Tensor delta = damping.contiguous();
  const at::Tensor R = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({n.grid, n.tasks, n.inputs, n.outputs, n.outputs}, damping.options());
  const int64_t blocks = n.grid * n.tasks * n.inputs;
  if (out.numel() == 0) return out;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "functional_covariance: D*T*M=", blocks,
              " exceeds the CUDA grid");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "functional_covariance_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const int tile = tile_for<Acc>(n.outputs);
    const size_t shared = sizeof(Acc) * static_cast<size_t>(n.outputs * (tile + 1) + tile);
    for (int64_t first = 0; first < n.layers; first += kMaxLayers) {
      CovarianceBatch batch{};
      batch.count = static_cast<int>(std::min<int64_t>(kMaxLayers, n.layers - first));
      for (int c = 0; c < batch.count; ++c) {
        const size_t l = static_cast<size_t>(first + c);
        batch.layers[c] = {J[l].data_ptr(), eG[l].data_ptr(), eA[l].data_ptr(), J[l].size(3), J[l].size(4)};
      }
      batch.first_layer = static_cast<int>(first);
      batch.accumulate = first > 0;
      batch.residual = R.defined() ? R.data_ptr() : nullptr;
      batch.damping = delta.data_ptr();
      batch.out = out.data_ptr();
      batch.sizes = n;
      batch.scale = scale;
      batch.tile = tile;
      covariance_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(batch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("functional_covariance", &functional_covariance_cuda);
}

}  // namespace llama_fast
