// CPU implementation of the DGC ops: momentum correction with local clipping,
// top-k selection by magnitude (exact, or sampled threshold + exact top-k
// among the candidates), masking, and densify (scatter-add of W payloads).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../dgc_checks.h"
#include "pycomm/momentum.h"
#include "pycomm/philox.h"
#include "pycomm/segments.h"
#include "pycomm/topk_order.h"

namespace pycomm {
namespace {

constexpr int64_t kGrain = 32768;

// ---------------------------------------------------------------------------
// Momentum correction: u = m u + s g; v += u (Nesterov: u = m (u + s g);
// v += u + s g), with s = min(1, clip / ||g_segment||) when clip > 0.

template <typename T>
double segment_sq_norm(const T* g, int64_t length) {
  return at::parallel_reduce(
      0, length, kGrain, 0.0,
      [&](int64_t begin, int64_t end, double acc) {
        for (int64_t i = begin; i < end; ++i) {
          const double x = static_cast<double>(static_cast<float>(g[i]));
          acc += x * x;
        }
        return acc;
      },
      [](double a, double b) { return a + b; });
}

template <typename T>
void compensate_segment(const T* g, float* u, float* v, int64_t length, float momentum, bool nesterov, float scale) {
  at::parallel_for(0, length, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      momentum_correction(mul_rn(static_cast<float>(g[i]), scale), u[i], v[i], momentum, nesterov);
    }
  });
}

void dgc_compensate_cpu(const at::Tensor& grad_in, at::Tensor u, at::Tensor v, const c10::optional<at::Tensor>& segments,
                        double momentum, bool nesterov, double clip_norm) {
  check_compensate_args(grad_in, u, v, momentum, clip_norm);
  const at::Tensor grad = grad_in.contiguous();
  const SegmentTable table = check_segments(segments, grad);
  float* up = u.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pycomm_dgc_compensate_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    for (int64_t s = 0; s < table.count; ++s) {
      int64_t offset, length;
      table.segment(s, offset, length);
      float scale = 1.0f;
      if (clip_norm > 0.0) {
        const double norm = std::sqrt(segment_sq_norm(gp + offset, length));
        if (norm > clip_norm) scale = static_cast<float>(clip_norm / norm);
      }
      compensate_segment(gp + offset, up + offset, vp + offset, length, static_cast<float>(momentum), nesterov, scale);
    }
  });
}

// ---------------------------------------------------------------------------
// Top-k by magnitude. Elements are ranked by topk::before (larger magnitude
// first, NaN as +inf, ties by lower index), a strict total order, so the
// selected set is unique and the same on every device.

struct Candidate {
  float key;
  int64_t index;
};

inline bool candidate_before(const Candidate& a, const Candidate& b) {
  return topk::before(a.key, a.index, b.key, b.index);
}

// Appends the elements of x[begin, end) (absolute positions offset + i) whose
// key is >= threshold. Candidates are rare (about 1.25 k in n), so float32
// input is scanned 16 at a time with SSE and only blocks that hold one are
// looked at element by element. !(|x| < t) is true for NaN too, so NaN (key
// +inf) is never skipped.
template <typename T>
void collect_range(const T* x, int64_t offset, int64_t begin, int64_t end, float threshold,
                   std::vector<Candidate>& out) {
  int64_t i = begin;
#if defined(__SSE2__)
  if constexpr (std::is_same<T, float>::value) {
    const __m128 t = _mm_set1_ps(threshold);
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    for (; i + 16 <= end; i += 16) {
      const float* p = x + offset + i;
      const __m128 a = _mm_cmpnlt_ps(_mm_and_ps(_mm_loadu_ps(p), abs_mask), t);
      const __m128 b = _mm_cmpnlt_ps(_mm_and_ps(_mm_loadu_ps(p + 4), abs_mask), t);
      const __m128 c = _mm_cmpnlt_ps(_mm_and_ps(_mm_loadu_ps(p + 8), abs_mask), t);
      const __m128 d = _mm_cmpnlt_ps(_mm_and_ps(_mm_loadu_ps(p + 12), abs_mask), t);
      if (_mm_movemask_ps(_mm_or_ps(_mm_or_ps(a, b), _mm_or_ps(c, d))) == 0) continue;
      for (int j = 0; j < 16; ++j) {
        const float key = topk::magnitude_key(p[j]);
        if (key >= threshold) out.push_back({key, offset + i + j});
      }
    }
  }
#endif
  for (; i < end; ++i) {
    const float key = topk::magnitude_key(static_cast<float>(x[offset + i]));
    if (key >= threshold) out.push_back({key, offset + i});
  }
}

