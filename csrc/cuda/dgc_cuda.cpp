// CUDA implementation of the DGC ops: validation (shared with the CPU ops,
// dgc_checks.h) and launches of the kernels in dgc_kernels.cu on the current
// stream, with their workspace allocated here through torch's caching
// allocator. Built only when torch has CUDA (setup.py). Results equal the CPU
// ops' (see dgc_kernels.h for the one caveat, the double norm of clipping).
//
// Host synchronisation, where the op cannot do without it:
//   - topk_magnitude with a segment table: the outputs' length is the sum of
//     each segment's k, so the table is read on the host: from the caller's
//     `host_segments` copy (the DGC hook passes one; nothing waits), or else
//     copied from the device (a few hundred bytes; this waits). A keep column
//     is validated on that host copy.
//   - dgc_mask and densify: the indices usually come from other ranks, and an
//     index out of range must raise. A kernel records the lowest bad position
//     and the writing kernels skip everything when it is set; then one 8-byte
//     device->host copy of that word tells the host whether to raise (a
//     second small copy fetches the bad index for the message). So the stream
//     has finished the op's work when these return. With the caller's
//     `first_bad` tensor, the word is that tensor and nothing is copied: no
//     wait, no raise (the DGC hook reads it back later, without waiting).
//   - dgc_compensate never waits.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "../dgc_checks.h"
#include "dgc_kernels.h"

