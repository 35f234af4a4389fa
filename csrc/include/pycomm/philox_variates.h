// Gaussian and Rademacher variates as a pure function of (seed, global
// element index), identical bit for bit on the CPU and on CUDA.
//
// Stream layout (philox.h): the Philox block with counter
// (lo32(b), hi32(b), stream, 0) and key (lo32(seed), hi32(seed)) is "block b".
//
//   Gaussian (stream kStreamGaussian): element i comes from block i / 4, words
//   (w0, w1, w2, w3). Elements 4b, 4b+1 are the Box-Muller pair of (w0, w1),
//   elements 4b+2, 4b+3 the pair of (w2, w3):
//       u     = (float(w_even >> 1) + 0.5) * 2^-31     in (0, 1], never 0
//       r     = sqrt(-2 ln u)                           at most sqrt(64 ln 2) = 6.66
//       theta = 2 pi (w_odd >> 8) / 2^24
//       z_even = r cos(theta),  z_odd = r sin(theta)
//   Rademacher (stream kStreamRademacher): one bit per element. Element i is
//   bit (i % 32) of word (i / 32) % 4 of block i / 128; bit 1 gives -1, bit 0
//   gives +1.
//
// Determinism. libm's and CUDA's logf / sinf / cosf / sqrtf (and their fast
// approximations) differ in the last bits, so none of them is used. The
// transcendental functions below are range reductions done on the integer bits
// plus short polynomials, written only with correctly rounded float
// operations: add_rn / sub_rn / mul_rn (common.h: never contracted into an
// FMA) and div_rn, plus exact integer and int->float conversions. The square
// root is Newton's iteration for 1/sqrt (multiplications and subtractions
// only), so it needs no sqrt instruction either; its loops vectorize on the
// CPU, where a sqrt call does not (errno). Every step therefore rounds the same
// way on any IEEE-754 binary32 machine: the values are exact functions of the
// Philox words. The approximations are accurate to a few float ulps (measured
// on 500k words against double precision: -2 ln u within 1.6e-7 relative,
// the square root 1.9e-7 relative, cos / sin 1e-7 absolute, z within 8e-7 of
// the exact Box-Muller value), which is irrelevant for sampling; only
// determinism is required of them.
//
// Host code including this header must be compiled with -ffp-contract=off
// (setup.py and CMakeLists.txt do so); nvcc honours the *_rn intrinsics.
#pragma once

#include "pycomm/common.h"
#include "pycomm/philox.h"

