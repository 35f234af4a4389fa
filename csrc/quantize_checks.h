// Argument validation shared by the CPU and CUDA implementations of the
// quantization ops, so both reject the same inputs with the same messages.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <limits>
#include <utility>

#include "pycomm/bucket_layout.h"
#include "pycomm/common.h"
#include "pycomm/quant_format.h"

namespace pycomm {

// Whether [offset, offset + length) lies inside [0, size). Written so that no
// sum is formed: offset + length overflows int64 for hostile arguments, and a
// wrapped sum would pass a naive `offset + length <= size`.
inline bool range_within(int64_t offset, int64_t length, int64_t size) {
  return offset >= 0 && length >= 0 && offset <= size && length <= size - offset;
}

// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1.
inline int64_t ceil_div_nonneg(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

inline void check_bits_and_bucket(int64_t bits, int64_t bucket_size) {
  TORCH_CHECK(bits >= quant::kMinBits && bits <= quant::kMaxBits,
              "pycomm: bits must be in [1, 8], got ", bits);
  TORCH_CHECK(bucket_size >= 8 && bucket_size % 8 == 0 && bucket_size <= (int64_t(1) << 24),
              "pycomm: bucket_size must be a positive multiple of 8 and at most 2^24, got ", bucket_size);
}

inline DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "pycomm: ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), "pycomm: ", what, " is on ", b.device(), " but the input is on ",
              a.device());
}

// Checks an optional bucket table against the tensor it indexes and returns
// the number of payload buckets it describes (or -1 when absent).
inline int64_t check_bucket_table(const c10::optional<at::Tensor>& table, const at::Tensor& like) {
  if (!table.has_value()) return -1;
  const at::Tensor& t = *table;
  check_same_device(like, t, "bucket_table");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && (t.size(1) == 2 || t.size(1) == 4) &&
                  t.is_contiguous(),
              "pycomm: bucket_table must be a contiguous int64 tensor of shape [num_buckets, 2] (or [num_buckets, "
              "4] for mixed bit widths), got ", t.scalar_type(), " ", t.sizes());
  return t.size(0);
}

inline bool is_mixed_table(const c10::optional<at::Tensor>& table) {
  return table.has_value() && table->dim() == 2 && table->size(1) == 4;
}

inline BucketLayout make_layout(const c10::optional<at::Tensor>& table, int64_t numel, int64_t bucket_size,
                                int64_t first_bucket) {
  BucketLayout layout;
  layout.table = table.has_value() ? table->data_ptr<int64_t>() : nullptr;
  layout.numel = numel;
  layout.bucket_size = bucket_size;
  layout.first_bucket = first_bucket;
  layout.columns = table.has_value() ? table->size(1) : 2;
  layout.packed_chunk = false;
  return layout;
}

// A mixed (4-column) bucket table as read on the host: the ops need its
// contents to size and check payloads. `rows` points to the table itself (CPU)
// or to the caller's CPU copy `host_table` (CUDA); without one, a CUDA table
// is copied to the host, which waits for the stream.
struct MixedTableInfo {
  at::Tensor host;       // keeps the host rows alive
  const int64_t* rows;
  int64_t count;
  int64_t total_bytes;   // bytes of the whole payload

  // Byte offset of row r's record; total_bytes for r == count.
  int64_t byte_at(int64_t r) const { return r < count ? rows[4 * r + 3] : total_bytes; }
};

inline void check_bits_argument_mixed(int64_t bits) {
  TORCH_CHECK(bits == 0, "pycomm: with a 4-column (mixed bit widths) bucket_table each row carries its bits; "
              "pass bits=0, got bits=", bits);
}

