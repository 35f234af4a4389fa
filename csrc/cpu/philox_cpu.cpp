// CPU implementation of the Philox ops: variates, multi-tensor axpy, perturbed
// copy and dot product, with the variates of pycomm/philox_variates.h.
//
// The global index space is cut into aligned tiles of 128 elements (32 Gaussian
// Philox blocks, or one Rademacher block); at::parallel_for spreads the tiles
// of all tensors at once (so many small tensors cost no more than one large
// one). A task computes a tile's 128 variates into a stack buffer with the
// vectorized lane functions of the header, then applies them to the elements
// of whichever tensors cover the tile. The variates are never materialized
// beyond one tile. Results depend only on (seed, global index): not on the
// thread count, nor on how the elements are split into tensors.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../philox_checks.h"
#include "pycomm/philox_variates.h"

namespace pycomm {
namespace {

constexpr int64_t kTile = 128;
constexpr int kTileBlocks = 32;           // Gaussian Philox blocks per tile
constexpr int64_t kTileGrain = 256;       // tiles per parallel task (32768 elements)
constexpr int64_t kChunkGrain = 8;        // dot chunks per parallel task (32768 elements)
constexpr int64_t kTilesPerChunk = philox::kDotChunk / kTile;
static_assert(philox::kDotChunk % kTile == 0, "a dot chunk must be whole tiles");

// ---- Gaussian tiles, compiled for several x86 vector widths ---------------------
// The extension is built for baseline x86-64 (SSE2). The Gaussian tile (Philox
// plus Box-Muller, compute-bound) is also compiled for AVX2 and AVX-512 and
// chosen at run time. All versions perform the same IEEE-754 operations
// (-ffp-contract=off, no FMA), only more lanes at a time, so their results are
// identical; tests/test_philox_ops.py checks this by forcing each level with
// the environment variable PYCOMM_PHILOX_CPU_ISA = baseline | avx2 | avx512
// (read on every call; default: the widest the CPU supports).

using GaussianTileFn = void (*)(uint64_t, uint64_t, float (&)[kTile]);

__attribute__((flatten, noinline)) void gaussian_tile_baseline(uint64_t seed, uint64_t first_block,
                                                               float (&z)[kTile]) {
  philox::gaussian_lanes<kTileBlocks>(seed, first_block, z);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define PYCOMM_PHILOX_X86_DISPATCH 1
__attribute__((target("avx2"), flatten, noinline)) void gaussian_tile_avx2(uint64_t seed, uint64_t first_block,
                                                                          float (&z)[kTile]) {
  philox::gaussian_lanes<kTileBlocks>(seed, first_block, z);
}

#if defined(__clang__)
#define PYCOMM_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq"
#else
#define PYCOMM_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512"
#endif
__attribute__((target(PYCOMM_AVX512_TARGET), flatten, noinline)) void gaussian_tile_avx512(uint64_t seed,
                                                                                          uint64_t first_block,
                                                                                          float (&z)[kTile]) {
  philox::gaussian_lanes<kTileBlocks>(seed, first_block, z);
}
#endif

GaussianTileFn select_gaussian_tile() {
#if defined(PYCOMM_PHILOX_X86_DISPATCH)
  int want = 2;
  if (const char* env = std::getenv("PYCOMM_PHILOX_CPU_ISA")) {
    if (std::strcmp(env, "baseline") == 0) want = 0;
    else if (std::strcmp(env, "avx2") == 0) want = 1;
  }
  __builtin_cpu_init();
  if (want >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return &gaussian_tile_avx512;
  }
  if (want >= 1 && __builtin_cpu_supports("avx2")) return &gaussian_tile_avx2;
#endif
  return &gaussian_tile_baseline;
}

// The variates of global indices [tile * 128, tile * 128 + 128).
inline void tile_variates(GaussianTileFn gaussian, uint64_t seed, int64_t distribution, int64_t tile,
                          float (&z)[kTile]) {
  if (distribution == philox::kRademacher) {
    philox::rademacher_tile(seed, static_cast<uint64_t>(tile), z);
  } else {
    gaussian(seed, static_cast<uint64_t>(tile) * kTileBlocks, z);
  }
}

// Index of the span holding global index g (spans are sorted and contiguous).
inline size_t span_index(const std::vector<PhiloxSpan>& spans, int64_t g) {
  const auto it = std::upper_bound(spans.begin(), spans.end(), g,
                                   [](int64_t v, const PhiloxSpan& s) { return v < s.start; });
  return static_cast<size_t>(it - spans.begin()) - 1;
}

// Calls fn(span, local_index, z_index, count) for the pieces of [lo, hi) (inside
// one tile starting at tile_base) held by consecutive spans, starting the
// search at *cursor (advanced; indices only grow within a task).
template <typename Fn>
inline void for_each_piece(const std::vector<PhiloxSpan>& spans, size_t* cursor, int64_t tile_base, int64_t lo,
                           int64_t hi, Fn&& fn) {
  size_t s = *cursor;
  int64_t g = lo;
  while (g < hi) {
    while (g >= spans[s].start + spans[s].numel) ++s;
    const PhiloxSpan& span = spans[s];
    const int64_t n = std::min(hi, span.start + span.numel) - g;
    fn(span, g - span.start, g - tile_base, n);
    g += n;
  }
  *cursor = s;
}

template <typename T>
inline void fill_run(T* dst, const float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(z[i]);
}

// dst = src + alpha * z, rounded in float32 (never fused), then to T.
template <typename T>
inline void axpy_run(const T* src, T* dst, const float* z, int64_t n, float alpha) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(add_rn(static_cast<float>(src[i]), mul_rn(alpha, z[i])));
}

template <typename T>
inline void load_run(const T* src, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(src[i]);
}

template <typename Fn>
inline void with_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float()); break;
    case DType::Float16: fn(at::Half()); break;
    case DType::BFloat16: fn(at::BFloat16()); break;
  }
}

