// functional_covariance: argument checks shared by the CPU and CUDA kernels.
#include "functional_covariance.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace llama_fast {

namespace {

void check_like(const at::Tensor& x, const at::Tensor& like, const char* what, size_t l) {
  TORCH_CHECK(x.scalar_type() == like.scalar_type() && x.device() == like.device(),
              "functional_covariance: ", what, "[", l, "] must match damping's dtype ",
              like.scalar_type(), " and device ", like.device(), ", got ", x.scalar_type(), " on ",
              x.device());
}

}  // namespace

CovarianceSizes check_functional_covariance(at::TensorList rotated, at::TensorList evals_G,
                                            at::TensorList evals_A,
                                            const std::optional<at::Tensor>& residual,
                                            const at::Tensor& damping) {
  TORCH_CHECK(at::isFloatingType(damping.scalar_type()),
              "functional_covariance: damping must be a floating tensor, got ", damping.scalar_type());
  TORCH_CHECK(damping.dim() == 3, "functional_covariance: damping must have shape [D, T, L], got ",
              damping.sizes());
  const int64_t L = static_cast<int64_t>(rotated.size());
  TORCH_CHECK(L >= 1, "functional_covariance: needs at least one layer");
  TORCH_CHECK(evals_G.size() == rotated.size() && evals_A.size() == rotated.size(),
              "functional_covariance: got ", L, " rotated Jacobians but ", evals_G.size(),
              " evals_G and ", evals_A.size(), " evals_A");
  TORCH_CHECK(damping.size(2) == L, "functional_covariance: damping has L=", damping.size(2),
              " layers but there are ", L);
  const int64_t T = damping.size(1);
  TORCH_CHECK(rotated[0].dim() == 5, "functional_covariance: rotated[0] must have shape "
              "[T, M, K, g, a], got ", rotated[0].sizes());
  const int64_t M = rotated[0].size(1), K = rotated[0].size(2);
  for (size_t l = 0; l < rotated.size(); ++l) {
    const at::Tensor& J = rotated[l];
    check_like(J, damping, "rotated", l);
    check_like(evals_G[l], damping, "evals_G", l);
    check_like(evals_A[l], damping, "evals_A", l);
    TORCH_CHECK(J.dim() == 5 && J.size(0) == T && J.size(1) == M && J.size(2) == K,
                "functional_covariance: rotated[", l, "] must have shape [T=", T, ", M=", M, ", K=",
                K, ", g, a], got ", J.sizes());
    TORCH_CHECK(evals_G[l].dim() == 2 && evals_G[l].size(0) == T && evals_G[l].size(1) == J.size(3),
                "functional_covariance: evals_G[", l, "] must have shape [T=", T, ", g=", J.size(3),
                "], got ", evals_G[l].sizes());
    TORCH_CHECK(evals_A[l].dim() == 2 && evals_A[l].size(0) == T && evals_A[l].size(1) == J.size(4),
                "functional_covariance: evals_A[", l, "] must have shape [T=", T, ", a=", J.size(4),
                "], got ", evals_A[l].sizes());
  }
  if (residual.has_value()) {
    const at::Tensor& R = *residual;
    check_like(R, damping, "residual", 0);
    TORCH_CHECK(R.dim() == 5 && R.size(0) == L && R.size(1) == T && R.size(2) == M &&
                    R.size(3) == K && R.size(4) == K,
                "functional_covariance: residual must have shape [L=", L, ", T=", T, ", M=", M,
                ", K=", K, ", K=", K, "], got ", R.sizes());
  }
  return {damping.size(0), T, M, K, L};
}

}  // namespace llama_fast