namespace pycomm {
namespace {

void check_cuda(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "pycomm: ", what, " must be a CUDA tensor, got one on ", t.device());
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void dgc_compensate_cuda(const at::Tensor& grad_in, at::Tensor u, at::Tensor v,
                         const c10::optional<at::Tensor>& segments, double momentum, bool nesterov,
                         double clip_norm) {
  check_compensate_args(grad_in, u, v, momentum, clip_norm);
  check_cuda(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const SegmentTable table = check_segments(segments, grad);
  if (grad.numel() == 0 || table.count == 0) return;
  const bool clip = clip_norm > 0.0;
  const size_t bytes = dgc_compensate_workspace_bytes(grad.numel(), table.count, clip);
  at::Tensor ws = workspace(bytes, grad);
  C10_CUDA_CHECK(launch_dgc_compensate(grad.data_ptr(), to_dtype(grad, "grad"), u.data_ptr<float>(),
                                       v.data_ptr<float>(), table.rows, table.count, table.columns, grad.numel(),
                                       static_cast<float>(momentum), nesterov, clip_norm, ws.data_ptr(), bytes,
                                       at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// `exact`, `sample_ratio` and `seed` select the CPU's strategy; its sampled
// mode returns the exact top-k too, and the CUDA kernels always compute that
// set directly, so they do not depend on them.
std::tuple<at::Tensor, at::Tensor> topk_magnitude_cuda(const at::Tensor& x_in,
                                                       const c10::optional<at::Tensor>& segments, double density,
                                                       bool /*exact*/, double sample_ratio, int64_t /*seed*/,
                                                       const c10::optional<at::Tensor>& host_segments) {
  check_topk_args(x_in, density, sample_ratio);
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous().view(-1);
  const SegmentTable table = check_segments(segments, x);
  // The outputs' length depends on the table's contents: use the caller's host
  // copy, or copy the table to the host (which waits for the stream).
  at::Tensor host_rows;
  if (segments.has_value()) {
    if (host_segments.has_value()) {
      TORCH_CHECK(host_segments->device().is_cpu() && host_segments->scalar_type() == at::kLong &&
                      host_segments->is_contiguous() && host_segments->sizes() == segments->sizes(),
                  "pycomm: host_segments must be a contiguous int64 CPU tensor shaped like segments ",
                  segments->sizes(), ", got ", host_segments->device(), " ", host_segments->sizes());
      host_rows = *host_segments;
    } else {
      host_rows = segments->cpu();
    }
  }
  const SegmentTable host_table{host_rows.defined() ? host_rows.data_ptr<int64_t>() : nullptr, table.count,
                                x.numel(), table.columns};
  check_segment_keep(host_table);
  const TopkPlan plan = topk_plan(host_table.rows, table.count, table.columns, x.numel(), density);
  // Sized from host_segments, which cannot be compared with the device table
  // without a sync: should they differ, slots the kernels do not fill must be
  // zeros, not stale memory (the outputs are sent to peers).
  const bool zero = host_segments.has_value();
  const at::TensorOptions index_options = x.options().dtype(index_type_for(x.numel()));
  at::Tensor values = zero ? at::zeros({plan.total_k}, x.options()) : at::empty({plan.total_k}, x.options());
  at::Tensor indices = zero ? at::zeros({plan.total_k}, index_options) : at::empty({plan.total_k}, index_options);
  if (plan.total_k == 0) return {values, indices};
  const size_t bytes = topk_magnitude_workspace_bytes(x.numel(), table.count, plan);
  at::Tensor ws = workspace(bytes, x);
  C10_CUDA_CHECK(launch_topk_magnitude(x.data_ptr(), to_dtype(x, "x"), x.numel(), table.rows, table.count,
                                       table.columns, density, plan, values.data_ptr(), indices.data_ptr(),
                                       indices.scalar_type() == at::kLong, ws.data_ptr(), bytes,
                                       at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

// Raises the CPU op's error when the index check found a bad position. This is
// the device->host copy described at the top (it waits for the stream).
void raise_if_bad_index(const at::Tensor& first_bad, const at::Tensor& indices, int64_t numel, const char* what) {
  const int64_t position = first_bad.item<int64_t>();  // ~0 (none) reads as -1
  if (position < 0) return;
  check_index_position(position, indices.view(-1)[position].item<int64_t>(), numel, what);
}

unsigned long long* as_word(at::Tensor& first_bad) {
  return reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>());
}

// The word the index check writes: the caller's first_bad, or a fresh one that is read back.
at::Tensor first_bad_word(const c10::optional<at::Tensor>& first_bad, const at::Tensor& like) {
  return first_bad.has_value() ? *first_bad : at::empty({1}, like.options().dtype(at::kLong));
}

void dgc_mask_cuda(at::Tensor v, c10::optional<at::Tensor> u, const at::Tensor& indices_in,
                   c10::optional<at::Tensor> first_bad_out) {
  check_mask_args(v, u, indices_in);
  check_cuda(v, "v");
  check_first_bad(first_bad_out, v);
  const c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t count = indices.numel();
  if (count == 0) {
    if (first_bad_out.has_value()) first_bad_out->fill_(-1);
    return;
  }
  const bool index64 = indices.scalar_type() == at::kLong;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor first_bad = first_bad_word(first_bad_out, v);
  C10_CUDA_CHECK(launch_index_check(indices.data_ptr(), index64, count, v.numel(), as_word(first_bad), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(launch_dgc_mask(v.data_ptr<float>(), u.has_value() ? u->data_ptr<float>() : nullptr,
                                 indices.data_ptr(), index64, count, as_word(first_bad), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!first_bad_out.has_value()) raise_if_bad_index(first_bad, indices, v.numel(), "indices");
}

at::Tensor densify_cuda(const at::Tensor& values_in, const at::Tensor& indices_in, int64_t numel,
                        c10::optional<at::Tensor> first_bad_out) {
  check_densify_args(values_in, indices_in, numel);
  check_cuda(values_in, "values");
  check_first_bad(first_bad_out, values_in);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor out = at::zeros({numel}, values.options().dtype(at::kFloat));
  const int64_t count = indices.numel();
  if (count == 0) {
    if (first_bad_out.has_value()) first_bad_out->fill_(-1);
    return out;
  }
  const bool index64 = indices.scalar_type() == at::kLong;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor first_bad = first_bad_word(first_bad_out, values);
  C10_CUDA_CHECK(launch_index_check(indices.data_ptr(), index64, count, numel, as_word(first_bad), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t bytes = densify_workspace_bytes(count, index64, numel);
  at::Tensor ws = workspace(bytes, values);
  C10_CUDA_CHECK(launch_densify(values.data_ptr(), to_dtype(values, "values"), indices.data_ptr(), index64, count,
                                numel, as_word(first_bad), out.data_ptr<float>(), ws.data_ptr(), bytes, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!first_bad_out.has_value()) raise_if_bad_index(first_bad, indices, numel, "indices");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CUDA, m) {
  m.impl("dgc_compensate", &dgc_compensate_cuda);
  m.impl("topk_magnitude", &topk_magnitude_cuda);
  m.impl("dgc_mask", &dgc_mask_cuda);
  m.impl("densify", &densify_cuda);
}

}  // namespace pycomm