// fill: dst = z; otherwise dst = src + alpha * z.
void elementwise(const std::vector<PhiloxSpan>& spans, uint64_t seed, int64_t distribution, float alpha, bool fill) {
  if (spans.empty()) return;
  const int64_t begin = spans.front().start, end = spans.back().start + spans.back().numel;
  const GaussianTileFn gaussian = select_gaussian_tile();
  at::parallel_for(begin / kTile, (end - 1) / kTile + 1, kTileGrain, [&](int64_t tile_begin, int64_t tile_end) {
    alignas(64) float z[kTile];
    size_t cursor = span_index(spans, std::max(tile_begin * kTile, begin));
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t base = tile * kTile;
      tile_variates(gaussian, seed, distribution, tile, z);
      for_each_piece(spans, &cursor, base, std::max(base, begin), std::min(base + kTile, end),
                     [&](const PhiloxSpan& span, int64_t local, int64_t zi, int64_t n) {
                       with_type(span.dtype, [&](auto tag) {
                         using T = decltype(tag);
                         T* dst = static_cast<T*>(span.dst) + local;
                         if (fill) {
                           fill_run(dst, z + zi, n);
                         } else {
                           axpy_run(static_cast<const T*>(span.src) + local, dst, z + zi, n, alpha);
                         }
                       });
                     });
    }
  });
}

