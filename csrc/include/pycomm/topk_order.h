// The order in which top-k selection ranks elements, and the constants of the
// sampled threshold search, shared by the CPU and CUDA kernels so that both
// select the same set.
#pragma once

#include "pycomm/common.h"

namespace pycomm {
namespace topk {

// |x|, with NaN ranked as +inf: a non-finite gradient is always selected, so
// it reaches the receiver instead of vanishing.
PYCOMM_HD float magnitude_key(float x) {
  const float a = x < 0.0f ? -x : x;
  return a == a ? a : bits_float(0x7f800000u);
}

// Strict total order: larger key first, then lower index. The top k under it
// is unique, so ties cannot make devices or thread counts disagree.
PYCOMM_HD bool before(float key_a, int64_t index_a, float key_b, int64_t index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// Sampled mode. The sample holds max(length * sample_ratio,
// kMinSamplesAboveThreshold * length / k) elements (on average that many
// sampled elements lie above the k-th largest), strided with a random start.
// The threshold is the sample element at the rank k would have, times
// kSampleSlack, so the count usually clears k on the first pass; otherwise the
// threshold is lowered by kLowerFactor, up to kMaxRounds passes (the last one
// takes every element). The top k are then found exactly among the
// candidates, which contain every element ranked above the k-th, so the
// result equals the exact top-k whenever the search succeeds.
constexpr int64_t kMinSampledLength = 32768;
constexpr int64_t kMinSamplesAboveThreshold = 64;
constexpr double kSampleSlack = 1.25;
constexpr float kLowerFactor = 0.5f;
constexpr int kMaxRounds = 6;

}  // namespace topk
}  // namespace pycomm
