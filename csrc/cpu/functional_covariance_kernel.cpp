// CPU kernel of functional_covariance. The (grid point, task, input) triples are split over
// the threads; each computes its K x K matrix layer by layer: the weights of the layer's
// eigenvector pairs once into a buffer, then every (k, j <= k) pair's weighted inner product
// (functional_covariance_common.h, shared with the CUDA kernel), mirrored into the upper
// triangle.
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

template <typename T>
void covariance_cpu(const std::vector<CovarianceLayer>& layers, const T* residual, const T* damping,
                    double scale, const CovarianceSizes& n, T* out) {
  using Acc = at::opmath_type<T>;
  const int64_t K = n.outputs, pairs = K * (K + 1) / 2, blocks = n.grid * n.tasks * n.inputs;
  int64_t widest = 0;
  for (const auto& layer : layers) widest = std::max(widest, layer.g * layer.a);
  // One (d, t, m) costs about pairs * P multiply-adds: small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, pairs * widest));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> weight(static_cast<size_t>(widest)), acc(static_cast<size_t>(pairs));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t m = block % n.inputs, t = (block / n.inputs) % n.tasks, d = block / (n.inputs * n.tasks);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t l = 0; l < n.layers; ++l) {
        const CovarianceLayer& layer = layers[l];
        const int64_t P = layer.g * layer.a;
        const T* mu = static_cast<const T*>(layer.evals_G) + t * layer.g;
        const T* lambda = static_cast<const T*>(layer.evals_A) + t * layer.a;
        const T* J = static_cast<const T*>(layer.rotated) + (t * n.inputs + m) * K * P;
        const Acc delta = static_cast<Acc>(damping[(d * n.tasks + t) * n.layers + l]);
        for (int64_t p = 0; p < layer.g; ++p)
          for (int64_t q = 0; q < layer.a; ++q)
            weight[p * layer.a + q] = covariance_weight<Acc>(static_cast<Acc>(mu[p]),
                                                             static_cast<Acc>(lambda[q]),
                                                             static_cast<Acc>(scale), delta);
        const T* R = residual == nullptr ? nullptr : residual + ((l * n.tasks + t) * n.inputs + m) * K * K;
        for (int64_t pair = 0; pair < pairs; ++pair) {
          int64_t k, j;
          pair_of_index(pair, &k, &j);
          acc[pair] += weighted_dot<Acc>(J + k * P, J + j * P, weight.data(), P);
          if (R != nullptr) acc[pair] += residual_term<Acc>(static_cast<Acc>(R[k * K + j]), delta);
        }
      }
      T* o = out + block * K * K;
      for (int64_t pair = 0; pair < pairs; ++pair) {
        int64_t k, j;
        pair_of_index(pair, &k, &j);
        o[k * K + j] = o[j * K + k] = static_cast<T>(acc[pair]);
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
