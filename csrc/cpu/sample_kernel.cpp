// CPU kernel of kron_scaled_normal. The normals are ATen's own CPU normal_ draws from torch's
// CPU generator (the one given, else the default one that torch.manual_seed seeds; normal_
// takes its mutex): the same stream torch.randn would produce from that generator state, layer
// after layer in the outputs' row-major order, with ATen's vectorised Box-Muller. A serial
// scalar draw (at::normal_distribution, or uniforms + a parallel scalar Box-Muller) measured
// 2-3.5x slower than torch.randn on 2 cores. The per-element scaling (sample_common.h, shared
// with CUDA) then runs in place in parallel with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../logdet.h"
#include "../sample.h"
#include "../sample_common.h"

namespace llama_fast {
namespace {

// out[n, t, p, q] *= std[t, p, q]: the [T, g, a] table of standard deviations is computed once
// (shared arithmetic) and applied to all S draws, in place, both passes in parallel.
template <typename T>
void scale_layer(const ScaledNormalLayer& layer, const T* damping, int64_t tasks, double scale) {
  using Acc = at::opmath_type<T>;
  const int64_t per_sample = tasks * layer.g * layer.a;
  if (per_sample == 0) return;
  // Walked as (t, p, q) loops rather than by flat index (scaled_normal_std, the CUDA kernel's
  // per-thread form): its integer divisions cost more than torch.randn's draws at S = 1.
  std::vector<T> std_table(per_sample);
  const T* mu = static_cast<const T*>(layer.evals_G);
  const T* lambda = static_cast<const T*>(layer.evals_A);
  at::parallel_for(0, tasks, std::max<int64_t>(1, 16384 / (layer.g * layer.a)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t p = 0; p < layer.g; ++p) {
        T* row = std_table.data() + (t * layer.g + p) * layer.a;
        const Acc mu_tp = static_cast<Acc>(mu[t * layer.g + p]);
        for (int64_t q = 0; q < layer.a; ++q)
          row[q] = static_cast<T>(kron_posterior_std<Acc>(mu_tp, static_cast<Acc>(lambda[t * layer.a + q]),
                                                          static_cast<Acc>(scale), static_cast<Acc>(damping[t])));
      }
    }
  });
  T* out = static_cast<T*>(layer.out);
  const T* sd = std_table.data();
  at::parallel_for(0, layer.numel, 16384, [&](int64_t begin, int64_t end) {
    int64_t k = begin;
    while (k < end) {
      const int64_t e = k % per_sample;
      const int64_t stop = std::min(end, k + (per_sample - e));
      T* row = out + k;
      const T* s = sd + e;
      for (int64_t j = 0; j < stop - k; ++j) row[j] *= s[j];
      k = stop;
    }
  });
}

std::vector<at::Tensor> kron_scaled_normal_cpu(at::TensorList evals_A, at::TensorList evals_G,
                                               const at::Tensor& damping, double scale,
                                               int64_t num_samples,
                                               const std::optional<at::Generator>& generator) {
  check_scaled_normal(evals_A, evals_G, damping, num_samples);
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  std::vector<at::Tensor> out = empty_scaled_normal(eA, eG, delta, num_samples);
  // Resolves (and type-checks) the generator once; normal_ locks its mutex per call.
  at::Generator gen = generator.has_value() && generator->defined() ? *generator
                                                                    : at::detail::getDefaultCPUGenerator();
  at::check_generator<at::CPUGeneratorImpl>(gen);
  for (at::Tensor& o : out) o.normal_(0.0, 1.0, gen);
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_scaled_normal_cpu", [&] {
    for (size_t l = 0; l < eA.size(); ++l) {
      const ScaledNormalLayer layer{eA[l].data_ptr(), eG[l].data_ptr(), out[l].data_ptr(),
                                    eA[l].size(1), eG[l].size(1), out[l].numel()};
      scale_layer<scalar_t>(layer, delta.data_ptr<scalar_t>(), delta.size(0), scale);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("kron_scaled_normal", &kron_scaled_normal_cpu);
}

}  // namespace llama_fast
