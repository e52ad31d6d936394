// Autograd kernel of chol_logdet, registered in C++ so that a call carries no Python autograd
// layer (for the small factors of the sinusoid MLP and Conv-4's head that layer cost more than
// the factorisation). d log det M / dM = M^-1, from the factor (cholesky_inverse); L and info
// are outputs, not differentiable ones. No double backward (as kron_logdet).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../llama_fast.h"
#include "below_autograd.h"

namespace llama_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CholLogdetFunction : public torch::autograd::Function<CholLogdetFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& M) {
    auto [logdet, L, info] = call_below_autograd(chol_logdet, M);
    ctx->mark_non_differentiable({L, info});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({L});
    return {logdet, L, info};
  }

  static variable_list backward(AutogradContext* ctx, variable_list d_out) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "chol_logdet: double backward is not supported");
    const at::Tensor& d_logdet = d_out[0];
    if (!d_logdet.defined()) return {at::Tensor()};
    const at::Tensor L = ctx->get_saved_variables()[0];
    return {d_logdet.unsqueeze(-1).unsqueeze(-1) * at::cholesky_inverse(L)};
  }
};

CholLogdetOutput chol_logdet_autograd(const at::Tensor& M) {
  const variable_list out = CholLogdetFunction::apply(M);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, Autograd, m) { m.impl("chol_logdet", &chol_logdet_autograd); }

}  // namespace llama_fast
