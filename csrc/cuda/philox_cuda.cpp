// CUDA implementation of the Philox ops: validation (shared with the CPU ops,
// csrc/philox_checks.h), grouping of the tensor list into batches of at most
// kPhiloxMaxTensors consecutive tensors of one dtype and of the seeds into
// groups of kPhiloxMaxDirections (both passed to the kernels as kernel
// parameters: no pointer or seed table is copied to the device), and launches
// on the current stream. No host synchronisation (the multi-direction axpy
// reads device alphas in the kernel); the only allocations are the
// outputs and, for philox_dot, its workspace (chunk partials). Results are
// bit-identical to the CPU ops'.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "../philox_checks.h"
#include "philox_kernels.h"

namespace pycomm {
namespace {

void check_cuda_tensors(at::TensorList tensors, const char* op) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.is_cuda(), "pycomm: ", op, ": expected CUDA tensors, got one on ", t.device());
  }
}

// Consecutive spans, cut where the dtype changes or a batch is full.
std::vector<PhiloxBatch> make_batches(const std::vector<PhiloxSpan>& spans) {
  std::vector<PhiloxBatch> batches;
  for (const PhiloxSpan& span : spans) {
    if (batches.empty() || batches.back().count == kPhiloxMaxTensors || batches.back().dtype != span.dtype) {
      batches.emplace_back();
      batches.back().count = 0;
      batches.back().dtype = span.dtype;
    }
    PhiloxBatch& b = batches.back();
    b.start[b.count] = span.start;
    b.src[b.count] = span.src;
    b.dst[b.count] = span.dst;
    ++b.count;
    b.start[b.count] = span.start + span.numel;
  }
  return batches;
}

// Directions in groups of at most kPhiloxMaxDirections (one launch per group
// and batch; groups run in order, so each element still sees the directions in
// order). alphas: float32 on the device (device_alpha) or on the CPU.
std::vector<PhiloxDirections> make_direction_groups(at::IntArrayRef seeds, const at::Tensor& alphas) {
  std::vector<PhiloxDirections> groups;
  const bool on_device = alphas.defined() && alphas.is_cuda();
  const float* host_alpha = alphas.defined() && !on_device ? alphas.data_ptr<float>() : nullptr;
  const float* device_alpha = on_device ? alphas.data_ptr<float>() : nullptr;
  for (size_t first = 0; first < seeds.size(); first += kPhiloxMaxDirections) {
    PhiloxDirections d{};
    d.count = static_cast<int>(std::min<size_t>(kPhiloxMaxDirections, seeds.size() - first));
    for (int k = 0; k < d.count; ++k) {
      d.seed[k] = static_cast<uint64_t>(seeds[first + k]);
      d.alpha[k] = host_alpha != nullptr ? host_alpha[first + k] : 0.0f;
    }
    d.device_alpha = device_alpha != nullptr ? device_alpha + first : nullptr;
    groups.push_back(d);
  }
  return groups;
}

PhiloxDirections single_direction(int64_t seed, double alpha) {
  PhiloxDirections d{};
  d.count = 1;
  d.seed[0] = static_cast<uint64_t>(seed);
  d.alpha[0] = static_cast<float>(alpha);
  d.device_alpha = nullptr;
  return d;
}

