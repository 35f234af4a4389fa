// CUDA kernels of the quantization ops: byte-identical to the CPU kernels in
// csrc/cpu/quantize_cpu.cpp (format: pycomm/quant_format.h).
//
// quantize: threads_per_bucket threads (one warp for the usual bucket sizes,
// up to a block of 8 warps for very large buckets) share a bucket. Each thread
// owns groups of 8 consecutive elements (16-byte vector loads when a group is
// full and aligned). Phase 1 reduces the bucket's min / max / non-finite flag
// with warp shuffles (and shared memory across warps); phase 2 encodes with
// Philox stochastic or nearest rounding, packs the levels and writes the
// error-feedback residual. When a thread owns at most kCacheGroups groups, the
// loaded values stay in registers between the phases, so x and the residual
// are read once.
//
// dequantize_into / dequantize_sum: one thread per (bucket, group), flat over
// the whole payload; dequantize_sum adds the sources in order, per element, as
// the CPU does, so the float32 sums are identical too.
//
// Mixed bit widths (4-column tables): the same kernels instantiated with
// kBits = 0 read each bucket's bits and record offset from the table and
// switch to the matching compile-time bit width per bucket (a bucket's
// threads are whole warps in quantize, and B/8 consecutive threads in the
// decoders, so a warp rarely mixes widths).
//
// One launch per op for the whole tensor; no synchronisation, no allocation.
#include "quantize_kernels.h"

#include "quantize_device.cuh"

namespace pycomm {
namespace {

using quant::kGroup;

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr int kCacheGroups = 2;                 // groups per thread kept in registers
constexpr int64_t kMaxGrid = int64_t(1) << 22;  // grid-stride beyond this many blocks

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_size(int64_t blocks) { return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid); }

// log2(v) if v is a power of two, else -1.
int pow2_shift(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

__device__ __forceinline__ int64_t div_groups(int64_t i, int64_t groups, int shift) {
  return shift >= 0 ? (i >> shift) : (i / groups);
}

// Butterfly reduction: every lane ends with the warp's range.
__device__ __forceinline__ void warp_reduce(qdev::RangePartial& r) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) {
    qdev::RangePartial o;
    o.mn = __shfl_xor_sync(0xffffffffu, r.mn, m);
    o.mx = __shfl_xor_sync(0xffffffffu, r.mx, m);
    o.bad = __shfl_xor_sync(0xffffffffu, r.bad, m);
    qdev::range_combine(r, o);
  }
}

// Block of kBlock threads = kBlock / tpb buckets; a bucket's threads are whole
// warps. The loop over blocks is uniform within a block, so __syncthreads is
// safe; threads of buckets past the end take part in the reductions only.
// kBits = 0: mixed table (bits per bucket).
template <DType D, int kBits, int kCache>
__global__ void __launch_bounds__(kBlock) quantize_kernel(const qdev::QuantizeParams p, int64_t block_count) {
  __shared__ qdev::RangePartial warp_ranges[kBlock / kWarp];
  const int tpb = p.threads_per_bucket;
  const int slot = static_cast<int>(threadIdx.x) / tpb;
  const int tid = static_cast<int>(threadIdx.x) - slot * tpb;
  const int warps_per_bucket = tpb / kWarp;
  for (int64_t blk = blockIdx.x; blk < block_count; blk += gridDim.x) {
    const int64_t k = blk * (kBlock / tpb) + slot;
    const qdev::BucketJob job = qdev::make_job(p, k < p.num_buckets ? k : 0);
    const bool active = k < p.num_buckets && job.valid;
    qdev::RangePartial range;
    qdev::range_init(range);
    float cache[kCache > 0 ? kCache : 1][kGroup];
    if (active) qdev::quantize_phase1<D, kCache>(p, job, tid, tpb, range, cache);
    warp_reduce(range);
    if (warps_per_bucket > 1) {
      const int warp = static_cast<int>(threadIdx.x) / kWarp;
      if ((threadIdx.x & (kWarp - 1)) == 0) warp_ranges[warp] = range;
      __syncthreads();
      const int first = slot * warps_per_bucket;
      range = warp_ranges[first];
      for (int w = 1; w < warps_per_bucket; ++w) qdev::range_combine(range, warp_ranges[first + w]);
      __syncthreads();  // warp_ranges is reused by the next block of buckets
    }
    if (active) {
      if constexpr (kBits == 0)
        qdev::quantize_phase2_mixed<D, kCache>(p, job, tid, tpb, range, cache);
      else
        qdev::quantize_phase2<D, kBits, kCache>(p, job, tid, tpb, range, cache);
    }
  }
}

