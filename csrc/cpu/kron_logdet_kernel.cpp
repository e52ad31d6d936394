// CPU kernels of the kron_logdet reductions: parallel over (layer, task) with at::parallel_for,
// each summing the shared per-pair terms (kron_logdet_common.h) in double precision.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../kron_logdet.h"
#include "../kron_logdet_common.h"
#include "../llama_fast.h"

namespace llama_fast {
namespace {

// partial[l][t] = sum_{p,q} term(mu_p, lambda_q) for layer l of task t.
template <typename T>
at::Tensor reduce_pairs(const std::vector<at::Tensor>& eA, const std::vector<at::Tensor>& eG,
                        const at::Tensor& damping, double scale, KronReduction what) {
  const int64_t layers = static_cast<int64_t>(eA.size());
  const int64_t tasks = damping.size(0);
  at::Tensor partial = at::zeros({layers, tasks}, damping.options());
  const T* delta = damping.data_ptr<T>();
  T* out = partial.data_ptr<T>();
  at::parallel_for(0, layers * tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t l = k / tasks, t = k % tasks;
      const int64_t a = eA[l].size(1), g = eG[l].size(1);
      const T* lambda = eA[l].data_ptr<T>() + t * a;
      const T* mu = eG[l].data_ptr<T>() + t * g;
      double total = 0;
      for (int64_t p = 0; p < g; ++p)
        for (int64_t q = 0; q < a; ++q)
          total += kron_term<double>(what, mu[p], lambda[q], scale, delta[t]);
      out[k] = static_cast<T>(total);
    }
  });
  return partial;
}

at::Tensor kron_logdet_from_eigs_cpu(at::TensorList evals_A, at::TensorList evals_G,
                                     const at::Tensor& damping, double scale) {
  check_kron_eigs(evals_A, evals_G, damping);
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_logdet_cpu", [&] {
    partial = reduce_pairs<scalar_t>(eA, eG, delta, scale, KronReduction::kLog);
  });
  return partial.sum(0);
}

// w[l][t][i] = kron_weight(x_i, others of task t) for every eigenvalue x_i of one factor.
template <typename T>
std::vector<at::Tensor> weights(const std::vector<at::Tensor>& own,
                                const std::vector<at::Tensor>& others, const at::Tensor& damping,
                                double scale) {
  const int64_t tasks = damping.size(0);
  const T* delta = damping.data_ptr<T>();
  std::vector<at::Tensor> out;
  for (size_t l = 0; l < own.size(); ++l) {
    const int64_t n = own[l].size(1), m = others[l].size(1);
    at::Tensor w = at::empty_like(own[l]);
    const T* x = own[l].data_ptr<T>();
    const T* o = others[l].data_ptr<T>();
    T* wp = w.data_ptr<T>();
    at::parallel_for(0, tasks * n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t t = k / n;
        wp[k] = static_cast<T>(kron_weight<double>(x[k], o + t * m, m, scale, delta[t]));
      }
    });
    out.push_back(w);
  }
  return out;
}

KronLogdetWeightsOutput kron_logdet_weights_cpu(
    at::TensorList evals_A, at::TensorList evals_G, const at::Tensor& damping, double scale) {
  check_kron_eigs(evals_A, evals_G, damping);
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  std::vector<at::Tensor> wA, wG;
  at::Tensor w_delta;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_logdet_weights_cpu", [&] {
    wA = weights<scalar_t>(eA, eG, delta, scale);
    wG = weights<scalar_t>(eG, eA, delta, scale);
    w_delta = reduce_pairs<scalar_t>(eA, eG, delta, scale, KronReduction::kInverse).sum(0);
  });
  return {wA, wG, w_delta};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("kron_logdet_from_eigs", &kron_logdet_from_eigs_cpu);
  m.impl("kron_logdet_weights", &kron_logdet_weights_cpu);
}

}  // namespace llama_fast
