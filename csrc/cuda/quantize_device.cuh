// Per-thread building blocks of the CUDA quantization kernels.
//
// Everything here is __host__ __device__ (PYCOMM_HD) and free of warp
// intrinsics, so the exact work of one GPU thread can also be run on the host:
// the kernels in quantize_kernels.cu are these phases glued together with a
// warp/block reduction. All float arithmetic goes through the shared format
// header (quant_format.h) or the *_rn helpers of common.h, so CPU and CUDA
// round every step identically.
//
// Includes only CUDA headers and pycomm's own headers (no torch).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <stdint.h>
#include <string.h>

#include "pycomm/bucket_layout.h"
#include "pycomm/common.h"
#include "pycomm/philox.h"
#include "pycomm/quant_format.h"
#include "element_types.cuh"

namespace pycomm {
namespace qdev {

using quant::kGroup;

// ---------------------------------------------------------------------------
// Raw memory access: 16-byte vector loads/stores when the address allows it.

PYCOMM_HD bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Read-only data (x, init, payloads): through the non-coherent cache.
PYCOMM_HD uint4 load16_ro(const void* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  uint4 v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// Data the kernel also writes (the residual).
PYCOMM_HD uint4 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}

PYCOMM_HD void store16(void* p, uint4 v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = v;
#else
  memcpy(p, &v, sizeof(v));
#endif
}

// ---------------------------------------------------------------------------
// NaN bit patterns. The GPU's float arithmetic returns one canonical NaN,
// while the CPU (x86 SSE/AVX) propagates the NaN operand, quieted, and
// produces the "default NaN" 0xFFC00000 for invalid operations (inf - inf,
// 0 * inf). Float results that the ops store (dequantized values, sums) are
// patched on the rare NaN path so that their bits match the CPU's too.

constexpr uint32_t kX86DefaultNaN = 0xFFC00000u;


PYCOMM_HD float x86_nan_result(float a, float b) {
  if (is_nan(a)) return bits_float(float_bits(a) | kQuietBit);
  if (is_nan(b)) return bits_float(float_bits(b) | kQuietBit);
  return bits_float(kX86DefaultNaN);
}

// quant::decode_level (decode_level_wide for a wide record) with the CPU's NaN
// bits. A wide record has a finite unit, so its NaN can only come from mn and
// has mn's bits, as the formula below gives.
PYCOMM_HD float decode_value(uint32_t level, float mn, float unit, bool wide) {
  const float d = quant::decode_any(level, mn, unit, wide);
  if (!is_nan(d)) return d;
  const float lev = static_cast<float>(level);
  float m = mul_rn(lev, unit);
  if (is_nan(m)) m = x86_nan_result(lev, unit);
  return x86_nan_result(mn, m);
}

// acc + d (add_rn) with the CPU's NaN bits. When both are NaN the CPU build
// returns d's (its vectorized loop computes d + acc), so d is tried first.
PYCOMM_HD float accumulate(float acc, float d) {
  const float s = add_rn(acc, d);
  return is_nan(s) ? x86_nan_result(d, acc) : s;
}

PYCOMM_HD void unpack_halves(uint32_t w, uint16_t& lo, uint16_t& hi) {
  lo = static_cast<uint16_t>(w);
  hi = static_cast<uint16_t>(w >> 16);
}

// Loads n <= 8 consecutive elements as float (the rest of v is 0): one or two
// 16-byte loads for a full, aligned group, scalar loads otherwise.
template <DType D, bool kReadOnly>
PYCOMM_HD void load8(const typename Elem<D>::Storage* p, int n, float (&v)[kGroup]) {
  if (n == kGroup && aligned_to(p, 16)) {
    if constexpr (D == DType::Float32) {
      const uint4 a = kReadOnly ? load16_ro(p) : load16(p);
      const uint4 b = kReadOnly ? load16_ro(p + 4) : load16(p + 4);
      v[0] = bits_float(a.x); v[1] = bits_float(a.y); v[2] = bits_float(a.z); v[3] = bits_float(a.w);
      v[4] = bits_float(b.x); v[5] = bits_float(b.y); v[6] = bits_float(b.z); v[7] = bits_float(b.w);
    } else {
      const uint4 a = kReadOnly ? load16_ro(p) : load16(p);
      const uint32_t w[4] = {a.x, a.y, a.z, a.w};
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        unpack_halves(w[i], lo, hi);
        v[2 * i] = Elem<D>::to_float(lo);
        v[2 * i + 1] = Elem<D>::to_float(hi);
      }
    }
    return;
  }
  for (int j = 0; j < kGroup; ++j) v[j] = j < n ? Elem<D>::to_float(p[j]) : 0.0f;
}

// Stores the first n <= 8 values of v, converted to the element type.
template <DType D>
PYCOMM_HD void store8(typename Elem<D>::Storage* p, int n, const float (&v)[kGroup]) {
  if (n == kGroup && aligned_to(p, 16)) {
    if constexpr (D == DType::Float32) {
      store16(p, make_uint4(float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3])));
      store16(p + 4, make_uint4(float_bits(v[4]), float_bits(v[5]), float_bits(v[6]), float_bits(v[7])));
    } else {
      uint32_t w[4];
      for (int i = 0; i < 4; ++i)
        w[i] = static_cast<uint32_t>(Elem<D>::from_float(v[2 * i])) |
               (static_cast<uint32_t>(Elem<D>::from_float(v[2 * i + 1])) << 16);
      store16(p, make_uint4(w[0], w[1], w[2], w[3]));
    }
    return;
  }
  for (int j = 0; j < kGroup; ++j)
    if (j < n) p[j] = Elem<D>::from_float(v[j]);
}

