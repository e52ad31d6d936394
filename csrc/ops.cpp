// The one schema file: every llama_fast op is declared here, and its typed C++ entry point
// (llama_fast.h, where each op is documented) is defined here, the only place that looks up
// an op in the dispatcher. The kernels are registered per op with TORCH_LIBRARY_IMPL: CPU in
// cpu/, CUDA in cuda/, Autograd in autograd/.
#include "llama_fast.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(llama_fast, m) {
  m.def(
      "kfac_factors(Tensor[] a, Tensor[] g, bool[] bias, float[] a_scale, float[] g_scale)"
      " -> (Tensor[], Tensor[])");
  m.def("sym_eig(Tensor M) -> (Tensor eigenvalues, Tensor eigenvectors, Tensor info)");
  m.def(
      "kron_logdet_exact(Tensor[] A, Tensor[] G, Tensor damping, float scale)"
      " -> (Tensor logdet, Tensor[] evals_A, Tensor[] evecs_A, Tensor[] evals_G, Tensor[] evecs_G)");
  m.def(
      "kron_logdet_from_eigs(Tensor[] evals_A, Tensor[] evals_G, Tensor damping, float scale)"
      " -> Tensor");
  m.def(
      "kron_logdet_weights(Tensor[] evals_A, Tensor[] evals_G, Tensor damping, float scale)"
      " -> (Tensor[] w_A, Tensor[] w_G, Tensor w_damping)");
  m.def("chol_logdet(Tensor M) -> (Tensor logdet, Tensor L, Tensor info)");
  m.def(
      "kron_scaled_normal(Tensor[] evals_A, Tensor[] evals_G, Tensor damping, float scale,"
      " int num_samples, Generator? generator=None) -> Tensor[]",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "functional_covariance(Tensor[] rotated, Tensor[] evals_G, Tensor[] evals_A,"
      " Tensor? residual, Tensor damping, float scale) -> Tensor");
}

namespace llama_fast {
namespace {

// The typed dispatcher handle of op `name` for the C++ signature `Fn` of its entry point; the
// dispatcher checks that signature against the registered kernels' (a mismatch throws).
template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

KfacFactorsOutput kfac_factors(at::TensorList a, at::TensorList g, const c10::List<bool>& bias,
                               c10::ArrayRef<double> a_scale, c10::ArrayRef<double> g_scale) {
  static const auto op = typed_op<decltype(kfac_factors)>("llama_fast::kfac_factors");
  return op.call(a, g, bias, a_scale, g_scale);
}

SymEigOutput sym_eig(const at::Tensor& M) {
  static const auto op = typed_op<decltype(sym_eig)>("llama_fast::sym_eig");
  return op.call(M);
}

KronLogdetExactOutput kron_logdet_exact(at::TensorList A, at::TensorList G,
                                        const at::Tensor& damping, double scale) {
  static const auto op = typed_op<decltype(kron_logdet_exact)>("llama_fast::kron_logdet_exact");
  return op.call(A, G, damping, scale);
}

at::Tensor kron_logdet_from_eigs(at::TensorList evals_A, at::TensorList evals_G,
                                 const at::Tensor& damping, double scale) {
  static const auto op =
      typed_op<decltype(kron_logdet_from_eigs)>("llama_fast::kron_logdet_from_eigs");
  return op.call(evals_A, evals_G, damping, scale);
}

KronLogdetWeightsOutput kron_logdet_weights(at::TensorList evals_A, at::TensorList evals_G,
                                            const at::Tensor& damping, double scale) {
  static const auto op =
      typed_op<decltype(kron_logdet_weights)>("llama_fast::kron_logdet_weights");
  return op.call(evals_A, evals_G, damping, scale);
}

CholLogdetOutput chol_logdet(const at::Tensor& M) {
  static const auto op = typed_op<decltype(chol_logdet)>("llama_fast::chol_logdet");
  return op.call(M);
}

TensorVector kron_scaled_normal(at::TensorList evals_A, at::TensorList evals_G,
                                const at::Tensor& damping, double scale, int64_t num_samples,
                                const std::optional<at::Generator>& generator) {
  static const auto op = typed_op<decltype(kron_scaled_normal)>("llama_fast::kron_scaled_normal");
  return op.call(evals_A, evals_G, damping, scale, num_samples, generator);
}

at::Tensor functional_covariance(at::TensorList rotated, at::TensorList evals_G,
                                 at::TensorList evals_A, const std::optional<at::Tensor>& residual,
                                 const at::Tensor& damping, double scale) {
  static const auto op =
      typed_op<decltype(functional_covariance)>("llama_fast::functional_covariance");
  return op.call(rotated, evals_G, evals_A, residual, damping, scale);
}

}  // namespace llama_fast
