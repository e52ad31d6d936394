// C++ test of the public entry points other than kfac_factors (test_kfac.cpp), CPU path: each
// call checks its typed signature against the registered kernels and its result against ATen.
// Run by ctest.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

#include "llama_fast.h"

namespace {

bool close(const at::Tensor& x, const at::Tensor& y, const char* what, double tol = 1e-9) {
  const double err = (x - y).abs().max().item<double>();
  const double ref = y.abs().max().item<double>();
  std::printf("%-38s max |diff| = %.3g (scale %.3g)\n", what, err, ref);
  return err <= tol * (1.0 + ref);
}

bool check(bool ok, const char* what) {
  std::printf("%-38s %s\n", what, ok ? "ok" : "FAILED");
  return ok;
}

// Symmetric positive definite [T, d, d].
at::Tensor spd(int64_t T, int64_t d, const torch::TensorOptions& opts) {
  const at::Tensor x = torch::randn({T, d + 3, d}, opts);
  return torch::bmm(x.transpose(1, 2), x) + 0.1 * torch::eye(d, opts);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t T = 3;
  const std::vector<at::Tensor> A = {spd(T, 5, opts), spd(T, 12, opts)};
  const std::vector<at::Tensor> G = {spd(T, 4, opts), spd(T, 9, opts)};
  const at::Tensor damping = torch::rand({T}, opts) + 0.5;
  const double scale = 0.7;
  bool ok = true;

  auto [evals, evecs, eig_info] = llama_fast::sym_eig(A[1]);
  ok &= close(evals, std::get<0>(torch::linalg_eigh(A[1])), "sym_eig eigenvalues");
  ok &= close(torch::matmul(evecs * evals.unsqueeze(-2), evecs.transpose(1, 2)), A[1],
              "sym_eig Q diag(w) Q^T");
  ok &= check(eig_info.eq(0).all().item<bool>(), "sym_eig info");

  auto [chol_det, L, chol_info] = llama_fast::chol_logdet(A[1]);
  ok &= close(chol_det, torch::logdet(A[1]), "chol_logdet logdet");
  ok &= close(torch::bmm(L, L.transpose(1, 2)), A[1], "chol_logdet L L^T");
  ok &= check(chol_info.eq(0).all().item<bool>(), "chol_logdet info");

  // Reference: sum over layers and eigenvalue pairs of log(s mu_p lambda_q + delta), and of
  // 1 / (s mu_p lambda_q + delta) for the damping's gradient weight.
  std::vector<at::Tensor> evals_A, evals_G;
  at::Tensor ref_logdet = torch::zeros({T}, opts), ref_inverse = torch::zeros({T}, opts);
  for (size_t l = 0; l < A.size(); ++l) {
    evals_A.push_back(torch::linalg_eigvalsh(A[l]));
    evals_G.push_back(torch::linalg_eigvalsh(G[l]));
    const at::Tensor h = scale * evals_G[l].unsqueeze(2) * evals_A[l].unsqueeze(1) +
                         damping.view({T, 1, 1});
    ref_logdet += h.log().sum({1, 2});
    ref_inverse += h.reciprocal().sum({1, 2});
  }
  auto exact = llama_fast::kron_logdet_exact(A, G, damping, scale);
  ok &= close(std::get<0>(exact), ref_logdet, "kron_logdet_exact logdet");
  ok &= check(std::get<1>(exact).size() == A.size() && std::get<4>(exact).size() == G.size(),
              "kron_logdet_exact eigendecompositions");
  ok &= close(llama_fast::kron_logdet_from_eigs(evals_A, evals_G, damping, scale), ref_logdet,
              "kron_logdet_from_eigs");
  auto [w_A, w_G, w_damping] = llama_fast::kron_logdet_weights(evals_A, evals_G, damping, scale);
  ok &= close(w_damping, ref_inverse, "kron_logdet_weights w_damping");
  ok &= check(w_A.size() == A.size() && w_G.size() == G.size(), "kron_logdet_weights w_A, w_G");

  // The autograd kernel from C++: d logdet / d damping is the weight above.
  const at::Tensor damping_leaf = damping.clone().requires_grad_(true);
  std::get<0>(llama_fast::kron_logdet_exact(A, G, damping_leaf, scale)).sum().backward();
  ok &= close(damping_leaf.grad(), ref_inverse, "kron_logdet_exact backward");

  const int64_t S = 4;
  torch::manual_seed(1);
  const auto draw = llama_fast::kron_scaled_normal(evals_A, evals_G, damping, scale, S);
  torch::manual_seed(1);
  const auto again =
      llama_fast::kron_scaled_normal(evals_A, evals_G, damping, scale, S, std::nullopt);
  ok &= check(draw.size() == A.size() && draw[1].sizes() == at::IntArrayRef({S, T, 9, 12}),
              "kron_scaled_normal shapes");
  ok &= check(draw[0].equal(again[0]) && draw[1].equal(again[1]), "kron_scaled_normal seeded");

  std::printf(ok ? "entry point C++ test passed\n" : "entry point C++ test FAILED\n");
  return ok ? 0 : 1;
}