// <t, z> in the order stated in philox_variates.h (chunks of 4096 global
// indices, 32 lanes per chunk, halving trees).
double dot(const std::vector<PhiloxSpan>& spans, uint64_t seed, int64_t distribution) {
  if (spans.empty()) return 0.0;
  const int64_t begin = spans.front().start, end = spans.back().start + spans.back().numel;
  const int64_t chunk_first = begin / philox::kDotChunk, chunk_last = (end - 1) / philox::kDotChunk;
  std::vector<double> partials(static_cast<size_t>(chunk_last - chunk_first + 1));
  const GaussianTileFn gaussian = select_gaussian_tile();
  at::parallel_for(chunk_first, chunk_last + 1, kChunkGrain, [&](int64_t chunk_begin, int64_t chunk_end) {
    alignas(64) float z[kTile];
    alignas(64) float v[kTile];
    size_t cursor = span_index(spans, std::max(chunk_begin * philox::kDotChunk, begin));
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double lanes[philox::kDotLanes];
      for (int l = 0; l < philox::kDotLanes; ++l) lanes[l] = 0.0;
      for (int64_t step = 0; step < kTilesPerChunk; ++step) {
        const int64_t tile = chunk * kTilesPerChunk + step;
        const int64_t base = tile * kTile;
        const int64_t lo = std::max(base, begin), hi = std::min(base + kTile, end);
        if (lo >= hi) continue;
        tile_variates(gaussian, seed, distribution, tile, z);
        if (lo > base || hi < base + kTile) {
          for (int64_t i = 0; i < kTile; ++i) v[i] = 0.0f;  // absent indices contribute +-0: no change
        }
        for_each_piece(spans, &cursor, base, lo, hi, [&](const PhiloxSpan& span, int64_t local, int64_t zi, int64_t n) {
          with_type(span.dtype, [&](auto tag) {
            using T = decltype(tag);
            load_run(static_cast<const T*>(span.src) + local, v + zi, n);
          });
        });
        // Lane l owns positions 4l .. 4l+3 of the step, in that order.
        for (int j = 0; j < 4; ++j) {
          for (int l = 0; l < philox::kDotLanes; ++l) {
            lanes[l] += static_cast<double>(v[4 * l + j]) * static_cast<double>(z[4 * l + j]);
          }
        }
      }
      partials[static_cast<size_t>(chunk - chunk_first)] = philox::reduce_lanes32(lanes);
    }
  });
  double lanes[philox::kDotLanes];
  for (int l = 0; l < philox::kDotLanes; ++l) lanes[l] = 0.0;
  for (size_t p = 0; p < partials.size(); ++p) lanes[p % philox::kDotLanes] += partials[p];
  return philox::reduce_lanes32(lanes);
}

void check_cpu(at::TensorList tensors, const char* op) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "pycomm: ", op, ": expected CPU tensors, got one on ", t.device());
  }
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.contiguous());
  return out;
}

at::Tensor philox_variates_cpu(const at::Tensor& like, int64_t n, int64_t seed, int64_t offset, int64_t distribution) {
  check_distribution(distribution);
  check_offset_count(offset, n);
  to_dtype(like, "like");
  at::Tensor out = at::empty({n}, like.options());
  if (n == 0) return out;
  const std::vector<PhiloxSpan> spans{PhiloxSpan{offset, n, to_dtype(out, "out"), nullptr, out.data_ptr()}};
  elementwise(spans, static_cast<uint64_t>(seed), distribution, 0.0f, /*fill=*/true);
  return out;
}

void philox_axpy_cpu(at::TensorList tensors, int64_t seed, double alpha, int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/true, "philox_axpy_");
  check_cpu(tensors, "philox_axpy_");
  check_no_overlap(tensors, "philox_axpy_");
  elementwise(make_spans(tensors, tensors, offset), static_cast<uint64_t>(seed), distribution,
              static_cast<float>(alpha), /*fill=*/false);
}

std::vector<at::Tensor> philox_perturbed_copy_cpu(at::TensorList tensors, int64_t seed, double alpha,
                                                  int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/false, "philox_perturbed_copy");
  check_cpu(tensors, "philox_perturbed_copy");
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  std::vector<at::Tensor> out;
  out.reserve(src.size());
  for (const at::Tensor& t : src) out.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  elementwise(make_spans(src, out, offset), static_cast<uint64_t>(seed), distribution, static_cast<float>(alpha),
              /*fill=*/false);
  return out;
}

at::Tensor philox_dot_cpu(at::TensorList tensors, int64_t seed, int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/false, "philox_dot");
  check_cpu(tensors, "philox_dot");
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  const double result = dot(make_spans(src, src, offset), static_cast<uint64_t>(seed), distribution);
  return at::scalar_tensor(result, tensors[0].options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CPU, m) {
  m.impl("philox_variates", &philox_variates_cpu);
  m.impl("philox_axpy_", &philox_axpy_cpu);
  m.impl("philox_perturbed_copy", &philox_perturbed_copy_cpu);
  m.impl("philox_dot", &philox_dot_cpu);
}

}  // namespace pycomm