// Validates every row: bits in [1, 8], 0 <= length <= bucket_size, offset >= 0,
// records packed back to back from byte 0.
inline MixedTableInfo check_mixed_table(const at::Tensor& table, const c10::optional<at::Tensor>& host_table,
                                        int64_t bucket_size) {
  MixedTableInfo info;
  if (host_table.has_value()) {
    const at::Tensor& h = *host_table;
    TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kLong && h.is_contiguous() &&
                    h.sizes() == table.sizes(),
                "pycomm: host_table must be a contiguous int64 CPU tensor shaped like bucket_table ", table.sizes(),
                ", got ", h.scalar_type(), " ", h.sizes(), " on ", h.device());
    // The kernels read `table` and the host sizes the payload from `h`: a CPU
    // table is compared (cheap, no device); a CUDA table cannot be without a
    // sync, so there the kernels bound every record by the payload instead and
    // quantize zero-fills its payload first (quantize_cuda.cpp).
    TORCH_CHECK(!table.device().is_cpu() || at::equal(h, table), "pycomm: host_table differs from the CPU "
                "bucket_table it should copy; pass the table itself (or no host_table) for a CPU table");
    info.host = h;
  } else {
    info.host = table.device().is_cpu() ? table : table.cpu();
  }
  info.rows = info.host.data_ptr<int64_t>();
  info.count = table.size(0);
  int64_t expected = 0;
  for (int64_t r = 0; r < info.count; ++r) {
    const int64_t* row = info.rows + 4 * r;
    TORCH_CHECK(row[2] >= quant::kMinBits && row[2] <= quant::kMaxBits, "pycomm: bucket_table row ", r,
                " has bits=", row[2], "; bits must be in [1, 8]");
    TORCH_CHECK(row[0] >= 0 && row[1] >= 0 && row[1] <= bucket_size, "pycomm: bucket_table row ", r,
                " has offset ", row[0], " and length ", row[1], "; need offset >= 0 and 0 <= length <= bucket_size (",
                bucket_size, ")");
    TORCH_CHECK(row[3] == expected, "pycomm: bucket_table row ", r, " has byte_offset ", row[3], " but the records ",
                "before it end at byte ", expected, " (records are packed back to back, each 8 + bucket_size*bits/8 "
                "bytes)");
    expected += quant::record_bytes(static_cast<int>(row[2]), bucket_size);
  }
  info.total_bytes = expected;
  return info;
}

// The row r >= begin at which a run of records starting at `begin` spans
// exactly `bytes` bytes; fails when no row boundary is there.
inline int64_t mixed_rows_spanning(const MixedTableInfo& info, int64_t begin, int64_t bytes, const char* what) {
  TORCH_CHECK(begin >= 0 && begin <= info.count, "pycomm: first row ", begin, " is outside bucket_table's ",
              info.count, " rows");
  // bytes <= what is left is checked first, so that the target cannot overflow.
  const bool fits = range_within(info.byte_at(begin), bytes, info.total_bytes);
  const int64_t target = fits ? info.byte_at(begin) + bytes : -1;
  int64_t lo = begin, hi = info.count;  // binary search: byte_at is strictly increasing
  while (fits && lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (info.byte_at(mid) < target) lo = mid + 1; else hi = mid;
  }
  TORCH_CHECK(fits && info.byte_at(lo) == target, "pycomm: ", what, " has ", bytes, " bytes, which is not ",
              "a whole number of the bucket_table's records from row ", begin, " (byte ", info.byte_at(begin), ")");
  return lo - begin;
}

inline MixedRecords make_mixed_records(const at::Tensor& table, int64_t first_row, int64_t payload_bytes,
                                       int64_t bucket_size) {
  MixedRecords m;
  m.table = table.data_ptr<int64_t>();
  m.first_row = first_row;
  m.payload_bytes = payload_bytes;
  m.bucket_size = bucket_size;
  return m;
}

inline void check_payload(const at::Tensor& payload, int64_t bits, int64_t bucket_size, int64_t dims,
                          const char* what) {
  TORCH_CHECK(payload.scalar_type() == at::kByte, "pycomm: ", what, " must be uint8, got ", payload.scalar_type());
  TORCH_CHECK(payload.dim() == dims, "pycomm: ", what, " must have ", dims, " dimensions, got shape ",
              payload.sizes());
  TORCH_CHECK(payload.is_contiguous(), "pycomm: ", what, " must be contiguous");
  const int64_t expected = quant::record_bytes(static_cast<int>(bits), bucket_size);
  TORCH_CHECK(payload.size(dims - 1) == expected, "pycomm: ", what, " has records of ", payload.size(dims - 1),
              " bytes, but bits=", bits, " and bucket_size=", bucket_size, " need ", expected,
              " bytes per bucket (8 header bytes + bucket_size*bits/8)");
}

