// CUDA kernels of the DGC ops, with the results of csrc/cpu/dgc_cpu.cpp.
//
// Segments are cut into tiles of kDgcTile elements; one launch covers every
// tile of every segment. An exclusive scan of the per-segment tile counts
// (tile_first, computed on the device from the device table) maps a tile to
// its segment by binary search, so no launch depends on a host copy of the
// table. A block of kBlock threads handles a tile, thread i the elements
// i, i + kBlock, ... (coalesced).
//
// dgc_compensate: with clipping, per-tile squared sums (double) are written to
// a partial array and summed per segment in a fixed order (deterministic), the
// segment's scale is computed as on the CPU, then one elementwise pass applies
// the CPU's float steps (mul_rn / add_rn: no FMA contraction).
//
// topk_magnitude: keys are the bit patterns of topk::magnitude_key, masked to
// 31 bits (the key is >= 0 or -0, and non-negative floats order like their bit
// patterns; -0 and +0 both map to 0, as they compare equal). A radix select
// (4 passes of 8 bits, per-segment histograms in global memory) finds each
// segment's k-th key K and how many elements equal to K are taken (rem). The
// selected set is {key > K} plus the rem lowest-index elements with key == K:
// exactly the top k under topk::before. A counting pass and a scan give every
// tile its number of selected elements before it, and a final pass writes
// them in index order. No sort, no host round trip, exact in every case.
//
// dgc_mask / densify: the indices are checked by a kernel that records the
// lowest bad position; the writing kernels do nothing when it is set.
// densify sorts (index, position) pairs with a stable radix sort and sums each
// run of equal indices in position order from +0.0f: the CPU's sequential
// scatter-add, bit for bit, whatever the duplicates.
//
// The per-element and per-thread logic is in __host__ __device__ helpers
// (PYCOMM_HD), so it can be exercised on the host; the kernels glue them with
// CUB block primitives.
#include "dgc_kernels.h"
#include "element_types.cuh"

#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <math.h>

#include <type_traits>

#include "pycomm/momentum.h"
#include "pycomm/topk_order.h"

