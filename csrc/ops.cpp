// The one schema file: every llama_fast op is declared here; the CPU and CUDA kernels are
// registered per op family in cpu/ and cuda/ with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(llama_fast, m) {
  // Batched K-FAC factors for a list of layers, all tasks at once:
  //   A[l] = a_scale[l] * abar^T abar (abar = [a, 1] when bias[l]),  G[l] = g_scale[l] * g^T g.
  m.def(
      "kfac_factors(Tensor[] a, Tensor[] g, bool[] bias, float[] a_scale, float[] g_scale)"
      " -> (Tensor[], Tensor[])");
}
