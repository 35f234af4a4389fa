// CPU implementation of the Philox ops: variates, multi-tensor axpy (one or K
// directions), perturbed copy and dot product (one or K directions), with the
// variates of pycomm/philox_variates.h.
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

template <typename T>
inline void copy_run(const T* src, T* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

// One direction of an axpy: its seed and its alpha, rounded to float32.
struct Direction {
  uint64_t seed;
  float alpha;
};

// fill: dst = z of directions[0]. Otherwise, for each direction in order whose
// alpha is not zero, dst = src + alpha * z, rounded to the dtype, with src = dst
// after the first applied direction: exactly the successive single-direction
// updates. A direction with alpha == 0 is skipped (no variates), and with none
// left the elements are copied bit for bit.
void elementwise(const std::vector<PhiloxSpan>& spans, const std::vector<Direction>& directions,
                 int64_t distribution, bool fill) {
  if (spans.empty() || directions.empty()) return;
  const int64_t begin = spans.front().start, end = spans.back().start + spans.back().numel;
  const GaussianTileFn gaussian = select_gaussian_tile();
  at::parallel_for(begin / kTile, (end - 1) / kTile + 1, kTileGrain, [&](int64_t tile_begin, int64_t tile_end) {
    alignas(64) float z[kTile];
    size_t cursor = span_index(spans, std::max(tile_begin * kTile, begin));
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t base = tile * kTile;
      // end - base, not base + kTile: the last tile may end past 2^63 - 1.
      const int64_t lo = std::max(base, begin), hi = base + std::min(kTile, end - base);
      const size_t tile_cursor = cursor;
      if (fill) {
        tile_variates(gaussian, directions.front().seed, distribution, tile, z);
        for_each_piece(spans, &cursor, base, lo, hi, [&](const PhiloxSpan& span, int64_t local, int64_t zi, int64_t n) {
          with_type(span.dtype, [&](auto tag) {
            using T = decltype(tag);
            fill_run(static_cast<T*>(span.dst) + local, z + zi, n);
          });
        });
        continue;
      }
      bool applied = false;
      for (const Direction& d : directions) {
        if (d.alpha == 0.0f) continue;
        tile_variates(gaussian, d.seed, distribution, tile, z);
        cursor = tile_cursor;
        for_each_piece(spans, &cursor, base, lo, hi, [&](const PhiloxSpan& span, int64_t local, int64_t zi, int64_t n) {
          with_type(span.dtype, [&](auto tag) {
            using T = decltype(tag);
            T* dst = static_cast<T*>(span.dst) + local;
            const T* src = applied ? dst : static_cast<const T*>(span.src) + local;
            axpy_run(src, dst, z + zi, n, d.alpha);
          });
        });
        applied = true;
      }
      if (!applied) {
        for_each_piece(spans, &cursor, base, lo, hi, [&](const PhiloxSpan& span, int64_t local, int64_t, int64_t n) {
          with_type(span.dtype, [&](auto tag) {
            using T = decltype(tag);
            copy_run(static_cast<const T*>(span.src) + local, static_cast<T*>(span.dst) + local, n);
          });
        });
      }
    }
  });
}

// <t, z_k> for every seed k, each in the order stated in philox_variates.h
// (chunks of 4096 global indices, 32 lanes per chunk, halving trees). The
// elements are loaded once per 128-index step for all directions.
std::vector<double> dot(const std::vector<PhiloxSpan>& spans, const std::vector<uint64_t>& seeds,
                        int64_t distribution) {
  const size_t directions = seeds.size();
  std::vector<double> result(directions, 0.0);
  if (spans.empty() || directions == 0) return result;
  const int64_t begin = spans.front().start, end = spans.back().start + spans.back().numel;
  const int64_t chunk_first = begin / philox::kDotChunk, chunk_last = (end - 1) / philox::kDotChunk;
  const size_t chunks = static_cast<size_t>(chunk_last - chunk_first + 1);
  std::vector<double> partials(directions * chunks);  // [direction][chunk]
  const GaussianTileFn gaussian = select_gaussian_tile();
  at::parallel_for(chunk_first, chunk_last + 1, kChunkGrain, [&](int64_t chunk_begin, int64_t chunk_end) {
    alignas(64) float z[kTile];
    alignas(64) float v[kTile];
    std::vector<double> lanes(directions * philox::kDotLanes);
    size_t cursor = span_index(spans, std::max(chunk_begin * philox::kDotChunk, begin));
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      std::fill(lanes.begin(), lanes.end(), 0.0);
      for (int64_t step = 0; step < kTilesPerChunk; ++step) {
        const int64_t tile = chunk * kTilesPerChunk + step;
        const int64_t base = tile * kTile;
        const int64_t lo = std::max(base, begin), hi = end - base < kTile ? end : base + kTile;
        if (lo >= hi) continue;
        if (lo > base || hi - base < kTile) {
          for (int64_t i = 0; i < kTile; ++i) v[i] = 0.0f;  // absent indices contribute +-0: no change
        }
        for_each_piece(spans, &cursor, base, lo, hi, [&](const PhiloxSpan& span, int64_t local, int64_t zi, int64_t n) {
          with_type(span.dtype, [&](auto tag) {
            using T = decltype(tag);
            load_run(static_cast<const T*>(span.src) + local, v + zi, n);
          });
        });
        for (size_t k = 0; k < directions; ++k) {
          tile_variates(gaussian, seeds[k], distribution, tile, z);
          double* acc = lanes.data() + k * philox::kDotLanes;
          // Lane l owns positions 4l .. 4l+3 of the step, in that order.
          for (int j = 0; j < 4; ++j) {
            for (int l = 0; l < philox::kDotLanes; ++l) {
              acc[l] += static_cast<double>(v[4 * l + j]) * static_cast<double>(z[4 * l + j]);
            }
          }
        }
      }
      for (size_t k = 0; k < directions; ++k) {
        double chunk_lanes[philox::kDotLanes];
        std::copy_n(lanes.data() + k * philox::kDotLanes, philox::kDotLanes, chunk_lanes);
        partials[k * chunks + static_cast<size_t>(chunk - chunk_first)] = philox::reduce_lanes32(chunk_lanes);
      }
    }
  });
  for (size_t k = 0; k < directions; ++k) {
    double lanes[philox::kDotLanes];
    for (int l = 0; l < philox::kDotLanes; ++l) lanes[l] = 0.0;
    for (size_t p = 0; p < chunks; ++p) lanes[p % philox::kDotLanes] += partials[k * chunks + p];
    result[k] = philox::reduce_lanes32(lanes);
  }
  return result;
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.contiguous());
  return out;
}

