// Host launchers of the CUDA DGC kernels (dgc_kernels.cu): momentum
// correction, top-k selection by magnitude, masking and densify.
//
// Torch-free: raw device pointers, sizes, pycomm::DType and a stream. The
// launchers only enqueue work on `stream`: no allocation, no synchronisation,
// no device->host copy. Temporary device memory comes from the caller as a
// workspace of at least *_workspace_bytes(...) bytes (any alignment of at
// least 256 bytes, as torch's allocator gives). Arguments are expected to be
// validated by the caller (dgc_cuda.cpp uses the same checks as the CPU ops,
// dgc_checks.h). A launcher returns the first error of the CUDA / CUB calls it
// made itself (cudaErrorInvalidValue for a workspace that is too small); errors
// of its kernel launches are left for the caller to fetch with
// cudaGetLastError(). Results are those of csrc/cpu/dgc_cpu.cpp (see each
// function).
#pragma once

#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#include "pycomm/common.h"
#include "pycomm/segments.h"

namespace pycomm {

// ---- momentum correction ------------------------------------------------------
// u = m*u + s*g; v += u (Nesterov: u = m*(u + s*g); v += u + s*g) over the
// segments of grad (numel elements of `dtype`); u, v: float32 [numel].
// table: device int64 [num_segments][columns] (offset, length[, keep]; keep
// is not used here) or nullptr (one segment [0, numel), num_segments = 1). With clip_norm > 0, s = clip / norm
// (double, then float) when the segment's L2 norm exceeds clip_norm, else 1.
// Every float step rounds as on the CPU, so u and v are bit-identical to the
// CPU's (NaN payloads aside) whenever the scales are; the squared norms are
// summed in double in a fixed order (run to run deterministic; the CPU sums in
// an order that depends on its thread count, so the double norms can differ in
// the last bits, which changes a float scale only in the rare case that the
// division lands next to a float rounding boundary).
// Rows must not overlap (layers of a bucket); where they do, the CUDA result
// is unspecified (the CPU applies the rows one after another).
size_t dgc_compensate_workspace_bytes(int64_t numel, int64_t num_segments, bool clip);
cudaError_t launch_dgc_compensate(const void* grad, DType dtype, float* u, float* v, const int64_t* table,
                                  int64_t num_segments, int64_t columns, int64_t numel, float momentum, bool nesterov,
                                  double clip_norm, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- top-k by magnitude -----------------------------------------------------------
// Output sizes, computed on the host from a host copy of the segment table
// (host_table: int64 [num_segments][columns], (offset, length) or (offset,
// length, keep), or nullptr for one segment [0, numel)).
struct TopkPlan {
  int64_t total_k;           // sum over segments of SegmentTable::keep: the outputs' length
  int64_t total_tiles;       // sum over segments of ceil(length / kDgcTile): sizes the workspace
  int64_t partial_segments;  // segments that keep some but not all of their elements (need a k-th key)
};
constexpr int64_t kDgcTile = 4096;  // elements of a segment one thread block handles at a time

inline TopkPlan topk_plan(const int64_t* host_table, int64_t num_segments, int64_t columns, int64_t numel,
                          double density) {
  const SegmentTable table{host_table, host_table != nullptr ? num_segments : 1, numel, columns};
  TopkPlan plan{0, 0, 0};
  for (int64_t s = 0; s < table.count; ++s) {
    int64_t offset, length;
    table.segment(s, offset, length);
    const int64_t k = table.keep(s, density);
    plan.total_k += k;
    plan.total_tiles += (length + kDgcTile - 1) / kDgcTile;
    if (k > 0 && k < length) ++plan.partial_segments;
  }
  return plan;
}

// For each segment, the SegmentTable::keep(s, density) elements ranked first by
// topk::before (larger magnitude_key first, NaN as +inf, ties to the lower
// index): values (raw elements of x, x's dtype) and flat indices (int32, or
// int64 with indices64) into values[total_k] / indices[total_k], segment by
// segment, ascending within a segment. `table` is the device copy, with
// `columns` columns, of the table `plan` was made from; a keep column (which
// the caller validates on its host copy, dgc_checks.h) sets each segment's k
// and density is then not used. The selection is exact (a radix select of each
// segment's k-th key, then one ordered compaction), so it equals the CPU op's
// in both of its modes: the CPU's sampled mode also returns the exact top-k.
size_t topk_magnitude_workspace_bytes(int64_t numel, int64_t num_segments, const TopkPlan& plan);
cudaError_t launch_topk_magnitude(const void* x, DType dtype, int64_t numel, const int64_t* table,
                                  int64_t num_segments, int64_t columns, double density, const TopkPlan& plan,
                                  void* values, void* indices, bool indices64, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

// ---- index validation, masking, densify -------------------------------------------
// *first_bad = the lowest position j < count with indices[j] outside [0, numel),
// or ~0ull when there is none (first_bad: one device word, set here).
cudaError_t launch_index_check(const void* indices, bool indices64, int64_t count, int64_t numel,
                               unsigned long long* first_bad, cudaStream_t stream);

// v[indices[j]] = 0 (and u[...] = 0 when u is not nullptr) for j < count,
// unless *first_bad (from launch_index_check) reports a bad index: then
// nothing is written.
cudaError_t launch_dgc_mask(float* v, float* u, const void* indices, bool indices64, int64_t count,
                            const unsigned long long* first_bad, cudaStream_t stream);

// out[i] (float32 [numel], zeroed by the caller) = the sum, in position order
// starting from +0.0f, of float(values[j]) over the positions j < count with
// indices[j] == i: the CPU's sequential scatter-add, so duplicates add up in
// the same order and the sums are bit-identical. Deterministic (a stable radix
// sort of (index, position), then one ordered sum per distinct index).
// Nothing is written when *first_bad reports a bad index.
size_t densify_workspace_bytes(int64_t count, bool indices64, int64_t numel);
cudaError_t launch_densify(const void* values, DType dtype, const void* indices, bool indices64, int64_t count,
                           int64_t numel, const unsigned long long* first_bad, float* out, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream);

}  // namespace pycomm
