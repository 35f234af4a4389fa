// L-GreCo's optimal per-layer choice (torch.ops.pycomm.lgreco_solve): the
// candidate per layer minimising the total size subject to a total
// discretized error within the budget, by dynamic programming with
// back-pointers. Python API and the documented rules: pycomm/lgreco.py.
//
// Discretization. unit = budget / levels, lowered to the largest double with
// levels * unit <= budget exactly (checked with fma, whose one rounding keeps
// the sign of the exact residual). A candidate's level is the least integer k
// with k * unit >= err exactly (ceil of the quotient, corrected with fma); an
// exactly-zero error has level 0. So a configuration whose levels sum to at
// most `levels` has a true (real-arithmetic) error sum <= budget. A candidate
// whose level exceeds `levels` on its own, or whose error is NaN/Inf, is left
// out of the DP (never clipped to the top level).
//
// DP. cost[l][e] = least size of layers 0..l whose levels sum to exactly e
// (+inf where no such choice exists); cost[l][e] = min_c cost[l-1][e - lev_c]
// + size_c, candidates tried in increasing index with a strict <, so the lowest
// index wins a tie. The answer is the least e with the least cost[L-1][e].
// Rows are swept in blocks that stay in L1: per block, each candidate's pass
// is a shifted add, compare and two blends, all in double (the winning index is
// kept as a double so the compiler vectorizes without mixing lane widths) and
// narrowed to a uint8 back-pointer at the end of the block. Blocks are
// independent, so at::parallel_for over them (long rows only) changes nothing
// in the result.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace pycomm {
namespace {

constexpr int64_t kMaxCandidates = 256;                 // back-pointers are uint8
constexpr int64_t kMaxLevels = 10'000'000;              // two cost rows of 80 MB at most
constexpr int64_t kMaxBackPointerBytes = int64_t{1} << 30;  // layers * (levels + 1)
constexpr int64_t kBlock = 1024;                        // levels per block: 16 KB of row state
// Levels of one layer per parallel task: a layer's row is a few tens of
// microseconds of work at the default 10,000 levels, less than what a parallel
// region costs on a busy 2-core machine (measured: 1 thread 60 ms, 2 threads
// 200+ ms for 1,000 x 8 x 10,000 under load), so only rows of 64K+ levels split.
constexpr int64_t kBlocksPerTask = 64;

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Candidate {
  int64_t level;  // discretized error, 0..levels
  double size;
  double index;   // candidate index, as the double the blend carries
};

// One block [start, end) of a layer's row: out[e] = min over the candidates of
// prev[e - level] + size, arg[e - start] = index of the first candidate reaching it.
inline void relax_block(const double* __restrict prev, double* __restrict out, double* __restrict arg,
                        const Candidate* cands, int64_t num_cands, int64_t start, int64_t end) {
  const int64_t n = end - start;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = kInf;
    arg[i] = 0.0;
  }
  for (int64_t k = 0; k < num_cands; ++k) {
    const Candidate cand = cands[k];
    if (cand.level >= end) continue;
    const int64_t first = std::max(start, cand.level) - start;
    const double* __restrict src = prev + (start - cand.level);
    const double size = cand.size;
    const double index = cand.index;
    for (int64_t i = first; i < n; ++i) {
      const double value = src[i] + size;
      const bool better = value < out[i];
      out[i] = better ? value : out[i];
      arg[i] = better ? index : arg[i];
    }
  }
}

using RelaxFn = void (*)(const double*, double*, double*, const Candidate*, int64_t, int64_t, int64_t);

