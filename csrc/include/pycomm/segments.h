// Segment tables: the layers of one DDP bucket as rows of a flat buffer, so
// one kernel launch covers a whole bucket. Shared by the CPU and CUDA code.
//
// A row is (offset, length), or (offset, length, keep): `keep` is the number
// of elements top-k selection keeps in that segment (per-layer densities
// inside one bucket). Without a keep column every segment keeps
// topk_count(length, density).
#pragma once

#include "pycomm/common.h"

namespace pycomm {

// Elements kept per segment at `density`: ceil(length * density), at least 1
// for a non-empty segment and at most its length. Computed in double on the
// host and the device alike.
PYCOMM_HD int64_t topk_count(int64_t length, double density) {
  if (length <= 0) return 0;
  double want = static_cast<double>(length) * density;
  int64_t k = static_cast<int64_t>(want);
  if (static_cast<double>(k) < want) ++k;
  if (k < 1) k = 1;
  if (k > length) k = length;
  return k;
}

struct SegmentTable {
  const int64_t* rows;  // [count][columns], or nullptr for one segment [0, numel)
  int64_t count;
  int64_t numel;
  int64_t columns = 2;  // 2: (offset, length); 3: (offset, length, keep)

  // Clamped so that a malformed table never addresses outside the buffer.
  PYCOMM_HD void segment(int64_t s, int64_t& offset, int64_t& length) const {
    if (rows == nullptr) {
      offset = 0;
      length = numel;
      return;
    }
    int64_t off = rows[columns * s], len = rows[columns * s + 1];
    if (off < 0) off = 0;
    if (off > numel) off = numel;
    if (len < 0) len = 0;
    if (len > numel - off) len = numel - off;
    offset = off;
    length = len;
  }

  PYCOMM_HD bool has_keep() const { return rows != nullptr && columns >= 3; }

  // Elements top-k keeps in segment s: the row's keep column (clamped to
  // [0, length]; the host validates it, dgc_checks.h), or else
  // topk_count(length, density).
  PYCOMM_HD int64_t keep(int64_t s, double density) const {
    int64_t offset, length;
    segment(s, offset, length);
    if (!has_keep()) return topk_count(length, density);
    int64_t k = rows[columns * s + 2];
    if (k < 0) k = 0;
    if (k > length) k = length;
    return k;
  }
};

}  // namespace pycomm
