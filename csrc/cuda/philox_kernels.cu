// CUDA kernels of the Philox ops: bit-identical to csrc/cpu/philox_cpu.cpp.
// The variates are the shared functions of pycomm/philox_variates.h.
//
// Elementwise (variates, axpy, perturbed copy): one thread per group of four
// global indices 4q .. 4q+3, i.e. one Gaussian Philox block (Rademacher: the
// thread takes its 4 bits from block q / 32, which the 32 threads of a warp
// compute alike). A thread finds its tensor by binary search in the batch's
// start table (in kernel parameter space), and uses one 16-byte (float32) or
// 8-byte (16-bit) access when its four elements lie in one tensor, aligned.
//
// Dot: one warp per chunk of 4096 global indices, exactly the order stated in
// philox_variates.h: in step k (0..31) lane l owns the indices
// chunk_base + 128k + 4l .. +3 and adds their products to its double
// accumulator in index order; then the xor-shuffle butterfly (the halving tree
// of reduce_lanes32) gives the chunk's partial. A chunk that continues into the
// next batch leaves its 32 lane sums in a carry buffer that the next launch
// (same stream, so ordered) resumes from; consecutive batches alternate between
// two carry buffers, so a launch never overwrites the carry it reads. The final
// kernel is one warp: lane l sums partials l, l+32, ... in order, then the
// butterfly. No atomics; every double addition happens in a fixed order.
#include "philox_kernels.h"

#include "pycomm/philox_variates.h"
#include "quantize_device.cuh"

namespace pycomm {
namespace {

using philox::kDotChunk;
using philox::kDotLanes;

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // grid-stride beyond this many blocks
static_assert(kDotLanes == kWarp, "a dot chunk is reduced by one warp");
static_assert(kDotChunk == 4 * kWarp * 32, "32 steps of 128 indices per chunk");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < kMaxGrid ? blocks : kMaxGrid));
}

// Index of the batch tensor holding global index g (start[0] <= g < start[count]).
__device__ __forceinline__ int find_tensor(const PhiloxBatch& b, int64_t g) {
  int lo = 0, hi = b.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (b.start[mid] <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ uint32_t pick_word(const philox::Block& w, uint32_t i) {
  return i == 0 ? w.v[0] : (i == 1 ? w.v[1] : (i == 2 ? w.v[2] : w.v[3]));
}

// The variates of global indices 4q .. 4q+3.
__device__ __forceinline__ void group_variates(uint64_t seed, int distribution, uint64_t q, float (&z)[4]) {
  if (distribution == philox::kRademacher) {
    const philox::Block w = philox::block_at(seed, philox::kStreamRademacher, q >> 5);
    const uint32_t word = pick_word(w, static_cast<uint32_t>(q >> 3) & 3u);
    const uint32_t shift = 4u * static_cast<uint32_t>(q & 7u);
#pragma unroll
    for (int j = 0; j < 4; ++j) z[j] = philox::sign_from_bit((word >> (shift + j)) & 1u);
  } else {
    philox::gaussian_block(seed, q, z);
  }
}

// t + alpha * z as the CPU computes it, NaN bits included where they are
// determined (a NaN t stays t, quieted; see quantize_device.cuh).
__device__ __forceinline__ float axpy_value(float t, float alpha, float z) {
  float m = mul_rn(alpha, z);
  if (is_nan(m)) m = qdev::x86_nan_result(alpha, z);
  const float s = add_rn(t, m);
  return is_nan(s) ? qdev::x86_nan_result(t, m) : s;
}

template <typename S>
struct Quad;
template <>
struct Quad<float> {
  using Vec = float4;
};
template <>
struct Quad<uint16_t> {
  using Vec = ushort4;
};

template <typename S>
__device__ __forceinline__ void load4(const S* p, S (&v)[4]) {
  const typename Quad<S>::Vec q = *reinterpret_cast<const typename Quad<S>::Vec*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}

template <typename S>
__device__ __forceinline__ void store4(S* p, const S (&v)[4]) {
  typename Quad<S>::Vec q;
  q.x = v[0];
  q.y = v[1];
  q.z = v[2];
  q.w = v[3];
  *reinterpret_cast<typename Quad<S>::Vec*>(p) = q;
}

template <DType D, bool kFill>
__global__ void __launch_bounds__(kBlock)
    elementwise_kernel(const __grid_constant__ PhiloxBatch b, uint64_t seed, int distribution, float alpha,
                       int64_t q_begin, int64_t q_count) {
  using E = Elem<D>;
  using S = typename E::Storage;
  const int64_t begin = b.start[0], end = b.start[b.count];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < q_count; i += stride) {
    const int64_t q = q_begin + i;
    float z[4];
    group_variates(seed, distribution, static_cast<uint64_t>(q), z);
    const int64_t g0 = 4 * q;
    int t = find_tensor(b, g0 > begin ? g0 : begin);
    if (g0 >= b.start[t] && g0 + 4 <= b.start[t + 1]) {
      const int64_t local = g0 - b.start[t];
      S* dst = static_cast<S*>(b.dst[t]) + local;
      const S* src = kFill ? nullptr : static_cast<const S*>(b.src[t]) + local;
      if (qdev::aligned_to(dst, 4 * sizeof(S)) && (kFill || qdev::aligned_to(src, 4 * sizeof(S)))) {
        S out[4];
        if (kFill) {
#pragma unroll
          for (int j = 0; j < 4; ++j) out[j] = E::from_float(z[j]);
        } else {
          S in[4];
          load4(src, in);
#pragma unroll
          for (int j = 0; j < 4; ++j) out[j] = E::from_float(axpy_value(E::to_float(in[j]), alpha, z[j]));
        }
        store4(dst, out);
        continue;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t g = g0 + j;
      if (g < begin || g >= end) continue;
      while (g >= b.start[t + 1]) ++t;
      const int64_t local = g - b.start[t];
      S* dst = static_cast<S*>(b.dst[t]) + local;
      if (kFill) {
        *dst = E::from_float(z[j]);
      } else {
        const float v = E::to_float(static_cast<const S*>(b.src[t])[local]);
        *dst = E::from_float(axpy_value(v, alpha, z[j]));
      }
    }
  }
}

// Halving tree of the lane sums (philox::reduce_lanes32): after the step with
// mask m, lane l < m holds v[l] + v[l + m]. Every lane ends with the total.
__device__ __forceinline__ double warp_tree(double acc) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) acc = dadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, m));
  return acc;
}

