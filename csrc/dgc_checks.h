// Argument validation shared by the CPU and CUDA implementations of the DGC
// ops (momentum correction, top-k selection, masking, densify).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "pycomm/segments.h"
#include "quantize_checks.h"

namespace pycomm {

inline SegmentTable check_segments(const c10::optional<at::Tensor>& segments, const at::Tensor& like) {
  SegmentTable table{nullptr, 1, like.numel()};
  if (!segments.has_value()) return table;
  const at::Tensor& t = *segments;
  check_same_device(like, t, "segments");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(1) == 2 && t.is_contiguous(),
              "pycomm: segments must be a contiguous int64 tensor of shape [num_segments, 2] (offset, length), got ",
              t.scalar_type(), " ", t.sizes());
  table.rows = t.data_ptr<int64_t>();
  table.count = t.size(0);
  return table;
}

inline void check_density(double density) {
  TORCH_CHECK(density > 0.0 && density <= 1.0, "pycomm: density must be in (0, 1], got ", density);
}

inline void check_state_buffer(const at::Tensor& like, const at::Tensor& buffer, const char* what) {
  check_same_device(like, buffer, what);
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous() && buffer.numel() == like.numel(),
              "pycomm: ", what, " must be a contiguous float32 tensor with ", like.numel(), " elements, got ",
              buffer.scalar_type(), " with ", buffer.numel(), " elements");
}

inline at::ScalarType index_type_for(int64_t numel) {
  return numel <= static_cast<int64_t>(INT32_MAX) ? at::kInt : at::kLong;
}

inline void check_indices(const at::Tensor& indices, const char* what) {
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, "pycomm: ", what,
              " must be int32 or int64, got ", indices.scalar_type());
}

}  // namespace pycomm
