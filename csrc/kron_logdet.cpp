// kron_logdet_*: argument checks, and the composite kron_logdet_exact. The composite is
// registered for CompositeExplicitAutograd (its autograd kernel is in autograd/kron_logdet.cpp):
// it calls the sym_eig and kron_logdet_from_eigs ops through the dispatcher, and returns the
// eigendecompositions so that the backward pass reuses them.
#include "kron_logdet.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "llama_fast.h"

namespace llama_fast {

void check_kron_eigs(at::TensorList evals_A, at::TensorList evals_G, const at::Tensor& damping) {
  TORCH_CHECK(evals_A.size() == evals_G.size(), "kron_logdet: got ", evals_A.size(),
              " factors A but ", evals_G.size(), " factors G");
  TORCH_CHECK(damping.dim() == 1, "kron_logdet: damping must have shape [T], got ",
              damping.sizes());
  for (size_t l = 0; l < evals_A.size(); ++l) {
    for (const at::Tensor& e : {evals_A[l], evals_G[l]}) {
      TORCH_CHECK(e.dim() == 2 && e.size(0) == damping.size(0), "kron_logdet: eigenvalues of layer ",
                  l, " must have shape [T=", damping.size(0), ", d], got ", e.sizes());
      TORCH_CHECK(e.scalar_type() == damping.scalar_type() && e.device() == damping.device(),
                  "kron_logdet: eigenvalues of layer ", l, " must match damping's dtype ",
                  damping.scalar_type(), " and device ", damping.device());
    }
  }
}

std::vector<at::Tensor> contiguous_all(at::TensorList xs) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& x : xs) out.push_back(x.contiguous());
  return out;
}

namespace {

KronLogdetExactOutput kron_logdet_exact_composite(at::TensorList A, at::TensorList G,
                                                  const at::Tensor& damping, double scale) {
  TORCH_CHECK(A.size() == G.size(), "kron_logdet: got ", A.size(), " factors A but ", G.size(),
              " factors G");
  TensorVector wA, QA, wG, QG;
  for (size_t l = 0; l < A.size(); ++l) {
    auto [w_a, q_a, info_a] = sym_eig(A[l]);
    auto [w_g, q_g, info_g] = sym_eig(G[l]);
    wA.push_back(w_a);
    QA.push_back(q_a);
    wG.push_back(w_g);
    QG.push_back(q_g);
  }
  at::Tensor logdet = kron_logdet_from_eigs(wA, wG, damping, scale);
  return {logdet, wA, QA, wG, QG};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CompositeExplicitAutograd, m) {
  m.impl("kron_logdet_exact", &kron_logdet_exact_composite);
}

}  // namespace llama_fast
