// Autograd kernel of sym_eig, registered in C++ so that small calls carry no Python autograd
// layer (for the 1x1..10x10 factors of the workloads it cost several times the solve).
// The gradient is torch.linalg.eigh's: with (w, Q) = eig(M), dL/dw = gw and dL/dQ = gQ,
//   dM = Q (diag(gw) + F o sym-part) Q^T,  F_ij = (Q^T gQ)_ij antisymmetrised / (w_j - w_i).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../llama_fast.h"
#include "below_autograd.h"

namespace llama_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor eigh_input_grad(const at::Tensor& evals, const at::Tensor& evecs,
                           const at::Tensor& d_evals, const at::Tensor& d_evecs) {
  at::Tensor inner = at::zeros_like(evecs);
  if (d_evecs.defined()) {
    const at::Tensor proj = at::matmul(evecs.transpose(-1, -2), d_evecs);
    // gap[i, j] = w_j - w_i, with 1 on the diagonal (masked out below) to avoid 0/0.
    at::Tensor gap = evals.unsqueeze(-2) - evals.unsqueeze(-1);
    gap.diagonal(0, -2, -1).fill_(1);
    inner = 0.5 * (proj - proj.transpose(-1, -2)) / gap;
    inner.diagonal(0, -2, -1).zero_();
  }
  if (d_evals.defined()) inner = inner + at::diag_embed(d_evals);
  return at::matmul(at::matmul(evecs, inner), evecs.transpose(-1, -2));
}

struct SymEigFunction : public torch::autograd::Function<SymEigFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& M) {
    auto [evals, evecs, info] = call_below_autograd(sym_eig, M);
    ctx->mark_non_differentiable({info});
    // An output nobody differentiated keeps an undefined gradient instead of zeros: zeros for
    // the eigenvectors would enter 0 / (w_j - w_i), NaN at repeated eigenvalues, even when only
    // the eigenvalues are used (torch.linalg.eigh is finite there).
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({evals, evecs});
    return {evals, evecs, info};
  }

  static variable_list backward(AutogradContext* ctx, variable_list d_out) {
    const variable_list saved = ctx->get_saved_variables();
    return {eigh_input_grad(saved[0], saved[1], d_out[0], d_out[1])};
  }
};

SymEigOutput sym_eig_autograd(const at::Tensor& M) {
  variable_list out = SymEigFunction::apply(M);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, Autograd, m) { m.impl("sym_eig", &sym_eig_autograd); }

}  // namespace llama_fast
