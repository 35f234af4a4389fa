// The pycomm quantized byte format, shared by the CPU and CUDA kernels.
//
// A tensor of n elements, quantized with `bits` b in [1, 8] and bucket size B
// (a positive multiple of 8), is a sequence of fixed-size bucket records:
//
//   payload : uint8[num_buckets][record_bytes(b, B)]
//   record  : bytes 0..3  min  (float32, little-endian)
//             bytes 4..7  unit (float32, little-endian)
//             bytes 8..   B levels of b bits, packed
//
// Levels are packed in groups of 8: the 8 levels of a group form the 8*b-bit
// little-endian integer sum(level[j] << (j * b)), written as b bytes. Group g
// of a record starts at byte 8 + g * b. A bucket holds at most B elements; the
// unused levels of a short bucket are zero, so every record has the same size
// and a run of buckets is one contiguous slice that can be sent as it is.
//
// Value x of a bucket with minimum m and unit u = (max - m) / (2^b - 1) is
// encoded as level = clamp(floor((x - m) * (1 / u) + r), 0, 2^b - 1) with
// r = 1/2 (nearest) or r ~ U[0, 1) from Philox (stochastic, unbiased), and
// decoded as m + level * u. A bucket whose elements are all equal has u = 0.
//
// Wide buckets: finite elements whose range max - m exceeds float32 (e.g.
// [-1e38, 3e38]) would overflow both m + level * u and x - m. A record is
// wide when its unit is finite and (2^b - 1) * u overflows float32; it is
// decoded as (m + h) + h with h = level * (u / 2), and encoded with
// (x / 2 - m / 2) * (1 / (u / 2)) in place of (x - m) * (1 / u). Its unit is
// max / (2^b - 1) - m / (2^b - 1), except at b = 1, where no float32 unit
// spans the range: u = FLT_MAX (the top level decodes to m + FLT_MAX, within
// half the range of max). In every record the unit is lowered, ulp by ulp,
// until the top level decodes finite; for ordinary buckets (every range up to
// about FLT_MAX) none of this changes a bit.
// A bucket that holds a NaN or an infinity is written as min = unit = NaN with
// all levels 0: it decodes to NaN, so an overflow is never hidden.
//
// Mixed bit widths: with a 4-column bucket table (bucket_layout.h) each
// bucket has its own b, and the payload is the flat byte sequence of the
// records, each exactly the record above for its b, packed back to back.
#pragma once

#include "pycomm/common.h"
#include "pycomm/philox.h"

#include <type_traits>

