#include "chol_logdet.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <limits>

namespace llama_fast {

void check_chol_input(const at::Tensor& M) {
  TORCH_CHECK(M.dim() >= 2 && M.size(-1) == M.size(-2),
              "chol_logdet: M must have shape [..., d, d] (square), got ", M.sizes());
  TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
              "chol_logdet: M must be float32 or float64, got ", M.scalar_type());
}

CholLogdetOutput chol_output(const at::Tensor& M, const at::Tensor& L, const at::Tensor& info,
                             const at::Tensor& logdet) {
  const at::Tensor flat_logdet =
      logdet.defined() ? logdet
                       : (2 * L.diagonal(0, -2, -1).log().sum(-1))
                             .masked_fill(info != 0, std::numeric_limits<double>::quiet_NaN());
  const auto lead = M.sizes().slice(0, M.dim() - 2);
  return {flat_logdet.view(lead), L.view(M.sizes()), info.view(lead)};
}

}  // namespace llama_fast
