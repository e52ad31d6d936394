#include "kron_scaled_normal.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "kron_logdet.h"

namespace llama_fast {

void check_scaled_normal(at::TensorList evals_A, at::TensorList evals_G, const at::Tensor& damping,
                         int64_t num_samples) {
  TORCH_CHECK(num_samples >= 0, "kron_scaled_normal: num_samples must be >= 0, got ", num_samples);
  TORCH_CHECK(at::isFloatingType(damping.scalar_type()),
              "kron_scaled_normal: damping must be a floating tensor, got ", damping.scalar_type());
  check_kron_eigs(evals_A, evals_G, damping);
}

std::vector<at::Tensor> empty_scaled_normal(at::TensorList evals_A, at::TensorList evals_G,
                                            const at::Tensor& damping, int64_t num_samples) {
  std::vector<at::Tensor> out;
  for (size_t l = 0; l < evals_A.size(); ++l)
    out.push_back(at::empty({num_samples, damping.size(0), evals_G[l].size(1), evals_A[l].size(1)},
                            damping.options()));
  return out;
}

}  // namespace llama_fast