namespace pycomm {
namespace {

constexpr int kBlock = 256;
constexpr int kItems = static_cast<int>(kDgcTile / kBlock);  // elements per thread and tile
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kPasses = 4;                              // 4 x 8 bits cover the 31-bit keys
constexpr int64_t kMaxGrid = int64_t(1) << 20;          // grid-stride beyond this many blocks
constexpr size_t kAlign = 256;                          // workspace sub-allocations
constexpr unsigned long long kNoBadIndex = ~0ull;
static_assert(kItems * kBlock == kDgcTile, "a tile is kItems elements per thread");
static_assert(kBins == kBlock, "the radix kernels give every thread one bin");

// ---------------------------------------------------------------------------
// Element types: element_types.cuh.

template <DType D>
using Storage = typename Elem<D>::Storage;

// atomicAdd on double is native from sm_60; a compare-and-swap loop before
// (setup.py builds for whatever TORCH_CUDA_ARCH_LIST names).
__device__ __forceinline__ void atomic_add_double(double* address, double value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  unsigned long long* word = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = *word, assumed;
  do {
    assumed = old;
    old = atomicCAS(word, assumed, __double_as_longlong(__longlong_as_double(assumed) + value));
  } while (assumed != old);
#else
  atomicAdd(address, value);
#endif
}

// ---------------------------------------------------------------------------
// Tiles.

PYCOMM_HD int64_t tile_count(int64_t length) { return (length + kDgcTile - 1) / kDgcTile; }

// The segment that owns tile t: the largest s < count with tile_first[s] <= t
// (an empty segment owns no tile, so the next non-empty one wins the tie).
PYCOMM_HD int64_t tile_segment(const int64_t* tile_first, int64_t count, int64_t t) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (tile_first[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

struct Tile {
  int64_t segment;
  int64_t begin;  // flat index of the tile's first element
  int64_t count;  // elements in the tile, at most kDgcTile (0 past the end)
};

PYCOMM_HD Tile locate_tile(const SegmentTable& table, const int64_t* tile_first, int64_t t) {
  Tile tile;
  tile.segment = tile_segment(tile_first, table.count, t);
  int64_t offset, length;
  table.segment(tile.segment, offset, length);
  const int64_t start = (t - tile_first[tile.segment]) * kDgcTile;
  const int64_t n = length - start;
  tile.begin = offset + start;
  tile.count = n < 0 ? 0 : (n > kDgcTile ? kDgcTile : n);
  return tile;
}

// Writes the tile count of every segment, and 0 at [count], for an exclusive scan.
__global__ void segment_tiles_kernel(const SegmentTable table, int64_t* tiles) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s <= table.count; s += stride) {
    int64_t n = 0;
    if (s < table.count) {
      int64_t offset, length;
      table.segment(s, offset, length);
      n = tile_count(length);
    }
    tiles[s] = n;
  }
}

// ---------------------------------------------------------------------------
// Momentum correction: the CPU's steps (dgc_cpu.cpp, compensate_segment).

template <DType D>
PYCOMM_HD double square(const Storage<D>* g, int64_t i) {
  const double d = static_cast<double>(Elem<D>::to_float(g[i]));
  return dmul_rn(d, d);  // exact: a float's square fits a double
}

// The CPU's clipping rule: s = clip / norm when norm > clip, computed in double.
PYCOMM_HD float clip_scale(double sq_norm, double clip) {
  const double norm = sqrt(sq_norm);
  return norm > clip ? static_cast<float>(clip / norm) : 1.0f;
}

template <DType D, bool kNesterov>
PYCOMM_HD void compensate_element(const Storage<D>* g, float* u, float* v, int64_t i, float momentum, float scale) {
  momentum_correction(mul_rn(Elem<D>::to_float(g[i]), scale), u[i], v[i], momentum, kNesterov);
}

// Squared sum of each tile (double): to partials[t], or, for tiles past the
// partials' capacity (possible only with overlapping rows), added to
// overflow[segment] with an atomic.
template <DType D>
__global__ void __launch_bounds__(kBlock)
    norm_partial_kernel(const Storage<D>* __restrict__ g, const SegmentTable table, const int64_t* tile_first,
                        double* partials, int64_t capacity, double* overflow) {
  using Reduce = cub::BlockReduce<double, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t tiles = tile_first[table.count];
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = locate_tile(table, tile_first, t);
    double acc = 0.0;
    for (int r = 0; r < kItems; ++r) {
      const int64_t j = static_cast<int64_t>(r) * kBlock + threadIdx.x;
      if (j < tile.count) acc = dadd_rn(acc, square<D>(g, tile.begin + j));
    }
    const double sum = Reduce(temp).Sum(acc);
    if (threadIdx.x == 0) {
      if (t < capacity)
        partials[t] = sum;
      else
        atomic_add_double(&overflow[tile.segment], sum);
    }
    __syncthreads();  // temp is reused by the next tile
  }
}

// Per segment: the squared norm from its tiles' partials (fixed order), then
// the scale.
__global__ void __launch_bounds__(kBlock)
    norm_finalize_kernel(const int64_t* tile_first, int64_t count, const double* partials, int64_t capacity,
                         const double* overflow, double clip, float* scales) {
  using Reduce = cub::BlockReduce<double, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t s = blockIdx.x; s < count; s += gridDim.x) {
    const int64_t end = tile_first[s + 1] < capacity ? tile_first[s + 1] : capacity;
    double acc = 0.0;
    for (int64_t t = tile_first[s] + threadIdx.x; t < end; t += kBlock) acc = dadd_rn(acc, partials[t]);
    const double sum = Reduce(temp).Sum(acc);
    if (threadIdx.x == 0) scales[s] = clip_scale(dadd_rn(sum, overflow[s]), clip);
    __syncthreads();
  }
}

template <DType D, bool kNesterov>
__global__ void __launch_bounds__(kBlock)
    compensate_kernel(const Storage<D>* __restrict__ g, float* __restrict__ u, float* __restrict__ v,
                      const SegmentTable table, const int64_t* tile_first, const float* scales, float momentum) {
  const int64_t tiles = tile_first[table.count];
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = locate_tile(table, tile_first, t);
    const float scale = scales != nullptr ? scales[tile.segment] : 1.0f;
    for (int r = 0; r < kItems; ++r) {
      const int64_t j = static_cast<int64_t>(r) * kBlock + threadIdx.x;
      if (j < tile.count) compensate_element<D, kNesterov>(g, u, v, tile.begin + j, momentum, scale);
    }
  }
}

// ---------------------------------------------------------------------------
// Top-k: radix select of the k-th key, then an ordered compaction.

template <DType D>
PYCOMM_HD uint32_t key_of(const Storage<D>* x, int64_t i) {
  return float_bits(topk::magnitude_key(Elem<D>::to_float(x[i]))) & 0x7fffffffu;
}

enum : uint32_t { kModeRadix = 0, kModeAll = 1, kModeNone = 2 };