// The block is compiled for SSE2 (the extension's baseline), AVX and AVX-512
// and chosen at run time; all perform the same IEEE additions and comparisons
// (no FMA here), so the result does not depend on the choice.
__attribute__((flatten, noinline)) void relax_baseline(const double* prev, double* out, double* arg,
                                                       const Candidate* cands, int64_t num_cands, int64_t start,
                                                       int64_t end) {
  relax_block(prev, out, arg, cands, num_cands, start, end);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define PYCOMM_LGRECO_X86_DISPATCH 1
__attribute__((target("avx"), flatten, noinline)) void relax_avx(const double* prev, double* out, double* arg,
                                                                 const Candidate* cands, int64_t num_cands,
                                                                 int64_t start, int64_t end) {
  relax_block(prev, out, arg, cands, num_cands, start, end);
}

#if defined(__clang__)
#define PYCOMM_LGRECO_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq"
#else
#define PYCOMM_LGRECO_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512"
#endif
__attribute__((target(PYCOMM_LGRECO_AVX512_TARGET), flatten, noinline)) void relax_avx512(
    const double* prev, double* out, double* arg, const Candidate* cands, int64_t num_cands, int64_t start,
    int64_t end) {
  relax_block(prev, out, arg, cands, num_cands, start, end);
}
#endif

// PYCOMM_LGRECO_CPU_ISA = baseline | avx | avx512 caps the level (read on every
// call, for tests and benchmarks); default: the widest the CPU supports.
RelaxFn select_relax() {
#if defined(PYCOMM_LGRECO_X86_DISPATCH)
  int want = 2;
  if (const char* env = std::getenv("PYCOMM_LGRECO_CPU_ISA")) {
    if (std::strcmp(env, "baseline") == 0) want = 0;
    else if (std::strcmp(env, "avx") == 0) want = 1;
  }
  __builtin_cpu_init();
  if (want >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return &relax_avx512;
  }
  if (want >= 1 && __builtin_cpu_supports("avx")) return &relax_avx;
#endif
  return &relax_baseline;
}

// The largest double unit with levels * unit <= budget (exactly).
double level_unit(double budget, int64_t levels) {
  const double d = static_cast<double>(levels);
  double unit = budget / d;
  while (unit > 0.0 && std::fma(d, unit, -budget) > 0.0) unit = std::nextafter(unit, 0.0);
  return unit;
}

// Level of a finite error >= 0, or -1 when it does not fit in `levels` alone.
int64_t error_level(double err, double unit, int64_t levels) {
  if (err == 0.0) return 0;
  if (unit == 0.0) return -1;
  const double quotient = err / unit;
  if (!(quotient <= static_cast<double>(levels))) return -1;  // also catches an overflow to inf
  double k = std::ceil(quotient);
  while (std::fma(k, unit, -err) < 0.0) k += 1.0;  // k * unit >= err, exactly
  return k <= static_cast<double>(levels) ? static_cast<int64_t>(k) : -1;
}

void check_tables(const at::Tensor& errors, const at::Tensor& sizes, double budget, int64_t levels) {
  TORCH_CHECK_VALUE(errors.device().is_cpu() && sizes.device().is_cpu(),
                    "lgreco_solve: errors and sizes must be CPU tensors");
  TORCH_CHECK_VALUE(errors.scalar_type() == at::kDouble && sizes.scalar_type() == at::kDouble,
                    "lgreco_solve: errors and sizes must be float64, got ", errors.scalar_type(), " and ",
                    sizes.scalar_type());
  TORCH_CHECK_VALUE(errors.dim() == 2, "lgreco_solve: errors must be 2-D [layers, candidates], got shape ",
                    errors.sizes());
  TORCH_CHECK_VALUE(sizes.sizes() == errors.sizes(), "lgreco_solve: sizes must have the shape of errors ",
                    errors.sizes(), ", got ", sizes.sizes());
  TORCH_CHECK_VALUE(!std::isnan(budget) && budget >= 0.0, "lgreco_solve: budget must be >= 0 (or +inf), got ",
                    budget);
  TORCH_CHECK_VALUE(levels >= 1 && levels <= kMaxLevels, "lgreco_solve: levels must be in [1, ", kMaxLevels,
                    "], got ", levels);
  const int64_t num_layers = errors.size(0);
  const int64_t num_cands = errors.size(1);
  if (num_layers == 0) return;
  TORCH_CHECK_VALUE(num_cands >= 1 && num_cands <= kMaxCandidates, "lgreco_solve: the number of candidates per ",
                    "layer must be in [1, ", kMaxCandidates, "], got ", num_cands);
  TORCH_CHECK_VALUE(std::isinf(budget) || num_layers <= kMaxBackPointerBytes / (levels + 1),
                    "lgreco_solve: layers * (levels + 1) = ", num_layers, " * ", levels + 1,
                    " back-pointer bytes exceeds the limit of ", kMaxBackPointerBytes, "; use fewer levels");
  const double* err = errors.data_ptr<double>();
  const double* size = sizes.data_ptr<double>();
  for (int64_t l = 0; l < num_layers; ++l) {
    bool usable = false;
    for (int64_t c = 0; c < num_cands; ++c) {
      const double e = err[l * num_cands + c];
      const double s = size[l * num_cands + c];
      TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0, "lgreco_solve: sizes must be finite and > 0, got sizes[", l,
                        "][", c, "] = ", s);
      TORCH_CHECK_VALUE(!(e < 0.0) || std::isinf(e), "lgreco_solve: errors must be >= 0 (NaN/Inf mark an ",
                        "unavailable candidate), got errors[", l, "][", c, "] = ", e);
      usable = usable || std::isfinite(e);
    }
    TORCH_CHECK_VALUE(usable, "lgreco_solve: layer ", l, " has no usable candidate (every error is NaN or Inf)");
  }
}