// quant::store_group / load_group, as one word access when the bit width
// makes a group a 1-, 2-, 4- or 8-byte word and the address is aligned. The
// bytes are the same (little endian); the fallback is the shared function.
template <int kBits>
PYCOMM_HD void store_group_word(uint8_t* dst, uint64_t word) {
#if defined(__CUDA_ARCH__)
  if constexpr (kBits == 8) {
    if (aligned_to(dst, 8)) { *reinterpret_cast<uint64_t*>(dst) = word; return; }
  } else if constexpr (kBits == 4) {
    if (aligned_to(dst, 4)) { *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(word); return; }
  } else if constexpr (kBits == 2) {
    if (aligned_to(dst, 2)) { *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(word); return; }
  }
#endif
  quant::store_group(dst, word, kBits);
}

template <int kBits>
PYCOMM_HD uint64_t load_group_word(const uint8_t* src) {
#if defined(__CUDA_ARCH__)
  if constexpr (kBits == 8) {
    if (aligned_to(src, 8)) return __ldg(reinterpret_cast<const unsigned long long*>(src));
  } else if constexpr (kBits == 4) {
    if (aligned_to(src, 4)) return __ldg(reinterpret_cast<const unsigned int*>(src));
  } else if constexpr (kBits == 2) {
    if (aligned_to(src, 2)) return __ldg(reinterpret_cast<const unsigned short*>(src));
  }
#endif
  return quant::load_group(src, kBits);
}

// ---------------------------------------------------------------------------
// Quantize.

struct QuantizeParams {
  const void* x;         // [numel] elements of the dtype the kernel is instantiated for
  float* residual;       // nullptr, or [numel] float32 updated in place
  BucketLayout layout;   // where bucket k reads from (first_bucket = 0)
  uint8_t* payload;      // [num_buckets][record_bytes], or the flat records of a mixed table
  MixedRecords mixed;    // mixed.table == nullptr: every record has record_size bytes
  int64_t num_buckets;
  int64_t record_size;
  int64_t skip_begin;    // buckets in [skip_begin, skip_end) become zero records
  int64_t skip_end;
  uint64_t seed;
  const int64_t* row_streams;  // nullptr, or [num_buckets]: where bucket k's draws start (quant::row_stream_base)
  int stochastic;
  int threads_per_bucket;  // 32, 64, 128 or 256
};

struct BucketJob {
  int64_t bucket;
  uint64_t stream_base;  // Philox index of the bucket's first draw (stochastic rounding only)
  int64_t offset;
  int64_t length;
  int64_t used_groups;  // groups holding elements: ceil(length / 8)
  int64_t groups;       // groups of the record: bucket_size / 8
  uint8_t* record;
  int bits;             // this bucket's bit width (mixed tables)
  bool valid;           // false: a mixed-table row that is malformed; the bucket is left alone
  bool zero;            // write an all-zero record (skipped, empty or past the end)
};

PYCOMM_HD BucketJob make_job(const QuantizeParams& p, int64_t k) {
  BucketJob job;
  job.bucket = k;
  // Read once per bucket and only when used; row_streams has num_buckets
  // entries (the op checks its length), so k < num_buckets stays in bounds.
  job.stream_base = p.stochastic != 0 && k < p.num_buckets
                        ? quant::row_stream_base(p.row_streams, k, p.layout.bucket_size) : 0;
  job.groups = p.layout.bucket_size / kGroup;
  job.bits = quant::kMinBits;
  job.valid = true;
  if (p.mixed.table != nullptr) {
    int64_t at = 0;
    job.valid = k < p.num_buckets && p.mixed.record(k, job.bits, at);
    job.record = p.payload + (job.valid ? at : 0);
  } else {
    job.record = p.payload + k * p.record_size;
  }
  job.offset = 0;
  job.length = 0;
  if (k < p.num_buckets && !(k >= p.skip_begin && k < p.skip_end)) p.layout.range(k, job.offset, job.length);
  job.used_groups = (job.length + kGroup - 1) / kGroup;
  job.zero = job.length == 0;
  return job;
}