// Per segment: the key bits fixed so far (prefix) and how many of the
// elements matching them are still to be taken (rem). After the last pass,
// prefix is the k-th key K and rem the number of elements equal to K taken
// (the elements above K are all taken). kModeAll: the segment is taken whole
// (k == length); kModeNone: nothing is taken (k == 0 < length, possible with a
// keep column).
struct SelectState {
  uint32_t prefix;
  uint32_t mode;
  int64_t rem;
};

PYCOMM_HD SelectState init_select(int64_t length, int64_t k) {
  SelectState st;
  st.prefix = 0;
  st.mode = k >= length ? kModeAll : (k <= 0 ? kModeNone : kModeRadix);
  st.rem = k;
  return st;
}

// The digit of `key` in the pass at `shift`, and whether the key matches the
// prefix fixed by the previous passes.
PYCOMM_HD bool radix_digit(uint32_t key, const SelectState& st, int shift, uint32_t& digit) {
  const uint32_t high = shift + kRadixBits >= 32 ? 0u : (~0u << (shift + kRadixBits));
  digit = (key >> shift) & static_cast<uint32_t>(kBins - 1);
  return (key & high) == st.prefix;
}

// `count` matching keys have `digit`, `above` have a larger one: the digit of
// the k-th key is this one iff above < rem <= above + count.
PYCOMM_HD bool radix_pick(const SelectState& st, int shift, uint32_t digit, uint64_t above, uint64_t count,
                          SelectState& next) {
  const uint64_t rem = static_cast<uint64_t>(st.rem);
  if (!(above < rem && rem <= above + count)) return false;
  next = st;
  next.prefix = st.prefix | (digit << shift);
  next.rem = static_cast<int64_t>(rem - above);
  return true;
}

// 1: ranked above the k-th key (taken); 2: equal to it (taken in index order
// while rem lasts); 0: not taken.
PYCOMM_HD uint32_t classify(uint32_t key, const SelectState& st) {
  if (st.mode == kModeNone) return 0;
  if (st.mode == kModeAll || key > st.prefix) return 1;
  return key == st.prefix ? 2 : 0;
}

// Counters of classes 1 and 2 packed in one word (a tile has < 2^16 elements).
PYCOMM_HD uint32_t class_bits(uint32_t cls) { return cls == 1 ? 1u : (cls == 2 ? (1u << 16) : 0u); }

// Position within the segment's output of an element of class cls that has
// `above` class-1 and `equal` class-2 elements before it in its segment;
// false if it is not taken.
PYCOMM_HD bool select_position(uint32_t cls, int64_t above, int64_t equal, int64_t rem, int64_t& pos) {
  pos = above + (equal < rem ? equal : rem);
  return cls == 1 || (cls == 2 && equal < rem);
}

__global__ void topk_init_kernel(const SegmentTable table, double density, int64_t* tiles, int64_t* ks,
                                 SelectState* state) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s <= table.count; s += stride) {
    int64_t n = 0, k = 0;
    if (s < table.count) {
      int64_t offset, length;
      table.segment(s, offset, length);
      n = tile_count(length);
      k = table.keep(s, density);
      state[s] = init_select(length, k);
    }
    tiles[s] = n;
    ks[s] = k;
  }
}

// Histogram of the digit at `shift` of the keys that match their segment's
// prefix (segments still in radix mode), accumulated into hist[segment][bin].
template <DType D, typename C>
__global__ void __launch_bounds__(kBlock)
    radix_histogram_kernel(const Storage<D>* __restrict__ x, const SegmentTable table, const int64_t* tile_first,
                           int64_t tiles, const SelectState* state, int shift, C* hist) {
  __shared__ unsigned int bins[kBins];
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = locate_tile(table, tile_first, t);
    const SelectState st = state[tile.segment];
    if (st.mode != kModeRadix) continue;  // uniform in the block
    bins[threadIdx.x] = 0u;
    __syncthreads();
    for (int r = 0; r < kItems; ++r) {
      const int64_t j = static_cast<int64_t>(r) * kBlock + threadIdx.x;
      uint32_t digit;
      if (j < tile.count && radix_digit(key_of<D>(x, tile.begin + j), st, shift, digit)) atomicAdd(&bins[digit], 1u);
    }
    __syncthreads();
    const unsigned int c = bins[threadIdx.x];
    if (c != 0u) atomicAdd(&hist[tile.segment * kBins + threadIdx.x], static_cast<C>(c));
    __syncthreads();
  }
}

