// Argument validation and the tensor-list layout shared by the CPU and CUDA
// implementations of the Philox ops (philox_variates, philox_axpy_,
// philox_perturbed_copy, philox_dot), so both reject the same inputs with the
// same messages and number the elements the same way.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "pycomm/common.h"
#include "pycomm/philox_variates.h"
#include "quantize_checks.h"

namespace pycomm {

// One non-empty tensor of a list: its elements have the global indices
// [start, start + numel). src is read, dst written (the same pointer for the
// in-place ops).
struct PhiloxSpan {
  int64_t start;
  int64_t numel;
  DType dtype;
  const void* src;
  void* dst;
};

inline void check_distribution(int64_t distribution) {
  TORCH_CHECK(distribution == philox::kGaussian || distribution == philox::kRademacher,
              "pycomm: distribution must be 0 (gaussian) or 1 (rademacher), got ", distribution);
}

inline void check_offset_count(int64_t offset, int64_t count) {
  TORCH_CHECK(offset >= 0, "pycomm: offset must be non-negative, got ", offset);
  TORCH_CHECK(count >= 0, "pycomm: the number of elements must be non-negative, got ", count);
  TORCH_CHECK(count <= std::numeric_limits<int64_t>::max() - offset, "pycomm: offset + number of elements (", offset,
              " + ", count, ") exceeds 2^63 - 1");
}

// Same device and supported dtypes for every tensor; contiguity when the op
// writes in place. Returns the total number of elements (after checking
// offset + total against overflow).
inline int64_t check_philox_tensors(at::TensorList tensors, int64_t offset, bool in_place, const char* op) {
  TORCH_CHECK(!tensors.empty(), "pycomm: ", op, " needs at least one tensor");
  const at::Device device = tensors[0].device();
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "pycomm: ", op, ": tensor ", i, " is undefined");
    TORCH_CHECK(t.device() == device, "pycomm: ", op, ": all tensors must be on one device; tensor 0 is on ", device,
                ", tensor ", i, " on ", t.device());
    to_dtype(t, "each tensor");
    if (in_place) {
      TORCH_CHECK(t.is_contiguous(), "pycomm: ", op, ": tensor ", i, " must be contiguous (it is updated in place)");
    }
    TORCH_CHECK(t.numel() <= std::numeric_limits<int64_t>::max() - total, "pycomm: ", op, ": too many elements");
    total += t.numel();
  }
  check_offset_count(offset, total);
  return total;
}

// In-place ops: no two tensors may share memory (each element is updated once,
// by one thread). Tensors are contiguous here, so each occupies one byte range.
inline void check_no_overlap(at::TensorList tensors, const char* op) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    ranges.emplace_back(p, p + static_cast<uintptr_t>(t.numel()) * t.element_size());
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    TORCH_CHECK(ranges[i].first >= ranges[i - 1].second, "pycomm: ", op,
                ": the tensors overlap in memory (each may appear only once)");
  }
}

// Multi-direction ops (philox_axpy_multi_, philox_dot_multi): K seeds and,
// for the axpy, K alphas: a float32 / float64 tensor of K elements, on the
// tensors' device or on the CPU (then read on the host).
inline void check_alphas(const at::Tensor& alphas, size_t directions, const at::Device& device, const char* op) {
  TORCH_CHECK(alphas.defined(), "pycomm: ", op, ": alphas is undefined");
  TORCH_CHECK(alphas.scalar_type() == at::kFloat || alphas.scalar_type() == at::kDouble, "pycomm: ", op,
              ": alphas must be float32 or float64, got ", alphas.scalar_type());
  TORCH_CHECK(alphas.dim() <= 1, "pycomm: ", op, ": alphas must be 0-d or 1-D, got ", alphas.dim(), " dimensions");
  TORCH_CHECK(static_cast<size_t>(alphas.numel()) == directions, "pycomm: ", op, ": one alpha per seed: got ",
              alphas.numel(), " alphas for ", directions, " seeds");
  TORCH_CHECK(alphas.device() == device || alphas.device().is_cpu(), "pycomm: ", op,
              ": alphas must be on the tensors' device (", device, ") or on the CPU, got ", alphas.device());
}

// The alphas as float32 (each rounded to nearest, as the single-direction ops
// round their double alpha), contiguous, on their own device.
inline at::Tensor float_alphas(const at::Tensor& alphas) {
  return alphas.reshape({-1}).to(at::kFloat).contiguous();
}

// The non-empty tensors as spans, numbered from `offset` in list order.
// src and dst lists have the same shapes (dst may be src).
inline std::vector<PhiloxSpan> make_spans(at::TensorList src, at::TensorList dst, int64_t offset) {
  std::vector<PhiloxSpan> spans;
  int64_t start = offset;
  for (size_t i = 0; i < src.size(); ++i) {
    const int64_t n = src[i].numel();
    if (n == 0) continue;
    spans.push_back(PhiloxSpan{start, n, to_dtype(src[i], "each tensor"), src[i].data_ptr(), dst[i].data_ptr()});
    start += n;
  }
  return spans;
}

}  // namespace pycomm
