// CUDA implementation of the quantization ops: validation (shared with the
// CPU ops, quantize_checks.h) and launches of the kernels in
// quantize_kernels.cu on the current stream. Built only when torch has CUDA
// (setup.py adds csrc/cuda/ and -DPYCOMM_WITH_CUDA then). The bytes and values
// are identical to the CPU ops' for the same inputs and seed.
//
// Mixed (4-column) tables: the ops read the table on the host to size and
// check the payloads, from the caller's `host_table` copy (the quantization
// hook passes one; nothing waits) or else from a copy of the device table
// (which waits for the stream). host_table is validated but cannot be compared
// with the device table without a sync: the kernels bound every record by the
// payload's length (bucket_layout.h), so a differing device table yields wrong
// values but no access outside the tensors, and quantize zero-fills its
// payload, so no uninitialised byte is ever sent.
//
// row_streams (stochastic rounding's per-bucket Philox start): dtype, device
// and shape are checked, the values are not (that would wait for the stream).
// The kernels use a value only as an RNG counter, so any value is memory-safe;
// the values the CPU op accepts give the CPU op's bytes.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../quantize_checks.h"
#include "pycomm/quant_format.h"
#include "quantize_kernels.h"

namespace pycomm {
namespace {

void check_cuda(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "pycomm: ", what, " must be a CUDA tensor, got one on ", t.device());
}

at::Tensor quantize_mixed_cuda(const at::Tensor& x_in, c10::optional<at::Tensor> residual, const at::Tensor& table,
                               int64_t num_buckets, int64_t bits, int64_t bucket_size, bool stochastic, int64_t seed,
                               int64_t skip_begin, int64_t skip_end, const c10::optional<at::Tensor>& host_table,
                               int64_t chunk_row_begin, const c10::optional<at::Tensor>& row_streams) {
  const MixedQuantizeArgs a = check_quantize_mixed_args(x_in, residual, table, num_buckets, bits, bucket_size,
                                                        host_table, chunk_row_begin);
  const int64_t* streams = check_row_streams(row_streams, x_in, a.num_buckets, bucket_size, false);
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // The payload is sized from host_table, which is not compared with the device
  // table (that would wait for the stream): should they differ, the kernel skips
  // records that do not fit, and those bytes must be zeros, not stale memory.
  at::Tensor payload = host_table.has_value() ? at::zeros({a.payload_bytes}, x.options().dtype(at::kByte))
                                              : at::empty({a.payload_bytes}, x.options().dtype(at::kByte));
  if (a.num_buckets == 0) return payload;
  launch_quantize_mixed(x.data_ptr(), to_dtype(x, "x"), residual.has_value() ? residual->data_ptr<float>() : nullptr,
                        table.data_ptr<int64_t>(), a.chunk, a.first_row, x.numel(), a.num_buckets, bucket_size,
                        stochastic, static_cast<uint64_t>(seed), streams, skip_begin, skip_end,
                        payload.data_ptr<uint8_t>(), a.payload_bytes, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return payload;
}

at::Tensor quantize_cuda(const at::Tensor& x_in, c10::optional<at::Tensor> residual,
                         const c10::optional<at::Tensor>& bucket_table, int64_t num_buckets, int64_t bits,
                         int64_t bucket_size, bool stochastic, int64_t seed, int64_t skip_begin, int64_t skip_end,
                         const c10::optional<at::Tensor>& host_table, int64_t chunk_row_begin,
                         const c10::optional<at::Tensor>& row_streams) {
  if (is_mixed_table(bucket_table))
    return quantize_mixed_cuda(x_in, residual, *bucket_table, num_buckets, bits, bucket_size, stochastic, seed,
                               skip_begin, skip_end, host_table, chunk_row_begin, row_streams);
  check_no_host_table(host_table, chunk_row_begin);
  num_buckets = check_quantize_args(x_in, residual, bucket_table, num_buckets, bits, bucket_size);
  const int64_t* streams = check_row_streams(row_streams, x_in, num_buckets, bucket_size, false);
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const int64_t record_size = quant::record_bytes(static_cast<int>(bits), bucket_size);
  at::Tensor payload = at::empty({num_buckets, record_size}, x.options().dtype(at::kByte));
  if (num_buckets == 0) return payload;
  launch_quantize(x.data_ptr(), to_dtype(x, "x"), residual.has_value() ? residual->data_ptr<float>() : nullptr,
                  bucket_table.has_value() ? bucket_table->data_ptr<int64_t>() : nullptr, numel, num_buckets,
                  static_cast<int>(bits), bucket_size, stochastic, static_cast<uint64_t>(seed), streams, skip_begin,
                  skip_end, payload.data_ptr<uint8_t>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return payload;
}

void dequantize_into_mixed_cuda(const at::Tensor& payload, at::Tensor out, const at::Tensor& table, int64_t bits,
                                int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  const MixedTableInfo info = check_dequantize_into_mixed_args(payload, out, table, bits, bucket_size, host_table);
  check_cuda(payload, "payload");
  const c10::cuda::CUDAGuard guard(payload.device());
  if (info.count == 0 || out.numel() == 0) return;
  launch_dequantize_into_mixed(payload.data_ptr<uint8_t>(), info.total_bytes, table.data_ptr<int64_t>(), info.count,
                               out.data_ptr(), to_dtype(out, "out"), out.numel(), bucket_size,
                               at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_into_cuda(const at::Tensor& payload, at::Tensor out, const c10::optional<at::Tensor>& bucket_table,
                          int64_t bits, int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  if (is_mixed_table(bucket_table))
    return dequantize_into_mixed_cuda(payload, out, *bucket_table, bits, bucket_size, host_table);
  check_no_host_table(host_table, -1);
  check_dequantize_into_args(payload, out, bucket_table, bits, bucket_size);
  check_cuda(payload, "payload");
  const c10::cuda::CUDAGuard guard(payload.device());
  const int64_t num_buckets = payload.size(0);
  if (num_buckets == 0 || out.numel() == 0) return;
  launch_dequantize_into(payload.data_ptr<uint8_t>(), num_buckets,
                         bucket_table.has_value() ? bucket_table->data_ptr<int64_t>() : nullptr, out.data_ptr(),
                         to_dtype(out, "out"), out.numel(), static_cast<int>(bits), bucket_size,
                         at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize_sum_mixed_cuda(const at::Tensor& payloads, const c10::optional<at::Tensor>& init_in,
                                     const at::Tensor& table, int64_t first_row, int64_t bits, int64_t bucket_size,
                                     const c10::optional<at::Tensor>& host_table) {
  const auto checked =
      check_dequantize_sum_mixed_args(payloads, init_in, table, first_row, bits, bucket_size, host_table);
  check_cuda(payloads, "payloads");
  const c10::cuda::CUDAGuard guard(payloads.device());
  const int64_t num_buckets = checked.second;
  at::Tensor out = at::empty({num_buckets * bucket_size}, payloads.options().dtype(at::kFloat));
  if (num_buckets == 0) return out;
  at::Tensor init;
  if (init_in.has_value()) init = init_in->contiguous();
  launch_dequantize_sum_mixed(payloads.data_ptr<uint8_t>(), payloads.size(0), payloads.size(1),
                              table.data_ptr<int64_t>(), first_row, num_buckets,
                              init.defined() ? init.data_ptr() : nullptr,
                              init.defined() ? to_dtype(init, "init") : DType::Float32,
                              init.defined() ? init.numel() : 0, bucket_size, out.data_ptr<float>(),
                              at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_sum_cuda(const at::Tensor& payloads, const c10::optional<at::Tensor>& init_in,
                               const c10::optional<at::Tensor>& bucket_table, int64_t init_bucket_begin, int64_t bits,
                               int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  if (is_mixed_table(bucket_table))
    return dequantize_sum_mixed_cuda(payloads, init_in, *bucket_table, init_bucket_begin, bits, bucket_size,
                                     host_table);
  check_no_host_table(host_table, -1);
  check_dequantize_sum_args(payloads, init_in, bucket_table, init_bucket_begin, bits, bucket_size);
  check_cuda(payloads, "payloads");
  const c10::cuda::CUDAGuard guard(payloads.device());
  const int64_t sources = payloads.size(0), num_buckets = payloads.size(1);
  at::Tensor out = at::empty({num_buckets * bucket_size}, payloads.options().dtype(at::kFloat));
  if (num_buckets == 0) return out;
  at::Tensor init;
  if (init_in.has_value()) init = init_in->contiguous();
  launch_dequantize_sum(payloads.data_ptr<uint8_t>(), sources, num_buckets,
                        init.defined() ? init.data_ptr() : nullptr,
                        init.defined() ? to_dtype(init, "init") : DType::Float32, init.defined() ? init.numel() : 0,
                        bucket_table.has_value() ? bucket_table->data_ptr<int64_t>() : nullptr, init_bucket_begin,
                        static_cast<int>(bits), bucket_size, out.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize_into", &dequantize_into_cuda);
  m.impl("dequantize_sum", &dequantize_sum_cuda);
}

}  // namespace pycomm
