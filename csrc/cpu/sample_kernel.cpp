// CPU kernel of kron_scaled_normal: the uniforms come from torch's CPU generator (the one
// given, else the default one that torch.manual_seed seeds), drawn serially under its mutex
// in the output's row-major order, layer after layer, exactly as at::uniform_real_distribution
// draws them for torch's own normal_; the Box-Muller transform and the per-element scaling
// (sample_common.h, shared with CUDA) then run in parallel with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <vector>

#include "../logdet.h"
#include "../sample.h"
#include "../sample_common.h"

namespace llama_fast {
namespace {

// out[k] = uniform draws (a pair per two outputs; one spare draw for an odd count), then in
// place: out[2j], out[2j+1] = Box-Muller of that pair, times the element's standard deviation.
template <typename T>
void fill_layer(const ScaledNormalLayer& layer, const T* damping, int64_t tasks, double scale,
                at::CPUGeneratorImpl* gen) {
  using Acc = double;
  T* out = static_cast<T*>(layer.out);
  const int64_t pairs = (layer.numel + 1) / 2;
  std::vector<T> spare(2);
  {
    // See ATen's note [Acquire lock when using random generators].
    std::lock_guard<std::mutex> lock(gen->mutex_);
    at::uniform_real_distribution<T> uniform(0, 1);
    for (int64_t k = 0; k < layer.numel; ++k) out[k] = static_cast<T>(uniform(gen));
    if (layer.numel % 2 == 1) spare[0] = static_cast<T>(uniform(gen));
  }
  at::parallel_for(0, pairs, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = 2 * j;
      const bool both = k + 1 < layer.numel;
      Acc z0, z1;
      box_muller<Acc>(out[k], both ? out[k + 1] : spare[0], &z0, &z1);
      out[k] = static_cast<T>(z0 * scaled_normal_std<Acc>(layer, damping, tasks, k, scale));
      if (both) out[k + 1] = static_cast<T>(z1 * scaled_normal_std<Acc>(layer, damping, tasks, k + 1, scale));
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
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_scaled_normal_cpu", [&] {
    for (size_t l = 0; l < eA.size(); ++l) {
      const ScaledNormalLayer layer{eA[l].data_ptr(), eG[l].data_ptr(), out[l].data_ptr(),
                                    eA[l].size(1), eG[l].size(1), out[l].numel()};
      fill_layer<scalar_t>(layer, delta.data_ptr<scalar_t>(), delta.size(0), scale, gen);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("kron_scaled_normal", &kron_scaled_normal_cpu);
}

}  // namespace llama_fast
