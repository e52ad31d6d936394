// Autograd kernel of kron_logdet_exact, registered in C++ so that a call carries no Python
// autograd layer (for the sinusoid MLP's six <= 10 x 10 factors that layer cost more than the
// op; timings: benchmarks/bench_logdet.py, benchmarks/RESULTS.md).
// The op returns the eigendecompositions it used; the backward reuses them, without
// eigenvector derivatives:
//   dA_l = Q_A diag(w_A * g) Q_A^T,  w_A[q] = sum_p s mu_p / (s mu_p lambda_q + delta),
// likewise for G, and d delta = g * sum_{p,q} 1 / (s mu_p lambda_q + delta) (kron_logdet_weights).
// The eigendecompositions are outputs for reuse, not differentiable ones.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "../llama_fast.h"
#include "below_autograd.h"

namespace llama_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Q diag(weights) Q^T for a batch.
at::Tensor rotate_back(const at::Tensor& evecs, const at::Tensor& weights) {
  return at::matmul(evecs * weights.unsqueeze(-2), evecs.transpose(-1, -2));
}

struct KronLogdetExactFunction : public torch::autograd::Function<KronLogdetExactFunction> {
  // Outputs: logdet, then per layer evals_A, evecs_A, evals_G, evecs_G (each a block of L).
  static variable_list forward(AutogradContext* ctx, at::TensorList A, at::TensorList G,
                               const at::Tensor& damping, double scale) {
    auto [logdet, evals_A, evecs_A, evals_G, evecs_G] =
        call_below_autograd(kron_logdet_exact, A, G, damping, scale);
    variable_list eigs;
    for (const TensorVector* part : {&evals_A, &evecs_A, &evals_G, &evecs_G})
      eigs.insert(eigs.end(), part->begin(), part->end());
    ctx->mark_non_differentiable(eigs);
    // No zero tensors for the eigendecompositions' (unused) output gradients.
    ctx->set_materialize_grads(false);
    variable_list saved{damping};
    saved.insert(saved.end(), eigs.begin(), eigs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = scale;
    variable_list out{logdet};
    out.insert(out.end(), eigs.begin(), eigs.end());
    return out;
  }

  // One gradient per tensor of A, then of G, then damping's, then none for the scale.
  static variable_list backward(AutogradContext* ctx, variable_list d_out) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "kron_logdet: double backward (create_graph=True through the log-determinant) "
                "is not supported");
    const variable_list saved = ctx->get_saved_variables();
    const size_t layers = (saved.size() - 1) / 4;
    variable_list grads(2 * layers + 2);
    const at::Tensor& d_logdet = d_out[0];
    if (!d_logdet.defined()) return grads;   // only the eigendecompositions were used
    const at::Tensor& damping = saved[0];
    auto block = [&](size_t part) {
      return TensorVector(saved.begin() + 1 + part * layers, saved.begin() + 1 + (part + 1) * layers);
    };
    const TensorVector evals_A = block(0), evecs_A = block(1), evals_G = block(2), evecs_G = block(3);
    auto [w_A, w_G, w_delta] =
        kron_logdet_weights(evals_A, evals_G, damping, ctx->saved_data["scale"].toDouble());
    const at::Tensor g = d_logdet.unsqueeze(-1);
    for (size_t l = 0; l < layers; ++l) {
      grads[l] = rotate_back(evecs_A[l], w_A[l] * g);
      grads[layers + l] = rotate_back(evecs_G[l], w_G[l] * g);
    }
    grads[2 * layers] = w_delta * d_logdet;
    return grads;
  }
};

KronLogdetExactOutput kron_logdet_exact_autograd(at::TensorList A, at::TensorList G,
                                                 const at::Tensor& damping, double scale) {
  const variable_list out = KronLogdetExactFunction::apply(A, G, damping, scale);
  const auto layers = static_cast<std::ptrdiff_t>(A.size());
  auto block = [&](std::ptrdiff_t part) {
    return TensorVector(out.begin() + 1 + part * layers, out.begin() + 1 + (part + 1) * layers);
  };
  return {out[0], block(0), block(1), block(2), block(3)};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, Autograd, m) {
  m.impl("kron_logdet_exact", &kron_logdet_exact_autograd);
}

}  // namespace llama_fast