// Per segment: picks the digit of the k-th key from the histogram (thread i
// holds digit kBins - 1 - i, so an inclusive scan counts the keys at or above
// each digit), updates the state and clears the histogram for the next pass.
template <typename C>
__global__ void __launch_bounds__(kBlock) radix_select_kernel(int64_t count, SelectState* state, C* hist, int shift) {
  using Scan = cub::BlockScan<unsigned long long, kBlock>;
  __shared__ typename Scan::TempStorage temp;
  for (int64_t s = blockIdx.x; s < count; s += gridDim.x) {
    const SelectState st = state[s];
    if (st.mode != kModeRadix) continue;  // uniform in the block
    const uint32_t digit = static_cast<uint32_t>(kBins - 1) - threadIdx.x;
    C* bin = &hist[s * kBins + digit];
    const unsigned long long c = static_cast<unsigned long long>(*bin);
    unsigned long long at_or_above;
    Scan(temp).InclusiveSum(c, at_or_above);  // its barriers order every read of state[s] before the write
    SelectState next;
    if (radix_pick(st, shift, digit, at_or_above - c, c, next)) state[s] = next;
    *bin = static_cast<C>(0);
    __syncthreads();  // temp is reused by the next segment
  }
}

// Per tile: the numbers of class-1 and class-2 elements, to counts[t] and
// counts[tiles + t].
template <DType D>
__global__ void __launch_bounds__(kBlock)
    select_count_kernel(const Storage<D>* __restrict__ x, const SegmentTable table, const int64_t* tile_first,
                        int64_t tiles, const SelectState* state, int64_t* counts) {
  using Reduce = cub::BlockReduce<uint32_t, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = locate_tile(table, tile_first, t);
    const SelectState st = state[tile.segment];
    uint32_t packed = 0;
    for (int r = 0; r < kItems; ++r) {
      const int64_t j = static_cast<int64_t>(r) * kBlock + threadIdx.x;
      if (j < tile.count) packed += class_bits(classify(key_of<D>(x, tile.begin + j), st));
    }
    const uint32_t total = Reduce(temp).Sum(packed);
    if (threadIdx.x == 0) {
      counts[t] = total & 0xffffu;
      counts[tiles + t] = total >> 16;
    }
    __syncthreads();
  }
}

// Writes the selected elements of each tile at their output positions:
// counts_first is the exclusive scan of counts, so the differences to the
// segment's first tile count the class-1 / class-2 elements of the segment
// before this tile; a block scan per round of kBlock elements adds those of
// the tile before each element.
template <DType D, typename I>
__global__ void __launch_bounds__(kBlock)
    select_write_kernel(const Storage<D>* __restrict__ x, const SegmentTable table, const int64_t* tile_first,
                        int64_t tiles, const int64_t* out_first, const SelectState* state,
                        const int64_t* counts_first, int64_t total_k, Storage<D>* __restrict__ values,
                        I* __restrict__ indices) {
  using Scan = cub::BlockScan<uint32_t, kBlock>;
  __shared__ typename Scan::TempStorage temp;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = locate_tile(table, tile_first, t);
    const SelectState st = state[tile.segment];
    const int64_t first = tile_first[tile.segment];
    const int64_t above_before = counts_first[t] - counts_first[first];
    const int64_t equal_before = counts_first[tiles + t] - counts_first[tiles + first];
    const int64_t base = out_first[tile.segment];
    uint32_t carry = 0;
    for (int r = 0; r < kItems; ++r) {
      if (static_cast<int64_t>(r) * kBlock >= tile.count) break;  // uniform in the block
      const int64_t j = static_cast<int64_t>(r) * kBlock + threadIdx.x;
      const uint32_t cls = j < tile.count ? classify(key_of<D>(x, tile.begin + j), st) : 0u;
      uint32_t before, aggregate;
      Scan(temp).ExclusiveSum(class_bits(cls), before, aggregate);
      before += carry;
      int64_t pos;
      if (cls != 0u &&
          select_position(cls, above_before + (before & 0xffffu), equal_before + (before >> 16), st.rem, pos)) {
        const int64_t o = base + pos;
        if (o < total_k) {
          values[o] = x[tile.begin + j];
          indices[o] = static_cast<I>(tile.begin + j);
        }
      }
      carry += aggregate;
      __syncthreads();  // temp is reused by the next round
    }
  }
}

// ---------------------------------------------------------------------------
// Index validation, masking, densify.

