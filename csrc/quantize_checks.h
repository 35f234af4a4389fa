// Argument validation shared by the CPU and CUDA implementations of the
// quantization ops, so both reject the same inputs with the same messages.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "pycomm/bucket_layout.h"
#include "pycomm/common.h"
#include "pycomm/quant_format.h"

namespace pycomm {

inline void check_bits_and_bucket(int64_t bits, int64_t bucket_size) {
  TORCH_CHECK(bits >= quant::kMinBits && bits <= quant::kMaxBits,
              "pycomm: bits must be in [1, 8], got ", bits);
  TORCH_CHECK(bucket_size >= 8 && bucket_size % 8 == 0 && bucket_size <= (int64_t(1) << 24),
              "pycomm: bucket_size must be a positive multiple of 8 and at most 2^24, got ", bucket_size);
}

inline DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "pycomm: ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), "pycomm: ", what, " is on ", b.device(), " but the input is on ",
              a.device());
}

// Checks an optional bucket table against the tensor it indexes and returns
// the number of payload buckets it describes (or -1 when absent).
inline int64_t check_bucket_table(const c10::optional<at::Tensor>& table, const at::Tensor& like) {
  if (!table.has_value()) return -1;
  const at::Tensor& t = *table;
  check_same_device(like, t, "bucket_table");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(1) == 2 && t.is_contiguous(),
              "pycomm: bucket_table must be a contiguous int64 tensor of shape [num_buckets, 2], got ",
              t.scalar_type(), " ", t.sizes());
  return t.size(0);
}

inline BucketLayout make_layout(const c10::optional<at::Tensor>& table, int64_t numel, int64_t bucket_size,
                                int64_t first_bucket) {
  BucketLayout layout;
  layout.table = table.has_value() ? table->data_ptr<int64_t>() : nullptr;
  layout.numel = numel;
  layout.bucket_size = bucket_size;
  layout.first_bucket = first_bucket;
  return layout;
}

inline void check_payload(const at::Tensor& payload, int64_t bits, int64_t bucket_size, int64_t dims,
                          const char* what) {
  TORCH_CHECK(payload.scalar_type() == at::kByte, "pycomm: ", what, " must be uint8, got ", payload.scalar_type());
  TORCH_CHECK(payload.dim() == dims, "pycomm: ", what, " must have ", dims, " dimensions, got shape ",
              payload.sizes());
  TORCH_CHECK(payload.is_contiguous(), "pycomm: ", what, " must be contiguous");
  const int64_t expected = quant::record_bytes(static_cast<int>(bits), bucket_size);
  TORCH_CHECK(payload.size(dims - 1) == expected, "pycomm: ", what, " has records of ", payload.size(dims - 1),
              " bytes, but bits=", bits, " and bucket_size=", bucket_size, " need ", expected,
              " bytes per bucket (8 header bytes + bucket_size*bits/8)");
}

// Full validation of quantize(x, residual, bucket_table, num_buckets, bits,
// bucket_size, ...). Returns the number of payload buckets (num_buckets, or
// the number needed when it is negative).
inline int64_t check_quantize_args(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                   const c10::optional<at::Tensor>& bucket_table, int64_t num_buckets, int64_t bits,
                                   int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  to_dtype(x, "x");
  const int64_t numel = x.numel();
  const int64_t table_rows = check_bucket_table(bucket_table, x);
  const int64_t needed = table_rows >= 0 ? table_rows : (numel + bucket_size - 1) / bucket_size;
  if (num_buckets < 0) num_buckets = needed;
  TORCH_CHECK(table_rows < 0 || num_buckets == table_rows, "pycomm: num_buckets (", num_buckets,
              ") must equal the number of bucket_table rows (", table_rows, ")");
  TORCH_CHECK(num_buckets >= needed, "pycomm: num_buckets=", num_buckets, " cannot hold ", numel,
              " elements in buckets of ", bucket_size, " (need at least ", needed, ")");
  if (residual.has_value()) {
    check_same_device(x, *residual, "residual");
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->numel() == numel,
                "pycomm: residual must be a contiguous float32 tensor with as many elements as x (", numel,
                "), got ", residual->scalar_type(), " with ", residual->numel(), " elements");
  }
  return num_buckets;
}

// Full validation of dequantize_into(payload, out, bucket_table, bits, bucket_size).
inline void check_dequantize_into_args(const at::Tensor& payload, const at::Tensor& out,
                                       const c10::optional<at::Tensor>& bucket_table, int64_t bits,
                                       int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  check_payload(payload, bits, bucket_size, 2, "payload");
  to_dtype(out, "out");
  check_same_device(payload, out, "out");
  TORCH_CHECK(out.is_contiguous(), "pycomm: out must be contiguous");
  const int64_t num_buckets = payload.size(0);
  const int64_t table_rows = check_bucket_table(bucket_table, out);
  if (table_rows >= 0) {
    TORCH_CHECK(table_rows == num_buckets, "pycomm: the payload has ", num_buckets,
                " buckets but bucket_table has ", table_rows, " rows");
  } else {
    TORCH_CHECK(out.numel() <= num_buckets * bucket_size, "pycomm: the payload holds ", num_buckets,
                " buckets of ", bucket_size, " elements (", num_buckets * bucket_size, ") but out has ",
                out.numel(), " elements");
  }
}

// Full validation of dequantize_sum(payloads, init, bucket_table,
// init_bucket_begin, bits, bucket_size).
inline void check_dequantize_sum_args(const at::Tensor& payloads, const c10::optional<at::Tensor>& init,
                                      const c10::optional<at::Tensor>& bucket_table, int64_t init_bucket_begin,
                                      int64_t bits, int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  check_payload(payloads, bits, bucket_size, 3, "payloads");
  if (init.has_value()) {
    to_dtype(*init, "init");
    check_same_device(payloads, *init, "init");
    const int64_t table_rows = check_bucket_table(bucket_table, *init);
    TORCH_CHECK(init_bucket_begin >= 0, "pycomm: init_bucket_begin must be >= 0, got ", init_bucket_begin);
    const int64_t num_buckets = payloads.size(1);
    if (table_rows >= 0)
      TORCH_CHECK(init_bucket_begin + num_buckets <= table_rows, "pycomm: buckets [", init_bucket_begin, ", ",
                  init_bucket_begin + num_buckets, ") are outside bucket_table's ", table_rows, " rows");
  } else {
    TORCH_CHECK(!bucket_table.has_value(), "pycomm: bucket_table is only used together with init");
  }
}

}  // namespace pycomm