// Per layer, the usable candidate least in (key1, key2, index).
void choose_per_layer(const double* key1, const double* key2, const double* err, int64_t num_layers,
                      int64_t num_cands, int64_t* choice) {
  for (int64_t l = 0; l < num_layers; ++l) {
    int64_t best = -1;
    for (int64_t c = 0; c < num_cands; ++c) {
      const int64_t i = l * num_cands + c;
      if (!std::isfinite(err[i])) continue;
      const int64_t b = l * num_cands + best;
      if (best < 0 || key1[i] < key1[b] || (key1[i] == key1[b] && key2[i] < key2[b])) best = c;
    }
    choice[l] = best;
  }
}

std::tuple<at::Tensor, at::Tensor> lgreco_solve_cpu(const at::Tensor& errors_in, const at::Tensor& sizes_in,
                                                    double budget, int64_t levels) {
  check_tables(errors_in, sizes_in, budget, levels);
  const at::Tensor errors = errors_in.contiguous();
  const at::Tensor sizes = sizes_in.contiguous();
  const int64_t num_layers = errors.size(0);
  const int64_t num_cands = errors.size(1);
  at::Tensor choice_t = at::empty({num_layers}, errors.options().dtype(at::kLong));
  at::Tensor feasible_t = at::ones({}, errors.options().dtype(at::kBool));
  if (num_layers == 0) return {choice_t, feasible_t};
  const double* err = errors.data_ptr<double>();
  const double* size = sizes.data_ptr<double>();
  int64_t* choice = choice_t.data_ptr<int64_t>();

  if (std::isinf(budget)) {  // every configuration fits: the smallest size per layer
    choose_per_layer(size, err, err, num_layers, num_cands, choice);
    return {choice_t, feasible_t};
  }

  // Discretize; per layer, the candidates that can fit.
  const double unit = level_unit(budget, levels);
  std::vector<int64_t> level(num_layers * num_cands);
  std::vector<Candidate> cands;
  std::vector<int64_t> cand_begin(num_layers + 1, 0);
  bool every_layer_has_one = true;
  for (int64_t l = 0; l < num_layers; ++l) {
    for (int64_t c = 0; c < num_cands; ++c) {
      const int64_t i = l * num_cands + c;
      level[i] = std::isfinite(err[i]) ? error_level(err[i], unit, levels) : -1;
      if (level[i] >= 0) cands.push_back({level[i], size[i], static_cast<double>(c)});
    }
    cand_begin[l + 1] = static_cast<int64_t>(cands.size());
    every_layer_has_one = every_layer_has_one && cand_begin[l + 1] > cand_begin[l];
  }

  int64_t final_level = -1;
  std::unique_ptr<uint8_t[]> back;
  const int64_t width = levels + 1;
  if (every_layer_has_one) {
    back.reset(new uint8_t[num_layers * width]);
    std::vector<double> prev(width, kInf), cur(width);
    prev[0] = 0.0;
    const RelaxFn relax = select_relax();
    const int64_t num_blocks = (width + kBlock - 1) / kBlock;
    for (int64_t l = 0; l < num_layers; ++l) {
      const Candidate* layer_cands = cands.data() + cand_begin[l];
      const int64_t n = cand_begin[l + 1] - cand_begin[l];
      uint8_t* back_row = back.get() + l * width;
      at::parallel_for(0, num_blocks, kBlocksPerTask, [&](int64_t b0, int64_t b1) {
        double arg[kBlock];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * kBlock;
          const int64_t end = std::min(width, start + kBlock);
          relax(prev.data(), cur.data() + start, arg, layer_cands, n, start, end);
          for (int64_t i = 0; i < end - start; ++i) back_row[start + i] = static_cast<uint8_t>(arg[i]);
        }
      });
      std::swap(prev, cur);
    }
    double best = kInf;
    for (int64_t e = 0; e < width; ++e) {
      if (prev[e] < best) {
        best = prev[e];
        final_level = e;
      }
    }
  }

  if (final_level < 0) {  // nothing fits: the least error per layer
    choose_per_layer(err, size, err, num_layers, num_cands, choice);
    feasible_t.fill_(false);
    return {choice_t, feasible_t};
  }
  int64_t e = final_level;
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int64_t c = back[l * width + e];
    choice[l] = c;
    e -= level[l * num_cands + c];
  }
  TORCH_CHECK(e == 0, "lgreco_solve: internal error, back-pointers do not sum to the chosen level");
  return {choice_t, feasible_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CPU, m) { m.impl("lgreco_solve", &lgreco_solve_cpu); }

}  // namespace pycomm
