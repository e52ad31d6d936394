// CPU kernel of functional_covariance. The threads split the (task, run of inputs) blocks;
// each block walks the layers, and per layer computes the weights of its eigenvector pairs for
// every damping of the grid once (they depend on the task, not the input), then for each input
// and (k, j <= k) output pair the weighted inner products for all D dampings in a row, while
// the two Jacobian rows stay in cache (functional_covariance_common.h, shared with the CUDA
// kernel); the lower triangle is mirrored into the upper one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../functional_covariance.h"
#include "../functional_covariance_common.h"
#include "../kron_logdet.h"

namespace llama_fast {
namespace {

// Per thread, at most this many weights (eigenvector pairs times the dampings of a tile) and
// about this many accumulators (inputs of a block times dampings times output pairs).
constexpr int64_t kBufferElements = int64_t(1) << 20;

// Inputs per block: all of a task's when there are enough tasks to keep the threads busy, else
// runs short enough for a few blocks per thread (each block recomputes its task's weights);
// fewer where a block's accumulators would outgrow kBufferElements.
int64_t inputs_per_block(const CovarianceSizes& n) {
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t runs = std::min<int64_t>(n.inputs, (wanted + n.tasks - 1) / n.tasks);
  const int64_t run = (n.inputs + runs - 1) / std::max<int64_t>(1, runs);
  const int64_t per_input = n.grid * n.outputs * (n.outputs + 1) / 2;
  return std::clamp<int64_t>(kBufferElements / std::max<int64_t>(1, per_input), 1, std::max<int64_t>(1, run));
}

template <typename T>
void covariance_cpu(const std::vector<CovarianceLayer>& layers, const T* residual, const T* damping,
                    double scale, const CovarianceSizes& n, T* out) {
  using Acc = at::opmath_type<T>;
  const int64_t K = n.outputs, D = n.grid, pairs = K * (K + 1) / 2;
  const int64_t run = inputs_per_block(n), runs = (n.inputs + run - 1) / run;
  int64_t widest = 0;
  for (const auto& layer : layers) widest = std::max(widest, layer.g * layer.a);
  // Dampings whose weights are held at once: a few MB per thread, however long the grid.
  const int64_t tile = std::clamp<int64_t>(kBufferElements / std::max<int64_t>(1, widest), 1, D);
  // One block costs about run * D * pairs * P multiply-adds: small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, run * D * pairs * widest));
  at::parallel_for(0, n.tasks * runs, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> weight(static_cast<size_t>(tile * widest)), acc(static_cast<size_t>(run * D * pairs));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t t = block / runs, m0 = (block % runs) * run, count = std::min(run, n.inputs - m0);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t l = 0; l < n.layers; ++l) {
        const CovarianceLayer& layer = layers[l];
        const int64_t P = layer.g * layer.a;
        const T* mu = static_cast<const T*>(layer.evals_G) + t * layer.g;
        const T* lambda = static_cast<const T*>(layer.evals_A) + t * layer.a;
        for (int64_t d0 = 0; d0 < D; d0 += tile) {
          const int64_t d1 = std::min(D, d0 + tile);
          for (int64_t d = d0; d < d1; ++d) {
            const Acc delta = static_cast<Acc>(damping[(d * n.tasks + t) * n.layers + l]);
            Acc* w = weight.data() + (d - d0) * P;
            for (int64_t p = 0; p < layer.g; ++p)
              for (int64_t q = 0; q < layer.a; ++q)
                w[p * layer.a + q] = covariance_weight<Acc>(static_cast<Acc>(mu[p]), static_cast<Acc>(lambda[q]),
                                                            static_cast<Acc>(scale), delta);
          }
          for (int64_t i = 0; i < count; ++i) {
            const int64_t m = m0 + i;
            const T* J = static_cast<const T*>(layer.rotated) + (t * n.inputs + m) * K * P;
            const T* R = residual == nullptr ? nullptr : residual + ((l * n.tasks + t) * n.inputs + m) * K * K;
            for (int64_t pair = 0; pair < pairs; ++pair) {
              int64_t k, j;
              pair_of_index(pair, &k, &j);
              for (int64_t d = d0; d < d1; ++d) {
                Acc& a = acc[(i * D + d) * pairs + pair];
                a += weighted_dot<Acc>(J + k * P, J + j * P, weight.data() + (d - d0) * P, P);
                if (R != nullptr)
                  a += residual_term<Acc>(static_cast<Acc>(R[k * K + j]),
                                          static_cast<Acc>(damping[(d * n.tasks + t) * n.layers + l]));
              }
            }
          }
        }
      }
      for (int64_t i = 0; i < count; ++i)
        for (int64_t d = 0; d < D; ++d) {
          T* o = out + ((d * n.tasks + t) * n.inputs + m0 + i) * K * K;
          for (int64_t pair = 0; pair < pairs; ++pair) {
            int64_t k, j;
            pair_of_index(pair, &k, &j);
            o[k * K + j] = o[j * K + k] = static_cast<T>(acc[(i * D + d) * pairs + pair]);
          }
        }
    }
  });
}

at::Tensor functional_covariance_cpu(at::TensorList rotated, at::TensorList evals_G,
                                     at::TensorList evals_A, const std::optional<at::Tensor>& residual,
                                     const at::Tensor& damping, double scale) {
  const CovarianceSizes n = check_functional_covariance(rotated, evals_G, evals_A, residual, damping);
  const auto J = contiguous_all(rotated), eG = contiguous_all(evals_G), eA = contiguous_all(evals_A);
  const at::Tensor delta = damping.contiguous();
  const at::Tensor R = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty({n.grid, n.tasks, n.inputs, n.outputs, n.outputs}, damping.options());
  if (out.numel() == 0) return out;
  std::vector<CovarianceLayer> layers;
  for (size_t l = 0; l < J.size(); ++l)
    layers.push_back({J[l].data_ptr(), eG[l].data_ptr(), eA[l].data_ptr(), J[l].size(3), J[l].size(4)});
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "functional_covariance_cpu", [&] {
    covariance_cpu<scalar_t>(layers, R.defined() ? R.data_ptr<scalar_t>() : nullptr,
                             delta.data_ptr<scalar_t>(), scale, n, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("functional_covariance", &functional_covariance_cpu);
}

}  // namespace llama_fast
