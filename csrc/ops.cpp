// Schemas of the pycomm operators (torch.ops.pycomm.*). Device kernels are
// registered beside their implementations (cpu/, cuda/); fake kernels for
// torch.compile live in pycomm/ops/, each after its op's wrapper.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <vector>

extern "C" {
// Importing pycomm._C loads this library, which runs the registrations below.
// The module itself has no Python functions: everything is a torch op.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace pycomm {

TORCH_LIBRARY(pycomm, m) {
  // Quantizes x (flattened) into bucket records; see quant_format.h. With a
  // residual, quantizes x + residual and stores the new error in residual.
  // Buckets in [skip_begin, skip_end) are written as zero records.
  //
  // Mixed bit widths: a 4-column bucket_table (offset, length, bits,
  // byte_offset; bucket_layout.h) gives each bucket its own bits (then `bits`
  // must be 0) and the payloads are flat uint8: [bytes] (dequantize_sum:
  // [sources, bytes]). host_table: an optional CPU copy of a CUDA mixed table,
  // which the ops read to size and check payloads (without it they copy the
  // table, which waits). With a CPU table, host_table must equal it. With a
  // CUDA table the two are not compared (that would wait): host_table is
  // validated and sizes the payloads, and the kernels bound every record by
  // the payload, so a device table that differs gives wrong values but never
  // an access outside the tensors; quantize then zero-fills its payload, so no
  // uninitialised byte is sent. chunk_row_begin >= 0 (mixed only): x is a reduced
  // chunk as dequantize_sum returns it, bucket k = elements [k*B, (k+1)*B)
  // with the bits of table row chunk_row_begin + k.
  //
  // Stochastic rounding draws element j of payload bucket k (table row k; in
  // chunk mode the chunk's bucket k) from Philox index k * bucket_size + j
  // under `seed`. row_streams: an optional int64 1-D tensor on x's device with
  // one entry per payload bucket; bucket k then draws from index
  // row_streams[k] + j instead, so a caller can tie a bucket's draws to the
  // parameter it holds (e.g. its element offset in a per-parameter stream)
  // rather than to its place in the payload. Entries should be non-negative
  // multiples of 8 with row_streams[k] + bucket_size <= 2^63 - 1: the CPU op
  // checks this; the CUDA op checks only dtype, device and shape (reading the
  // values would wait), and there any value is memory-safe (it is only an RNG
  // counter) and valid values give the CPU's bytes. Round to nearest ignores
  // the values.
  m.def(
      "quantize(Tensor x, Tensor(a!)? residual, Tensor? bucket_table, int num_buckets, int bits, "
      "int bucket_size, bool stochastic, int seed, int skip_begin, int skip_end, Tensor? host_table=None, "
      "int chunk_row_begin=-1, Tensor? row_streams=None) -> Tensor");
  // Decodes payload [num_buckets, record_bytes] into out (flat, any float dtype).
  m.def(
      "dequantize_into(Tensor payload, Tensor(a!) out, Tensor? bucket_table, int bits, int bucket_size, "
      "Tensor? host_table=None) -> ()");
  // Sums the decoded payloads [sources, num_buckets, record_bytes] (plus init,
  // read through bucket_table rows starting at init_bucket_begin) into a new
  // float32 tensor of num_buckets * bucket_size elements. Mixed: payloads
  // [sources, bytes] hold the records of the rows from init_bucket_begin on.
  m.def(
      "dequantize_sum(Tensor payloads, Tensor? init, Tensor? bucket_table, int init_bucket_begin, int bits, "
      "int bucket_size, Tensor? host_table=None) -> Tensor");

  // DGC momentum correction over the segments (layers) of a flat gradient:
  // u = m*u + g; v += u (Nesterov: u = m*(u + g); v += u + g). With clip_norm
  // > 0 each segment's gradient is first scaled to norm <= clip_norm.
  m.def(
      "dgc_compensate(Tensor grad, Tensor(a!) u, Tensor(b!) v, Tensor? segments, float momentum, bool nesterov, "
      "float clip_norm) -> ()");
  // The ceil(length * density) elements of largest magnitude of each segment:
  // (values, indices), segment by segment, indices ascending within a segment
  // (int32 when they fit). Exact, or sampled threshold + exact among candidates.
  // segments: [S, 2] (offset, length) rows, or [S, 3] (offset, length, keep):
  // then segment s keeps `keep` elements (0 <= keep <= length, checked) and
  // density is only validated.
  // host_segments: an optional CPU copy of `segments`, so that a CUDA caller
  // that already knows the table (a DDP hook) spares the op a device->host copy.
  m.def(
      "topk_magnitude(Tensor x, Tensor? segments, float density, bool exact, float sample_ratio, int seed, "
      "Tensor? host_segments=None) -> (Tensor, Tensor)");
  // v[indices] = 0 and, with u, u[indices] = 0 (momentum factor masking).
  // Indices are checked before anything is written. Without first_bad an index
  // out of range raises (on CUDA that reads a device word, which waits for the
  // stream). With first_bad (int64, one element, on v's device) nothing waits
  // and nothing raises: it receives the position of the first bad index, or -1,
  // and a bad index means nothing is written. The same on CPU and CUDA.
  m.def("dgc_mask(Tensor(a!) v, Tensor(b!)? u, Tensor indices, Tensor(c!)? first_bad=None) -> ()");
  // Sums the (values, indices) payloads (any shape, same for both) into a dense
  // float32 tensor of numel elements; every index is checked first. first_bad:
  // as for dgc_mask (a bad index returns zeros instead of raising).
  m.def("densify(Tensor values, Tensor indices, int numel, Tensor(a!)? first_bad=None) -> Tensor");

  // Counter-based random variates (pycomm/philox_variates.h): element j of a
  // tensor list has the global index offset + (elements of the tensors before
  // it) + j, and its variate depends only on (seed, global index), on every
  // device. distribution: 0 Gaussian, 1 Rademacher (+-1).
  // n variates of global indices offset .. offset+n-1, 1-D, with like's dtype and device.
  m.def("philox_variates(Tensor like, int n, int seed, int offset, int distribution) -> Tensor");
  // t += alpha * z for every tensor (contiguous, non-overlapping), in float32. alpha == 0
  // (after rounding to float32) leaves the tensors untouched, bit for bit.
  m.def("philox_axpy_(Tensor(a!)[] tensors, int seed, float alpha, int distribution, int offset) -> ()");
  // t + alpha * z as new contiguous tensors (same rounding as philox_axpy_).
  m.def("philox_perturbed_copy(Tensor[] tensors, int seed, float alpha, int distribution, int offset) -> Tensor[]");
  // <t, z> as a float64 scalar tensor, summed in the fixed order of philox_variates.h.
  m.def("philox_dot(Tensor[] tensors, int seed, int distribution, int offset) -> Tensor");
  // K directions in one pass: for k = 0 .. K-1 in order, t += alphas[k] * z(seeds[k]), each step
  // exactly philox_axpy_ (float32 alpha; a zero alpha is skipped). alphas: K float32 / float64
  // values on the tensors' device (read there, no host sync) or on the CPU.
  m.def("philox_axpy_multi_(Tensor(a!)[] tensors, int[] seeds, Tensor alphas, int distribution, int offset) -> ()");
  // [K] float64 on the tensors' device: element k is philox_dot(tensors, seeds[k], ...) bit for bit.
  m.def("philox_dot_multi(Tensor[] tensors, int[] seeds, int distribution, int offset) -> Tensor");

  // L-GreCo: per layer (row), the candidate (column) minimising the total size
  // subject to a total discretized error <= budget (levels steps); when nothing
  // fits, the least-error candidate per layer and feasible = false. Rules and
  // tie-breaking: pycomm/lgreco.py. CPU only (cpu/lgreco_solver.cpp).
  m.def("lgreco_solve(Tensor errors, Tensor sizes, float budget, int levels) -> (Tensor choice, Tensor feasible)");
}

// In-place writes and autograd, for every op that writes into an argument (schema `Tensor(a!)`,
// lists and optionals included). The dispatcher does not do for custom ops what torch's own
// in-place ops get from their generated kernels, so this Autograd kernel does it:
//   - with grad mode on, writing into a leaf that requires grad raises ValueError (torch's rule
//     for in-place ops; the ops have no derivative: call them under torch.no_grad());
//   - every written tensor's version counter is bumped, so a backward that saved one of them
//     raises ("modified by an inplace operation") instead of using the new values silently.
// A non-leaf that requires grad keeps its history, as a `.data` write would: only the version
// check protects it.
namespace {

void check_and_bump_writes(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[first + i];
    auto note = [&](const at::Tensor& t, const std::string& name) {
      if (!t.defined()) return;
      TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && t.requires_grad() && t.is_leaf()), op.schema().name(),
                        " writes into `", name, "` in place, a leaf tensor that requires grad; the op has no ",
                        "derivative: call it under torch.no_grad() (as for any in-place update of parameters) ",
                        "or on a tensor that does not require grad");
      written.push_back(t);
    };
    if (value.isTensor()) {
      note(value.toTensor(), arguments[i].name());
    } else if (value.isTensorList()) {
      const auto list = value.toListRef();
      for (size_t j = 0; j < list.size(); ++j)
        note(list[j].toTensor(), arguments[i].name() + "[" + std::to_string(j) + "]");
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written)
    if (!t.is_inference()) torch::autograd::impl::bump_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, Autograd, m) {
  for (const char* name : {"quantize", "dequantize_into", "dgc_compensate", "dgc_mask", "densify", "philox_axpy_",
                           "philox_axpy_multi_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&check_and_bump_writes>());
}

}  // namespace pycomm
