// C++ test of the libtorch build (CPU path): kfac_factors through the public header against
// a plain ATen computation, on random inputs with and without bias. Run by ctest.
#include <torch/torch.h>

#include <cstdio>

#include "llama_fast.h"

namespace {

bool close(const at::Tensor& x, const at::Tensor& y, const char* what) {
  const double err = (x - y).abs().max().item<double>();
  const double ref = y.abs().max().item<double>();
  std::printf("%-28s max |diff| = %.3g (scale %.3g)\n", what, err, ref);
  return err <= 1e-10 * (1.0 + ref);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  const at::Tensor a0 = torch::randn({3, 50, 7}, opts), g0 = torch::randn({3, 20, 4}, opts);
  const at::Tensor a1 = torch::randn({3, 5, 130}, opts), g1 = torch::randn({3, 9, 70}, opts);
  c10::List<bool> bias({true, false});
  const std::vector<double> a_scale = {1.0 / 50, 0.5};
  const std::vector<double> g_scale = {1.0, 2.0};
  auto [A, G] = llama_fast::kfac_factors({a0, a1}, {g0, g1}, bias, a_scale, g_scale);

  const at::Tensor abar0 = torch::cat({a0, torch::ones({3, 50, 1}, opts)}, 2);
  bool ok = true;
  ok &= close(A[0], torch::bmm(abar0.transpose(1, 2), abar0) / 50, "A[0] (bias)");
  ok &= close(G[0], torch::bmm(g0.transpose(1, 2), g0), "G[0]");
  ok &= close(A[1], 0.5 * torch::bmm(a1.transpose(1, 2), a1), "A[1] (no bias)");
  ok &= close(G[1], 2.0 * torch::bmm(g1.transpose(1, 2), g1), "G[1]");
  ok &= A[0].size(1) == 8 && A[1].size(1) == 130;
  std::printf(ok ? "kfac_factors C++ test passed\n" : "kfac_factors C++ test FAILED\n");
  return ok ? 0 : 1;
}
