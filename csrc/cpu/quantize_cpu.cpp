// CPU implementation of the quantization ops (see quant_format.h for the
// byte format). Buckets are independent, so they are spread over threads with
// at::parallel_for; within a bucket the loops run over groups of 8 lanes with
// the bit width a compile-time constant, which the compiler vectorizes. With a
// mixed (4-column) bucket table the bit width is dispatched per bucket.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../quantize_checks.h"
#include "pycomm/bucket_layout.h"
#include "pycomm/quant_format.h"

namespace pycomm {
namespace {

using quant::kGroup;
constexpr int kTileGroups = 32;
constexpr int kTile = kTileGroups * kGroup;

// Buckets per parallel task: enough elements that scheduling is negligible.
int64_t bucket_grain(int64_t bucket_size) { return std::max<int64_t>(1, 16384 / bucket_size); }

// Byte-lane (un)packing of a group: byte j of `bytes` holds level j. Three
// shift-and-merge steps turn the 8 bytes into the group word
// sum(level_j << (j * kBits)) of quant_format.h and back, instead of 8 shifts
// and ORs per group. Needs a little-endian host (bytes loaded with memcpy).
template <int kBits>
inline uint64_t pack_byte_levels(uint64_t bytes) {
  if constexpr (kBits == 8) {
    return bytes;
  } else {
    uint64_t w = (bytes & 0x00FF00FF00FF00FFull) | ((bytes & 0xFF00FF00FF00FF00ull) >> (8 - kBits));
    w = (w & 0x0000FFFF0000FFFFull) | ((w & 0xFFFF0000FFFF0000ull) >> (16 - 2 * kBits));
    return (w & 0x00000000FFFFFFFFull) | ((w & 0xFFFFFFFF00000000ull) >> (32 - 4 * kBits));
  }
}

template <int kBits>
inline uint64_t unpack_byte_levels(uint64_t word) {
  if constexpr (kBits == 8) {
    return word;
  } else {
    constexpr uint64_t half = (uint64_t(1) << (4 * kBits)) - 1;
    constexpr uint64_t quarter = ((uint64_t(1) << (2 * kBits)) - 1) * 0x0000000100000001ull;
    constexpr uint64_t eighth = ((uint64_t(1) << kBits) - 1) * 0x0001000100010001ull;
    uint64_t w = (word & half) | (((word >> (4 * kBits)) & half) << 32);
    w = (w & quarter) | (((w >> (2 * kBits)) & quarter) << 16);
    return (w & eighth) | (((w >> kBits) & eighth) << 8);
  }
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the CPU packing code assumes a little-endian host");

template <typename T, bool kResidual>
inline float load_value(const T* x, const float* residual, int64_t i) {
  float v = static_cast<float>(x[i]);
  if (kResidual) v = add_rn(v, residual[i]);
  return v;
}

// Per-lane range of the first n (a multiple of 8) elements of x (+ residual),
// eight lanes at a time. Plain loops with ?: min/max do not vectorize without
// -ffast-math, so x86 gets SSE min/max, which have exactly the ?: semantics
// (minps(a, b) = a < b ? a : b).
template <typename T, bool kResidual>
inline void range8(const T* x, const float* residual, int64_t n, float (&mn)[kGroup], float (&mx)[kGroup],
                   float (&bad)[kGroup]) {
  const float inf = std::numeric_limits<float>::infinity();
#if defined(__SSE2__)
  __m128 min0 = _mm_set1_ps(inf), min1 = min0, max0 = _mm_set1_ps(-inf), max1 = max0;
  __m128 bad0 = _mm_setzero_ps(), bad1 = bad0;
  for (int64_t i = 0; i < n; i += kGroup) {
    __m128 v0, v1;
    if constexpr (std::is_same<T, float>::value) {
      v0 = _mm_loadu_ps(x + i);
      v1 = _mm_loadu_ps(x + i + 4);
    } else {
      alignas(16) float tmp[kGroup];
      for (int j = 0; j < kGroup; ++j) tmp[j] = static_cast<float>(x[i + j]);
      v0 = _mm_load_ps(tmp);
      v1 = _mm_load_ps(tmp + 4);
    }
    if constexpr (kResidual) {
      v0 = _mm_add_ps(v0, _mm_loadu_ps(residual + i));
      v1 = _mm_add_ps(v1, _mm_loadu_ps(residual + i + 4));
    }
    min0 = _mm_min_ps(v0, min0);
    min1 = _mm_min_ps(v1, min1);
    max0 = _mm_max_ps(v0, max0);
    max1 = _mm_max_ps(v1, max1);
    bad0 = _mm_add_ps(bad0, _mm_sub_ps(v0, v0));
    bad1 = _mm_add_ps(bad1, _mm_sub_ps(v1, v1));
  }
  _mm_storeu_ps(mn, min0);
  _mm_storeu_ps(mn + 4, min1);
  _mm_storeu_ps(mx, max0);
  _mm_storeu_ps(mx + 4, max1);
  _mm_storeu_ps(bad, bad0);
  _mm_storeu_ps(bad + 4, bad1);
#else
  for (int j = 0; j < kGroup; ++j) {
    mn[j] = inf;
    mx[j] = -inf;
    bad[j] = 0.0f;
  }
  for (int64_t i = 0; i < n; i += kGroup) {
    for (int j = 0; j < kGroup; ++j) {
      const float v = load_value<T, kResidual>(x, residual, i + j);
      mn[j] = v < mn[j] ? v : mn[j];
      mx[j] = v > mx[j] ? v : mx[j];
      bad[j] += v - v;
    }
  }
#endif
}

// levels[i] = quant::encode_level(v[i], scale, r[i], max_lev) for i < n, with
// r[i] = 1/2 (round to nearest) when r is null. The
// SSE loop is that function written with vector instructions of exactly the
// same semantics (maxps(t, 0) is t > 0 ? t : 0, minps(t, m) is t < m ? t : m,
// cvttps2dq truncates like the int32 cast), so the bytes are identical, which
// tests/test_quantize_ops.py checks against an independent reference.
inline void encode_levels(const float* v, const float* r, int n, const quant::BucketScale& scale, float max_lev,
                          uint8_t* levels) {
  int i = 0;
#if defined(__SSE2__)
  const __m128 mn = _mm_set1_ps(scale.min), inv = _mm_set1_ps(scale.inv_unit);
  const __m128 zero = _mm_setzero_ps(), top = _mm_set1_ps(max_lev);
  auto encode4 = [&](int at) {
    const __m128 offset = r != nullptr ? _mm_loadu_ps(r + at) : _mm_set1_ps(0.5f);
    __m128 t = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(v + at), mn), inv), offset);
    t = _mm_min_ps(_mm_max_ps(t, zero), top);
    return _mm_cvttps_epi32(t);
  };
  for (; i + 16 <= n; i += 16) {
    const __m128i lo = _mm_packs_epi32(encode4(i), encode4(i + 4));
    const __m128i hi = _mm_packs_epi32(encode4(i + 8), encode4(i + 12));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(levels + i), _mm_packus_epi16(lo, hi));
  }