// The range of a bucket, reduced over threads with the CPU's comparisons
// (NaN never replaces an extreme). Which of +0/-0 wins does not matter:
// make_scale canonicalizes both to +0.
struct RangePartial {
  float mn;
  float mx;
  uint32_t bad;   // nonzero if any element is NaN or +-Inf
};

PYCOMM_HD void range_init(RangePartial& r) {
  r.mn = bits_float(0x7F800000u);   // +inf
  r.mx = bits_float(0xFF800000u);   // -inf
  r.bad = 0;
}

// Same comparisons as the CPU: NaN never replaces an extreme.
PYCOMM_HD void range_group(RangePartial& r, const float (&v)[kGroup], int n) {
  for (int j = 0; j < kGroup; ++j) {
    if (j >= n) continue;
    const float x = v[j];
    r.mn = x < r.mn ? x : r.mn;
    r.mx = x > r.mx ? x : r.mx;
    r.bad |= sub_rn(x, x) == 0.0f ? 0u : 1u;  // x - x is NaN exactly for NaN and +-Inf
  }
}

PYCOMM_HD void range_combine(RangePartial& a, const RangePartial& b) {
  a.mn = b.mn < a.mn ? b.mn : a.mn;
  a.mx = b.mx > a.mx ? b.mx : a.mx;
  a.bad |= b.bad;
}

PYCOMM_HD quant::BucketScale range_scale(const RangePartial& r, int bits) {
  return quant::make_scale(r.mn, r.mx, r.bad != 0, bits);
}

// Loads the n values of group g of the bucket: x (+ residual), as the CPU's
// load_value.
template <DType D>
PYCOMM_HD void load_bucket_group(const QuantizeParams& p, const BucketJob& job, int64_t g, int n,
                                 float (&v)[kGroup]) {
  using S = typename Elem<D>::Storage;
  const int64_t at = job.offset + g * kGroup;
  load8<D, true>(static_cast<const S*>(p.x) + at, n, v);
  if (p.residual != nullptr) {
    float r[kGroup];
    load8<DType::Float32, false>(p.residual + at, n, r);
    for (int j = 0; j < kGroup; ++j) v[j] = j < n ? add_rn(v[j], r[j]) : 0.0f;
  }
}

PYCOMM_HD int group_count(const BucketJob& job, int64_t g) {
  const int64_t left = job.length - g * kGroup;
  return static_cast<int>(left < kGroup ? left : kGroup);
}

// Phase 1 of thread `tid` of the `tpb` threads of a bucket: the range of its
// groups g = tid, tid + tpb, ... With kCache > 0 (the launcher guarantees
// groups <= kCache * tpb), the loaded values stay in `cache` for phase 2.
template <DType D, int kCache>
PYCOMM_HD void quantize_phase1(const QuantizeParams& p, const BucketJob& job, int tid, int tpb, RangePartial& part,
                               float (&cache)[kCache > 0 ? kCache : 1][kGroup]) {
  if (job.zero) return;
  if constexpr (kCache > 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < kCache; ++c) {
      const int64_t g = tid + static_cast<int64_t>(c) * tpb;
      if (g < job.used_groups) {
        const int n = group_count(job, g);
        load_bucket_group<D>(p, job, g, n, cache[c]);
        range_group(part, cache[c], n);
      }
    }
  } else {
    (void)cache;
    for (int64_t g = tid; g < job.used_groups; g += tpb) {
      const int n = group_count(job, g);
      float v[kGroup];
      load_bucket_group<D>(p, job, g, n, v);
      range_group(part, v, n);
    }
  }
}

