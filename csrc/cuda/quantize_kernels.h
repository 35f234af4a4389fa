// Host launchers of the CUDA quantization kernels (quantize_kernels.cu).
//
// Torch-free: raw device pointers, sizes and a stream. The launchers only
// enqueue work on `stream` (no synchronisation, no allocation); arguments are
// expected to be validated by the caller (quantize_cuda.cpp uses the same
// checks as the CPU ops). Launch errors are left for the caller to fetch with
// cudaGetLastError(). Byte format and semantics: pycomm/quant_format.h and
// csrc/cpu/quantize_cpu.cpp, which these kernels reproduce bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <stdint.h>

#include "pycomm/common.h"

namespace pycomm {

// Quantizes x (numel elements of `dtype`) into payload [num_buckets][record_bytes(bits, bucket_size)].
// residual: nullptr or float32 [numel], updated in place (error feedback).
// table: nullptr (bucket k covers [k*B, (k+1)*B)) or int64 [num_buckets][2] rows of (offset, length).
// Buckets in [skip_begin, skip_end) are written as zero records.
// row_streams: nullptr (bucket k draws its stochastic rounding from Philox index k*B + j) or
// int64 [num_buckets] on the device (from row_streams[k] + j; any value is memory-safe).
void launch_quantize(const void* x, DType dtype, float* residual, const int64_t* table, int64_t numel,
                     int64_t num_buckets, int bits, int64_t bucket_size, bool stochastic, uint64_t seed,
                     const int64_t* row_streams, int64_t skip_begin, int64_t skip_end, uint8_t* payload,
                     cudaStream_t stream);

// Decodes payload [num_buckets][record_bytes] into out (out_numel elements of `dtype`), through the
// optional table (int64 [num_buckets][2]); elements no bucket covers are left untouched.
void launch_dequantize_into(const uint8_t* payload, int64_t num_buckets, const int64_t* table, void* out,
                            DType dtype, int64_t out_numel, int bits, int64_t bucket_size, cudaStream_t stream);

// out [num_buckets * bucket_size] float32 = init (optional: init_numel elements of init_dtype, bucket k
// reading table row init_bucket_begin + k, or [(init_bucket_begin + k) * B, ...) without a table)
// + the decoded payloads [sources][num_buckets][record_bytes], in source order; zero records are skipped.
void launch_dequantize_sum(const uint8_t* payloads, int64_t sources, int64_t num_buckets, const void* init,
                           DType init_dtype, int64_t init_numel, const int64_t* table, int64_t init_bucket_begin,
                           int bits, int64_t bucket_size, float* out, cudaStream_t stream);

// Mixed bit widths: mixed_table is int64 [rows][4] (offset, length, bits,
// byte_offset), checked by the caller (records packed back to back); the
// kernels still skip any row whose record would leave the payload.
// quantize: bucket k is row first_row + k; it reads its elements through the
// row (chunk_layout false, first_row 0) or from [k*B, k*B + the row's length)
// of x (chunk_layout true: a reduced chunk); payload holds payload_bytes bytes.
// row_streams: as for launch_quantize, one entry per bucket k (not per table row).
void launch_quantize_mixed(const void* x, DType dtype, float* residual, const int64_t* mixed_table,
                           bool chunk_layout, int64_t first_row, int64_t numel, int64_t num_buckets,
                           int64_t bucket_size, bool stochastic, uint64_t seed, const int64_t* row_streams,
                           int64_t skip_begin, int64_t skip_end, uint8_t* payload, int64_t payload_bytes,
                           cudaStream_t stream);

// Decodes the records of all num_buckets rows (payload_bytes bytes) into out through the rows.
void launch_dequantize_into_mixed(const uint8_t* payload, int64_t payload_bytes, const int64_t* mixed_table,
                                  int64_t num_buckets, void* out, DType dtype, int64_t out_numel,
                                  int64_t bucket_size, cudaStream_t stream);

// out [num_buckets * B] = init (read through rows first_row + k) + the decoded payloads
// [sources][payload_bytes], which hold the records of rows [first_row, first_row + num_buckets).
void launch_dequantize_sum_mixed(const uint8_t* payloads, int64_t sources, int64_t payload_bytes,
                                 const int64_t* mixed_table, int64_t first_row, int64_t num_buckets, const void* init,
                                 DType init_dtype, int64_t init_numel, int64_t bucket_size, float* out,
                                 cudaStream_t stream);

}  // namespace pycomm
