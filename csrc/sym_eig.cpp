#include "sym_eig.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace llama_fast {

void check_sym_eig_input(const at::Tensor& M) {
  TORCH_CHECK(M.dim() >= 2, "sym_eig: M must have shape [..., d, d], got ", M.sizes());
  TORCH_CHECK(M.size(-1) == M.size(-2), "sym_eig: M must be square in its last two dims, got ",
              M.sizes());
  TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
              "sym_eig: M must be float32 or float64, got ", M.scalar_type());
}

SymEigOutput unflatten_sym_eig(const at::Tensor& M, const at::Tensor& evals,
                               const at::Tensor& evecs, const at::Tensor& info) {
  const auto lead = M.sizes().slice(0, M.dim() - 2);
  std::vector<int64_t> w_shape(lead.begin(), lead.end());
  std::vector<int64_t> info_shape = w_shape;
  w_shape.push_back(M.size(-1));
  std::vector<int64_t> q_shape = w_shape;
  q_shape.push_back(M.size(-1));
  return {evals.view(w_shape), evecs.view(q_shape), info.view(info_shape)};
}

}  // namespace llama_fast
