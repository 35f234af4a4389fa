// Element types of the CUDA kernels (the .cu files cannot see torch's Half and
// BFloat16): storage types, conversions that give the same bits as the CPU's
// c10 conversions, and the runtime-dtype dispatch.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <stdint.h>
#include <type_traits>

#include "pycomm/common.h"

namespace pycomm {

constexpr uint32_t kQuietBit = 0x00400000u;

PYCOMM_HD bool is_nan(float f) { return !(f == f); }

// ---------------------------------------------------------------------------
// Element types. The CPU converts through c10::Half / c10::BFloat16; these
// conversions give the same bits (round to nearest even, and c10's NaNs:
// half <- float NaN is sign|0x7E00, bfloat16 <- float NaN is 0x7FC0, and
// half -> float keeps the NaN's payload, quieted).

template <DType D>
struct Elem;

template <>
struct Elem<DType::Float32> {
  using Storage = float;
  PYCOMM_HD static float to_float(float s) { return s; }
  PYCOMM_HD static float from_float(float f) { return f; }
};

template <>
struct Elem<DType::Float16> {
  using Storage = uint16_t;
  PYCOMM_HD static float to_float(uint16_t h) {
    const float f = __half2float(__ushort_as_half(h));
    if (!is_nan(f)) return f;
    return bits_float((static_cast<uint32_t>(h & 0x8000u) << 16) | 0x7F800000u | kQuietBit |
                      (static_cast<uint32_t>(h & 0x03FFu) << 13));
  }
  PYCOMM_HD static uint16_t from_float(float f) {
    if (is_nan(f)) return static_cast<uint16_t>(((float_bits(f) >> 16) & 0x8000u) | 0x7E00u);
    return __half_as_ushort(__float2half_rn(f));
  }
};

template <>
struct Elem<DType::BFloat16> {
  using Storage = uint16_t;
  PYCOMM_HD static float to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }
  PYCOMM_HD static uint16_t from_float(float f) {
    if (is_nan(f)) return 0x7FC0u;
    const uint32_t u = float_bits(f);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
  }
};

// Calls f(std::integral_constant<DType, D>) for the runtime dtype. Host code.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16: f(std::integral_constant<DType, DType::Float16>{}); break;
    case DType::BFloat16: f(std::integral_constant<DType, DType::BFloat16>{}); break;
    default: f(std::integral_constant<DType, DType::Float32>{}); break;
  }
}

}  // namespace pycomm