// Collects every element of the segment whose key is >= threshold, in index
// order (per-thread lists concatenated in thread order).
template <typename T>
std::vector<Candidate> collect(const T* x, int64_t offset, int64_t length, float threshold) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), length / kGrain));
  std::vector<std::vector<Candidate>> parts(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      collect_range(x, offset, length * c / chunks, length * (c + 1) / chunks, threshold, parts[c]);
  });
  size_t total = 0;
  for (const auto& p : parts) total += p.size();
  std::vector<Candidate> all;
  all.reserve(total);
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// The threshold estimated from a sample: strided with a Philox-random start,
// `samples` elements, taking the rank that a slightly larger k would have so
// that the count clears k with high probability.
template <typename T>
float sampled_threshold(const T* x, int64_t offset, int64_t length, int64_t k, int64_t samples, uint64_t seed,
                        int64_t segment) {
  const int64_t stride = std::max<int64_t>(1, length / samples);
  const uint32_t r = philox::uint32_at(seed, philox::kStreamTopkSample, static_cast<uint64_t>(segment));
  const int64_t start = static_cast<int64_t>(r % static_cast<uint32_t>(std::min<int64_t>(stride, 1 << 30)));
  std::vector<float> keys;
  keys.reserve(samples);
  for (int64_t i = start; i < length && static_cast<int64_t>(keys.size()) < samples; i += stride)
    keys.push_back(topk::magnitude_key(static_cast<float>(x[offset + i])));
  const double expected = static_cast<double>(k) * static_cast<double>(keys.size()) / static_cast<double>(length);
  int64_t rank = static_cast<int64_t>(std::ceil(expected * topk::kSampleSlack)) + 1;
  rank = std::min<int64_t>(std::max<int64_t>(rank, 1), static_cast<int64_t>(keys.size()));
  std::nth_element(keys.begin(), keys.begin() + (rank - 1), keys.end(), std::greater<float>());
  return keys[rank - 1];
}

template <typename T, typename I>
void select_segment(const T* x, int64_t offset, int64_t length, int64_t k, bool exact, double sample_ratio,
                    uint64_t seed, int64_t segment, T* out_values, I* out_indices) {
  if (k == 0) return;
  std::vector<Candidate> candidates;
  const int64_t samples =
      std::max<int64_t>(static_cast<int64_t>(std::ceil(static_cast<double>(length) * sample_ratio)),
                        topk::kMinSamplesAboveThreshold * length / k);
  const bool sampled = !exact && length >= topk::kMinSampledLength && samples * 2 <= length && k * 4 <= length;
  if (sampled) {
    float threshold = sampled_threshold(x, offset, length, k, samples, seed, segment);
    for (int round = 0; round < topk::kMaxRounds; ++round) {
      candidates = collect(x, offset, length, threshold);
      if (static_cast<int64_t>(candidates.size()) >= k) break;
      // Too few: lower the threshold (the last round takes everything).
      threshold = round + 2 < topk::kMaxRounds ? threshold * topk::kLowerFactor : 0.0f;
    }
  } else {
    candidates = collect(x, offset, length, 0.0f);
  }
  // Every element ranked above the k-th is a candidate (all of them clear the
  // threshold), so the top k of the candidates are the top k of the segment.
  if (static_cast<int64_t>(candidates.size()) > k)
    std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(), candidate_before);
  candidates.resize(k);
  std::sort(candidates.begin(), candidates.end(),
            [](const Candidate& a, const Candidate& b) { return a.index < b.index; });
  for (int64_t j = 0; j < k; ++j) {
    out_indices[j] = static_cast<I>(candidates[j].index);
    out_values[j] = x[candidates[j].index];
  }
}

