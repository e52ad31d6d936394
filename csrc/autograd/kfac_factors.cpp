// Autograd kernel of kfac_factors, registered in C++ so that a call carries no Python
// autograd layer (for the sinusoid MLP that layer cost as much as the arithmetic).
//   A = s * abar^T abar  =>  da = s * a (dA + dA^T)[:i, :i] + s * (dA + dA^T)[i, :i]  (bias row)
//   G = s * g^T g        =>  dg = s * g (dG + dG^T)
// The backward is written with differentiable ATen ops, so double backward works.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../llama_fast.h"
#include "below_autograd.h"

namespace llama_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Gradient of out = scale * xbar^T xbar (xbar = [x, 1] if ones) with respect to x.
// The scale goes on the small (cols x cols) matrix and the bias row's cross terms ride in the
// product as baddbmm's `self`: rows x cols is touched once (Conv-4's 15680 x 64 and
// 980 x 576 rows took an extra pass each for `* scale` and `+ bias`).
at::Tensor gram_input_grad(const at::Tensor& x, const at::Tensor& d_out, bool ones,
                           double scale) {
  if (!d_out.defined()) return {};
  const int64_t cols = x.size(2);
  const at::Tensor sym = (d_out + d_out.transpose(1, 2)) * scale;
  const at::Tensor weight = sym.slice(1, 0, cols).slice(2, 0, cols);
  if (!ones) return at::bmm(x, weight);
  // The column of ones is not an input; its cross terms still reach every row of x.
  const at::Tensor bias_row = sym.slice(1, cols, cols + 1).slice(2, 0, cols);
  return at::baddbmm(bias_row.expand({x.size(0), x.size(1), cols}), x, weight);
}

struct KfacFactorsFunction : public torch::autograd::Function<KfacFactorsFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList a, at::TensorList g,
                               const c10::List<bool>& bias, c10::ArrayRef<double> a_scale,
                               c10::ArrayRef<double> g_scale) {
    auto [A, G] = call_below_autograd(kfac_factors, a, g, bias, a_scale, g_scale);
    variable_list inputs(a.begin(), a.end());
    inputs.insert(inputs.end(), g.begin(), g.end());
    ctx->save_for_backward(inputs);
    ctx->saved_data["bias"] = bias;
    ctx->saved_data["a_scale"] = a_scale.vec();
    ctx->saved_data["g_scale"] = g_scale.vec();
    variable_list out = std::move(A);
    out.insert(out.end(), G.begin(), G.end());
    return out;
  }

  // Returns one gradient per tensor of a, then of g, then none for bias and the two scales.
  static variable_list backward(AutogradContext* ctx, variable_list d_out) {
    const variable_list inputs = ctx->get_saved_variables();
    const size_t layers = inputs.size() / 2;
    const c10::List<bool> bias = ctx->saved_data["bias"].toBoolList();
    const std::vector<double> a_scale = ctx->saved_data["a_scale"].toDoubleVector();
    const std::vector<double> g_scale = ctx->saved_data["g_scale"].toDoubleVector();
    variable_list grads(2 * layers + 3);
    for (size_t l = 0; l < layers; ++l) {
      grads[l] = gram_input_grad(inputs[l], d_out[l], bias.get(l), a_scale[l]);
      grads[layers + l] = gram_input_grad(inputs[layers + l], d_out[layers + l], false, g_scale[l]);
    }
    return grads;
  }
};

KfacFactorsOutput kfac_factors_autograd(at::TensorList a, at::TensorList g,
                                        const c10::List<bool>& bias, c10::ArrayRef<double> a_scale,
                                        c10::ArrayRef<double> g_scale) {
  variable_list out = KfacFactorsFunction::apply(a, g, bias, a_scale, g_scale);
  const auto layers = static_cast<int64_t>(a.size());
  return {TensorVector(out.begin(), out.begin() + layers),
          TensorVector(out.begin() + layers, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, Autograd, m) {
  m.impl("kfac_factors", &kfac_factors_autograd);
}

}  // namespace llama_fast