template <typename I>
__global__ void index_check_kernel(const I* __restrict__ indices, int64_t count, int64_t numel,
                                   unsigned long long* first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += stride) {
    const int64_t i = static_cast<int64_t>(indices[j]);
    if (i < 0 || i >= numel) {
      atomicMin(first_bad, static_cast<unsigned long long>(j));
      break;  // this thread's later positions are larger
    }
  }
}

template <typename I>
__global__ void mask_kernel(float* v, float* u, const I* __restrict__ indices, int64_t count,
                            const unsigned long long* first_bad) {
  if (*first_bad != kNoBadIndex) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += stride) {
    const int64_t i = static_cast<int64_t>(indices[j]);
    v[i] = 0.0f;
    if (u != nullptr) u[i] = 0.0f;
  }
}

template <typename P>
__global__ void iota_kernel(P* p, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += stride)
    p[j] = static_cast<P>(j);
}

// The sum of the run of equal keys starting at j (keys sorted stably, so the
// run's positions ascend): +0.0f, then each value in position order.
template <DType D, typename K, typename P>
PYCOMM_HD float densify_run(const K* keys, const P* positions, const Storage<D>* values, int64_t count, int64_t j) {
  const K key = keys[j];
  float acc = 0.0f;
  for (int64_t r = j; r < count && keys[r] == key; ++r) acc = add_rn(acc, Elem<D>::to_float(values[positions[r]]));
  return acc;
}

template <DType D, typename K, typename P>
__global__ void densify_kernel(const K* __restrict__ keys, const P* __restrict__ positions,
                               const Storage<D>* __restrict__ values, int64_t count,
                               const unsigned long long* first_bad, float* __restrict__ out) {
  if (*first_bad != kNoBadIndex) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += stride)
    if (j == 0 || keys[j] != keys[j - 1]) out[keys[j]] = densify_run<D>(keys, positions, values, count, j);
}

// ---------------------------------------------------------------------------
// Host side.

unsigned grid_for(int64_t blocks) {
  if (blocks < 1) return 1u;
  return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

unsigned grid_for_items(int64_t items) { return grid_for((items + kBlock - 1) / kBlock); }

#define PYCOMM_TRY(expr)                          \
  do {                                            \
    const cudaError_t pycomm_err_ = (expr);       \
    if (pycomm_err_ != cudaSuccess) return pycomm_err_; \
  } while (0)

// Sub-allocations of the caller's workspace, each aligned to kAlign. With a
// null base it only measures (the *_workspace_bytes functions).
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}

  template <typename T>
  T* take(int64_t n) {
    return static_cast<T*>(take_bytes(static_cast<size_t>(n > 0 ? n : 0) * sizeof(T)));
  }

  void* take_bytes(size_t bytes) {
    offset_ = (offset_ + kAlign - 1) / kAlign * kAlign;
    void* p = base_ != nullptr ? base_ + offset_ : nullptr;
    offset_ += bytes;
    return p;
  }

  size_t size() const { return (offset_ + kAlign - 1) / kAlign * kAlign; }

 private:
  char* base_;
  size_t offset_ = 0;
};

size_t scan_temp_bytes(int64_t items) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                items);
  return bytes;
}

size_t max_size(size_t a, size_t b) { return a > b ? a : b; }


template <typename F>
void dispatch_index(bool index64, F&& f) {
  if (index64)
    f(int64_t{});
  else
    f(int32_t{});
}

// ---- compensate workspace ----
struct CompensateWorkspace {
  int64_t* tiles;       // [segments + 1] tile counts
  int64_t* tile_first;  // [segments + 1] their exclusive scan
  double* partials;     // [capacity] per-tile squared sums (clip only)
  double* overflow;     // [segments] (clip only)
  float* scales;        // [segments] (clip only)
  void* scan_temp;
  size_t scan_bytes;
  int64_t capacity;
};

size_t carve_compensate(void* base, int64_t numel, int64_t segments, bool clip, CompensateWorkspace& w) {
  Carver c(base);
  w.tiles = c.take<int64_t>(segments + 1);
  w.tile_first = c.take<int64_t>(segments + 1);
  // Non-overlapping rows have at most numel / kDgcTile + segments tiles.
  w.capacity = clip ? tile_count(numel) + segments : 0;
  w.partials = c.take<double>(w.capacity);
  w.overflow = c.take<double>(clip ? segments : 0);
  w.scales = c.take<float>(clip ? segments : 0);
  w.scan_bytes = scan_temp_bytes(segments + 1);
  w.scan_temp = c.take_bytes(w.scan_bytes);
  return c.size();
}