std::tuple<at::Tensor, at::Tensor> topk_magnitude_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& segments,
                                                      double density, bool exact, double sample_ratio, int64_t seed,
                                                      const c10::optional<at::Tensor>& /*host_segments: CUDA only*/) {
  check_topk_args(x_in, density, sample_ratio);
  const at::Tensor x = x_in.contiguous().view(-1);
  const SegmentTable table = check_segments(segments, x);
  check_segment_keep(table);
  std::vector<int64_t> first(table.count + 1, 0);
  for (int64_t s = 0; s < table.count; ++s) first[s + 1] = first[s] + table.keep(s, density);
  const int64_t total = first[table.count];
  at::Tensor values = at::empty({total}, x.options());
  at::Tensor indices = at::empty({total}, x.options().dtype(index_type_for(x.numel())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pycomm_topk_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "pycomm_topk_cpu_index", [&] {
      index_t* ip = indices.data_ptr<index_t>();
      for (int64_t s = 0; s < table.count; ++s) {
        int64_t offset, length;
        table.segment(s, offset, length);
        select_segment<scalar_t, index_t>(xp, offset, length, first[s + 1] - first[s], exact, sample_ratio,
                                          static_cast<uint64_t>(seed), s, vp + first[s], ip + first[s]);
      }
    });
  });
  return {values, indices};
}

// ---------------------------------------------------------------------------
// Masking and densify. Indices are validated before anything is written.

// The first position of an index outside [0, numel), or -1.
template <typename I>
int64_t first_bad_index(const I* idx, int64_t count, int64_t numel) {
  return at::parallel_reduce(
      0, count, kGrain, int64_t(-1),
      [&](int64_t begin, int64_t end, int64_t found) {
        for (int64_t i = begin; i < end && found < 0; ++i)
          if (idx[i] < 0 || static_cast<int64_t>(idx[i]) >= numel) found = i;
        return found;
      },
      [](int64_t a, int64_t b) { return a >= 0 ? a : b; });
}

// Raises on a bad index, or, with first_bad, stores its position there (-1: none). True: go on writing.
template <typename I>
bool indices_in_range(const I* idx, int64_t count, int64_t numel, const c10::optional<at::Tensor>& first_bad,
                      const char* what) {
  const int64_t bad = first_bad_index(idx, count, numel);
  if (first_bad.has_value()) {
    *first_bad->data_ptr<int64_t>() = bad;
    return bad < 0;
  }
  check_index_position(bad, bad >= 0 ? static_cast<int64_t>(idx[bad]) : 0, numel, what);
  return true;
}

void dgc_mask_cpu(at::Tensor v, c10::optional<at::Tensor> u, const at::Tensor& indices_in,
                  c10::optional<at::Tensor> first_bad) {
  check_mask_args(v, u, indices_in);
  check_first_bad(first_bad, v);
  const at::Tensor indices = indices_in.contiguous();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "pycomm_dgc_mask_cpu", [&] {
    const index_t* ip = indices.data_ptr<index_t>();
    if (!indices_in_range(ip, indices.numel(), v.numel(), first_bad, "indices")) return;
    float* vp = v.data_ptr<float>();
    float* up = u.has_value() ? u->data_ptr<float>() : nullptr;
    for (int64_t j = 0; j < indices.numel(); ++j) {
      vp[ip[j]] = 0.0f;
      if (up != nullptr) up[ip[j]] = 0.0f;
    }
  });
}

at::Tensor densify_cpu(const at::Tensor& values_in, const at::Tensor& indices_in, int64_t numel,
                       c10::optional<at::Tensor> first_bad) {
  check_densify_args(values_in, indices_in, numel);
  check_first_bad(first_bad, values_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor out = at::zeros({numel}, values.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "pycomm_densify_cpu", [&] {
    const scalar_t* vp = values.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "pycomm_densify_cpu_index", [&] {
      const index_t* ip = indices.data_ptr<index_t>();
      if (!indices_in_range(ip, indices.numel(), numel, first_bad, "indices")) return;
      float* op = out.data_ptr<float>();
      // Sequential: payloads are small (k << n) and the order of the sum is fixed.
      for (int64_t j = 0; j < indices.numel(); ++j) op[ip[j]] = add_rn(op[ip[j]], static_cast<float>(vp[j]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CPU, m) {
  m.impl("dgc_compensate", &dgc_compensate_cpu);
  m.impl("topk_magnitude", &topk_magnitude_cpu);
  m.impl("dgc_mask", &dgc_mask_cpu);
  m.impl("densify", &densify_cpu);
}

}  // namespace pycomm
