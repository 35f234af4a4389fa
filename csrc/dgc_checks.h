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
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && (t.size(1) == 2 || t.size(1) == 3) &&
                  t.is_contiguous(),
              "pycomm: segments must be a contiguous int64 tensor of shape [num_segments, 2] (offset, length) or "
              "[num_segments, 3] (offset, length, keep), got ",
              t.scalar_type(), " ", t.sizes());
  table.rows = t.data_ptr<int64_t>();
  table.count = t.size(0);
  table.columns = t.size(1);
  return table;
}

// The keep column of a host table: 0 <= keep <= the segment's length (after
// the clamping of SegmentTable::segment).
inline void check_segment_keep(const SegmentTable& host_table) {
  if (!host_table.has_keep()) return;
  for (int64_t s = 0; s < host_table.count; ++s) {
    int64_t offset, length;
    host_table.segment(s, offset, length);
    const int64_t keep = host_table.rows[host_table.columns * s + 2];
    TORCH_CHECK(keep >= 0 && keep <= length, "pycomm: segment ", s, " (offset ", offset, ", length ", length,
                ") keeps ", keep, " elements; keep must be in [0, length]");
  }
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

// Full validation of each op's arguments, shared by the CPU and CUDA ops.
inline void check_compensate_args(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& v, double momentum,
                                  double clip_norm) {
  to_dtype(grad, "grad");
  check_state_buffer(grad, u, "u");
  check_state_buffer(grad, v, "v");
  TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, "pycomm: momentum must be in [0, 1), got ", momentum);
  TORCH_CHECK(clip_norm >= 0.0, "pycomm: clip_norm must be >= 0 (0 disables clipping), got ", clip_norm);
}

inline void check_topk_args(const at::Tensor& x, double density, double sample_ratio) {
  to_dtype(x, "x");
  check_density(density);
  TORCH_CHECK(sample_ratio > 0.0 && sample_ratio <= 1.0, "pycomm: sample_ratio must be in (0, 1], got ",
              sample_ratio);
}

inline void check_mask_args(const at::Tensor& v, const c10::optional<at::Tensor>& u, const at::Tensor& indices) {
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous(), "pycomm: v must be a contiguous float32 tensor");
  if (u.has_value()) check_state_buffer(v, *u, "u");
  check_indices(indices, "indices");
  check_same_device(v, indices, "indices");
}

inline void check_densify_args(const at::Tensor& values, const at::Tensor& indices, int64_t numel) {
  to_dtype(values, "values");
  check_indices(indices, "indices");
  check_same_device(values, indices, "indices");
  TORCH_CHECK(numel >= 0, "pycomm: numel must be >= 0, got ", numel);
  TORCH_CHECK(values.sizes() == indices.sizes(), "pycomm: values ", values.sizes(), " and indices ", indices.sizes(),
              " must have the same shape");
}

// The error of an index outside [0, numel) at `position` (< 0: none found).
inline void check_index_position(int64_t position, int64_t value, int64_t numel, const char* what) {
  TORCH_CHECK(position < 0, "pycomm: ", what, " holds index ", value, " at position ", position, ", outside [0, ",
              numel, "); nothing was written");
}

// dgc_mask / densify's optional first_bad: where the op stores the first bad position (or -1)
// instead of raising.
inline void check_first_bad(const c10::optional<at::Tensor>& first_bad, const at::Tensor& like) {
  if (!first_bad.has_value()) return;
  TORCH_CHECK(first_bad->scalar_type() == at::kLong && first_bad->numel() == 1 && first_bad->is_contiguous(),
              "pycomm: first_bad must be a contiguous int64 tensor of one element, got ", first_bad->scalar_type(),
              " of shape ", first_bad->sizes());
  check_same_device(like, *first_bad, "first_bad");
}

}  // namespace pycomm
