// CPU kernels of kfac_factors: a grouped symmetric Gram product over all layers and tasks,
// parallel with at::parallel_for. Only one triangle is computed, then mirrored. Two paths:
//  - "portable": upper-triangle tiles accumulated by the register-blocked micro-kernel shared
//    with the CUDA kernel (kfac_factors_common.h) on packed row panels; the bias column of
//    ones is produced while packing. Used for small problems, where call overheads dominate.
//  - "blas": per (task, block row) one BLAS gemm over the lower-triangle panel (ATen's
//    cpublas, i.e. MKL/OpenBLAS), the bias row from column sums, then the mirror. Used when
//    the arithmetic dominates, where BLAS outruns portable C++.
// LLAMA_FAST_CPU_GRAM=portable|blas forces one path (tests run both on every shape).
// Timings of both paths: benchmarks/bench_kfac.py, benchmarks/RESULTS.md.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../kfac_factors.h"
#include "../kfac_factors_common.h"
#include "path_choice.h"

namespace llama_fast {
namespace {

constexpr int kRM = 4;              // micro-tile rows (columns of xbar on the P side)
constexpr int kRN = 8;              // micro-tile columns; a multiple of the SIMD width
constexpr int64_t kMaxTile = 64;    // output tile edge, a multiple of kRN
constexpr int64_t kRowChunk = 256;  // rows packed at once: two panels stay in L2

// Output tile edge for a problem: the width split evenly into at most kMaxTile-wide tiles,
// rounded up to the micro-tile, so that no tile is mostly padding. A zero-width layer (an empty
// factor, no tiles) gets the micro-tile edge rather than a division by zero tiles.
int64_t tile_edge(const GramProblem& p) {
  if (p.width() == 0) return kRN;
  const int64_t tiles = ceil_div(p.width(), kMaxTile);
  return ceil_div(ceil_div(p.width(), tiles), kRN) * kRN;
}

// One unit of parallel work: one upper-triangle tile of one task of one problem.
struct TileTask {
  int64_t problem;
  int64_t task;
  int64_t tile_i;
  int64_t tile_j;
};

std::vector<TileTask> list_tiles(const std::vector<GramProblem>& problems) {
  std::vector<TileTask> tiles;
  for (size_t pi = 0; pi < problems.size(); ++pi) {
    const GramProblem& p = problems[pi];
    const int64_t grid = ceil_div(p.width(), tile_edge(p));
    for (int64_t t = 0; t < p.tasks; ++t) {
      for (int64_t k = 0; k < triangle_tiles(grid); ++k) {
        TileTask w{static_cast<int64_t>(pi), t, 0, 0};
        triangle_tile_coords(k, grid, w.tile_i, w.tile_j);
        tiles.push_back(w);
      }
    }
  }
  return tiles;
}

// Copies rows [r0, r0 + kr) of xbar's columns [c0, c0 + edge) into a k-major panel,
// zero padded past the matrix.
template <typename T>
void pack_panel(const T* x_task, const GramProblem& p, int64_t r0, int64_t kr, int64_t c0,
                int64_t edge, T* panel) {
  for (int64_t k = 0; k < kr; ++k) {
    for (int64_t c = 0; c < edge; ++c) panel[k * edge + c] = xbar_padded(x_task, p, r0 + k, c0 + c);
  }
}

// Packed panels and the partial-sum tile of one thread, sized for the largest problem.
template <typename T>
struct TileWorkspace {
  using acc_t = at::opmath_type<T>;
  std::vector<T> P, Q;
  std::vector<acc_t> C;