// Full validation of quantize(x, residual, bucket_table, num_buckets, bits,
// bucket_size, ...). Returns the number of payload buckets (num_buckets, or
// the number needed when it is negative).
inline int64_t check_quantize_args(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                   const c10::optional<at::Tensor>& bucket_table, int64_t num_buckets, int64_t bits,
                                   int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  to_dtype(x, "x");
  const int64_t numel = x.numel();
  const int64_t table_rows = check_bucket_table(bucket_table, x);
  const int64_t needed = table_rows >= 0 ? table_rows : ceil_div_nonneg(numel, bucket_size);
  if (num_buckets < 0) num_buckets = needed;
  TORCH_CHECK(table_rows < 0 || num_buckets == table_rows, "pycomm: num_buckets (", num_buckets,
              ") must equal the number of bucket_table rows (", table_rows, ")");
  TORCH_CHECK(num_buckets >= needed, "pycomm: num_buckets=", num_buckets, " cannot hold ", numel,
              " elements in buckets of ", bucket_size, " (need at least ", needed, ")");
  if (residual.has_value()) {
    check_same_device(x, *residual, "residual");
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->numel() == numel,
                "pycomm: residual must be a contiguous float32 tensor with as many elements as x (", numel,
                "), got ", residual->scalar_type(), " with ", residual->numel(), " elements");
  }
  return num_buckets;
}

// quantize's optional row_streams: int64, 1-D, contiguous, one entry per
// payload bucket, on x's device. Returns its data (nullptr when absent).
// check_values (CPU): every entry is >= 0, a multiple of 8 (so each element
// draws exactly Philox index row_streams[k] + j) and leaves room for the
// bucket's B draws below 2^63. CUDA passes false: reading the values would
// wait for the stream, and any value there is only an RNG counter.
inline const int64_t* check_row_streams(const c10::optional<at::Tensor>& row_streams, const at::Tensor& x,
                                        int64_t num_buckets, int64_t bucket_size, bool check_values) {
  if (!row_streams.has_value()) return nullptr;
  const at::Tensor& s = *row_streams;
  check_same_device(x, s, "row_streams");
  TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.is_contiguous(),
              "pycomm: row_streams must be a contiguous 1-D int64 tensor (one Philox stream start per payload "
              "bucket), got ", s.scalar_type(), " of shape ", s.sizes());
  TORCH_CHECK(s.size(0) == num_buckets, "pycomm: row_streams has ", s.size(0), " entries but the payload has ",
              num_buckets, " buckets; pass exactly one entry per payload bucket");
  const int64_t* v = s.data_ptr<int64_t>();
  if (check_values) {
    const int64_t limit = std::numeric_limits<int64_t>::max() - bucket_size;
    for (int64_t k = 0; k < num_buckets; ++k) {
      TORCH_CHECK(v[k] >= 0 && v[k] % quant::kGroup == 0, "pycomm: row_streams[", k, "] = ", v[k],
                  "; entries must be non-negative multiples of 8 (bucket k draws Philox indices row_streams[k] + j)");
      TORCH_CHECK(v[k] <= limit, "pycomm: row_streams[", k, "] = ", v[k], " overflows int64 with bucket_size ",
                  bucket_size, "; entries must be at most 2^63 - 1 - bucket_size = ", limit);
    }
  }
  return v;
}

// Full validation of dequantize_into(payload, out, bucket_table, bits, bucket_size).
inline void check_dequantize_into_args(const at::Tensor& payload, const at::Tensor& out,
                                       const c10::optional<at::Tensor>& bucket_table, int64_t bits,
                                       int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  check_payload(payload, bits, bucket_size, 2, "payload");
  to_dtype(out, "out");
  check_same_device(payload, out, "out");
  TORCH_CHECK(out.is_contiguous(), "pycomm: out must be contiguous");
  const int64_t num_buckets = payload.size(0);
  const int64_t table_rows = check_bucket_table(bucket_table, out);
  if (table_rows >= 0) {
    TORCH_CHECK(table_rows == num_buckets, "pycomm: the payload has ", num_buckets,
                " buckets but bucket_table has ", table_rows, " rows");
  } else {
    TORCH_CHECK(ceil_div_nonneg(out.numel(), bucket_size) <= num_buckets, "pycomm: the payload holds ",
                num_buckets, " buckets of ", bucket_size, " elements but out has ", out.numel(), " elements");
  }
}