// ---- top-k workspace ----
struct TopkWorkspace {
  int64_t* tiles;         // [segments + 1]
  int64_t* tile_first;    // [segments + 1]
  int64_t* ks;            // [segments + 1]
  int64_t* out_first;     // [segments + 1]
  SelectState* state;     // [segments]
  void* hist;             // [segments][kBins] counters (C)
  int64_t* counts;        // [2 * total_tiles]
  int64_t* counts_first;  // [2 * total_tiles]
  void* scan_temp;
  size_t scan_bytes;
};

bool wide_counters(int64_t numel) { return numel > static_cast<int64_t>(0xffffffffu); }

size_t carve_topk(void* base, int64_t numel, int64_t segments, const TopkPlan& plan, TopkWorkspace& w) {
  Carver c(base);
  w.tiles = c.take<int64_t>(segments + 1);
  w.tile_first = c.take<int64_t>(segments + 1);
  w.ks = c.take<int64_t>(segments + 1);
  w.out_first = c.take<int64_t>(segments + 1);
  w.state = c.take<SelectState>(segments);
  w.hist = c.take_bytes(static_cast<size_t>(segments) * kBins *
                        (wide_counters(numel) ? sizeof(unsigned long long) : sizeof(unsigned int)));
  w.counts = c.take<int64_t>(2 * plan.total_tiles);
  w.counts_first = c.take<int64_t>(2 * plan.total_tiles);
  w.scan_bytes = max_size(scan_temp_bytes(segments + 1), scan_temp_bytes(2 * plan.total_tiles));
  w.scan_temp = c.take_bytes(w.scan_bytes);
  return c.size();
}

// ---- densify workspace ----
int key_bits_for(int64_t numel, bool index64) {
  const int max_bits = index64 ? 64 : 32;
  int bits = 1;
  while (bits < max_bits && (uint64_t(1) << bits) < static_cast<uint64_t>(numel)) ++bits;
  return bits;
}

bool wide_positions(int64_t count) { return count > static_cast<int64_t>(0xffffffffu); }

template <typename K, typename P>
size_t sort_temp_bytes(int64_t count, int end_bit) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const K*>(nullptr), static_cast<K*>(nullptr),
                                  static_cast<const P*>(nullptr), static_cast<P*>(nullptr), count, 0, end_bit);
  return bytes;
}

struct DensifyWorkspace {
  void* keys;           // [count] sorted indices (K)
  void* positions_in;   // [count] (P)
  void* positions_out;  // [count] (P)
  void* sort_temp;
  size_t sort_bytes;
  int end_bit;
};

template <typename K, typename P>
size_t carve_densify_typed(void* base, int64_t count, int64_t numel, DensifyWorkspace& w) {
  Carver c(base);
  w.end_bit = key_bits_for(numel, sizeof(K) == 8);
  w.keys = c.take<K>(count);
  w.positions_in = c.take<P>(count);
  w.positions_out = c.take<P>(count);
  w.sort_bytes = sort_temp_bytes<K, P>(count, w.end_bit);
  w.sort_temp = c.take_bytes(w.sort_bytes);
  return c.size();
}

size_t carve_densify(void* base, int64_t count, bool index64, int64_t numel, DensifyWorkspace& w) {
  const bool wide = wide_positions(count);
  if (index64)
    return wide ? carve_densify_typed<uint64_t, uint64_t>(base, count, numel, w)
                : carve_densify_typed<uint64_t, uint32_t>(base, count, numel, w);
  return wide ? carve_densify_typed<uint32_t, uint64_t>(base, count, numel, w)
              : carve_densify_typed<uint32_t, uint32_t>(base, count, numel, w);
}