namespace pycomm {
namespace quant {

constexpr int kHeaderBytes = 8;
constexpr int kGroup = 8;
constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;
constexpr float kFloatMax = 3.402823466e+38f;

PYCOMM_HD int64_t record_bytes(int bits, int64_t bucket_size) {
  return kHeaderBytes + bucket_size * bits / 8;
}

PYCOMM_HD uint32_t max_level(int bits) { return (1u << bits) - 1u; }

struct BucketScale {
  float min;
  float unit;
  float inv_unit;  // 0 when unit == 0, so every element maps to level 0; 1 / (unit / 2) when wide
  bool wide;       // see the top of this file
};

// Whether a record with this unit is wide: finite unit, (2^b - 1) * unit
// overflows. A NaN or infinite unit (a non-finite bucket, or a hostile header)
// is never wide, so those records decode exactly as before.
PYCOMM_HD bool is_wide(float unit, int bits) {
  const float a = unit < 0.0f ? -unit : unit;
  return a <= kFloatMax && !(mul_rn(static_cast<float>(max_level(bits)), a) <= kFloatMax);
}

// Decoding of an ordinary (not wide) record.
PYCOMM_HD float decode_level(uint32_t level, float mn, float unit) {
  // Through int32 (exact for levels <= 255): unsigned->float does not vectorize on x86.
  return add_rn(mn, mul_rn(static_cast<float>(static_cast<int32_t>(level)), unit));
}

// Decoding of a wide record: (m + h) + h, h = level * (u / 2), which stays
// finite where m + level * u would overflow.
PYCOMM_HD float decode_level_wide(uint32_t level, float mn, float unit) {
  const float h = mul_rn(static_cast<float>(static_cast<int32_t>(level)), mul_rn(unit, 0.5f));
  return add_rn(add_rn(mn, h), h);
}

PYCOMM_HD float decode_any(uint32_t level, float mn, float unit, bool wide) {
  return wide ? decode_level_wide(level, mn, unit) : decode_level(level, mn, unit);
}

// `nonfinite` is nonzero when the bucket held a NaN or an infinity.
PYCOMM_HD BucketScale make_scale(float mn, float mx, bool nonfinite, int bits) {
  BucketScale s;
  s.wide = false;
  if (nonfinite) {
    const float nan = bits_float(0x7fc00000u);
    s.min = nan;
    s.unit = nan;
    s.inv_unit = 0.0f;
    return s;
  }
  // +0 and -0 compare equal, so which one a min/max scan keeps depends on the
  // scan order; adding +0 turns -0 into +0 and makes the header independent of it.
  mn = add_rn(mn, 0.0f);
  mx = add_rn(mx, 0.0f);
  const float levels = static_cast<float>(max_level(bits));
  float unit = sub_rn(mx, mn) / levels;
  if (!(unit <= kFloatMax)) {
    // mx - mn overflowed (mn < 0 < mx): a wide bucket. Each quotient is at most
    // FLT_MAX / 2 for b >= 2, so their difference is finite.
    unit = bits == 1 ? kFloatMax : sub_rn(div_rn(mx, levels), div_rn(mn, levels));
  }
  bool wide = is_wide(unit, bits);
  // The top level must decode finite. Rounding can push m + (2^b - 1) * u just
  // past FLT_MAX when max is near it; each step lowers u by one ulp (a few
  // steps at most; the bound only guards against a caller's impossible range).
  for (int step = 0; step < 64 && unit > 0.0f; ++step) {
    const float top = decode_any(max_level(bits), mn, unit, wide);
    if (top <= kFloatMax && top >= -kFloatMax) break;
    unit = bits_float(float_bits(unit) - 1u);
    wide = is_wide(unit, bits);
  }
  s.min = mn;
  s.unit = unit;
  s.wide = wide;
  if (wide)
    s.inv_unit = 1.0f / mul_rn(unit, 0.5f);
  else
    s.inv_unit = unit > 0.0f ? 1.0f / unit : 0.0f;
  return s;
}

// Written so that NaN maps to level 0 and the float->int conversion is always
// defined (its operand is in [0, max_level]).
PYCOMM_HD uint32_t encode_level(float x, const BucketScale& s, float r, float max_lev) {
  float t = add_rn(mul_rn(sub_rn(x, s.min), s.inv_unit), r);
  t = t > 0.0f ? t : 0.0f;
  t = t < max_lev ? t : max_lev;
  // Through int32: the same value for t in [0, 255], and it vectorizes on CPUs.
  return static_cast<uint32_t>(static_cast<int32_t>(t));
}

// encode_level of a wide bucket (s.inv_unit = 1 / (unit / 2)): halves first, so
// that x - m cannot overflow.
PYCOMM_HD uint32_t encode_level_wide(float x, const BucketScale& s, float r, float max_lev) {
  float t = add_rn(mul_rn(sub_rn(mul_rn(x, 0.5f), mul_rn(s.min, 0.5f)), s.inv_unit), r);
  t = t > 0.0f ? t : 0.0f;
  t = t < max_lev ? t : max_lev;
  return static_cast<uint32_t>(static_cast<int32_t>(t));
}

PYCOMM_HD void write_header(uint8_t* record, float mn, float unit) {
  const uint32_t a = float_bits(mn), b = float_bits(unit);
  for (int i = 0; i < 4; ++i) {
    record[i] = static_cast<uint8_t>(a >> (8 * i));
    record[4 + i] = static_cast<uint8_t>(b >> (8 * i));
  }
}

PYCOMM_HD void read_header(const uint8_t* record, float& mn, float& unit) {
  uint32_t a = 0, b = 0;
  for (int i = 0; i < 4; ++i) {
    a |= static_cast<uint32_t>(record[i]) << (8 * i);
    b |= static_cast<uint32_t>(record[4 + i]) << (8 * i);
  }
  mn = bits_float(a);
  unit = bits_float(b);
}

// True for a record that decodes to exact zeros (min 0, unit 0): used for the
// empty buckets of padding and for a rank's own chunk, which it keeps in full
// precision. Reducers skip such records.
PYCOMM_HD bool is_zero_record(const uint8_t* record) {
  uint32_t any = 0;
  for (int i = 0; i < kHeaderBytes; ++i) any |= record[i];
  return any == 0;
}

PYCOMM_HD void store_group(uint8_t* dst, uint64_t word, int bits) {
  for (int i = 0; i < bits; ++i) dst[i] = static_cast<uint8_t>(word >> (8 * i));
}

PYCOMM_HD uint64_t load_group(const uint8_t* src, int bits) {
  uint64_t word = 0;
  for (int i = 0; i < bits; ++i) word |= static_cast<uint64_t>(src[i]) << (8 * i);
  return word;
}

PYCOMM_HD uint32_t level_in_group(uint64_t word, int j, int bits) {
  return static_cast<uint32_t>(word >> (j * bits)) & max_level(bits);
}

// Where payload bucket k's stochastic-rounding draws start in the Philox
// stream: row_streams[k] when the caller gives one entry per bucket (the
// quantize op's `row_streams`, which ties a bucket's draws to the parameter
// it holds rather than to its place in the payload), else k * B (its position
// in the payload). Entries are meant to be multiples of 8 (the CPU op checks;
// on CUDA any value is only an RNG counter and stays memory-safe). Unsigned,
// so that no entry, however hostile, makes the arithmetic undefined.
PYCOMM_HD uint64_t row_stream_base(const int64_t* row_streams, int64_t bucket, int64_t bucket_size) {
  return row_streams != nullptr ? static_cast<uint64_t>(row_streams[bucket])
                                : static_cast<uint64_t>(bucket) * static_cast<uint64_t>(bucket_size);
}

// The rounding offsets r of kGroups consecutive groups of 8 elements, from
// group `first_group` of a bucket whose draws start at `stream_base`
// (row_stream_base). Stochastic rounding draws element j of the bucket from
// the Philox stochastic-rounding stream at index stream_base + j, so with
// stream_base a multiple of 8 a group of 8 is exactly two Philox blocks.
// (Any other base is read as first_block = (stream_base + first_group * 8) >> 2,
// in wrapping uint64 arithmetic: the same on every device.) Round to nearest
// uses r = 1/2.
template <int kGroups>
PYCOMM_HD void rounding_offsets_groups(bool stochastic, uint64_t seed, uint64_t stream_base, int64_t first_group,
                                       float (&r)[kGroups * kGroup]) {
  if (!stochastic) {
    for (int j = 0; j < kGroups * kGroup; ++j) r[j] = 0.5f;
    return;
  }
  const uint64_t first_block = (stream_base + static_cast<uint64_t>(first_group) * kGroup) >> 2;
  philox::unit_floats<2 * kGroups>(seed, philox::kStreamStochasticRounding, first_block, r);
}

PYCOMM_HD void rounding_offsets(bool stochastic, uint64_t seed, uint64_t stream_base, int64_t group,
                                float (&r)[kGroup]) {
  rounding_offsets_groups<1>(stochastic, seed, stream_base, group, r);
}

// Encodes up to 8 values (n <= 8; the rest of the group is level 0) into one
// group word and returns it; `decoded` receives what the receiver will see.
template <int kBits>
PYCOMM_HD uint64_t encode_group(const float (&v)[kGroup], int n, const BucketScale& s, const float (&r)[kGroup],
                                float (&decoded)[kGroup]) {
  const float max_lev = static_cast<float>(max_level(kBits));
  uint64_t word = 0;
  if (s.wide) {
    for (int j = 0; j < kGroup; ++j) {
      const uint32_t level = j < n ? encode_level_wide(v[j], s, r[j], max_lev) : 0u;
      decoded[j] = decode_level_wide(level, s.min, s.unit);
      word |= static_cast<uint64_t>(level) << (j * kBits);
    }
    return word;
  }
  for (int j = 0; j < kGroup; ++j) {
    const uint32_t level = j < n ? encode_level(v[j], s, r[j], max_lev) : 0u;
    decoded[j] = decode_level(level, s.min, s.unit);
    word |= static_cast<uint64_t>(level) << (j * kBits);
  }
  return word;
}

// Calls f(std::integral_constant<int, bits>) so kernels get the bit width as a
// compile-time constant (constant shifts, unrolled packing). Host code only.
template <typename F>
inline void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace quant
}  // namespace pycomm