#endif
  for (; i < n; ++i)
    levels[i] = static_cast<uint8_t>(quant::encode_level(v[i], scale, r != nullptr ? r[i] : 0.5f, max_lev));
}

template <typename T, int kBits, bool kResidual>
void quantize_bucket(const T* x, float* residual, int64_t offset, int64_t length, uint8_t* record,
                     int64_t bucket_size, bool stochastic, uint64_t seed, uint64_t stream_base) {
  const int64_t record_size = quant::record_bytes(kBits, bucket_size);
  if (length == 0) {
    std::memset(record, 0, record_size);
    return;
  }
  const T* xb = x + offset;
  float* rb = kResidual ? residual + offset : nullptr;

  // Pass 1: range. v - v is NaN exactly for NaN and +-Inf, so `bad` flags
  // non-finite input; min/max use `v < m ? v : m`, which ignores NaN.
  float lane_min[kGroup], lane_max[kGroup], lane_bad[kGroup];
  const int64_t full = length / kGroup * kGroup;
  range8<T, kResidual>(xb, rb, full, lane_min, lane_max, lane_bad);
  for (int64_t i = full; i < length; ++i) {
    const float v = load_value<T, kResidual>(xb, rb, i);
    lane_min[0] = v < lane_min[0] ? v : lane_min[0];
    lane_max[0] = v > lane_max[0] ? v : lane_max[0];
    lane_bad[0] += v - v;
  }
  float mn = lane_min[0], mx = lane_max[0], bad = lane_bad[0];
  for (int j = 1; j < kGroup; ++j) {
    mn = lane_min[j] < mn ? lane_min[j] : mn;
    mx = lane_max[j] > mx ? lane_max[j] : mx;
    bad += lane_bad[j];
  }
  const bool nonfinite = !(bad == 0.0f);
  const quant::BucketScale scale = quant::make_scale(mn, mx, nonfinite, kBits);
  quant::write_header(record, scale.min, scale.unit);
  uint8_t* data = record + quant::kHeaderBytes;
  if (nonfinite) {
    // The residual is left as it was: the step will be skipped (AMP) and the
    // carried error must not be poisoned.
    std::memset(data, 0, record_size - quant::kHeaderBytes);
    return;
  }

  // Pass 2, one tile of 256 elements at a time so that every loop is a plain
  // vectorizable loop: rounding offsets (Philox, 64 blocks at once), levels and
  // residuals, then packing with compile-time shifts.
  const float max_lev = static_cast<float>(quant::max_level(kBits));
  for (int64_t tile = 0; tile < length; tile += kTile) {
    const int m = static_cast<int>(std::min<int64_t>(kTile, length - tile));
    float r[kTile];
    if (stochastic) quant::rounding_offsets_groups<kTileGroups>(true, seed, stream_base, tile / kGroup, r);
    // Separate loops (values, levels, residuals) vectorize; one fused loop with
    // a store to the residual and a narrowing store does not.
    float v[kTile];
    for (int i = 0; i < m; ++i) v[i] = load_value<T, kResidual>(xb, rb, tile + i);
    alignas(16) uint8_t levels[kTile];
    if (scale.wide) {  // a range wider than float32 (quant_format.h): rare, scalar
      for (int i = 0; i < m; ++i)
        levels[i] = static_cast<uint8_t>(quant::encode_level_wide(v[i], scale, stochastic ? r[i] : 0.5f, max_lev));
      if (kResidual)
        for (int i = 0; i < m; ++i)
          rb[tile + i] = sub_rn(v[i], quant::decode_level_wide(levels[i], scale.min, scale.unit));
    } else {
      encode_levels(v, stochastic ? r : nullptr, m, scale, max_lev, levels);
      if (kResidual) {
        float* __restrict__ out = rb + tile;
        for (int i = 0; i < m; ++i) out[i] = sub_rn(v[i], quant::decode_level(levels[i], scale.min, scale.unit));
      }
    }
    for (int i = m; i < kTile; ++i) levels[i] = 0;
    uint8_t* dst = data + (tile / kGroup) * kBits;
    const int groups = (m + kGroup - 1) / kGroup;
    for (int g = 0; g < groups; ++g) {
      uint64_t bytes;
      std::memcpy(&bytes, levels + g * kGroup, sizeof(bytes));
      quant::store_group(dst + g * kBits, pack_byte_levels<kBits>(bytes), kBits);
    }
  }
  const int64_t used = (length + kGroup - 1) / kGroup * kBits;
  std::memset(data + used, 0, record_size - quant::kHeaderBytes - used);
}

