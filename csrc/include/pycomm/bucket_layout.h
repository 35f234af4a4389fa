// Where each bucket of a payload reads its elements from, and (mixed tables)
// which bit width and which bytes of the payload it has.
//
// Without a table, bucket k covers elements [k * B, min((k + 1) * B, numel))
// of a flat tensor; buckets past the end are empty (padding). With a table
// (int64 [num_buckets][2] of (offset, length) rows), bucket k covers
// [offset, offset + length): hooks use one to give each layer of a DDP bucket
// its own quantization buckets and to leave small layers out, without copying.
//
// A mixed table has 4 columns, (offset, length, bits, byte_offset): row k's
// record has its own bit width and starts at byte_offset of a flat 1-D
// payload. Records are packed back to back in row order (byte_offset[0] = 0,
// byte_offset[k + 1] = byte_offset[k] + record_bytes(bits[k], B)); the host
// checks this (quantize_checks.h) and the kernels check every record against
// the payload's length again, so a malformed table never addresses outside it.
#pragma once

#include "pycomm/common.h"
#include "pycomm/quant_format.h"

namespace pycomm {

struct BucketLayout {
  const int64_t* table;  // nullptr: the identity layout above
  int64_t numel;         // elements addressable in the flat tensor
  int64_t bucket_size;
  int64_t first_bucket;  // row of the table (or bucket of the identity layout) for bucket 0
  int64_t columns;       // int64s per table row: 2, or 4 for a mixed table
  bool packed_chunk;     // bucket k covers [k * B, k * B + length of row first_bucket + k): a
                         // reduced chunk as dequantize_sum returns it (mixed tables)

  // Clamped so that a malformed table can never address outside the tensor.
  PYCOMM_HD void range(int64_t bucket, int64_t& offset, int64_t& length) const {
    int64_t off, len;
    if (table != nullptr && packed_chunk) {
      off = bucket * bucket_size;
      len = table[columns * (first_bucket + bucket) + 1];
    } else if (table != nullptr) {
      off = table[columns * (first_bucket + bucket)];
      len = table[columns * (first_bucket + bucket) + 1];
    } else {
      // (first_bucket + bucket) * bucket_size can overflow int64 (init_bucket_begin is any
      // non-negative int): a bucket past numel / bucket_size starts at or past the end.
      const int64_t last = numel / bucket_size;
      off = first_bucket >= 0 && first_bucket <= last && bucket <= last - first_bucket
                ? (first_bucket + bucket) * bucket_size
                : numel;
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

// Bit width and byte position of each record of a mixed-table payload.
struct MixedRecords {
  const int64_t* table;   // int64 [rows][4] (offset, length, bits, byte_offset)
  int64_t first_row;      // table row of payload bucket 0
  int64_t payload_bytes;  // bytes of one payload (one source)
  int64_t bucket_size;

  // Bucket k's bit width and record offset (relative to the payload's start,
  // i.e. to first_row's byte_offset). False for a row whose bits are out of
  // [1, 8] or whose record does not lie inside the payload: callers then
  // leave the bucket alone.
  PYCOMM_HD bool record(int64_t k, int& bits, int64_t& offset) const {
    const int64_t row = first_row + k;
    const int64_t b = table[4 * row + 2];
    if (b < quant::kMinBits || b > quant::kMaxBits) return false;
    bits = static_cast<int>(b);
    // Both byte offsets are checked before subtracting: a table the host has not
    // validated (a CUDA table used with host_table) may hold any values.
    const int64_t at = table[4 * row + 3], first = table[4 * first_row + 3];
    if (first < 0 || at < first) return false;
    offset = at - first;
    return offset <= payload_bytes - quant::record_bytes(bits, bucket_size);
  }
};

}  // namespace pycomm
