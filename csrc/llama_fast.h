// Public C++ API of llama_fast: one typed entry point per registered op (torch.ops.llama_fast.*),
// defined in ops.cpp. Each call goes through the dispatcher, so C++ users get the CPU or CUDA
// kernel from the inputs' device, and autograd, exactly as Python does; the autograd kernels
// and composite ops call these too (under at::AutoDispatchBelowADInplaceOrView to skip autograd).
// Link libllama_fast (CMakeLists.txt) with --no-as-needed: the ops register at load time.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace llama_fast {

using TensorVector = std::vector<at::Tensor>;

// K-FAC factors of a list of layers for all tasks at once: a[l] [T, N_l, i_l], g[l] [T, M_l, o_l],
//   A[l] = a_scale[l] * abar^T abar (abar = [a[l], 1] when bias[l]),  G[l] = g_scale[l] * g^T g.
using KfacFactorsOutput = std::tuple<TensorVector, TensorVector>;  // (A, G)
KfacFactorsOutput kfac_factors(at::TensorList a, at::TensorList g, const c10::List<bool>& bias,
                               c10::ArrayRef<double> a_scale, c10::ArrayRef<double> g_scale);

// Batched symmetric eigendecomposition of M [..., d, d] (float32/float64): eigenvalues [..., d]
// ascending, eigenvectors [..., d, d] as columns, and info [...] int32 (0: converged, 1: not
// converged) instead of an exception.
using SymEigOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
SymEigOutput sym_eig(const at::Tensor& M);

// Per-task damped Kronecker log-determinant summed over layers, "exact" damping:
//   sum_l sum_{p,q} log(scale * mu_p * lambda_q + damping[t])  (mu: eig(G[l]), lambda: eig(A[l]))
// with the eigendecompositions it used (reused by the backward pass and by sampling):
// (logdet [T], evals_A, evecs_A, evals_G, evecs_G).
using KronLogdetExactOutput =
    std::tuple<at::Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;
KronLogdetExactOutput kron_logdet_exact(at::TensorList A, at::TensorList G,
                                        const at::Tensor& damping, double scale);

// The same sum from given eigenvalues evals_A[l] [T, a_l], evals_G[l] [T, g_l] (one fused
// reduction over all layers and tasks): logdet [T].
at::Tensor kron_logdet_from_eigs(at::TensorList evals_A, at::TensorList evals_G,
                                 const at::Tensor& damping, double scale);

// Gradient weights of that sum: (w_A[l] [T, a_l], w_G[l] [T, g_l], d/d damping [T]).
using KronLogdetWeightsOutput = std::tuple<TensorVector, TensorVector, at::Tensor>;
KronLogdetWeightsOutput kron_logdet_weights(at::TensorList evals_A, at::TensorList evals_G,
                                            const at::Tensor& damping, double scale);

// Batched Cholesky factorisation of SPD M [..., d, d] with log det M = 2 sum log diag(L):
// (logdet [...], L [..., d, d] lower triangular, info [...] int32: 0, or j+1 for the first
// non-positive pivot j, as LAPACK's potrf; logdet NaN there), never an exception.
using CholLogdetOutput = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
CholLogdetOutput chol_logdet(const at::Tensor& M);

// Gaussian posterior sampling in the eigenbases, all layers and tasks at once: per layer
//   out[l] [S, T, g_l, a_l] = Z * (scale * mu_p * lambda_q + damping[t])^(-1/2),  Z iid N(0, 1)
// (mu: evals_G[l], lambda: evals_A[l], negative round-off clamped to 0), drawn from the given
// generator or the default one of the device (torch.manual_seed governs it).
TensorVector kron_scaled_normal(at::TensorList evals_A, at::TensorList evals_G,
                                const at::Tensor& damping, double scale, int64_t num_samples,
                                const std::optional<at::Generator>& generator = std::nullopt);

// Function-space covariance of the linearised (GLM) predictive, J H^-1 J^T, for a grid of D
// dampings at once: out [D, T, M, K, K] with
//   out[d, t, m, k, j] = sum_l ( residual[l, t, m, k, j] / damping[d, t, l]
//       + sum_{p,q} rotated[l][t, m, k, p, q] rotated[l][t, m, j, p, q]
//                   / (scale * mu_p * lambda_q + damping[d, t, l]) )
// rotated[l] [T, M, K, g_l, a_l]: the Jacobian of output k at input m with respect to layer l's
// weight in the eigenbases of G (evals_G[l] [T, g_l]) and A (evals_A[l] [T, a_l]); residual
// [L, T, M, K, K] (optional): the Gram matrices of the Jacobians' parts outside those bases
// (low-rank factors; symmetric, only the lower triangle is read); damping [D, T, L]. Negative round-off eigenvalues are clamped to 0.
// Autograd: registered from Python (llama_fast/ops/covariance.py).
at::Tensor functional_covariance(at::TensorList rotated, at::TensorList evals_G,
                                 at::TensorList evals_A, const std::optional<at::Tensor>& residual,
                                 const at::Tensor& damping, double scale);

}  // namespace llama_fast