template <DType D>
__global__ void __launch_bounds__(kBlock)
    dot_kernel(const __grid_constant__ PhiloxBatch b, uint64_t seed, int distribution, int64_t op_begin,
               int64_t op_end, int64_t chunk_first, int64_t chunk_lo, int64_t chunk_count, const double* carry_in,
               double* carry_out, double* partials) {
  using E = Elem<D>;
  using S = typename E::Storage;
  const int lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t begin = b.start[0], end = b.start[b.count];
  for (int64_t w = warp; w < chunk_count; w += warps) {  // uniform within the warp
    const int64_t chunk = chunk_lo + w;
    const int64_t base = chunk * kDotChunk;
    const int64_t first = base > begin ? base : begin;
    double acc = 0.0;
    if ((base > op_begin ? base : op_begin) < begin) acc = carry_in[lane];  // the chunk began in an earlier batch
    int t = find_tensor(b, first);
    for (int k = 0; k < 32; ++k) {
      const int64_t step = base + 128 * k;
      if (step + 128 <= begin || step >= end) continue;
      const int64_t q = step / 4 + lane;
      float z[4];
      group_variates(seed, distribution, static_cast<uint64_t>(q), z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t g = 4 * q + j;
        if (g < begin || g >= end) continue;
        while (g >= b.start[t + 1]) ++t;
        const float v = E::to_float(static_cast<const S*>(b.src[t])[g - b.start[t]]);
        acc = dadd_rn(acc, dmul_rn(static_cast<double>(v), static_cast<double>(z[j])));
      }
    }
    const int64_t chunk_end = base + kDotChunk < op_end ? base + kDotChunk : op_end;
    if (chunk_end <= end) {
      acc = warp_tree(acc);
      if (lane == 0) partials[chunk - chunk_first] = acc;
    } else {
      carry_out[lane] = acc;  // continued by the next batch
    }
  }
}