template <DType D, typename K, typename P>
cudaError_t densify_typed(const void* values, const void* indices, int64_t count, const DensifyWorkspace& w,
                          const unsigned long long* first_bad, float* out, cudaStream_t stream) {
  P* pos_in = static_cast<P*>(w.positions_in);
  P* pos_out = static_cast<P*>(w.positions_out);
  K* keys = static_cast<K*>(w.keys);
  iota_kernel<P><<<grid_for_items(count), kBlock, 0, stream>>>(pos_in, count);
  size_t bytes = w.sort_bytes;
  // Indices are reinterpreted as unsigned: valid ones (checked before any
  // write) are non-negative, so the order is the same.
  PYCOMM_TRY(cub::DeviceRadixSort::SortPairs(w.sort_temp, bytes, static_cast<const K*>(indices), keys, pos_in, pos_out,
                                             count, 0, w.end_bit, stream));
  densify_kernel<D, K, P><<<grid_for_items(count), kBlock, 0, stream>>>(
      keys, pos_out, static_cast<const Storage<D>*>(values), count, first_bad, out);
  return cudaSuccess;
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers.

size_t dgc_compensate_workspace_bytes(int64_t numel, int64_t num_segments, bool clip) {
  CompensateWorkspace w;
  return carve_compensate(nullptr, numel, num_segments, clip, w);
}

cudaError_t launch_dgc_compensate(const void* grad, DType dtype, float* u, float* v, const int64_t* table,
                                  int64_t num_segments, int64_t columns, int64_t numel, float momentum,
                                  bool nesterov, double clip_norm, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  const SegmentTable segs{table, table != nullptr ? num_segments : 1, numel, columns};
  if (segs.count <= 0 || numel <= 0) return cudaSuccess;
  const bool clip = clip_norm > 0.0;
  CompensateWorkspace w;
  if (carve_compensate(workspace, numel, segs.count, clip, w) > workspace_bytes) return cudaErrorInvalidValue;

  segment_tiles_kernel<<<grid_for_items(segs.count + 1), kBlock, 0, stream>>>(segs, w.tiles);
  size_t bytes = w.scan_bytes;
  PYCOMM_TRY(cub::DeviceScan::ExclusiveSum(w.scan_temp, bytes, static_cast<const int64_t*>(w.tiles), w.tile_first,
                                           segs.count + 1, stream));
  if (clip) PYCOMM_TRY(cudaMemsetAsync(w.overflow, 0, sizeof(double) * segs.count, stream));
  // Tiles of non-overlapping rows; with overlaps the kernels grid-stride over the rest.
  const unsigned grid = grid_for(tile_count(numel) + segs.count);
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    const Storage<D>* g = static_cast<const Storage<D>*>(grad);
    const float* scales = nullptr;
    if (clip) {
      norm_partial_kernel<D><<<grid, kBlock, 0, stream>>>(g, segs, w.tile_first, w.partials, w.capacity, w.overflow);
      norm_finalize_kernel<<<grid_for(segs.count), kBlock, 0, stream>>>(w.tile_first, segs.count, w.partials,
                                                                         w.capacity, w.overflow, clip_norm, w.scales);
      scales = w.scales;
    }
    if (nesterov)
      compensate_kernel<D, true><<<grid, kBlock, 0, stream>>>(g, u, v, segs, w.tile_first, scales, momentum);
    else
      compensate_kernel<D, false><<<grid, kBlock, 0, stream>>>(g, u, v, segs, w.tile_first, scales, momentum);
  });
  return cudaSuccess;
}

size_t topk_magnitude_workspace_bytes(int64_t numel, int64_t num_segments, const TopkPlan& plan) {
  TopkWorkspace w;
  return carve_topk(nullptr, numel, num_segments, plan, w);
}

