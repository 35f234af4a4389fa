// CUDA implementation of the Philox ops: validation (shared with the CPU ops,
// csrc/philox_checks.h), grouping of the tensor list into batches of at most
// kPhiloxMaxTensors consecutive tensors of one dtype (passed to the kernels as
// kernel parameters: no pointer table is copied to the device), and launches
// on the current stream. No host synchronisation; the only allocations are the
// outputs and, for philox_dot, its workspace (chunk partials). Results are
// bit-identical to the CPU ops'.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

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

void run_elementwise(const std::vector<PhiloxSpan>& spans, int64_t seed, int64_t distribution, float alpha,
                     bool fill) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const PhiloxBatch& b : make_batches(spans)) {
    launch_philox_elementwise(b, static_cast<uint64_t>(seed), static_cast<int>(distribution), alpha, fill, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  run_elementwise(spans, seed, distribution, 0.0f, /*fill=*/true);
  return out;
}

void philox_axpy_cuda(at::TensorList tensors, int64_t seed, double alpha, int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  check_philox_tensors(tensors, offset, /*in_place=*/true, "philox_axpy_");
  check_cuda_tensors(tensors, "philox_axpy_");
  check_no_overlap(tensors, "philox_axpy_");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  run_elementwise(make_spans(tensors, tensors, offset), seed, distribution, static_cast<float>(alpha),
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
  run_elementwise(make_spans(src, out, offset), seed, distribution, static_cast<float>(alpha), /*fill=*/false);
  return out;
}

at::Tensor philox_dot_cuda(at::TensorList tensors, int64_t seed, int64_t distribution, int64_t offset) {
  check_distribution(distribution);
  const int64_t total = check_philox_tensors(tensors, offset, /*in_place=*/false, "philox_dot");
  check_cuda_tensors(tensors, "philox_dot");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::TensorOptions options = tensors[0].options().dtype(at::kDouble);
  if (total == 0) return at::zeros({}, options);
  const std::vector<at::Tensor> src = contiguous_all(tensors);
  const int64_t begin = offset, end = offset + total;
  at::Tensor workspace = at::empty({philox_dot_workspace_doubles(begin, end)}, options);
  at::Tensor out = at::empty({}, options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<PhiloxBatch> batches = make_batches(make_spans(src, src, offset));
  for (size_t i = 0; i < batches.size(); ++i) {
    launch_philox_dot_batch(batches[i], static_cast<int>(i), begin, end, static_cast<uint64_t>(seed),
                            static_cast<int>(distribution), workspace.data_ptr<double>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_philox_dot_final(begin, end, workspace.data_ptr<double>(), out.data_ptr<double>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CUDA, m) {
  m.impl("philox_variates", &philox_variates_cuda);
  m.impl("philox_axpy_", &philox_axpy_cuda);
  m.impl("philox_perturbed_copy", &philox_perturbed_copy_cuda);
  m.impl("philox_dot", &philox_dot_cuda);
}

}  // namespace pycomm