namespace pycomm {
namespace philox {

enum Distribution : int { kGaussian = 0, kRademacher = 1 };

// ---- Box-Muller pieces ----------------------------------------------------------

// Uniform in (0, 1] from 31 bits of w: (m + 1/2) * 2^-31 with m = w >> 1, as a
// float (int32 -> float rounds to nearest; the scaling by 2^-31 is exact). The
// smallest value is 2^-32, so log(0) cannot happen.
PYCOMM_HD float open_unit_float(uint32_t w) {
  const float m = static_cast<float>(static_cast<int32_t>(w >> 1));
  return mul_rn(add_rn(m, 0.5f), 4.656612873077392578125e-10f);  // 2^-31
}

// -2 ln(u) for u in (0, 1], as a float >= 0 (+0 for u = 1).
// u = 2^k * x with x in [sqrt(1/2), sqrt(2)) taken from the bits;
// ln x = 2 atanh(s), s = (x - 1) / (x + 1), |s| <= 0.1716, by its series to
// s^9 (truncation error below 1e-9 relative); ln 2 is split in a 17-bit head
// (k * head is exact for |k| <= 64) and a tail.
PYCOMM_HD float minus_two_log(float u) {
  uint32_t ix = float_bits(u) + (0x3F800000u - 0x3F3504F3u);
  const int32_t k = static_cast<int32_t>(ix >> 23) - 127;
  ix = (ix & 0x007FFFFFu) + 0x3F3504F3u;
  const float f = sub_rn(bits_float(ix), 1.0f);
  const float s = div_rn(f, add_rn(2.0f, f));
  const float z = mul_rn(s, s);
  float p = add_rn(0.2857142857142857f, mul_rn(z, 0.2222222222222222f));  // 2/7 + z 2/9
  p = add_rn(0.4f, mul_rn(z, p));                                          // 2/5 + ...
  p = add_rn(0.6666666666666666f, mul_rn(z, p));                           // 2/3 + ...
  const float ln1p = add_rn(mul_rn(2.0f, s), mul_rn(mul_rn(s, z), p));
  const float kf = static_cast<float>(k);
  const float ln = add_rn(mul_rn(kf, 0.693145751953125f), add_rn(mul_rn(kf, 1.428606765330187e-06f), ln1p));
  return add_rn(mul_rn(-2.0f, ln), 0.0f);  // + 0: -0 becomes +0
}

// sqrt(a) for a = 0 or a in [2^-126, 2^126]: three Newton steps for 1/sqrt(a)
// from the classic bit-level first guess (relative error 3.4e-2 -> 1.8e-3 ->
// 4.7e-6 -> float rounding), times a. For a = 0 the guess stays finite because
// (a/2 * y) * y is evaluated as written, so the result is 0.
PYCOMM_HD float sqrt_newton(float a) {
  const float half = mul_rn(0.5f, a);
  float y = bits_float(0x5F3759DFu - (float_bits(a) >> 1));
  y = mul_rn(y, sub_rn(1.5f, mul_rn(mul_rn(half, y), y)));
  y = mul_rn(y, sub_rn(1.5f, mul_rn(mul_rn(half, y), y)));
  y = mul_rn(y, sub_rn(1.5f, mul_rn(mul_rn(half, y), y)));
  return mul_rn(a, y);
}

// cos and sin of theta = 2 pi (w >> 8) / 2^24. The nearest quarter turn q is
// split off exactly on the integer: w >> 8 = q * 2^22 + d with d in
// [-2^21, 2^21), so x = d * 2 pi / 2^24 lies in [-pi/4, pi/4) and the
// rotation by q quarter turns is a swap and sign flips. Taylor polynomials:
// sin to x^9, cos to x^10 (truncation error below 2e-9).
PYCOMM_HD void cos_sin_turn(uint32_t w, float& c, float& s) {
  const uint32_t v = w >> 8;
  const uint32_t qq = (v + 0x200000u) >> 22;  // 0..4
  const int32_t d = static_cast<int32_t>(v) - static_cast<int32_t>(qq << 22);
  const uint32_t q = qq & 3u;
  const float x = mul_rn(static_cast<float>(d), 6.28318530717958647692f / 16777216.0f);
  const float x2 = mul_rn(x, x);
  float ps = add_rn(-1.984126984126984e-04f, mul_rn(x2, 2.755731922398589e-06f));  // -1/5040 + x2/9!
  ps = add_rn(8.333333333333333e-03f, mul_rn(x2, ps));                              // 1/120
  ps = add_rn(-0.16666666666666666f, mul_rn(x2, ps));                               // -1/6
  const float sn = add_rn(x, mul_rn(mul_rn(x, x2), ps));
  float pc = add_rn(2.48015873015873e-05f, mul_rn(x2, -2.755731922398589e-07f));  // 1/8! - x2/10!
  pc = add_rn(-1.388888888888889e-03f, mul_rn(x2, pc));                            // -1/720
  pc = add_rn(4.1666666666666664e-02f, mul_rn(x2, pc));                            // 1/24
  pc = add_rn(-0.5f, mul_rn(x2, pc));                                               // -1/2
  const float cn = add_rn(1.0f, mul_rn(x2, pc));
  // q = 1: (cos, sin) = (-sn, cn); q = 2: (-cn, -sn); q = 3: (sn, -cn).
  const uint32_t swap = 0u - (q & 1u);
  const uint32_t cb = (float_bits(cn) & ~swap) | (float_bits(sn) & swap);
  const uint32_t sb = (float_bits(sn) & ~swap) | (float_bits(cn) & swap);
  c = bits_float(cb ^ (((q + 1u) & 2u) << 30));
  s = bits_float(sb ^ ((q & 2u) << 30));
}

// The Box-Muller pair of two Philox words.
PYCOMM_HD void box_muller(uint32_t w_radius, uint32_t w_angle, float& z_cos, float& z_sin) {
  const float r = sqrt_newton(minus_two_log(open_unit_float(w_radius)));
  float c, s;
  cos_sin_turn(w_angle, c, s);
  z_cos = mul_rn(r, c);
  z_sin = mul_rn(r, s);
}

// ---- single elements (reference definitions) ----------------------------------------

// The four Gaussian variates of block b: elements 4b .. 4b+3.
PYCOMM_HD void gaussian_block(uint64_t seed, uint64_t block, float (&z)[4]) {
  const Block w = block_at(seed, kStreamGaussian, block);
  box_muller(w.v[0], w.v[1], z[0], z[1]);
  box_muller(w.v[2], w.v[3], z[2], z[3]);
}

PYCOMM_HD float gaussian_at(uint64_t seed, uint64_t index) {
  float z[4];
  gaussian_block(seed, index >> 2, z);
  return z[index & 3];
}

// +1.0f for bit 0, -1.0f for bit 1 (only the sign bit differs).
PYCOMM_HD float sign_from_bit(uint32_t bit) { return bits_float(0x3F800000u | (bit << 31)); }

PYCOMM_HD float rademacher_at(uint64_t seed, uint64_t index) {
  const Block w = block_at(seed, kStreamRademacher, index >> 7);
  return sign_from_bit((w.v[(index >> 5) & 3] >> (index & 31)) & 1u);
}

PYCOMM_HD float variate_at(uint64_t seed, int distribution, uint64_t index) {
  return distribution == kRademacher ? rademacher_at(seed, index) : gaussian_at(seed, index);
}

// ---- many elements at once (the CPU kernels' inner loops) ---------------------------

// Gaussian variates of elements [4 * first_block, 4 * (first_block + N)), in
// index order: the values of gaussian_at, N Philox blocks at a time, written as
// loops over lanes that compilers vectorize.
template <int N>
PYCOMM_HD void gaussian_lanes(uint64_t seed, uint64_t first_block, float (&out)[4 * N]) {
  uint32_t c[4][N];
  for (int i = 0; i < N; ++i) {
    const uint64_t block = first_block + static_cast<uint64_t>(i);
    c[0][i] = static_cast<uint32_t>(block);
    c[1][i] = static_cast<uint32_t>(block >> 32);
    c[2][i] = kStreamGaussian;
    c[3][i] = 0u;
  }
  philox4x32_10_lanes<N>(c[0], c[1], c[2], c[3], static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  // Pairs (w0, w1) of all blocks, then (w2, w3): 2N independent Box-Muller lanes.
  float zc[2 * N], zs[2 * N];
  for (int i = 0; i < N; ++i) {
    box_muller(c[0][i], c[1][i], zc[i], zs[i]);
    box_muller(c[2][i], c[3][i], zc[N + i], zs[N + i]);
  }
  for (int i = 0; i < N; ++i) {
    out[4 * i + 0] = zc[i];
    out[4 * i + 1] = zs[i];
    out[4 * i + 2] = zc[N + i];
    out[4 * i + 3] = zs[N + i];
  }
}

// Rademacher variates of elements [128 * block, 128 * (block + 1)): one Philox block.
PYCOMM_HD void rademacher_tile(uint64_t seed, uint64_t block, float (&out)[128]) {
  const Block w = block_at(seed, kStreamRademacher, block);
  for (int i = 0; i < 128; ++i) out[i] = sign_from_bit((w.v[i >> 5] >> (i & 31)) & 1u);
}

// ---- the reduction order of philox_dot ------------------------------------------------
//
// <t, z> is a sum of products p_i = double(t_i) * double(z_i) (exact: 24 x 24
// significant bits fit in a double) over the global indices i of the tensors.
//   1. Chunks: the global index space is cut at multiples of kDotChunk = 4096
//      (independent of how the elements are split into tensors).
//   2. Within a chunk, lane l (0..31) sums, in ascending index order, the
//      products of the indices whose position in the chunk, divided by 4, is
//      congruent to l mod 32 (positions 4l..4l+3, 128+4l..128+4l+3, ...), in
//      double, starting from +0. (This is a warp of 32 GPU threads, each owning
//      one Philox block of every 128-element step.)
//   3. The 32 lane sums are combined by halving: for m = 16, 8, 4, 2, 1:
//      v[l] = v[l] + v[l + m] for l < m; the chunk's partial is v[0]
//      (reduce_lanes32; a warp's xor-shuffle butterfly computes the same).
//   4. The partials of the chunks touched, numbered p = 0, 1, ... from the first,
//      are reduced the same way: lane l sums partials l, l+32, l+64, ... in
//      ascending order, then step 3.
// Every addition is a double add in a fixed order, so the result is
// independent of the thread count, the launch configuration, the tensor split
// and the device. Indices not covered by a tensor are skipped (equivalently,
// contribute +-0: an accumulator that starts at +0 never becomes -0).
constexpr int64_t kDotChunk = 4096;
constexpr int kDotLanes = 32;

PYCOMM_HD double reduce_lanes32(double (&v)[kDotLanes]) {
  for (int m = kDotLanes / 2; m > 0; m >>= 1) {
    for (int l = 0; l < m; ++l) v[l] = dadd_rn(v[l], v[l + m]);
  }
  return v[0];
}

}  // namespace philox
}  // namespace pycomm