// The per-group work of the two decoding ops, selected by their parameter type.
template <DType D, int kBits>
__device__ __forceinline__ void decode_group(const qdev::DequantizeParams& p, int64_t k, int64_t g) {
  qdev::dequantize_group<D, kBits>(p, k, g);
}

template <DType D, int kBits>
__device__ __forceinline__ void decode_group(const qdev::DequantizeSumParams& p, int64_t k, int64_t g) {
  qdev::dequantize_sum_group<D, kBits>(p, k, g);
}

// One thread per (bucket, group), grid-stride over the whole payload.
template <DType D, int kBits, typename Params>
__global__ void __launch_bounds__(kBlock) decode_kernel(const Params p, int64_t groups, int shift) {
  const int64_t total = p.num_buckets * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < total; i += stride) {
    const int64_t k = div_groups(i, groups, shift);
    decode_group<D, kBits>(p, k, i - k * groups);
  }
}


}  // namespace

namespace {

int threads_per_bucket(int64_t bucket_size) {
  const int64_t groups = bucket_size / kGroup;
  // Enough threads per bucket that each owns at most kCacheGroups groups, up
  // to a whole block; beyond that, threads loop over more groups and re-read.
  int tpb = kWarp;
  while (tpb < kBlock && groups > static_cast<int64_t>(tpb) * kCacheGroups) tpb *= 2;
  return tpb;
}

// Whether every thread owns few enough groups to keep their values in registers.
bool groups_fit_cache(const qdev::QuantizeParams& p) {
  return p.layout.bucket_size / kGroup <= static_cast<int64_t>(p.threads_per_bucket) * kCacheGroups;
}

// kBits = 0 launches the mixed-table instantiation.
template <int kBits>
void launch_quantize_kernel(const qdev::QuantizeParams& p, DType dtype, cudaStream_t stream) {
  const bool cached = groups_fit_cache(p);
  const int64_t blocks = ceil_div(p.num_buckets, kBlock / p.threads_per_bucket);
  const unsigned grid = grid_size(blocks);
  dispatch_dtype(dtype, [&](auto dtype_c) {
    constexpr DType D = decltype(dtype_c)::value;
    if (cached)
      quantize_kernel<D, kBits, kCacheGroups><<<grid, kBlock, 0, stream>>>(p, blocks);
    else
      quantize_kernel<D, kBits, 0><<<grid, kBlock, 0, stream>>>(p, blocks);
  });
}

// kBits = 0 launches the mixed-table instantiation; one thread per (bucket, group).
template <int kBits, typename Params>
void launch_decode_kernel(const Params& p, DType dtype, cudaStream_t stream) {
  const int64_t groups = p.layout.bucket_size / kGroup;
  const unsigned grid = grid_size(ceil_div(p.num_buckets * groups, kBlock));
  const int shift = pow2_shift(groups);
  dispatch_dtype(dtype, [&](auto dtype_c) {
    constexpr DType D = decltype(dtype_c)::value;
    decode_kernel<D, kBits><<<grid, kBlock, 0, stream>>>(p, groups, shift);
  });
}

// Bucket k covers row first_row + k of a table with `columns` int64s per row
// (or the identity layout when table is nullptr).
BucketLayout bucket_layout(const int64_t* table, int64_t columns, int64_t numel, int64_t bucket_size,
                           int64_t first_row, bool packed_chunk) {
  BucketLayout layout;
  layout.table = table;
  layout.numel = numel;
  layout.bucket_size = bucket_size;
  layout.first_bucket = first_row;
  layout.columns = columns;
  layout.packed_chunk = packed_chunk;
  return layout;
}

// mixed_table nullptr: uniform widths, every record is the params' record_size bytes.
MixedRecords mixed_records(const int64_t* mixed_table, int64_t first_row, int64_t payload_bytes,
                           int64_t bucket_size) {
  MixedRecords mixed;
  mixed.table = mixed_table;
  mixed.first_row = first_row;
  mixed.payload_bytes = payload_bytes;
  mixed.bucket_size = bucket_size;
  return mixed;
}

MixedRecords uniform_records(int64_t bucket_size) { return mixed_records(nullptr, 0, 0, bucket_size); }

// record_size: bytes of every record (uniform widths), 0 with mixed records.
qdev::QuantizeParams quantize_params(const void* x, float* residual, const BucketLayout& layout,
                                     const MixedRecords& mixed, int64_t num_buckets, int64_t record_size,
                                     bool stochastic, uint64_t seed, const int64_t* row_streams,
                                     int64_t skip_begin, int64_t skip_end, uint8_t* payload) {
  qdev::QuantizeParams p;
  p.x = x;
  p.residual = residual;
  p.layout = layout;
  p.payload = payload;
  p.mixed = mixed;
  p.num_buckets = num_buckets;
  p.record_size = record_size;
  p.skip_begin = skip_begin;
  p.skip_end = skip_end;
  p.seed = seed;
  p.row_streams = row_streams;
  p.stochastic = stochastic ? 1 : 0;
  p.threads_per_bucket = threads_per_bucket(layout.bucket_size);
  return p;
}

qdev::DequantizeParams dequantize_params(const uint8_t* payload, void* out, const BucketLayout& layout,
                                         const MixedRecords& mixed, int64_t num_buckets, int64_t record_size) {
  qdev::DequantizeParams p;
  p.payload = payload;
  p.out = out;
  p.layout = layout;
  p.mixed = mixed;
  p.num_buckets = num_buckets;
  p.record_size = record_size;
  return p;
}

// layout.numel must be 0 when init is nullptr.
qdev::DequantizeSumParams dequantize_sum_params(const uint8_t* payloads, int64_t sources, const void* init,
                                                const BucketLayout& layout, const MixedRecords& mixed,
                                                int64_t num_buckets, int64_t record_size, float* out) {
  qdev::DequantizeSumParams p;
  p.payloads = payloads;
  p.init = init;
  p.layout = layout;
  p.mixed = mixed;
  p.out = out;
  p.sources = sources;
  p.num_buckets = num_buckets;
  p.record_size = record_size;
  return p;
}

// Without init the sums start from zero and read no elements: float32, no numel.
DType init_read_dtype(const void* init, DType init_dtype) { return init != nullptr ? init_dtype : DType::Float32; }
int64_t init_read_numel(const void* init, int64_t init_numel) { return init != nullptr ? init_numel : 0; }

}  // namespace