void run_elementwise(const std::vector<PhiloxSpan>& spans, const std::vector<PhiloxDirections>& groups,
                     int64_t distribution, bool fill) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<PhiloxBatch> batches = make_batches(spans);
  for (const PhiloxDirections& directions : groups) {
    for (const PhiloxBatch& b : batches) {
      launch_philox_elementwise(b, directions, static_cast<int>(distribution), fill, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Dot products of the groups' directions into out (float64, one per direction).
void run_dot(const std::vector<at::Tensor>& src, int64_t offset, int64_t total,
             const std::vector<PhiloxDirections>& groups, int64_t distribution, at::Tensor& out) {
  const int64_t begin = offset, end = offset + total;
  int64_t workspace_size = 0;
  for (const PhiloxDirections& d : groups) workspace_size += philox_dot_workspace_doubles(begin, end, d.count);
  at::Tensor workspace = at::empty({workspace_size}, out.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<PhiloxBatch> batches = make_batches(make_spans(src, src, offset));
  double* area = workspace.data_ptr<double>();
  double* result = out.data_ptr<double>();
  for (const PhiloxDirections& d : groups) {
    for (size_t i = 0; i < batches.size(); ++i) {
      launch_philox_dot_batch(batches[i], static_cast<int>(i), begin, end, d, static_cast<int>(distribution), area,
                              stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_philox_dot_final(begin, end, d.count, area, result, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    area += philox_dot_workspace_doubles(begin, end, d.count);
    result += d.count;
  }
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.contiguous());
  return out;
}

at::Tensor philox_variates_cuda(const at::Tensor& like, int64_t n, int64_t seed, int64_t offset,
                                int64_t distribution) {
  check_distribution(distribution);
  check_offset_count(offset, n);
  to_dtype(like, "like");
  check_cuda_tensors({like}, "philox_variates");
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty({n}, like.options());
  if (n == 0) return out;
  const std::vector<PhiloxSpan> spans{PhiloxSpan{offset, n, to_dtype(out, "out"), nullptr, out.data_ptr()}};
  run_elementwise(spans, {single_direction(seed, 0.0)}, distribution, /*fill=*/true);
  return out;
}

void philox_axpy_cuda(at::TensorList tensors, int64_t seed, double alpha, int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/true, "philox_axpy_");
  check_cuda_tensors(tensors, "philox_axpy_");
  check_no_overlap(tensors, "philox_axpy_");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  run_elementwise(make_spans(tensors, tensors, offset), {single_direction(seed, alpha)}, distribution,
                  /*fill=*/false);
}

void philox_axpy_multi_cuda(at::TensorList tensors, at::IntArrayRef seeds, const at::Tensor& alphas,
                            int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/true, "philox_axpy_multi_");
  check_cuda_tensors(tensors, "philox_axpy_multi_");
  check_no_overlap(tensors, "philox_axpy_multi_");
  check_alphas(alphas, seeds.size(), tensors[0].device(), "philox_axpy_multi_");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::Tensor a = float_alphas(alphas);  // on the device: a cast kernel on this stream, no wait
  run_elementwise(make_spans(tensors, tensors, offset), make_direction_groups(seeds, a), distribution,
                  /*fill=*/false);
}

std::vector<at::Tensor> philox_perturbed_copy_cuda(at::TensorList tensors, int64_t seed, double alpha,
                                                   int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/false, "philox_perturbed_copy");
  check_cuda_tensors(tensors, "philox_perturbed_copy");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  std::vector<at::Tensor> out;
  out.reserve(src.size());
  for (const at::Tensor& t : src) out.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  run_elementwise(make_spans(src, out, offset), {single_direction(seed, alpha)}, distribution, /*fill=*/false);
  return out;
}

at::Tensor philox_dot_cuda(at::TensorList tensors, int64_t seed, int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  const int64_t total = check_philox_tensors(tensors, offset, /*in_place=*/false, "philox_dot");
  check_cuda_tensors(tensors, "philox_dot");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::TensorOptions options = tensors[0].options().dtype(at::kDouble);
  if (total == 0) return at::zeros({}, options);
  at::Tensor out = at::empty({}, options);
  run_dot(contiguous_all(tensors), offset, total, {single_direction(seed, 0.0)}, distribution, out);
  return out;
}

at::Tensor philox_dot_multi_cuda(at::TensorList tensors, at::IntArrayRef seeds, int64_t distribution,
                                 int64_t offset) {
  check_distribution(distribution);
  const int64_t total = check_philox_tensors(tensors, offset, /*in_place=*/false, "philox_dot_multi");
  check_cuda_tensors(tensors, "philox_dot_multi");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::TensorOptions options = tensors[0].options().dtype(at::kDouble);
  const int64_t directions = static_cast<int64_t>(seeds.size());
  if (total == 0 || directions == 0) return at::zeros({directions}, options);
  at::Tensor out = at::empty({directions}, options);
  run_dot(contiguous_all(tensors), offset, total, make_direction_groups(seeds, at::Tensor()), distribution, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CUDA, m) {
  m.impl("philox_variates", &philox_variates_cuda);
  m.impl("philox_axpy_", &philox_axpy_cuda);
  m.impl("philox_perturbed_copy", &philox_perturbed_copy_cuda);
  m.impl("philox_dot", &philox_dot_cuda);
  m.impl("philox_axpy_multi_", &philox_axpy_multi_cuda);
  m.impl("philox_dot_multi", &philox_dot_multi_cuda);
}

}  // namespace pycomm