// Bucket k of x, read through the layout, into its record, with error feedback
// when residual is not null. A skipped bucket is encoded as an empty one: an
// all-zero record. row_streams: nullptr, or where each bucket's draws start.
template <typename T, int kBits>
void quantize_layout_bucket(const T* x, float* residual, const BucketLayout& layout, int64_t k, bool skipped,
                            uint8_t* record, int64_t bucket_size, bool stochastic, uint64_t seed,
                            const int64_t* row_streams) {
  int64_t offset = 0, length = 0;
  if (!skipped) layout.range(k, offset, length);
  const uint64_t base = quant::row_stream_base(row_streams, k, bucket_size);
  if (residual != nullptr)
    quantize_bucket<T, kBits, true>(x, residual, offset, length, record, bucket_size, stochastic, seed, base);
  else
    quantize_bucket<T, kBits, false>(x, nullptr, offset, length, record, bucket_size, stochastic, seed, base);
}

// Unpacks `groups` groups into one byte per level, so that decoding runs as a
// separate, vectorizable loop.
template <int kBits>
inline void unpack_levels(const uint8_t* data, int64_t groups, uint8_t* levels) {
  for (int64_t g = 0; g < groups; ++g) {
    const uint64_t bytes = unpack_byte_levels<kBits>(quant::load_group(data + g * kBits, kBits));
    std::memcpy(levels + g * kGroup, &bytes, sizeof(bytes));
  }
}

