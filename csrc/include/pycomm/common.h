// Small portability layer shared by the CPU and CUDA code.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define PYCOMM_HD __host__ __device__ __forceinline__
#else
#define PYCOMM_HD inline
#endif

namespace pycomm {

// Element types the kernels accept. The CUDA code cannot see torch's
// ScalarType (it includes only CUDA headers), so the glue maps onto this.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Multiplication that is never contracted into an FMA with a following add.
// CPU and CUDA must round every step the same way to produce identical
// bytes, and nvcc contracts a*b+c by default.
PYCOMM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PYCOMM_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PYCOMM_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

PYCOMM_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

PYCOMM_HD double dadd_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

PYCOMM_HD double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

PYCOMM_HD uint32_t float_bits(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  return v.u;
}

PYCOMM_HD float bits_float(uint32_t u) {
  union { float f; uint32_t u; } v;
  v.u = u;
  return v.f;
}

}  // namespace pycomm