// Encodes (or zero-fills) group g of the record.
template <DType D, int kBits>
PYCOMM_HD void quantize_group(const QuantizeParams& p, const BucketJob& job, const quant::BucketScale& scale,
                              bool nonfinite, int64_t g, const float (&v)[kGroup]) {
  uint8_t* dst = job.record + quant::kHeaderBytes + g * kBits;
  if (job.zero || nonfinite || g >= job.used_groups) {
    store_group_word<kBits>(dst, 0);
    return;
  }
  const int n = group_count(job, g);
  float r[kGroup], decoded[kGroup];
  quant::rounding_offsets(p.stochastic != 0, p.seed, job.stream_base, g, r);
  const uint64_t word = quant::encode_group<kBits>(v, n, scale, r, decoded);
  store_group_word<kBits>(dst, word);
  if (p.residual != nullptr) {
    float e[kGroup];
    for (int j = 0; j < kGroup; ++j) e[j] = j < n ? sub_rn(v[j], decoded[j]) : 0.0f;
    store8<DType::Float32>(p.residual + job.offset + g * kGroup, n, e);
  }
}

// Phase 2: header (thread 0) and the groups g = tid, tid + tpb, ... of the
// record, all of them (short and empty buckets get zero levels).
template <DType D, int kBits, int kCache>
PYCOMM_HD void quantize_phase2(const QuantizeParams& p, const BucketJob& job, int tid, int tpb,
                               const RangePartial& range, const float (&cache)[kCache > 0 ? kCache : 1][kGroup]) {
  quant::BucketScale scale;
  bool nonfinite = false;
  if (job.zero) {
    scale.min = 0.0f;
    scale.unit = 0.0f;
    scale.inv_unit = 0.0f;
    scale.wide = false;
  } else {
    scale = range_scale(range, kBits);
    nonfinite = range.bad != 0;
  }
  if (tid == 0) quant::write_header(job.record, scale.min, scale.unit);
  if constexpr (kCache > 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < kCache; ++c) {
      const int64_t g = tid + static_cast<int64_t>(c) * tpb;
      if (g < job.groups) quantize_group<D, kBits>(p, job, scale, nonfinite, g, cache[c]);
    }
  } else {
    (void)cache;
    const bool encode = !job.zero && !nonfinite;
    for (int64_t g = tid; g < job.groups; g += tpb) {
      float v[kGroup];
      if (encode && g < job.used_groups) {
        load_bucket_group<D>(p, job, g, group_count(job, g), v);
      } else {
        for (int j = 0; j < kGroup; ++j) v[j] = 0.0f;
      }
      quantize_group<D, kBits>(p, job, scale, nonfinite, g, v);
    }
  }
}

// Phase 2 with the bucket's bit width chosen at run time (mixed tables): every
// thread of a bucket takes the same branch.
template <DType D, int kCache>
PYCOMM_HD void quantize_phase2_mixed(const QuantizeParams& p, const BucketJob& job, int tid, int tpb,
                                     const RangePartial& range,
                                     const float (&cache)[kCache > 0 ? kCache : 1][kGroup]) {
  switch (job.bits) {
    case 1: quantize_phase2<D, 1, kCache>(p, job, tid, tpb, range, cache); break;
    case 2: quantize_phase2<D, 2, kCache>(p, job, tid, tpb, range, cache); break;
    case 3: quantize_phase2<D, 3, kCache>(p, job, tid, tpb, range, cache); break;
    case 4: quantize_phase2<D, 4, kCache>(p, job, tid, tpb, range, cache); break;
    case 5: quantize_phase2<D, 5, kCache>(p, job, tid, tpb, range, cache); break;
    case 6: quantize_phase2<D, 6, kCache>(p, job, tid, tpb, range, cache); break;
    case 7: quantize_phase2<D, 7, kCache>(p, job, tid, tpb, range, cache); break;
    default: quantize_phase2<D, 8, kCache>(p, job, tid, tpb, range, cache); break;
  }
}

// ---------------------------------------------------------------------------
// Dequantize into a tensor: one thread per group of a bucket.

struct DequantizeParams {
  const uint8_t* payload;  // [num_buckets][record_size], or the flat records of a mixed table
  void* out;
  BucketLayout layout;     // first_bucket = 0, numel = out's elements
  MixedRecords mixed;      // used by the kBits = 0 (mixed) instantiation
  int64_t num_buckets;
  int64_t record_size;
};

template <DType D, int kBits>
PYCOMM_HD void dequantize_record_group(const DequantizeParams& p, const uint8_t* record, int64_t k, int64_t g) {
  int64_t offset, length;
  p.layout.range(k, offset, length);
  const int64_t base = g * kGroup;
  if (base >= length) return;
  const int n = static_cast<int>(length - base < kGroup ? length - base : kGroup);
  float mn, unit;
  quant::read_header(record, mn, unit);
  const bool wide = quant::is_wide(unit, kBits);
  const uint64_t word = load_group_word<kBits>(record + quant::kHeaderBytes + g * kBits);
  float v[kGroup];
  for (int j = 0; j < kGroup; ++j) v[j] = decode_value(quant::level_in_group(word, j, kBits), mn, unit, wide);
  store8<D>(static_cast<typename Elem<D>::Storage*>(p.out) + offset + base, n, v);
}