  explicit TileWorkspace(const std::vector<GramProblem>& problems) {
    int64_t panel = 0, tile = 0;
    for (const GramProblem& p : problems) {
      panel = std::max(panel, std::min(p.rows, kRowChunk) * tile_edge(p));
      if (p.rows > kRowChunk) tile = std::max(tile, tile_edge(p) * tile_edge(p));
    }
    P.resize(panel);
    Q.resize(panel);
    C.resize(tile);
  }
};

// Packs rows [r0, r0 + kr) of the tile's two column panels into ws.P and ws.Q and returns the
// Q panel; a diagonal tile has one panel, P serves as Q.
template <typename T>
const T* pack_tile_panels(const T* x_task, const GramProblem& p, const TileTask& w, int64_t r0,
                          int64_t kr, int64_t edge, TileWorkspace<T>& ws) {
  pack_panel(x_task, p, r0, kr, w.tile_i * edge, edge, ws.P.data());
  if (w.tile_i == w.tile_j) return ws.P.data();
  pack_panel(x_task, p, r0, kr, w.tile_j * edge, edge, ws.Q.data());
  return ws.Q.data();
}

// Extent of a tile inside the matrix, rounded up to whole micro-tiles.
struct TileExtent {
  int64_t rows;  // micro-tile rows needed (multiple of kRM)
  int64_t cols;  // micro-tile columns needed (multiple of kRN)
};

TileExtent tile_extent(const GramProblem& p, const TileTask& w, int64_t edge) {
  const int64_t width = p.width();
  return {std::min(edge, ceil_div(width - w.tile_i * edge, kRM) * kRM),
          std::min(edge, ceil_div(width - w.tile_j * edge, kRN) * kRN)};
}

// Stores micro-tile (mb, nb) of a tile and its mirror, inside the matrix and, on a diagonal
// tile, in the upper triangle only.
template <typename T, typename acc_t>
void store_micro(const GramProblem& p, const TileTask& w, int64_t edge, int64_t mb, int64_t nb,
                 const acc_t (&acc)[kRM][kRN], T* out_task) {
  const int64_t width = p.width();
  for (int m = 0; m < kRM; ++m) {
    const int64_t row = w.tile_i * edge + mb + m;
    for (int n = 0; n < kRN; ++n) {
      const int64_t col = w.tile_j * edge + nb + n;
      if (row < width && col < width && (w.tile_i != w.tile_j || row <= col))
        store_symmetric(out_task, width, row, col, acc[m][n], p.scale);
    }
  }
}

// Whether micro-tile (mb, nb) of a diagonal tile lies strictly below the diagonal.
bool below_diagonal(bool diagonal, int64_t mb, int64_t nb) { return diagonal && nb + kRN <= mb; }

// All rows fit one packed panel: every micro-tile is accumulated in registers and stored.
template <typename T>
void compute_tile_one_pass(const GramProblem& p, const TileTask& w, TileWorkspace<T>& ws,
                           const T* x_task, T* out_task) {
  using acc_t = at::opmath_type<T>;
  const int64_t edge = tile_edge(p);
  const bool diagonal = w.tile_i == w.tile_j;
  const T* Q = pack_tile_panels(x_task, p, w, 0, p.rows, edge, ws);
  const TileExtent ext = tile_extent(p, w, edge);
  for (int64_t mb = 0; mb < ext.rows; mb += kRM) {
    for (int64_t nb = 0; nb < ext.cols; nb += kRN) {
      if (below_diagonal(diagonal, mb, nb)) continue;
      acc_t acc[kRM][kRN] = {};
      outer_accumulate<kRM, kRN>(acc, ws.P.data() + mb, edge, Q + nb, edge, p.rows);
      store_micro(p, w, edge, mb, nb, acc, out_task);
    }
  }
}

// More rows than one panel: row chunks outer, partial sums kept in the tile buffer C.
template <typename T>
void compute_tile_chunked(const GramProblem& p, const TileTask& w, TileWorkspace<T>& ws,
                          const T* x_task, T* out_task) {
  using acc_t = at::opmath_type<T>;
  const int64_t edge = tile_edge(p);
  const bool diagonal = w.tile_i == w.tile_j;
  const TileExtent ext = tile_extent(p, w, edge);
  std::fill(ws.C.begin(), ws.C.begin() + edge * edge, acc_t(0));
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRowChunk) {
    const int64_t kr = std::min(kRowChunk, p.rows - r0);
    const T* Q = pack_tile_panels(x_task, p, w, r0, kr, edge, ws);
    for (int64_t mb = 0; mb < ext.rows; mb += kRM) {
      for (int64_t nb = 0; nb < ext.cols; nb += kRN) {
        if (below_diagonal(diagonal, mb, nb)) continue;
        acc_t acc[kRM][kRN];
        for (int m = 0; m < kRM; ++m)
          for (int n = 0; n < kRN; ++n) acc[m][n] = ws.C[(mb + m) * edge + nb + n];
        outer_accumulate<kRM, kRN>(acc, ws.P.data() + mb, edge, Q + nb, edge, kr);
        for (int m = 0; m < kRM; ++m)
          for (int n = 0; n < kRN; ++n) ws.C[(mb + m) * edge + nb + n] = acc[m][n];
      }
    }
  }
  for (int64_t mb = 0; mb < ext.rows; mb += kRM) {
    for (int64_t nb = 0; nb < ext.cols; nb += kRN) {
      acc_t acc[kRM][kRN];
      for (int m = 0; m < kRM; ++m)
        for (int n = 0; n < kRN; ++n) acc[m][n] = ws.C[(mb + m) * edge + nb + n];
      store_micro(p, w, edge, mb, nb, acc, out_task);
    }
  }
}

template <typename T>
void compute_tile(const GramProblem& p, const TileTask& w, TileWorkspace<T>& ws) {
  const int64_t width = p.width();
  const T* x_task = static_cast<const T*>(p.x) + w.task * p.stride_t;
  T* out_task = static_cast<T*>(p.out) + w.task * width * width;
  if (p.rows <= kRowChunk)
    compute_tile_one_pass(p, w, ws, x_task, out_task);
  else
    compute_tile_chunked(p, w, ws, x_task, out_task);
}

// Parallel chunks below this many multiply-adds run inline: waking the pool costs more.
constexpr int64_t kMinParallelWork = int64_t(1) << 18;

template <typename T>
void gram_portable(const std::vector<GramProblem>& problems) {
  const std::vector<TileTask> tiles = list_tiles(problems);
  int64_t work = 0;
  for (const TileTask& w : tiles) {
    const GramProblem& p = problems[w.problem];
    work += p.rows * tile_edge(p) * tile_edge(p);
  }
  const int64_t n = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, n, work < kMinParallelWork ? n : 1, [&](int64_t begin, int64_t end) {
    TileWorkspace<T> ws(problems);
    for (int64_t k = begin; k < end; ++k) compute_tile<T>(problems[tiles[k].problem], tiles[k], ws);
  });
}