template <typename T, int kBits>
void dequantize_bucket(const uint8_t* record, T* out, int64_t offset, int64_t length) {
  float mn, unit;
  quant::read_header(record, mn, unit);
  const uint8_t* data = record + quant::kHeaderBytes;
  const bool wide = quant::is_wide(unit, kBits);
  T* ob = out + offset;
  for (int64_t tile = 0; tile < length; tile += kTile) {
    const int m = static_cast<int>(std::min<int64_t>(kTile, length - tile));
    alignas(16) uint8_t levels[kTile];
    unpack_levels<kBits>(data + (tile / kGroup) * kBits, (m + kGroup - 1) / kGroup, levels);
    if (wide)
      for (int i = 0; i < m; ++i) ob[tile + i] = static_cast<T>(quant::decode_level_wide(levels[i], mn, unit));
    else
      for (int i = 0; i < m; ++i) ob[tile + i] = static_cast<T>(quant::decode_level(levels[i], mn, unit));
  }
}

// acc [bucket_size] = bucket k of init (read through the layout), zero past
// its length or without init: where dequantize_sum starts adding the sources.
template <typename T>
void start_bucket_sum(float* acc, const T* init, const BucketLayout& layout, int64_t k, int64_t bucket_size) {
  std::memset(acc, 0, bucket_size * sizeof(float));
  if (init == nullptr) return;
  int64_t offset, length;
  layout.range(k, offset, length);
  for (int64_t j = 0; j < length; ++j) acc[j] = static_cast<float>(init[offset + j]);
}

template <int kBits>
void accumulate_bucket(const uint8_t* record, float* acc, int64_t bucket_size) {
  if (quant::is_zero_record(record)) return;
  float mn, unit;
  quant::read_header(record, mn, unit);
  const uint8_t* data = record + quant::kHeaderBytes;
  const bool wide = quant::is_wide(unit, kBits);
  for (int64_t tile = 0; tile < bucket_size; tile += kTile) {
    const int m = static_cast<int>(std::min<int64_t>(kTile, bucket_size - tile));
    alignas(16) uint8_t levels[kTile];
    unpack_levels<kBits>(data + (tile / kGroup) * kBits, m / kGroup, levels);
    float* __restrict__ a = acc + tile;
    if (wide)
      for (int i = 0; i < m; ++i) a[i] = add_rn(a[i], quant::decode_level_wide(levels[i], mn, unit));
    else
      for (int i = 0; i < m; ++i) a[i] = add_rn(a[i], quant::decode_level(levels[i], mn, unit));
  }
}

