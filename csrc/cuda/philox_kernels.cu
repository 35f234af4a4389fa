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
// Several directions (seeds) per launch: the elementwise threads apply them in
// order to their four elements (the data is read and written once); the dot
// kernel gives each (chunk, direction) pair its own warp.
//
// Dot: one warp per chunk of 4096 global indices and direction, exactly the order stated in
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
    elementwise_kernel(const __grid_constant__ PhiloxBatch b, const __grid_constant__ PhiloxDirections dirs,
                       int distribution, int64_t q_begin, int64_t q_count) {
  using E = Elem<D>;
  using S = typename E::Storage;
  const int64_t begin = b.start[0], end = b.start[b.count];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < q_count; i += stride) {
    const int64_t q = q_begin + i;
    const int64_t g0 = 4 * q;
    const int t = find_tensor(b, g0 > begin ? g0 : begin);
    const bool whole = g0 >= b.start[t] && b.start[t + 1] - g0 >= 4;  // g0 + 4 may pass 2^63 - 1
    S* const dst_whole = whole ? static_cast<S*>(b.dst[t]) + (g0 - b.start[t]) : nullptr;
    const S* const src_whole = whole && !kFill ? static_cast<const S*>(b.src[t]) + (g0 - b.start[t]) : nullptr;
    const bool vector = whole && qdev::aligned_to(dst_whole, 4 * sizeof(S)) &&
                        (kFill || qdev::aligned_to(src_whole, 4 * sizeof(S)));
    // Otherwise element by element: the tensor of each index, -1 outside the batch.
    int tensor_of[4];
    if (!vector) {
      int u = t;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t g = g0 + j;
        if (g < begin || g >= end) {
          tensor_of[j] = -1;
          continue;
        }
        while (g >= b.start[u + 1]) ++u;
        tensor_of[j] = u;
      }
    }
    S out[4];
    if (kFill) {
      float z[4];
      group_variates(dirs.seed[0], distribution, static_cast<uint64_t>(q), z);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = E::from_float(z[j]);
    } else {
      S in[4];
      if (vector) {
        load4(src_whole, in);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int u = tensor_of[j];
          in[j] = u >= 0 ? static_cast<const S*>(b.src[u])[g0 + j - b.start[u]] : S(0);
        }
      }
      float v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = E::to_float(in[j]);
      bool applied = false;
      for (int k = 0; k < dirs.count; ++k) {
        const float alpha = dirs.device_alpha != nullptr ? dirs.device_alpha[k] : dirs.alpha[k];
        if (alpha == 0.0f) continue;
        float z[4];
        group_variates(dirs.seed[k], distribution, static_cast<uint64_t>(q), z);
        // Rounded to the dtype after every direction, as successive single-direction ops store it.
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = E::to_float(E::from_float(axpy_value(v[j], alpha, z[j])));
        applied = true;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = applied ? E::from_float(v[j]) : in[j];
    }
    if (vector) {
      store4(dst_whole, out);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int u = tensor_of[j];
        if (u >= 0) static_cast<S*>(b.dst[u])[g0 + j - b.start[u]] = out[j];
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

// One warp per (chunk, direction) pair; the directions of a chunk are
// neighbouring warps, so they read the chunk's elements while it is in cache.
// Per direction k: partials[k * chunks_total + chunk - chunk_first] and the
// carries carry_in / carry_out + 32 k.
template <DType D>
__global__ void __launch_bounds__(kBlock)
    dot_kernel(const __grid_constant__ PhiloxBatch b, const __grid_constant__ PhiloxDirections dirs,
               int distribution, int64_t op_begin, int64_t op_end, int64_t chunk_first, int64_t chunks_total,
               int64_t chunk_lo, int64_t chunk_count, const double* carry_in, double* carry_out,
               double* partials) {
  using E = Elem<D>;
  using S = typename E::Storage;
  const int lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t begin = b.start[0], end = b.start[b.count];
  const int64_t items = chunk_count * dirs.count;
  for (int64_t w = warp; w < items; w += warps) {  // uniform within the warp
    const int64_t chunk = chunk_lo + w / dirs.count;
    const int k = static_cast<int>(w % dirs.count);
    const uint64_t seed = dirs.seed[k];
    const int64_t base = chunk * kDotChunk;
    const int64_t first = base > begin ? base : begin;
    double acc = 0.0;
    if ((base > op_begin ? base : op_begin) < begin) acc = carry_in[kDotLanes * k + lane];  // began in an earlier batch
    int t = find_tensor(b, first);
    for (int step_index = 0; step_index < 32; ++step_index) {
      const int64_t step = base + 128 * step_index;
      if (begin - step >= 128 || step >= end) continue;  // step + 128 may pass 2^63 - 1
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
    const int64_t chunk_end = op_end - base > kDotChunk ? base + kDotChunk : op_end;
    if (chunk_end <= end) {
      acc = warp_tree(acc);
      if (lane == 0) partials[k * chunks_total + (chunk - chunk_first)] = acc;
    } else {
      carry_out[kDotLanes * k + lane] = acc;  // continued by the next batch
    }
  }
}

// One warp per direction (block k): lane l sums partials l, l+32, ... in order.
__global__ void dot_final_kernel(const double* partials, int64_t count, double* out) {
  const int lane = static_cast<int>(threadIdx.x);
  const double* p = partials + static_cast<int64_t>(blockIdx.x) * count;
  double acc = 0.0;
  for (int64_t i = lane; i < count; i += kWarp) acc = dadd_rn(acc, p[i]);
  acc = warp_tree(acc);
  if (lane == 0) out[blockIdx.x] = acc;
}

template <bool kFill>
void launch_elementwise_typed(const PhiloxBatch& b, const PhiloxDirections& dirs, int distribution,
                              cudaStream_t stream) {
  const int64_t begin = b.start[0], end = b.start[b.count];
  const int64_t q_begin = begin / 4, q_count = (end - 1) / 4 + 1 - q_begin;
  const unsigned grid = grid_size(ceil_div(q_count, kBlock));
  dispatch_dtype(b.dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    elementwise_kernel<D, kFill><<<grid, kBlock, 0, stream>>>(b, dirs, distribution, q_begin, q_count);
  });
}

int64_t chunk_of(int64_t g) { return g / kDotChunk; }

int64_t chunk_count_of(int64_t begin, int64_t end) {
  return end > begin ? chunk_of(end - 1) - chunk_of(begin) + 1 : 0;
}

}  // namespace