// Full validation of dequantize_sum(payloads, init, bucket_table,
// init_bucket_begin, bits, bucket_size).
inline void check_dequantize_sum_args(const at::Tensor& payloads, const c10::optional<at::Tensor>& init,
                                      const c10::optional<at::Tensor>& bucket_table, int64_t init_bucket_begin,
                                      int64_t bits, int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  check_payload(payloads, bits, bucket_size, 3, "payloads");
  if (init.has_value()) {
    to_dtype(*init, "init");
    check_same_device(payloads, *init, "init");
    const int64_t table_rows = check_bucket_table(bucket_table, *init);
    TORCH_CHECK(init_bucket_begin >= 0, "pycomm: init_bucket_begin must be >= 0, got ", init_bucket_begin);
    const int64_t num_buckets = payloads.size(1);
    if (table_rows >= 0) {
      TORCH_CHECK(range_within(init_bucket_begin, num_buckets, table_rows), "pycomm: ", num_buckets,
                  " buckets from row init_bucket_begin=", init_bucket_begin, " are outside bucket_table's ",
                  table_rows, " rows");
    } else {
      // Bucket k reads init from element (init_bucket_begin + k) * bucket_size.
      TORCH_CHECK(range_within(init_bucket_begin, num_buckets, std::numeric_limits<int64_t>::max() / bucket_size),
                  "pycomm: init_bucket_begin=", init_bucket_begin, " with ", num_buckets, " buckets of ", bucket_size,
                  " puts element positions past 2^63 - 1");
    }
  } else {
    TORCH_CHECK(!bucket_table.has_value(), "pycomm: bucket_table is only used together with init");
  }
}

// ---------------------------------------------------------------------------
// Mixed bit widths (4-column bucket tables).

struct MixedQuantizeArgs {
  MixedTableInfo info;
  int64_t num_buckets;
  int64_t first_row;      // table row of payload bucket 0
  int64_t payload_bytes;
  bool chunk;             // x is a reduced chunk: identity element layout
};

// quantize(x, residual, bucket_table (4 columns), num_buckets, bits = 0, ...,
// host_table, chunk_row_begin). chunk_row_begin < 0: bucket k is row k of the
// table. chunk_row_begin >= 0: x is a chunk laid out as dequantize_sum returns
// it (bucket k = elements [k*B, (k+1)*B)) and bucket k takes its bits from row
// chunk_row_begin + k; the records are packed from byte 0.
inline MixedQuantizeArgs check_quantize_mixed_args(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                   const at::Tensor& table, int64_t num_buckets, int64_t bits,
                                                   int64_t bucket_size, const c10::optional<at::Tensor>& host_table,
                                                   int64_t chunk_row_begin) {
  check_bits_and_bucket(quant::kMinBits, bucket_size);
  check_bits_argument_mixed(bits);
  to_dtype(x, "x");
  check_bucket_table(table, x);
  const int64_t numel = x.numel();
  if (residual.has_value()) {
    check_same_device(x, *residual, "residual");
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->numel() == numel,
                "pycomm: residual must be a contiguous float32 tensor with as many elements as x (", numel,
                "), got ", residual->scalar_type(), " with ", residual->numel(), " elements");
  }
  MixedQuantizeArgs a;
  a.info = check_mixed_table(table, host_table, bucket_size);
  a.chunk = chunk_row_begin >= 0;
  if (!a.chunk) {
    TORCH_CHECK(num_buckets < 0 || num_buckets == a.info.count, "pycomm: num_buckets (", num_buckets,
                ") must equal the number of bucket_table rows (", a.info.count, ")");
    a.num_buckets = a.info.count;
    a.first_row = 0;
  } else {
    const int64_t needed = ceil_div_nonneg(numel, bucket_size);
    a.num_buckets = num_buckets < 0 ? needed : num_buckets;
    TORCH_CHECK(a.num_buckets >= needed, "pycomm: num_buckets=", a.num_buckets, " cannot hold ", numel,
                " elements in buckets of ", bucket_size, " (need at least ", needed, ")");
    TORCH_CHECK(range_within(chunk_row_begin, a.num_buckets, a.info.count), "pycomm: the chunk's ", a.num_buckets,
                " rows from chunk_row_begin=", chunk_row_begin, " are outside bucket_table's ", a.info.count,
                " rows");
    a.first_row = chunk_row_begin;
  }
  a.payload_bytes = a.info.byte_at(a.first_row + a.num_buckets) - a.info.byte_at(a.first_row);
  return a;
}