// kBits = 0: the bit width and the record's place come from the mixed table.
template <DType D, int kBits>
PYCOMM_HD void dequantize_group(const DequantizeParams& p, int64_t k, int64_t g) {
  if constexpr (kBits == 0) {
    int bits = 0;
    int64_t at = 0;
    if (!p.mixed.record(k, bits, at)) return;
    const uint8_t* record = p.payload + at;
    switch (bits) {
      case 1: dequantize_record_group<D, 1>(p, record, k, g); break;
      case 2: dequantize_record_group<D, 2>(p, record, k, g); break;
      case 3: dequantize_record_group<D, 3>(p, record, k, g); break;
      case 4: dequantize_record_group<D, 4>(p, record, k, g); break;
      case 5: dequantize_record_group<D, 5>(p, record, k, g); break;
      case 6: dequantize_record_group<D, 6>(p, record, k, g); break;
      case 7: dequantize_record_group<D, 7>(p, record, k, g); break;
      default: dequantize_record_group<D, 8>(p, record, k, g); break;
    }
  } else {
    dequantize_record_group<D, kBits>(p, p.payload + k * p.record_size, k, g);
  }
}

// ---------------------------------------------------------------------------
// Sum of dequantized payloads (+ init): one thread per group of a bucket.

struct DequantizeSumParams {
  const uint8_t* payloads;  // [sources][num_buckets][record_size], or [sources][mixed.payload_bytes]
  const void* init;         // nullptr, or elements read through layout
  BucketLayout layout;      // first_bucket = init_bucket_begin, numel = init's elements
  MixedRecords mixed;       // used by the kBits = 0 (mixed) instantiation
  float* out;               // [num_buckets * bucket_size]
  int64_t sources;
  int64_t num_buckets;
  int64_t record_size;
};

// acc += the decoded group g of each source's record (at byte `first` of
// source 0, `stride` bytes apart), in source order; zero records are skipped.
template <int kBits>
PYCOMM_HD void accumulate_sources(const DequantizeSumParams& p, int64_t first, int64_t stride, int64_t g,
                                  float (&acc)[kGroup]) {
  for (int64_t s = 0; s < p.sources; ++s) {
    const uint8_t* record = p.payloads + s * stride + first;
    if (quant::is_zero_record(record)) continue;
    float mn, unit;
    quant::read_header(record, mn, unit);
    const bool wide = quant::is_wide(unit, kBits);
    const uint64_t word = load_group_word<kBits>(record + quant::kHeaderBytes + g * kBits);
    for (int j = 0; j < kGroup; ++j)
      acc[j] = accumulate(acc[j], decode_value(quant::level_in_group(word, j, kBits), mn, unit, wide));
  }
}

template <DType D, int kBits>
PYCOMM_HD void dequantize_sum_group(const DequantizeSumParams& p, int64_t k, int64_t g) {
  const int64_t base = g * kGroup;
  float acc[kGroup];
  for (int j = 0; j < kGroup; ++j) acc[j] = 0.0f;
  if (p.init != nullptr) {
    int64_t offset, length;
    p.layout.range(k, offset, length);
    if (base < length) {
      const int n = static_cast<int>(length - base < kGroup ? length - base : kGroup);
      load8<D, true>(static_cast<const typename Elem<D>::Storage*>(p.init) + offset + base, n, acc);
    }
  }
  if constexpr (kBits == 0) {
    int bits = 0;
    int64_t at = 0;
    if (p.mixed.record(k, bits, at)) {
      const int64_t stride = p.mixed.payload_bytes;
      switch (bits) {
        case 1: accumulate_sources<1>(p, at, stride, g, acc); break;
        case 2: accumulate_sources<2>(p, at, stride, g, acc); break;
        case 3: accumulate_sources<3>(p, at, stride, g, acc); break;
        case 4: accumulate_sources<4>(p, at, stride, g, acc); break;
        case 5: accumulate_sources<5>(p, at, stride, g, acc); break;
        case 6: accumulate_sources<6>(p, at, stride, g, acc); break;
        case 7: accumulate_sources<7>(p, at, stride, g, acc); break;
        default: accumulate_sources<8>(p, at, stride, g, acc); break;
      }
    }
  } else {
    accumulate_sources<kBits>(p, k * p.record_size, p.num_buckets * p.record_size, g, acc);
  }
  store8<DType::Float32>(p.out + k * p.layout.bucket_size + base, kGroup, acc);
}

}  // namespace qdev
}  // namespace pycomm
