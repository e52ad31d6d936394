// Per-element arithmetic of the fused Gaussian posterior draw (kron_scaled_normal), shared by
// the CPU and CUDA kernels so that the CPU tests exercise the GPU's math. Per layer, with
// eigenvalues mu (of G, [T, g]) and lambda (of A, [T, a]), scale s and damping delta, element
// (n, t, p, q) of the [S, T, g, a] output is
//   z * (s * mu_p * lambda_q + delta)^(-1/2),   z ~ N(0, 1) iid,
// the eigenbasis coordinates of a draw from N(0, H^-1), H = s * G (x) A + delta * I.
// Negative round-off eigenvalues are clamped to 0, as in the log-determinant.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "kron_logdet_common.h"

namespace llama_fast {

// (s * mu * lambda + delta)^(-1/2): the posterior standard deviation along one eigenvector pair.
template <typename T>
LF_HOST_DEVICE T kron_posterior_std(T mu, T lambda, T scale, T damping) {
  const T h = scale * clamp_eigenvalue(mu) * clamp_eigenvalue(lambda) + damping;
#if defined(__CUDA_ARCH__)
  return T(1) / sqrt(h);
#else
  // std::sqrt keeps float in float on the host (the global C sqrt takes a double, and its
  // conversions and double-precision sqrt/divide were most of the CPU op's time at S = 1).
  return T(1) / std::sqrt(h);
#endif
}

// One layer of the output, [S, T, g, a] contiguous, addressed by its flat index.
struct ScaledNormalLayer {
  const void* evals_A;  // [T, a], contiguous
  const void* evals_G;  // [T, g], contiguous
  void* out;            // [S, T, g, a], contiguous
  int64_t a;
  int64_t g;
  int64_t numel;  // S * T * g * a
};

// The standard deviation that multiplies the normal at flat index `index` of `layer`.
template <typename Acc, typename T>
LF_HOST_DEVICE Acc scaled_normal_std(const ScaledNormalLayer& layer, const T* damping, int64_t tasks,
                                     int64_t index, Acc scale) {
  const int64_t per_task = layer.g * layer.a;
  const int64_t e = index % (tasks * per_task);
  const int64_t t = e / per_task, r = e % per_task;
  const int64_t p = r / layer.a, q = r % layer.a;
  const Acc mu = static_cast<Acc>(static_cast<const T*>(layer.evals_G)[t * layer.g + p]);
  const Acc lambda = static_cast<Acc>(static_cast<const T*>(layer.evals_A)[t * layer.a + q]);
  return kron_posterior_std<Acc>(mu, lambda, scale, static_cast<Acc>(damping[t]));
}

}  // namespace llama_fast