void launch_quantize(const void* x, DType dtype, float* residual, const int64_t* table, int64_t numel,
                     int64_t num_buckets, int bits, int64_t bucket_size, bool stochastic, uint64_t seed,
                     const int64_t* row_streams, int64_t skip_begin, int64_t skip_end, uint8_t* payload,
                     cudaStream_t stream) {
  if (num_buckets <= 0) return;
  const qdev::QuantizeParams p =
      quantize_params(x, residual, bucket_layout(table, 2, numel, bucket_size, 0, false), uniform_records(bucket_size),
                      num_buckets, quant::record_bytes(bits, bucket_size), stochastic, seed, row_streams, skip_begin,
                      skip_end, payload);
  quant::dispatch_bits(bits, [&](auto bits_c) {
    launch_quantize_kernel<decltype(bits_c)::value>(p, dtype, stream);
  });
}

void launch_quantize_mixed(const void* x, DType dtype, float* residual, const int64_t* mixed_table,
                           bool chunk_layout, int64_t first_row, int64_t numel, int64_t num_buckets,
                           int64_t bucket_size, bool stochastic, uint64_t seed, const int64_t* row_streams,
                           int64_t skip_begin, int64_t skip_end, uint8_t* payload, int64_t payload_bytes,
                           cudaStream_t stream) {
  if (num_buckets <= 0) return;
  const qdev::QuantizeParams p =
      quantize_params(x, residual, bucket_layout(mixed_table, 4, numel, bucket_size, first_row, chunk_layout),
                      mixed_records(mixed_table, first_row, payload_bytes, bucket_size), num_buckets, 0, stochastic,
                      seed, row_streams, skip_begin, skip_end, payload);
  launch_quantize_kernel<0>(p, dtype, stream);
}