std::vector<uint64_t> seed_words(at::IntArrayRef seeds) {
  std::vector<uint64_t> out;
  out.reserve(seeds.size());
  for (const int64_t s : seeds) out.push_back(static_cast<uint64_t>(s));
  return out;
}

at::Tensor philox_variates_cpu(const at::Tensor& like, int64_t n, int64_t seed, int64_t offset, int64_t distribution) {
  check_distribution(distribution);
  check_offset_count(offset, n);
  to_dtype(like, "like");
  at::Tensor out = at::empty({n}, like.options());
  if (n == 0) return out;
  const std::vector<PhiloxSpan> spans{PhiloxSpan{offset, n, to_dtype(out, "out"), nullptr, out.data_ptr()}};
  elementwise(spans, {Direction{static_cast<uint64_t>(seed), 0.0f}}, distribution, /*fill=*/true);
  return out;
}

void philox_axpy_cpu(at::TensorList tensors, int64_t seed, double alpha, int64_t distribution, int64_t offset) {
  check_philox_list_op(tensors, distribution, offset, /*in_place=*/true, at::kCPU, "philox_axpy_");
  elementwise(make_spans(tensors, tensors, offset), {Direction{static_cast<uint64_t>(seed), static_cast<float>(alpha)}},
              distribution, /*fill=*/false);
}

void philox_axpy_multi_cpu(at::TensorList tensors, at::IntArrayRef seeds, const at::Tensor& alphas,
                           int64_t distribution, int64_t offset) {
  check_philox_list_op(tensors, distribution, offset, /*in_place=*/true, at::kCPU, "philox_axpy_multi_");
  check_alphas(alphas, seeds.size(), tensors[0].device(), "philox_axpy_multi_");
  const at::Tensor a = float_alphas(alphas);
  const float* alpha = a.data_ptr<float>();
  std::vector<Direction> directions;
  directions.reserve(seeds.size());
  for (size_t k = 0; k < seeds.size(); ++k) directions.push_back(Direction{static_cast<uint64_t>(seeds[k]), alpha[k]});
  elementwise(make_spans(tensors, tensors, offset), directions, distribution, /*fill=*/false);
}

std::vector<at::Tensor> philox_perturbed_copy_cpu(at::TensorList tensors, int64_t seed, double alpha,
                                                  int64_t distribution, int64_t offset) {
  check_philox_list_op(tensors, distribution, offset, /*in_place=*/false, at::kCPU, "philox_perturbed_copy");
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  std::vector<at::Tensor> out;
  out.reserve(src.size());
  for (const at::Tensor& t : src) out.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  elementwise(make_spans(src, out, offset), {Direction{static_cast<uint64_t>(seed), static_cast<float>(alpha)}},
              distribution, /*fill=*/false);
  return out;
}

at::Tensor philox_dot_cpu(at::TensorList tensors, int64_t seed, int64_t distribution, int64_t offset) {
  check_philox_list_op(tensors, distribution, offset, /*in_place=*/false, at::kCPU, "philox_dot");
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  const double result = dot(make_spans(src, src, offset), {static_cast<uint64_t>(seed)}, distribution)[0];
  return at::scalar_tensor(result, tensors[0].options().dtype(at::kDouble));
}

at::Tensor philox_dot_multi_cpu(at::TensorList tensors, at::IntArrayRef seeds, int64_t distribution, int64_t offset) {
  check_philox_list_op(tensors, distribution, offset, /*in_place=*/false, at::kCPU, "philox_dot_multi");
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  const std::vector<double> result = dot(make_spans(src, src, offset), seed_words(seeds), distribution);
  at::Tensor out = at::empty({static_cast<int64_t>(result.size())}, tensors[0].options().dtype(at::kDouble));
  std::copy(result.begin(), result.end(), out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CPU, m) {
  m.impl("philox_variates", &philox_variates_cpu);
  m.impl("philox_axpy_", &philox_axpy_cpu);
  m.impl("philox_perturbed_copy", &philox_perturbed_copy_cpu);
  m.impl("philox_dot", &philox_dot_cpu);
  m.impl("philox_axpy_multi_", &philox_axpy_multi_cpu);
  m.impl("philox_dot_multi", &philox_dot_multi_cpu);
}

}  // namespace pycomm