// Mixed bit widths: the bucket's bits are dispatched per bucket (a switch per
// bucket of B elements, nothing per element).
at::Tensor quantize_mixed_cpu(const at::Tensor& x_in, c10::optional<at::Tensor> residual, const at::Tensor& table,
                              int64_t num_buckets, int64_t bits, int64_t bucket_size, bool stochastic, int64_t seed,
                              int64_t skip_begin, int64_t skip_end, const c10::optional<at::Tensor>& host_table,
                              int64_t chunk_row_begin, const c10::optional<at::Tensor>& row_streams) {
  const MixedQuantizeArgs a = check_quantize_mixed_args(x_in, residual, table, num_buckets, bits, bucket_size,
                                                        host_table, chunk_row_begin);
  const int64_t* streams = check_row_streams(row_streams, x_in, a.num_buckets, bucket_size, true);
  const at::Tensor x = x_in.contiguous();
  at::Tensor payload = at::empty({a.payload_bytes}, x.options().dtype(at::kByte));
  BucketLayout layout = make_layout(table, x.numel(), bucket_size, a.first_row);
  layout.packed_chunk = a.chunk;
  const MixedRecords records = make_mixed_records(table, a.first_row, a.payload_bytes, bucket_size);
  uint8_t* out = payload.data_ptr<uint8_t>();
  float* res = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const uint64_t useed = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pycomm_quantize_mixed_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, a.num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        int bucket_bits;
        int64_t at;
        if (!records.record(k, bucket_bits, at)) continue;
        quant::dispatch_bits(bucket_bits, [&](auto bits_c) {
          quantize_layout_bucket<scalar_t, decltype(bits_c)::value>(xp, res, layout, k, k >= skip_begin && k < skip_end,
                                                                    out + at, bucket_size, stochastic, useed,
                                                                    streams);
        });
      }
    });
  });
  return payload;
}

at::Tensor quantize_cpu(const at::Tensor& x_in, c10::optional<at::Tensor> residual,
                        const c10::optional<at::Tensor>& bucket_table, int64_t num_buckets, int64_t bits,
                        int64_t bucket_size, bool stochastic, int64_t seed, int64_t skip_begin, int64_t skip_end,
                        const c10::optional<at::Tensor>& host_table, int64_t chunk_row_begin,
                        const c10::optional<at::Tensor>& row_streams) {
  if (is_mixed_table(bucket_table))
    return quantize_mixed_cpu(x_in, residual, *bucket_table, num_buckets, bits, bucket_size, stochastic, seed,
                              skip_begin, skip_end, host_table, chunk_row_begin, row_streams);
  check_no_host_table(host_table, chunk_row_begin);
  num_buckets = check_quantize_args(x_in, residual, bucket_table, num_buckets, bits, bucket_size);
  const int64_t* streams = check_row_streams(row_streams, x_in, num_buckets, bucket_size, true);
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const int64_t record_size = quant::record_bytes(static_cast<int>(bits), bucket_size);
  at::Tensor payload = at::empty({num_buckets, record_size}, x.options().dtype(at::kByte));
  const BucketLayout layout = make_layout(bucket_table, numel, bucket_size, 0);
  uint8_t* out = payload.data_ptr<uint8_t>();
  float* res = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const uint64_t useed = static_cast<uint64_t>(seed);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pycomm_quantize_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    quant::dispatch_bits(static_cast<int>(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          quantize_layout_bucket<scalar_t, kBits>(xp, res, layout, k, k >= skip_begin && k < skip_end,
                                                  out + k * record_size, bucket_size, stochastic, useed, streams);
        }
      });
    });
  });
  return payload;
}

void dequantize_into_mixed_cpu(const at::Tensor& payload, at::Tensor out, const at::Tensor& table, int64_t bits,
                               int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  const MixedTableInfo info = check_dequantize_into_mixed_args(payload, out, table, bits, bucket_size, host_table);
  const BucketLayout layout = make_layout(table, out.numel(), bucket_size, 0);
  const MixedRecords records = make_mixed_records(table, 0, info.total_bytes, bucket_size);
  const uint8_t* in = payload.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pycomm_dequantize_mixed_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, info.count, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        int bucket_bits;
        int64_t at;
        if (!records.record(k, bucket_bits, at)) continue;
        int64_t offset, length;
        layout.range(k, offset, length);
        quant::dispatch_bits(bucket_bits, [&](auto bits_c) {
          dequantize_bucket<scalar_t, decltype(bits_c)::value>(in + at, op, offset, length);
        });
      }
    });
  });
}

