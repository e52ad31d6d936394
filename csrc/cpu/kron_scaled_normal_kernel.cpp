// CPU kernel of kron_scaled_normal. The output is cut into fixed chunks of kDrawChunk
// elements, independent of the thread count; chunk c draws its normals with ATen's own
// vectorised CPU normal_ from a generator seeded with base + c, where base is one 64-bit draw
// from torch's CPU generator (the one given, else the default one that torch.manual_seed
// seeds) per call: the same seed gives the same samples on any number of threads, each call
// advances the generator, and the chunks are drawn in parallel (torch.randn draws serially)
// and scaled in place while still in cache, by the per-element formula shared with CUDA
// (kron_scaled_normal_common.h). torch's DataLoader seeds its workers the same way (base seed
// + worker).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "../kron_logdet.h"
#include "../kron_scaled_normal.h"
#include "../kron_scaled_normal_common.h"

namespace llama_fast {
namespace {

// Elements drawn with one generator: large enough that seeding its Mersenne Twister is noise
// next to drawing them, small enough (64 KB of float) to stay in L2 between drawing and
// scaling, and to split the sinusoid network's outputs (70K elements at T=4, S=10) over the
// threads. Timings: benchmarks/bench_sample.py, benchmarks/RESULTS.md.
constexpr int64_t kDrawChunk = int64_t(1) << 14;

// out[k] *= std(t, p, q) over the flat range [begin, end) of one layer's [S, T, g, a] output,
// walked as (t, p) rows so the inner loop over q is straight-line (vectorisable).
template <typename T>
void scale_range(const ScaledNormalLayer& layer, const T* damping, int64_t tasks, double scale,
                 int64_t begin, int64_t end) {
  using Acc = at::opmath_type<T>;
  const int64_t per_sample = tasks * layer.g * layer.a;
  const T* mu = static_cast<const T*>(layer.evals_G);
  const T* lambda = static_cast<const T*>(layer.evals_A);
  T* out = static_cast<T*>(layer.out);
  const Acc s = static_cast<Acc>(scale);
  int64_t k = begin;
  while (k < end) {
    const int64_t e = k % per_sample, row = e / layer.a, q0 = e % layer.a;
    const int64_t t = row / layer.g, stop = std::min(end, k + (layer.a - q0));
    const Acc mu_tp = static_cast<Acc>(mu[row]), delta = static_cast<Acc>(damping[t]);
    const T* lam = lambda + t * layer.a + q0;
    T* o = out + k;
    for (int64_t j = 0; j < stop - k; ++j)
      o[j] = static_cast<T>(o[j] * kron_posterior_std<Acc>(mu_tp, static_cast<Acc>(lam[j]), s, delta));
    k = stop;
  }
}

// One chunk: draw, then scale in place.
template <typename T>
void draw_chunk(const ScaledNormalLayer& layer, const at::Tensor& flat_out, const T* damping,
                int64_t tasks, double scale, int64_t begin, int64_t end, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  flat_out.narrow(0, begin, end - begin).normal_(0.0, 1.0, gen);
  scale_range<T>(layer, damping, tasks, scale, begin, end);
}

// One 64-bit draw from the caller's generator (under its lock): the base of the chunk seeds.
uint64_t base_seed(const std::optional<at::Generator>& generator) {
  at::Generator gen = generator.has_value() && generator->defined() ? *generator
                                                                    : at::detail::getDefaultCPUGenerator();
  auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return impl->random64();
}

std::vector<at::Tensor> kron_scaled_normal_cpu(at::TensorList evals_A, at::TensorList evals_G,
                                               const at::Tensor& damping, double scale,
                                               int64_t num_samples,
                                               const std::optional<at::Generator>& generator) {
  check_scaled_normal(evals_A, evals_G, damping, num_samples);
  const auto eA = contiguous_all(evals_A), eG = contiguous_all(evals_G);
  const at::Tensor delta = damping.contiguous();
  std::vector<at::Tensor> out = empty_scaled_normal(eA, eG, delta, num_samples);
  const uint64_t base = base_seed(generator);
  // (layer, first element, offset over all layers) of every chunk, numbered over all layers.
  struct Chunk {
    size_t layer;
    int64_t first;
    int64_t offset;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t l = 0; l < out.size(); ++l) {
    for (int64_t k = 0; k < out[l].numel(); k += kDrawChunk) chunks.push_back({l, k, total + k});
    total += out[l].numel();
  }
  // The threads split the elements, not the chunks: each draws the chunks that start in its
  // share. (Split by count, the sinusoid's 7 chunks of 3.2K, 4 x 16K, 16 and 1.6K elements
  // went 52K : 18K.) Small outputs run inline: waking the thread pool costs more.
  const int64_t grain = total < 2 * kDrawChunk ? std::max<int64_t>(1, total) : kDrawChunk;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "kron_scaled_normal_cpu", [&] {
    std::vector<ScaledNormalLayer> layers;
    std::vector<at::Tensor> flat;
    for (size_t l = 0; l < eA.size(); ++l) {
      layers.push_back({eA[l].data_ptr(), eG[l].data_ptr(), out[l].data_ptr(), eA[l].size(1),
                        eG[l].size(1), out[l].numel()});
      flat.push_back(out[l].view({-1}));
    }
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      for (size_t c = 0; c < chunks.size(); ++c) {
        const Chunk& chunk = chunks[c];
        if (chunk.offset < begin || chunk.offset >= end) continue;
        const int64_t numel = out[chunk.layer].numel();
        draw_chunk<scalar_t>(layers[chunk.layer], flat[chunk.layer], delta.data_ptr<scalar_t>(),
                             delta.size(0), scale, chunk.first, std::min(chunk.first + kDrawChunk, numel),
                             base + static_cast<uint64_t>(c));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("kron_scaled_normal", &kron_scaled_normal_cpu);
}

}  // namespace llama_fast
