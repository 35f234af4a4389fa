// Philox4x32-10 (Salmon et al., SC'11), a counter-based generator: every
// output is a pure function of (counter, key), so any element's random
// number can be computed independently, in any order, on any device, and
// the CPU and the GPU agree bit for bit. This header is the only definition
// of the generator in pycomm.
#pragma once

#include "pycomm/common.h"

namespace pycomm {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Block {
  uint32_t v[4];
};

PYCOMM_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Philox4x32 with kRounds rounds on N independent blocks (structure of
// arrays, updated in place); the key is bumped between rounds. With N > 1 the
// loops over blocks vectorize on CPUs; the single-block form below is N = 1.
template <int N>
PYCOMM_HD void philox4x32_10_lanes(uint32_t (&c0)[N], uint32_t (&c1)[N], uint32_t (&c2)[N], uint32_t (&c3)[N],
                                   uint32_t key0, uint32_t key1) {
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) {
      key0 += kWeyl0;
      key1 += kWeyl1;
    }
    for (int i = 0; i < N; ++i) {
      uint32_t hi0, lo0, hi1, lo1;
      mulhilo(kMul0, c0[i], hi0, lo0);
      mulhilo(kMul1, c2[i], hi1, lo1);
      const uint32_t n0 = hi1 ^ c1[i] ^ key0;
      const uint32_t n2 = hi0 ^ c3[i] ^ key1;
      c0[i] = n0;
      c1[i] = lo1;
      c2[i] = n2;
      c3[i] = lo0;
    }
  }
}

PYCOMM_HD Block philox4x32_10(Block counter, uint32_t key0, uint32_t key1) {
  uint32_t c0[1] = {counter.v[0]}, c1[1] = {counter.v[1]}, c2[1] = {counter.v[2]}, c3[1] = {counter.v[3]};
  philox4x32_10_lanes<1>(c0, c1, c2, c3, key0, key1);
  Block out;
  out.v[0] = c0[0];
  out.v[1] = c1[0];
  out.v[2] = c2[0];
  out.v[3] = c3[0];
  return out;
}

// The pycomm stream layout. Element i of stream `stream` under `seed` is word
// (i % 4) of the block with counter (lo32(i / 4), hi32(i / 4), stream, 0) and
// key (lo32(seed), hi32(seed)). Streams keep unrelated uses of one seed
// (stochastic rounding, perturbations) independent of each other.
enum Stream : uint32_t {
  kStreamStochasticRounding = 0x51554E54u,  // "QUNT"
  kStreamTopkSample = 0x544F504Bu,          // "TOPK": start of the strided top-k sample
  kStreamGaussian = 0x47415553u,            // "GAUS": Box-Muller normals (philox_variates.h)
  kStreamRademacher = 0x52414445u,          // "RADE": random signs, one bit per element (philox_variates.h)
};

PYCOMM_HD Block block_at(uint64_t seed, uint32_t stream, uint64_t block_index) {
  Block counter;
  counter.v[0] = static_cast<uint32_t>(block_index);
  counter.v[1] = static_cast<uint32_t>(block_index >> 32);
  counter.v[2] = stream;
  counter.v[3] = 0u;
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

PYCOMM_HD uint32_t uint32_at(uint64_t seed, uint32_t stream, uint64_t index) {
  return block_at(seed, stream, index >> 2).v[index & 3];
}

// Uniform in [0, 1) with 24 random bits: exactly representable in float32, so
// the conversion cannot round differently on different devices.
PYCOMM_HD float uint32_to_unit_float(uint32_t u) {
  return static_cast<float>(u >> 8) * (1.0f / 16777216.0f);
}

// Uniforms of stream indices [4 * first_block, 4 * (first_block + N)), in
// index order: the same numbers as uint32_at, N blocks at a time.
template <int N>
PYCOMM_HD void unit_floats(uint64_t seed, uint32_t stream, uint64_t first_block, float (&out)[4 * N]) {
  uint32_t c0[N], c1[N], c2[N], c3[N];
  for (int i = 0; i < N; ++i) {
    const uint64_t block = first_block + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(block);
    c1[i] = static_cast<uint32_t>(block >> 32);
    c2[i] = stream;
    c3[i] = 0u;
  }
  philox4x32_10_lanes<N>(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int i = 0; i < N; ++i) {
    out[4 * i + 0] = uint32_to_unit_float(c0[i]);
    out[4 * i + 1] = uint32_to_unit_float(c1[i]);
    out[4 * i + 2] = uint32_to_unit_float(c2[i]);
    out[4 * i + 3] = uint32_to_unit_float(c3[i]);
  }
}

}  // namespace philox
}  // namespace pycomm