inline void check_no_host_table(const c10::optional<at::Tensor>& host_table, int64_t chunk_row_begin) {
  TORCH_CHECK(!host_table.has_value(), "pycomm: host_table is only used with a 4-column (mixed bits) bucket_table");
  TORCH_CHECK(chunk_row_begin < 0, "pycomm: chunk_row_begin is only used with a 4-column (mixed bits) bucket_table, "
              "got ", chunk_row_begin);
}

inline void check_flat_payload(const at::Tensor& payload, int64_t dims, int64_t bytes, const char* what) {
  TORCH_CHECK(payload.scalar_type() == at::kByte, "pycomm: ", what, " must be uint8, got ", payload.scalar_type());
  TORCH_CHECK(payload.dim() == dims, "pycomm: with a 4-column bucket_table ", what, " must have ", dims,
              " dimension(s) (flat records), got shape ", payload.sizes());
  TORCH_CHECK(payload.is_contiguous(), "pycomm: ", what, " must be contiguous");
  if (bytes >= 0)
    TORCH_CHECK(payload.size(dims - 1) == bytes, "pycomm: ", what, " has ", payload.size(dims - 1),
                " bytes but bucket_table's records take ", bytes, " bytes");
}

// dequantize_into(payload [bytes], out, bucket_table (4 columns), bits = 0, ...).
inline MixedTableInfo check_dequantize_into_mixed_args(const at::Tensor& payload, const at::Tensor& out,
                                                       const at::Tensor& table, int64_t bits, int64_t bucket_size,
                                                       const c10::optional<at::Tensor>& host_table) {
  check_bits_and_bucket(quant::kMinBits, bucket_size);
  check_bits_argument_mixed(bits);
  to_dtype(out, "out");
  check_same_device(payload, out, "out");
  TORCH_CHECK(out.is_contiguous(), "pycomm: out must be contiguous");
  check_bucket_table(table, out);
  MixedTableInfo info = check_mixed_table(table, host_table, bucket_size);
  check_flat_payload(payload, 1, info.total_bytes, "payload");
  return info;
}

// dequantize_sum(payloads [sources, bytes], init, bucket_table (4 columns),
// init_bucket_begin, bits = 0, ...): the payloads hold the records of rows
// [init_bucket_begin, init_bucket_begin + n), n fixed by their length.
// Returns (table info, n).
inline std::pair<MixedTableInfo, int64_t> check_dequantize_sum_mixed_args(
    const at::Tensor& payloads, const c10::optional<at::Tensor>& init, const at::Tensor& table,
    int64_t init_bucket_begin, int64_t bits, int64_t bucket_size, const c10::optional<at::Tensor>& host_table) {
  check_bits_and_bucket(quant::kMinBits, bucket_size);
  check_bits_argument_mixed(bits);
  check_flat_payload(payloads, 2, -1, "payloads");
  check_same_device(payloads, table, "bucket_table");
  check_bucket_table(table, payloads);
  if (init.has_value()) {
    to_dtype(*init, "init");
    check_same_device(payloads, *init, "init");
  }
  MixedTableInfo info = check_mixed_table(table, host_table, bucket_size);
  const int64_t rows = mixed_rows_spanning(info, init_bucket_begin, payloads.size(1), "each of payloads");
  return {info, rows};
}

}  // namespace pycomm