void launch_philox_elementwise(const PhiloxBatch& batch, const PhiloxDirections& directions, int distribution,
                               bool fill, cudaStream_t stream) {
  if (batch.count <= 0 || batch.start[batch.count] <= batch.start[0] || directions.count <= 0) return;
  if (fill) {
    launch_elementwise_typed<true>(batch, directions, distribution, stream);
  } else {
    launch_elementwise_typed<false>(batch, directions, distribution, stream);
  }
}

int64_t philox_dot_workspace_doubles(int64_t begin, int64_t end, int directions) {
  return static_cast<int64_t>(directions) * (chunk_count_of(begin, end) + 2 * kDotLanes);
}

void launch_philox_dot_batch(const PhiloxBatch& b, int batch_index, int64_t begin, int64_t end,
                             const PhiloxDirections& dirs, int distribution, double* workspace,
                             cudaStream_t stream) {
  const int64_t batch_begin = b.start[0], batch_end = b.start[b.count];
  if (b.count <= 0 || batch_end <= batch_begin || dirs.count <= 0) return;
  const int64_t chunk_first = chunk_of(begin), chunks_total = chunk_count_of(begin, end);
  const int64_t chunk_lo = chunk_of(batch_begin), chunk_count = chunk_of(batch_end - 1) - chunk_lo + 1;
  double* carry = workspace + dirs.count * chunks_total;
  const double* carry_in = carry + kDotLanes * dirs.count * (batch_index & 1);
  double* carry_out = carry + kDotLanes * dirs.count * ((batch_index + 1) & 1);
  const unsigned grid = grid_size(ceil_div(chunk_count * dirs.count, kBlock / kWarp));
  dispatch_dtype(b.dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    dot_kernel<D><<<grid, kBlock, 0, stream>>>(b, dirs, distribution, begin, end, chunk_first, chunks_total,
                                               chunk_lo, chunk_count, carry_in, carry_out, workspace);
  });
}

void launch_philox_dot_final(int64_t begin, int64_t end, int directions, const double* workspace, double* out,
                             cudaStream_t stream) {
  if (directions <= 0) return;
  dot_final_kernel<<<directions, kWarp, 0, stream>>>(workspace, chunk_count_of(begin, end), out);
}

}  // namespace pycomm
