// The one schema file: every llama_fast op is declared here; the CPU and CUDA kernels are
// registered per op family in cpu/ and cuda/ with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(llama_fast, m) {
  // Batched K-FAC factors for a list of layers, all tasks at once:
  //   A[l] = a_scale[l] * abar^T abar (abar = [a, 1] when bias[l]),  G[l] = g_scale[l] * g^T g.
  m.def(
      "kfac_factors(Tensor[] a, Tensor[] g, bool[] bias, float[] a_scale, float[] g_scale)"
      " -> (Tensor[], Tensor[])");
  // Batched symmetric eigendecomposition of M [..., d, d]: ascending eigenvalues, column
  // eigenvectors, and info (0: converged, 1: not converged) instead of an exception.
  m.def("sym_eig(Tensor M) -> (Tensor eigenvalues, Tensor eigenvectors, Tensor info)");
  // Per-task damped Kronecker log-determinant summed over layers, "exact" damping:
  //   sum_l sum_{p,q} log(scale * mu_p * lambda_q + damping[t])  (mu: eig(G[l]), lambda: eig(A[l]))
  // with the eigendecompositions it used (reused by the backward pass and by sampling).
  m.def(
      "kron_logdet_exact(Tensor[] A, Tensor[] G, Tensor damping, float scale)"
      " -> (Tensor logdet, Tensor[] evals_A, Tensor[] evecs_A, Tensor[] evals_G, Tensor[] evecs_G)");
  // The same sum from given eigenvalues (one fused reduction over all layers and tasks).
  m.def(
      "kron_logdet_from_eigs(Tensor[] evals_A, Tensor[] evals_G, Tensor damping, float scale)"
      " -> Tensor");
  // Gradient weights of that sum: w_A[l] [T, a_l], w_G[l] [T, g_l] and d/d damping [T].
  m.def(
      "kron_logdet_weights(Tensor[] evals_A, Tensor[] evals_G, Tensor damping, float scale)"
      " -> (Tensor[] w_A, Tensor[] w_G, Tensor w_damping)");
  // Batched Cholesky factorisation of SPD M [..., d, d] with log det M = 2 sum log diag(L);
  // info is 0 or the first non-positive pivot + 1 (logdet NaN there), never an exception.
  m.def("chol_logdet(Tensor M) -> (Tensor logdet, Tensor L, Tensor info)");
  // Gaussian posterior sampling in the eigenbases, all layers and tasks at once: per layer
  //   out[l] [S, T, g_l, a_l] = Z * (scale * mu_p * lambda_q + damping[t])^(-1/2),  Z iid N(0, 1)
  // (mu: evals_G[l], lambda: evals_A[l], negative round-off clamped to 0), drawn from the
  // given generator or the default one of the device (torch.manual_seed governs it).
  m.def(
      "kron_scaled_normal(Tensor[] evals_A, Tensor[] evals_G, Tensor damping, float scale,"
      " int num_samples, Generator? generator=None) -> Tensor[]",
      {at::Tag::nondeterministic_seeded});
}
