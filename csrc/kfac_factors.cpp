#include "kfac_factors.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace llama_fast {
namespace {

void check_factor_input(const at::Tensor& x, const char* name, size_t layer,
                        const at::Tensor& first) {
  TORCH_CHECK(x.dim() == 3, "kfac_factors: ", name, "[", layer,
              "] must have shape [T, N, features], got ", x.dim(), " dims ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "kfac_factors: ",
              name, "[", layer, "] must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == first.scalar_type(), "kfac_factors: ", name, "[", layer,
              "] has dtype ", x.scalar_type(), " but a[0] has ", first.scalar_type(),
              "; all factors of one call must share a dtype");
  TORCH_CHECK(x.device() == first.device(), "kfac_factors: ", name, "[", layer, "] is on ",
              x.device(), " but a[0] is on ", first.device());
  TORCH_CHECK(x.size(0) == first.size(0), "kfac_factors: ", name, "[", layer, "] has T=",
              x.size(0), " tasks but a[0] has T=", first.size(0));
  TORCH_CHECK(x.size(1) >= 1, "kfac_factors: ", name, "[", layer,
              "] needs at least one row (N >= 1), got shape ", x.sizes());
}

GramProblem describe(const at::Tensor& x, const at::Tensor& out, bool ones, double scale) {
  GramProblem p;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.tasks = x.size(0);
  p.rows = x.size(1);
  p.cols = x.size(2);
  p.stride_t = x.stride(0);
  p.stride_r = x.stride(1);
  p.stride_c = x.stride(2);
  p.scale = scale;
  p.ones = ones;
  return p;
}

}  // namespace

KfacPlan plan_kfac_factors(at::TensorList a, at::TensorList g, const c10::List<bool>& bias,
                           c10::ArrayRef<double> a_scale, c10::ArrayRef<double> g_scale) {
  const size_t layers = a.size();
  TORCH_CHECK(g.size() == layers, "kfac_factors: got ", layers, " tensors in a but ", g.size(),
              " in g");
  TORCH_CHECK(bias.size() == layers && a_scale.size() == layers && g_scale.size() == layers,
              "kfac_factors: bias, a_scale and g_scale need one entry per layer (", layers,
              "), got ", bias.size(), ", ", a_scale.size(), ", ", g_scale.size());
  KfacPlan plan;
  if (layers == 0) return plan;
  plan.dtype = a[0].scalar_type();
  for (size_t l = 0; l < layers; ++l) {
    check_factor_input(a[l], "a", l, a[0]);
    check_factor_input(g[l], "g", l, a[0]);
  }
  for (size_t l = 0; l < layers; ++l) {
    const int64_t T = a[l].size(0);
    const int64_t wa = a[l].size(2) + (bias.get(l) ? 1 : 0);
    const int64_t wg = g[l].size(2);
    plan.A.push_back(at::empty({T, wa, wa}, a[l].options()));
    plan.G.push_back(at::empty({T, wg, wg}, g[l].options()));
  }
  for (size_t l = 0; l < layers; ++l) {
    plan.problems.push_back(describe(a[l], plan.A[l], bias.get(l), a_scale[l]));
    plan.problems.push_back(describe(g[l], plan.G[l], false, g_scale[l]));
  }
  return plan;
}

}  // namespace llama_fast
