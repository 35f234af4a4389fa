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

}  // namespace pycomm