// ---- BLAS path ----------------------------------------------------------------------------

// Block-row height of the BLAS path: narrow matrices take one full gemm (splitting them
// saves less than the extra calls cost); wide ones skip the upper triangle block by block.
int64_t blas_block(const GramProblem& p) { return p.cols <= 256 ? p.cols : 64; }

// For each block row I of the data columns, the unscaled lower-triangle panel
// x[:, :, J]^T x[:, :, I] (J: all columns from the block on), for all tasks in one batched
// gemm through ATen. (bmm into fresh tensors: its out= variants take a slow path for strided
// outputs, slower than bmm + copy.)
std::vector<at::Tensor> lower_panels(const GramProblem& p, const at::Tensor& x) {
  std::vector<at::Tensor> panels;
  for (int64_t c0 = 0; c0 < p.cols; c0 += blas_block(p)) {
    const int64_t c1 = std::min(c0 + blas_block(p), p.cols);
    panels.push_back(at::bmm(x.slice(2, c0, p.cols).transpose(1, 2), x.slice(2, c0, c1)));
  }
  return panels;
}

// Copies the strict lower triangle of the leading `n` x `n` block of `out` (row stride
// `width`) onto the upper one, in small square blocks so that the strided side of the
// transpose stays within a few cache lines.
template <typename T>
void mirror_lower_to_upper(T* out, int64_t width, int64_t n) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    for (int64_t j0 = 0; j0 <= i0; j0 += kBlock) {
      for (int64_t i = i0; i < std::min(i0 + kBlock, n); ++i)
        for (int64_t j = j0; j < std::min(j0 + kBlock, i); ++j) out[j * width + i] = out[i * width + j];
    }
  }
}

// Several block-row panels (wide factors): the scaled lower triangle row by row into `out`
// (contiguous, vectorised); the caller mirrors it.
template <typename T>
void copy_lower_panels(const GramProblem& p, const std::vector<at::Tensor>& panels, int64_t task,
                       T scale, T* out) {
  const int64_t width = p.width();
  for (size_t b = 0; b < panels.size(); ++b) {
    const int64_t c0 = static_cast<int64_t>(b) * blas_block(p);
    const int64_t bw = panels[b].size(2);
    const T* panel = panels[b].data_ptr<T>() + task * panels[b].stride(0);
    for (int64_t r = c0; r < p.cols; ++r) {
      const T* src = panel + (r - c0) * bw;
      T* dst = out + r * width + c0;
      const int64_t n = std::min(bw, r + 1 - c0);
      for (int64_t k = 0; k < n; ++k) dst[k] = scale * src[k];
    }
  }
}

// One full-width panel (narrow factors): each output row is written once, contiguously, from
// the panel's lower triangle (row r up to the diagonal, then column r below it), so the
// result is exactly symmetric without a strided mirror pass (which can cost more than the gemm
// for narrow factors).
template <typename T>
void copy_symmetric_from_lower(const T* panel, int64_t n, T scale, T* out, int64_t width) {
  for (int64_t r = 0; r < n; ++r) {
    T* dst = out + r * width;
    const T* row = panel + r * n;
    for (int64_t k = 0; k <= r; ++k) dst[k] = scale * row[k];
    for (int64_t k = r + 1; k < n; ++k) dst[k] = scale * panel[k * n + r];
  }
}

