// CUDA kernel of kron_scaled_normal. One launch covers up to kMaxLayers layers (more are
// launched in groups): every layer's output is cut into quads of 4 consecutive elements, all
// layers' quads form one index space, and a grid-stride loop gives each thread quads in
// increasing order. Each thread owns one Philox subsequence (curand_init(seed, thread, offset)
// with seed and offset from torch's CUDA generator, as ATen's DistributionTemplates.h does) and
// draws 4 normals per quad (curand_normal4, or 2 x curand_normal2_double), scaled by the
// element's posterior standard deviation (kron_scaled_normal_common.h, shared with the CPU
// kernel).
// The generator's offset advances by the draws of the busiest thread, under its mutex, so
// torch.manual_seed / an explicit generator govern the draws and CUDA graphs capture the op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "../kron_logdet.h"
#include "../kron_scaled_normal.h"
#include "../kron_scaled_normal_common.h"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLayers = 48;
constexpr int kQuad = 4;

struct SampleBatch {
  ScaledNormalLayer layers[kMaxLayers];
  int64_t quad_start[kMaxLayers + 1];  // prefix sums of ceil(numel / 4) over the group
  int count;
  const void* damping;  // [T]
  int64_t tasks;
  double scale;
  at::PhiloxCudaState philox;
};

template <typename T>
__device__ void normal_quad(curandStatePhilox4_32_10_t* state, at::opmath_type<T> z[kQuad]) {
  if constexpr (std::is_same_v<T, double>) {
    const double2 first = curand_normal2_double(state);
    const double2 second = curand_normal2_double(state);
    z[0] = first.x, z[1] = first.y, z[2] = second.x, z[3] = second.y;
  } else {
    const float4 r = curand_normal4(state);
    z[0] = r.x, z[1] = r.y, z[2] = r.z, z[3] = r.w;
  }
}

// 32-bit Philox outputs one thread consumes per quad (curand's offset unit).
template <typename T>
constexpr uint64_t draws_per_quad() {
  return std::is_same_v<T, double> ? 8 : 4;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scaled_normal_kernel(const __grid_constant__ SampleBatch batch) {
  using acc_t = at::opmath_type<T>;
  const auto seeds = at::cuda::philox::unpack(batch.philox);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  curandStatePhilox4_32_10_t state;
  curand_init(std::get<0>(seeds), thread, std::get<1>(seeds), &state);
  const int64_t total = batch.quad_start[batch.count];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T* damping = static_cast<const T*>(batch.damping);
  int l = 0;
  for (int64_t quad = thread; quad < total; quad += stride) {
    while (quad >= batch.quad_start[l + 1]) ++l;  // a thread's quads only move forward
    const ScaledNormalLayer& layer = batch.layers[l];
    acc_t z[kQuad];
    normal_quad<T>(&state, z);
    T* out = static_cast<T*>(layer.out);
    const int64_t first = (quad - batch.quad_start[l]) * kQuad;
#pragma unroll
    for (int i = 0; i < kQuad; ++i) {
      const int64_t k = first + i;
      if (k < layer.numel)
        out[k] = static_cast<T>(z[i] * scaled_normal_std<acc_t>(layer, damping, batch.tasks, k,
                                                                 static_cast<acc_t>(batch.scale)));
    }
  }
}

std::vector<at::Tensor> kron_scaled_normal_cuda(at::TensorList evals_A, at::TensorList evals_G,
                                                const at::Tensor& damping, double scale,
                                                int64_t num_samples,
                                                const std::optional<at::Generator>& generator) {
  check_scaled_normal(evals_A, evals_G, damping, num_samples);
  const c10::cuda::CUDAGuard guard(damping.device());
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  std::vector<at::Tensor> out = empty_scaled_normal(eA, eG, delta, num_samples);
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(delta.device().index()));
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks =
      static_cast<int64_t>(props->multiProcessorCount) * (props->maxThreadsPerMultiProcessor / kThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t layers = static_cast<int64_t>(eA.size());
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_scaled_normal_cuda", [&] {
    for (int64_t first = 0; first < layers; first += kMaxLayers) {
      SampleBatch batch{};
      batch.count = static_cast<int>(std::min<int64_t>(kMaxLayers, layers - first));
      for (int i = 0; i < batch.count; ++i) {
        const int64_t l = first + i;
        batch.layers[i] = {eA[l].data_ptr(), eG[l].data_ptr(), out[l].data_ptr(), eA[l].size(1),
                           eG[l].size(1), out[l].numel()};
        batch.quad_start[i + 1] = batch.quad_start[i] + (out[l].numel() + kQuad - 1) / kQuad;
      }
      const int64_t total = batch.quad_start[batch.count];
      if (total == 0) continue;
      const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks);
      const uint64_t rounds = static_cast<uint64_t>((total + blocks * kThreads - 1) / (blocks * kThreads));
      batch.damping = delta.data_ptr();
      batch.tasks = delta.size(0);
      batch.scale = scale;
      {
        // See ATen's note [Acquire lock when using random generators].
        std::lock_guard<std::mutex> lock(gen->mutex_);
        batch.philox = gen->philox_cuda_state(rounds * draws_per_quad<scalar_t>());
      }
      scaled_normal_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("kron_scaled_normal", &kron_scaled_normal_cuda);
}

}  // namespace llama_fast
