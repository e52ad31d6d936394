// CUDA kernel of kfac_factors: one grouped launch computes the Gram products of every factor
// (A and G of every layer) of every task. Each block owns one upper-triangle 64x64 output
// tile of one task of one problem, stages 16-row slabs of the two column panels in shared
// memory (the bias column of ones is produced on load, never stored), accumulates 4x4
// register tiles per thread with the micro-kernel shared with the CPU kernel, and writes the
// tile and its mirror image.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../kfac_factors.h"
#include "../kfac_factors_common.h"

namespace llama_fast {
namespace {

constexpr int kTile = 64;       // output tile edge
constexpr int kThreads = 16;    // threads per block edge: 16 x 16 threads, 4 x 4 outputs each
constexpr int kMicro = kTile / kThreads;
constexpr int kSlab = 16;       // rows staged per shared-memory round
constexpr int kPad = 4;         // keeps 16-byte alignment of each slab row; breaks bank aliasing
constexpr int kMaxProblems = 32;

// Kernel parameter block (passed by value): the problems and the prefix sums of their tiles.
struct GramBatch {
  GramProblem problems[kMaxProblems];
  int64_t first_tile[kMaxProblems + 1];
  int count;
};

// Which problem, task and upper-triangle tile this block owns.
__device__ void locate_block(const GramBatch& batch, int64_t block, int& pi, int64_t& task,
                             int64_t& ti, int64_t& tj) {
  pi = 0;
  while (block >= batch.first_tile[pi + 1]) ++pi;
  const GramProblem& p = batch.problems[pi];
  const int64_t grid = ceil_div(p.width(), kTile);
  const int64_t local = block - batch.first_tile[pi];
  task = local / triangle_tiles(grid);
  triangle_tile_coords(local % triangle_tiles(grid), grid, ti, tj);
}

template <typename T>
__device__ void load_slab(const T* x_task, const GramProblem& p, int64_t r0, int64_t c0,
                          T (*slab)[kTile + kPad]) {
  const int tid = threadIdx.y * kThreads + threadIdx.x;
  for (int e = tid; e < kSlab * kTile; e += kThreads * kThreads) {
    const int k = e / kTile;
    const int c = e % kTile;
    slab[k][c] = xbar_padded(x_task, p, r0 + k, c0 + c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads* kThreads)
    gram_grouped_kernel(const __grid_constant__ GramBatch batch) {
  using acc_t = at::opmath_type<T>;
  __shared__ T slab_p[kSlab][kTile + kPad];
  __shared__ T slab_q[kSlab][kTile + kPad];

  int pi;
  int64_t task, ti, tj;
  locate_block(batch, blockIdx.x, pi, task, ti, tj);
  const GramProblem& p = batch.problems[pi];
  const T* x_task = static_cast<const T*>(p.x) + task * p.stride_t;
  const bool diagonal = ti == tj;

  acc_t acc[kMicro][kMicro] = {};
  for (int64_t r0 = 0; r0 < p.rows; r0 += kSlab) {
    load_slab(x_task, p, r0, ti * kTile, slab_p);
    if (!diagonal) load_slab(x_task, p, r0, tj * kTile, slab_q);
    __syncthreads();
    const T* Q = diagonal ? &slab_p[0][0] : &slab_q[0][0];
    outer_accumulate<kMicro, kMicro>(acc, &slab_p[0][threadIdx.y * kMicro], kTile + kPad,
                                     Q + threadIdx.x * kMicro, kTile + kPad, kSlab);
    __syncthreads();
  }

  const int64_t width = p.width();
  T* out_task = static_cast<T*>(p.out) + task * width * width;
LF_UNROLL
  for (int m = 0; m < kMicro; ++m) {
LF_UNROLL
    for (int n = 0; n < kMicro; ++n) {
      const int64_t row = ti * kTile + threadIdx.y * kMicro + m;
      const int64_t col = tj * kTile + threadIdx.x * kMicro + n;
      // On a diagonal tile both triangles are computed; the upper one is stored and mirrored.
      if (row < width && col < width && (!diagonal || row <= col))
        store_symmetric(out_task, width, row, col, acc[m][n], p.scale);
    }
  }
}

template <typename T>
void launch_group(const GramProblem* problems, int count, cudaStream_t stream) {
  GramBatch batch{};
  batch.count = count;
  batch.first_tile[0] = 0;
  for (int i = 0; i < count; ++i) {
    batch.problems[i] = problems[i];
    const int64_t grid = ceil_div(problems[i].width(), kTile);
    batch.first_tile[i + 1] = batch.first_tile[i] + problems[i].tasks * triangle_tiles(grid);
  }
  const int64_t blocks = batch.first_tile[count];
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "kfac_factors: too many tiles for one launch");
  gram_grouped_kernel<T><<<static_cast<unsigned>(blocks), dim3(kThreads, kThreads), 0, stream>>>(
      batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

KfacFactorsOutput kfac_factors_cuda(at::TensorList a, at::TensorList g,
                                    const c10::List<bool>& bias, c10::ArrayRef<double> a_scale,
                                    c10::ArrayRef<double> g_scale) {
  KfacPlan plan = plan_kfac_factors(a, g, bias, a_scale, g_scale);
  if (plan.problems.empty()) return {std::move(plan.A), std::move(plan.G)};
  TORCH_CHECK(a[0].is_cuda(), "kfac_factors: CUDA kernel got tensors on ", a[0].device());
  const c10::cuda::CUDAGuard guard(a[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int total = static_cast<int>(plan.problems.size());
  AT_DISPATCH_FLOATING_TYPES(plan.dtype, "kfac_factors_cuda", [&] {
    // Networks with more than kMaxProblems / 2 K-FAC layers take one launch per group.
    for (int first = 0; first < total; first += kMaxProblems)
      launch_group<scalar_t>(plan.problems.data() + first, std::min(kMaxProblems, total - first),
                             stream);
  });
  return {std::move(plan.A), std::move(plan.G)};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) { m.impl("kfac_factors", &kfac_factors_cuda); }

}  // namespace llama_fast