// Per task: the Gram block from the panels (only entries on or below the diagonal are read,
// so the result is exactly symmetric), then the bias row from column sums and the corner.
template <typename T>
void finish_task_blas(const GramProblem& p, const std::vector<at::Tensor>& panels, int64_t task) {
  using acc_t = at::opmath_type<T>;
  const int64_t width = p.width();
  T* out = static_cast<T*>(p.out) + task * width * width;
  const T scale = static_cast<T>(p.scale);
  if (panels.size() == 1) {
    copy_symmetric_from_lower(panels[0].data_ptr<T>() + task * panels[0].stride(0), p.cols, scale, out, width);
  } else {
    copy_lower_panels(p, panels, task, scale, out);
    mirror_lower_to_upper(out, width, p.cols);
  }
  if (!p.ones) return;
  const T* x = static_cast<const T*>(p.x) + task * p.stride_t;
  std::vector<acc_t> sums(p.cols, acc_t(0));
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) sums[c] += static_cast<acc_t>(x[r * p.stride_r + c]);
  for (int64_t c = 0; c < p.cols; ++c) {
    const T v = static_cast<T>(sums[c] * p.scale);
    out[p.cols * width + c] = v;
    out[c * width + p.cols] = v;
  }
  out[p.cols * width + p.cols] = static_cast<T>(static_cast<acc_t>(p.rows) * p.scale);
}

template <typename T>
void gram_blas(const std::vector<GramProblem>& problems, const std::vector<at::Tensor>& inputs) {
  // Batched gemm parallelises over tasks itself; the finishing pass is parallel here, and
  // runs inline when it is too small to pay for waking the thread pool.
  std::vector<std::vector<at::Tensor>> panels;
  std::vector<std::pair<size_t, int64_t>> tasks;
  int64_t work = 0;
  for (size_t pi = 0; pi < problems.size(); ++pi) {
    panels.push_back(lower_panels(problems[pi], inputs[pi]));
    for (int64_t t = 0; t < problems[pi].tasks; ++t) tasks.emplace_back(pi, t);
    work += problems[pi].tasks * problems[pi].width() * (problems[pi].width() + problems[pi].rows);
  }
  const int64_t n = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, n, work < kMinParallelWork ? n : 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const size_t pi = tasks[k].first;
      finish_task_blas<T>(problems[pi], panels[pi], tasks[k].second);
    }
  });
}

// ---- path choice --------------------------------------------------------------------------

// Portable pays off only where the fixed cost of the BLAS path (a batched gemm, a temporary
// and a finishing pass per problem) outweighs its faster arithmetic: calls whose problems are
// all tiny, such as the sinusoid MLP at T=4.
bool prefers_portable(const GramProblem& p) {
  constexpr int64_t kPortableMaxWork = int64_t(1) << 17;  // multiply-adds over all tasks
  return p.tasks * p.rows * p.width() * p.width() <= kPortableMaxWork;
}

// Problems are A then G of each layer, in the order of plan.A / plan.G and the inputs.
template <typename T>
void gram_grouped_cpu(const KfacPlan& plan, at::TensorList a, at::TensorList g) {
  const CpuPath path = cpu_path_from_env("LLAMA_FAST_CPU_GRAM", "portable", "blas");
  // One path for the whole call: a mix pays both paths' fixed costs and two trips to the
  // thread pool.
  const bool use_portable =
      path == CpuPath::kFirst ||
      (path == CpuPath::kAuto &&
       std::all_of(plan.problems.begin(), plan.problems.end(), prefers_portable));
  if (use_portable) {
    gram_portable<T>(plan.problems);
    return;
  }
  std::vector<at::Tensor> inputs;
  for (size_t i = 0; i < plan.problems.size(); ++i) inputs.push_back(i % 2 == 0 ? a[i / 2] : g[i / 2]);
  gram_blas<T>(plan.problems, inputs);
}

// The column sums of the BLAS path read rows with unit column stride; other layouts are
// copied once.
std::vector<at::Tensor> unit_column_stride(at::TensorList xs) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& x : xs) out.push_back(x.dim() == 3 && x.stride(2) != 1 ? x.contiguous() : x);
  return out;
}

KfacFactorsOutput kfac_factors_cpu(at::TensorList a, at::TensorList g, const c10::List<bool>& bias,
                                   c10::ArrayRef<double> a_scale, c10::ArrayRef<double> g_scale) {
  const std::vector<at::Tensor> a_unit = unit_column_stride(a);
  const std::vector<at::Tensor> g_unit = unit_column_stride(g);
  KfacPlan plan = plan_kfac_factors(a_unit, g_unit, bias, a_scale, g_scale);
  if (!plan.problems.empty()) {
    TORCH_CHECK(a[0].device().is_cpu(), "kfac_factors: CPU kernel got tensors on ",
                a[0].device());
    AT_DISPATCH_FLOATING_TYPES(plan.dtype, "kfac_factors_cpu",
                               [&] { gram_grouped_cpu<scalar_t>(plan, a_unit, g_unit); });
  }
  return {std::move(plan.A), std::move(plan.G)};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("kfac_factors", &kfac_factors_cpu); }

}  // namespace llama_fast
