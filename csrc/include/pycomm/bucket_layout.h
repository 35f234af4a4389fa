// Where each bucket of a payload reads its elements from.
//
// Without a table, bucket k covers elements [k * B, min((k + 1) * B, numel))
// of a flat tensor; buckets past the end are empty (padding). With a table
// (int64 [num_buckets][2] of (offset, length) rows), bucket k covers
// [offset, offset + length): hooks use one to give each layer of a DDP bucket
// its own quantization buckets and to leave small layers out, without copying.
#pragma once

#include "pycomm/common.h"

namespace pycomm {

struct BucketLayout {
  const int64_t* table;  // nullptr: the identity layout above
  int64_t numel;         // elements addressable in the flat tensor
  int64_t bucket_size;
  int64_t first_bucket;  // row of the table (or bucket of the identity layout) for bucket 0

  // Clamped so that a malformed table can never address outside the tensor.
  PYCOMM_HD void range(int64_t bucket, int64_t& offset, int64_t& length) const {
    const int64_t k = first_bucket + bucket;
    int64_t off, len;
    if (table != nullptr) {
      off = table[2 * k];
      len = table[2 * k + 1];
    } else {
      off = k * bucket_size;
      len = bucket_size;
    }
    if (off < 0) off = 0;
    if (off > numel) off = numel;
    if (len > bucket_size) len = bucket_size;
    if (len > numel - off) len = numel - off;
    if (len < 0) len = 0;
    offset = off;
    length = len;
  }
};

}  // namespace pycomm
