// How the autograd kernels run their op's forward: through its entry point (llama_fast.h)
// with the Autograd dispatch keys excluded, so that the dispatcher picks the CPU or CUDA
// kernel rather than the autograd kernel again.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>

#include <utility>

namespace llama_fast {

template <typename Op, typename... Args>
auto call_below_autograd(Op op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op(std::forward<Args>(args)...);
}

}  // namespace llama_fast