__global__ void dot_final_kernel(const double* partials, int64_t count, double* out) {
  const int lane = static_cast<int>(threadIdx.x);
  double acc = 0.0;
  for (int64_t p = lane; p < count; p += kWarp) acc = dadd_rn(acc, partials[p]);
  acc = warp_tree(acc);
  if (lane == 0) out[0] = acc;
}

template <bool kFill>
void launch_elementwise_typed(const PhiloxBatch& b, uint64_t seed, int distribution, float alpha,
                              cudaStream_t stream) {
  const int64_t begin = b.start[0], end = b.start[b.count];
  const int64_t q_begin = begin / 4, q_count = (end - 1) / 4 + 1 - q_begin;
  const unsigned grid = grid_size(ceil_div(q_count, kBlock));
  switch (b.dtype) {
    case DType::Float32:
      elementwise_kernel<DType::Float32, kFill><<<grid, kBlock, 0, stream>>>(b, seed, distribution, alpha, q_begin,
                                                                             q_count);
      break;
    case DType::Float16:
      elementwise_kernel<DType::Float16, kFill><<<grid, kBlock, 0, stream>>>(b, seed, distribution, alpha, q_begin,
                                                                             q_count);
      break;
    case DType::BFloat16:
      elementwise_kernel<DType::BFloat16, kFill><<<grid, kBlock, 0, stream>>>(b, seed, distribution, alpha,
                                                                              q_begin, q_count);
      break;
  }
}

int64_t chunk_of(int64_t g) { return g / kDotChunk; }

}  // namespace

void launch_philox_elementwise(const PhiloxBatch& batch, uint64_t seed, int distribution, float alpha, bool fill,
                               cudaStream_t stream) {
  if (batch.count <= 0 || batch.start[batch.count] <= batch.start[0]) return;
  if (fill) {
    launch_elementwise_typed<true>(batch, seed, distribution, alpha, stream);
  } else {
    launch_elementwise_typed<false>(batch, seed, distribution, alpha, stream);
  }
}

int64_t philox_dot_workspace_doubles(int64_t begin, int64_t end) {
  const int64_t chunks = end > begin ? chunk_of(end - 1) - chunk_of(begin) + 1 : 0;
  return chunks + 2 * kDotLanes;
}

void launch_philox_dot_batch(const PhiloxBatch& b, int batch_index, int64_t begin, int64_t end, uint64_t seed,
                             int distribution, double* workspace, cudaStream_t stream) {
  const int64_t batch_begin = b.start[0], batch_end = b.start[b.count];
  if (b.count <= 0 || batch_end <= batch_begin) return;
  const int64_t chunk_first = chunk_of(begin);
  const int64_t chunk_lo = chunk_of(batch_begin), chunk_count = chunk_of(batch_end - 1) - chunk_lo + 1;
  double* carry = workspace + (chunk_of(end - 1) - chunk_first + 1);
  const double* carry_in = carry + kDotLanes * (batch_index & 1);
  double* carry_out = carry + kDotLanes * ((batch_index + 1) & 1);
  const unsigned grid = grid_size(ceil_div(chunk_count, kBlock / kWarp));
  switch (b.dtype) {
    case DType::Float32:
      dot_kernel<DType::Float32><<<grid, kBlock, 0, stream>>>(b, seed, distribution, begin, end, chunk_first,
                                                              chunk_lo, chunk_count, carry_in, carry_out, workspace);
      break;
    case DType::Float16:
      dot_kernel<DType::Float16><<<grid, kBlock, 0, stream>>>(b, seed, distribution, begin, end, chunk_first,
                                                              chunk_lo, chunk_count, carry_in, carry_out, workspace);
      break;
    case DType::BFloat16:
      dot_kernel<DType::BFloat16><<<grid, kBlock, 0, stream>>>(b, seed, distribution, begin, end, chunk_first,
                                                               chunk_lo, chunk_count, carry_in, carry_out, workspace);
      break;
  }
}

void launch_philox_dot_final(int64_t begin, int64_t end, const double* workspace, double* out, cudaStream_t stream) {
  const int64_t chunks = end > begin ? chunk_of(end - 1) - chunk_of(begin) + 1 : 0;
  dot_final_kernel<<<1, kWarp, 0, stream>>>(workspace, chunks, out);
}

}  // namespace pycomm