cudaError_t launch_topk_magnitude(const void* x, DType dtype, int64_t numel, const int64_t* table,
                                  int64_t num_segments, int64_t columns, double density, const TopkPlan& plan,
                                  void* values, void* indices, bool indices64, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
  const SegmentTable segs{table, table != nullptr ? num_segments : 1, numel, columns};
  if (segs.count <= 0 || numel <= 0 || plan.total_k <= 0 || plan.total_tiles <= 0) return cudaSuccess;
  TopkWorkspace w;
  if (carve_topk(workspace, numel, segs.count, plan, w) > workspace_bytes) return cudaErrorInvalidValue;
  const int64_t tiles = plan.total_tiles;

  topk_init_kernel<<<grid_for_items(segs.count + 1), kBlock, 0, stream>>>(segs, density, w.tiles, w.ks, w.state);
  size_t bytes = w.scan_bytes;
  PYCOMM_TRY(cub::DeviceScan::ExclusiveSum(w.scan_temp, bytes, static_cast<const int64_t*>(w.tiles), w.tile_first,
                                           segs.count + 1, stream));
  bytes = w.scan_bytes;
  PYCOMM_TRY(cub::DeviceScan::ExclusiveSum(w.scan_temp, bytes, static_cast<const int64_t*>(w.ks), w.out_first,
                                           segs.count + 1, stream));
  const bool wide = wide_counters(numel);
  const size_t counter_bytes = wide ? sizeof(unsigned long long) : sizeof(unsigned int);
  const unsigned grid = grid_for(tiles);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    const Storage<D>* xp = static_cast<const Storage<D>*>(x);
    // Segments taken whole or not at all have no k-th key to find.
    if (plan.partial_segments > 0) {
      err = cudaMemsetAsync(w.hist, 0, static_cast<size_t>(segs.count) * kBins * counter_bytes, stream);
      if (err != cudaSuccess) return;
      for (int pass = 0; pass < kPasses; ++pass) {
        const int shift = (kPasses - 1 - pass) * kRadixBits;
        if (wide) {
          auto* hist = static_cast<unsigned long long*>(w.hist);
          radix_histogram_kernel<D><<<grid, kBlock, 0, stream>>>(xp, segs, w.tile_first, tiles, w.state, shift, hist);
          radix_select_kernel<<<grid_for(segs.count), kBlock, 0, stream>>>(segs.count, w.state, hist, shift);
        } else {
          auto* hist = static_cast<unsigned int*>(w.hist);
          radix_histogram_kernel<D><<<grid, kBlock, 0, stream>>>(xp, segs, w.tile_first, tiles, w.state, shift, hist);
          radix_select_kernel<<<grid_for(segs.count), kBlock, 0, stream>>>(segs.count, w.state, hist, shift);
        }
      }
    }
    select_count_kernel<D><<<grid, kBlock, 0, stream>>>(xp, segs, w.tile_first, tiles, w.state, w.counts);
    size_t scan_bytes = w.scan_bytes;
    err = cub::DeviceScan::ExclusiveSum(w.scan_temp, scan_bytes, static_cast<const int64_t*>(w.counts),
                                        w.counts_first, 2 * tiles, stream);
    if (err != cudaSuccess) return;
    dispatch_index(indices64, [&](auto index_tag) {
      using I = decltype(index_tag);
      Storage<D>* out_values = static_cast<Storage<D>*>(values);
      I* out_indices = static_cast<I*>(indices);
      select_write_kernel<D, I><<<grid, kBlock, 0, stream>>>(xp, segs, w.tile_first, tiles, w.out_first, w.state,
                                                             w.counts_first, plan.total_k, out_values, out_indices);
    });
  });
  PYCOMM_TRY(err);
  return cudaSuccess;
}

cudaError_t launch_index_check(const void* indices, bool indices64, int64_t count, int64_t numel,
                               unsigned long long* first_bad, cudaStream_t stream) {
  PYCOMM_TRY(cudaMemsetAsync(first_bad, 0xff, sizeof(unsigned long long), stream));
  if (count <= 0) return cudaSuccess;
  dispatch_index(indices64, [&](auto index_tag) {
    using I = decltype(index_tag);
    index_check_kernel<I><<<grid_for_items(count), kBlock, 0, stream>>>(static_cast<const I*>(indices), count, numel,
                                                                         first_bad);
  });
  return cudaSuccess;
}

cudaError_t launch_dgc_mask(float* v, float* u, const void* indices, bool indices64, int64_t count,
                            const unsigned long long* first_bad, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  dispatch_index(indices64, [&](auto index_tag) {
    using I = decltype(index_tag);
    mask_kernel<I><<<grid_for_items(count), kBlock, 0, stream>>>(v, u, static_cast<const I*>(indices), count,
                                                                  first_bad);
  });
  return cudaSuccess;
}

size_t densify_workspace_bytes(int64_t count, bool indices64, int64_t numel) {
  DensifyWorkspace w;
  return carve_densify(nullptr, count, indices64, numel, w);
}

cudaError_t launch_densify(const void* values, DType dtype, const void* indices, bool indices64, int64_t count,
                           int64_t numel, const unsigned long long* first_bad, float* out, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  if (count <= 0 || numel <= 0) return cudaSuccess;  // numel == 0 with count > 0: every index is bad
  DensifyWorkspace w;
  if (carve_densify(workspace, count, indices64, numel, w) > workspace_bytes) return cudaErrorInvalidValue;
  const bool wide = wide_positions(count);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    if (indices64)
      err = wide ? densify_typed<D, uint64_t, uint64_t>(values, indices, count, w, first_bad, out, stream)
                 : densify_typed<D, uint64_t, uint32_t>(values, indices, count, w, first_bad, out, stream);
    else
      err = wide ? densify_typed<D, uint32_t, uint64_t>(values, indices, count, w, first_bad, out, stream)
                 : densify_typed<D, uint32_t, uint32_t>(values, indices, count, w, first_bad, out, stream);
  });
  PYCOMM_TRY(err);
  return cudaSuccess;
}

}  // namespace pycomm