void launch_dequantize_into(const uint8_t* payload, int64_t num_buckets, const int64_t* table, void* out,
                            DType dtype, int64_t out_numel, int bits, int64_t bucket_size, cudaStream_t stream) {
  if (num_buckets <= 0) return;
  const qdev::DequantizeParams p =
      dequantize_params(payload, out, bucket_layout(table, 2, out_numel, bucket_size, 0, false),
                        uniform_records(bucket_size), num_buckets, quant::record_bytes(bits, bucket_size));
  quant::dispatch_bits(bits, [&](auto bits_c) {
    launch_decode_kernel<decltype(bits_c)::value>(p, dtype, stream);
  });
}

void launch_dequantize_sum(const uint8_t* payloads, int64_t sources, int64_t num_buckets, const void* init,
                           DType init_dtype, int64_t init_numel, const int64_t* table, int64_t init_bucket_begin,
                           int bits, int64_t bucket_size, float* out, cudaStream_t stream) {
  if (num_buckets <= 0) return;
  const qdev::DequantizeSumParams p = dequantize_sum_params(
      payloads, sources, init,
      bucket_layout(table, 2, init_read_numel(init, init_numel), bucket_size, init_bucket_begin, false),
      uniform_records(bucket_size), num_buckets, quant::record_bytes(bits, bucket_size), out);
  quant::dispatch_bits(bits, [&](auto bits_c) {
    launch_decode_kernel<decltype(bits_c)::value>(p, init_read_dtype(init, init_dtype), stream);
  });
}

void launch_dequantize_into_mixed(const uint8_t* payload, int64_t payload_bytes, const int64_t* mixed_table,
                                  int64_t num_buckets, void* out, DType dtype, int64_t out_numel,
                                  int64_t bucket_size, cudaStream_t stream) {
  if (num_buckets <= 0) return;
  const qdev::DequantizeParams p =
      dequantize_params(payload, out, bucket_layout(mixed_table, 4, out_numel, bucket_size, 0, false),
                        mixed_records(mixed_table, 0, payload_bytes, bucket_size), num_buckets, 0);
  launch_decode_kernel<0>(p, dtype, stream);
}

void launch_dequantize_sum_mixed(const uint8_t* payloads, int64_t sources, int64_t payload_bytes,
                                 const int64_t* mixed_table, int64_t first_row, int64_t num_buckets, const void* init,
                                 DType init_dtype, int64_t init_numel, int64_t bucket_size, float* out,
                                 cudaStream_t stream) {
  if (num_buckets <= 0) return;
  const qdev::DequantizeSumParams p = dequantize_sum_params(
      payloads, sources, init,
      bucket_layout(mixed_table, 4, init_read_numel(init, init_numel), bucket_size, first_row, false),
      mixed_records(mixed_table, first_row, payload_bytes, bucket_size), num_buckets, 0, out);
  launch_decode_kernel<0>(p, init_read_dtype(init, init_dtype), stream);
}

}  // namespace pycomm