void dequantize_into_cpu(const at::Tensor& payload, at::Tensor out, const c10::optional<at::Tensor>& bucket_table,
                         int64_t bits, int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  if (is_mixed_table(bucket_table))
    return dequantize_into_mixed_cpu(payload, out, *bucket_table, bits, bucket_size, host_table);
  check_no_host_table(host_table, -1);
  check_dequantize_into_args(payload, out, bucket_table, bits, bucket_size);
  const int64_t num_buckets = payload.size(0);
  const int64_t record_size = payload.size(1);
  const BucketLayout layout = make_layout(bucket_table, out.numel(), bucket_size, 0);
  const uint8_t* in = payload.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pycomm_dequantize_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    quant::dispatch_bits(static_cast<int>(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          int64_t offset, length;
          layout.range(k, offset, length);
          dequantize_bucket<scalar_t, kBits>(in + k * record_size, op, offset, length);
        }
      });
    });
  });
}

at::Tensor dequantize_sum_mixed_cpu(const at::Tensor& payloads, const c10::optional<at::Tensor>& init_in,
                                    const at::Tensor& table, int64_t first_row, int64_t bits, int64_t bucket_size,
                                    const c10::optional<at::Tensor>& host_table) {
  const auto checked =
      check_dequantize_sum_mixed_args(payloads, init_in, table, first_row, bits, bucket_size, host_table);
  const int64_t num_buckets = checked.second;
  const int64_t sources = payloads.size(0), payload_bytes = payloads.size(1);
  at::Tensor out = at::empty({num_buckets * bucket_size}, payloads.options().dtype(at::kFloat));
  at::Tensor init;
  BucketLayout layout{};
  if (init_in.has_value()) {
    init = init_in->contiguous();
    layout = make_layout(table, init.numel(), bucket_size, first_row);
  }
  const MixedRecords records = make_mixed_records(table, first_row, payload_bytes, bucket_size);
  const uint8_t* in = payloads.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const at::ScalarType init_type = init.defined() ? init.scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_type, "pycomm_dequantize_sum_mixed_cpu", [&] {
    const scalar_t* ip = init.defined() ? init.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        float* acc = op + k * bucket_size;
        start_bucket_sum(acc, ip, layout, k, bucket_size);
        int bucket_bits;
        int64_t at;
        if (!records.record(k, bucket_bits, at)) continue;
        quant::dispatch_bits(bucket_bits, [&](auto bits_c) {
          for (int64_t s = 0; s < sources; ++s)
            accumulate_bucket<decltype(bits_c)::value>(in + s * payload_bytes + at, acc, bucket_size);
        });
      }
    });
  });
  return out;
}

at::Tensor dequantize_sum_cpu(const at::Tensor& payloads, const c10::optional<at::Tensor>& init_in,
                              const c10::optional<at::Tensor>& bucket_table, int64_t init_bucket_begin, int64_t bits,
                              int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  if (is_mixed_table(bucket_table))
    return dequantize_sum_mixed_cpu(payloads, init_in, *bucket_table, init_bucket_begin, bits, bucket_size,
                                    host_table);
  check_no_host_table(host_table, -1);
  check_dequantize_sum_args(payloads, init_in, bucket_table, init_bucket_begin, bits, bucket_size);
  const int64_t sources = payloads.size(0), num_buckets = payloads.size(1), record_size = payloads.size(2);
  at::Tensor out = at::empty({num_buckets * bucket_size}, payloads.options().dtype(at::kFloat));
  at::Tensor init;
  BucketLayout layout{};
  if (init_in.has_value()) {
    init = init_in->contiguous();
    layout = make_layout(bucket_table, init.numel(), bucket_size, init_bucket_begin);
  }
  const uint8_t* in = payloads.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const at::ScalarType init_type = init.defined() ? init.scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_type, "pycomm_dequantize_sum_cpu", [&] {
    const scalar_t* ip = init.defined() ? init.data_ptr<scalar_t>() : nullptr;
    quant::dispatch_bits(static_cast<int>(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          float* acc = op + k * bucket_size;
          start_bucket_sum(acc, ip, layout, k, bucket_size);
          for (int64_t s = 0; s < sources; ++s)
            accumulate_bucket<kBits>(in + (s * num_buckets + k) * record_size, acc, bucket_size);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize_into", &dequantize_into_cpu);
  m.impl("dequantize_sum", &dequantize_sum_cpu);
}

}  // namespace pycomm
