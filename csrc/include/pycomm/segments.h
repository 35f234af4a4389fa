// Segment tables: the layers of one DDP bucket as (offset, length) rows of a
// flat buffer, so one kernel launch covers a whole bucket. Shared by the CPU
// and CUDA code.
#pragma once

#include "pycomm/common.h"

namespace pycomm {

struct SegmentTable {
  const int64_t* rows;  // [count][2] (offset, length), or nullptr for one segment [0, numel)
  int64_t count;
  int64_t numel;

  // Clamped so that a malformed table never addresses outside the buffer.
  PYCOMM_HD void segment(int64_t s, int64_t& offset, int64_t& length) const {
    if (rows == nullptr) {
      offset = 0;
      length = numel;
      return;
    }
    int64_t off = rows[2 * s], len = rows[2 * s + 1];
    if (off < 0) off = 0;
    if (off > numel) off = numel;
    if (len < 0) len = 0;
    if (len > numel - off) len = numel - off;
    offset = off;
    length = len;
  }
};

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

}  // namespace pycomm
