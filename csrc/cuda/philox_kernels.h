// Host launchers of the CUDA Philox kernels (philox_kernels.cu): variates,
// multi-tensor axpy / perturbed copy and dot product, for one or several
// directions (seeds) per launch.
//
// Torch-free: raw device pointers, sizes, pycomm::DType and a stream. The
// launchers only enqueue work on `stream`: no allocation, no synchronisation,
// no host<->device copy. Tensor lists reach the kernels as PhiloxBatch structs
// passed by value as kernel parameters (__grid_constant__), up to
// kPhiloxMaxTensors consecutive tensors of one dtype per launch, so no pointer
// table has to be copied to the device. Arguments are expected to be validated
// by the caller (philox_cuda.cpp uses the same checks as the CPU ops,
// csrc/philox_checks.h). Errors of the kernel launches are left for the caller
// to fetch with cudaGetLastError(). Results are bit-identical to the CPU ops'
// (csrc/cpu/philox_cpu.cpp); the variates and the dot product's summation
// order are defined in pycomm/philox_variates.h.
#pragma once

#include <cuda_runtime.h>

#include <stdint.h>

#include "pycomm/common.h"

namespace pycomm {

constexpr int kPhiloxMaxTensors = 48;

// Consecutive tensors of one dtype: tensor i holds the global indices
// [start[i], start[i + 1]) (non-empty); start[count] is the batch's end.
// src[i] is read (unused when filling), dst[i] written (== src[i] in place).
struct PhiloxBatch {
  int count;
  DType dtype;
  int64_t start[kPhiloxMaxTensors + 1];
  const void* src[kPhiloxMaxTensors];
  void* dst[kPhiloxMaxTensors];
};

// Up to kPhiloxMaxDirections directions of one launch, also passed as a
// kernel parameter: their seeds and their alphas, either in alpha[] or, when
// device_alpha is not null, as `count` floats in device memory (read by the
// kernels: a caller whose alphas were computed on the device never waits).
constexpr int kPhiloxMaxDirections = 32;

struct PhiloxDirections {
  int count;
  uint64_t seed[kPhiloxMaxDirections];
  float alpha[kPhiloxMaxDirections];
  const float* device_alpha;
};

// fill: dst = z of direction 0. Otherwise, for each direction k in order whose
// alpha is not 0: dst = src + alpha_k * z_k (float32, mul then add, each
// rounded; then rounded to dtype), src being the previous result: exactly the
// successive single-direction updates. With no direction applied, dst = src
// bit for bit. distribution: philox::kGaussian / kRademacher.
void launch_philox_elementwise(const PhiloxBatch& batch, const PhiloxDirections& directions, int distribution,
                               bool fill, cudaStream_t stream);

// Dot products <t, z_k> of the op's global index range [begin, end) for the
// directions of one group, made of batches 0, 1, ... launched in order with
// launch_philox_dot_batch, then launch_philox_dot_final. workspace:
// philox_dot_workspace_doubles(begin, end, directions.count) doubles (per
// direction the chunk partials, then two 32-lane carries per direction for
// chunks that span two batches). out: directions.count doubles on the device.
int64_t philox_dot_workspace_doubles(int64_t begin, int64_t end, int directions);
void launch_philox_dot_batch(const PhiloxBatch& batch, int batch_index, int64_t begin, int64_t end,
                             const PhiloxDirections& directions, int distribution, double* workspace,
                             cudaStream_t stream);
void launch_philox_dot_final(int64_t begin, int64_t end, int directions, const double* workspace, double* out,
                             cudaStream_t stream);

}  // namespace pycomm
