// CPU implementation of the quantization ops (see quant_format.h for the
// byte format). Buckets are independent, so they are spread over threads with
// at::parallel_for; within a bucket the loops run over groups of 8 lanes with
// the bit width a compile-time constant, which the compiler vectorizes.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <limits>

#include "../quantize_checks.h"
#include "pycomm/bucket_layout.h"
#include "pycomm/quant_format.h"

namespace pycomm {
namespace {

using quant::kGroup;

// Buckets per parallel task: enough elements that scheduling is negligible.
int64_t bucket_grain(int64_t bucket_size) { return std::max<int64_t>(1, 16384 / bucket_size); }

template <typename T, bool kResidual>
inline float load_value(const T* x, const float* residual, int64_t i) {
  float v = static_cast<float>(x[i]);
  if (kResidual) v = add_rn(v, residual[i]);
  return v;
}

template <typename T, int kBits, bool kResidual>
void quantize_bucket(const T* x, float* residual, int64_t offset, int64_t length, uint8_t* record,
                     int64_t bucket_size, bool stochastic, uint64_t seed, int64_t bucket) {
  const int64_t record_size = quant::record_bytes(kBits, bucket_size);
  if (length == 0) {
    std::memset(record, 0, record_size);
    return;
  }
  const T* xb = x + offset;
  float* rb = kResidual ? residual + offset : nullptr;

  // Pass 1: range. Eight independent lanes keep the reduction vectorizable;
  // v - v is NaN exactly for NaN and +-Inf, so `bad` flags non-finite input.
  float lane_min[kGroup], lane_max[kGroup], lane_bad[kGroup];
  for (int j = 0; j < kGroup; ++j) {
    lane_min[j] = std::numeric_limits<float>::infinity();
    lane_max[j] = -std::numeric_limits<float>::infinity();
    lane_bad[j] = 0.0f;
  }
  const int64_t full = length / kGroup * kGroup;
  for (int64_t i = 0; i < full; i += kGroup) {
    for (int j = 0; j < kGroup; ++j) {
      const float v = load_value<T, kResidual>(xb, rb, i + j);
      lane_min[j] = v < lane_min[j] ? v : lane_min[j];
      lane_max[j] = v > lane_max[j] ? v : lane_max[j];
      lane_bad[j] += v - v;
    }
  }
  for (int64_t i = full; i < length; ++i) {
    const float v = load_value<T, kResidual>(xb, rb, i);
    lane_min[0] = v < lane_min[0] ? v : lane_min[0];
    lane_max[0] = v > lane_max[0] ? v : lane_max[0];
    lane_bad[0] += v - v;
  }
  float mn = lane_min[0], mx = lane_max[0], bad = lane_bad[0];
  for (int j = 1; j < kGroup; ++j) {
    mn = lane_min[j] < mn ? lane_min[j] : mn;
    mx = lane_max[j] > mx ? lane_max[j] : mx;
    bad += lane_bad[j];
  }
  const bool nonfinite = !(bad == 0.0f);
  const quant::BucketScale scale = quant::make_scale(mn, mx, nonfinite, kBits);
  quant::write_header(record, scale.min, scale.unit);
  uint8_t* data = record + quant::kHeaderBytes;
  if (nonfinite) {
    // The residual is left as it was: the step will be skipped (AMP) and the
    // carried error must not be poisoned.
    std::memset(data, 0, record_size - quant::kHeaderBytes);
    return;
  }

  // Pass 2: encode, pack and (optionally) carry the error.
  const int64_t groups = (length + kGroup - 1) / kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t base = g * kGroup;
    const int n = static_cast<int>(std::min<int64_t>(kGroup, length - base));
    float v[kGroup], r[kGroup], decoded[kGroup];
    for (int j = 0; j < kGroup; ++j) v[j] = j < n ? load_value<T, kResidual>(xb, rb, base + j) : 0.0f;
    quant::rounding_offsets(stochastic, seed, bucket, bucket_size, g, r);
    const uint64_t word = quant::encode_group<kBits>(v, n, scale, r, decoded);
    quant::store_group(data + g * kBits, word, kBits);
    if (kResidual) {
      for (int j = 0; j < n; ++j) rb[base + j] = sub_rn(v[j], decoded[j]);
    }
  }
  const int64_t used = groups * kBits;
  std::memset(data + used, 0, record_size - quant::kHeaderBytes - used);
}

template <typename T, int kBits>
void dequantize_bucket(const uint8_t* record, T* out, int64_t offset, int64_t length) {
  float mn, unit;
  quant::read_header(record, mn, unit);
  const uint8_t* data = record + quant::kHeaderBytes;
  T* ob = out + offset;
  const int64_t full = length / kGroup * kGroup;
  for (int64_t i = 0; i < full; i += kGroup) {
    const uint64_t word = quant::load_group(data + (i / kGroup) * kBits, kBits);
    for (int j = 0; j < kGroup; ++j)
      ob[i + j] = static_cast<T>(quant::decode_level(quant::level_in_group(word, j, kBits), mn, unit));
  }
  if (full < length) {
    const uint64_t word = quant::load_group(data + (full / kGroup) * kBits, kBits);
    for (int64_t i = full; i < length; ++i)
      ob[i] = static_cast<T>(quant::decode_level(quant::level_in_group(word, i - full, kBits), mn, unit));
  }
}

template <int kBits>
void accumulate_bucket(const uint8_t* record, float* acc, int64_t bucket_size) {
  if (quant::is_zero_record(record)) return;
  float mn, unit;
  quant::read_header(record, mn, unit);
  const uint8_t* data = record + quant::kHeaderBytes;
  for (int64_t i = 0; i < bucket_size; i += kGroup) {
    const uint64_t word = quant::load_group(data + (i / kGroup) * kBits, kBits);
    for (int j = 0; j < kGroup; ++j)
      acc[i + j] = add_rn(acc[i + j], quant::decode_level(quant::level_in_group(word, j, kBits), mn, unit));
  }
}

at::Tensor quantize_cpu(const at::Tensor& x_in, c10::optional<at::Tensor> residual,
                        const c10::optional<at::Tensor>& bucket_table, int64_t num_buckets, int64_t bits,
                        int64_t bucket_size, bool stochastic, int64_t seed, int64_t skip_begin, int64_t skip_end) {
  check_bits_and_bucket(bits, bucket_size);
  to_dtype(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  const int64_t table_rows = check_bucket_table(bucket_table, x);
  const int64_t needed = table_rows >= 0 ? table_rows : (numel + bucket_size - 1) / bucket_size;
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
  const int64_t record_size = quant::record_bytes(static_cast<int>(bits), bucket_size);
  at::Tensor payload = at::empty({num_buckets, record_size}, x.options().dtype(at::kByte));
  const BucketLayout layout = make_layout(bucket_table, numel, bucket_size, 0);
  uint8_t* out = payload.data_ptr<uint8_t>();
  float* res = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const uint64_t useed = static_cast<uint64_t>(seed);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pycomm_quantize_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    quant::dispatch_bits(static_cast<int>(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          uint8_t* record = out + k * record_size;
          if (k >= skip_begin && k < skip_end) {
            std::memset(record, 0, record_size);
            continue;
          }
          int64_t offset, length;
          layout.range(k, offset, length);
          if (res != nullptr)
            quantize_bucket<scalar_t, kBits, true>(xp, res, offset, length, record, bucket_size, stochastic, useed, k);
          else
            quantize_bucket<scalar_t, kBits, false>(xp, nullptr, offset, length, record, bucket_size, stochastic,
                                                    useed, k);
        }
      });
    });
  });
  return payload;
}

void dequantize_into_cpu(const at::Tensor& payload, at::Tensor out, const c10::optional<at::Tensor>& bucket_table,
                         int64_t bits, int64_t bucket_size) {
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
    TORCH_CHECK(out.numel() <= num_buckets * bucket_size, "pycomm: the payload holds ", num_buckets,
                " buckets of ", bucket_size, " elements (", num_buckets * bucket_size, ") but out has ",
                out.numel(), " elements");
  }
  const int64_t record_size = payload.size(1);
  const BucketLayout layout = make_layout(bucket_table, out.numel(), bucket_size, 0);
  const uint8_t* in = payload.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "pycomm_dequantize_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    quant::dispatch_bits(static_cast<int>(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          int64_t offset, length;
          layout.range(k, offset, length);
          dequantize_bucket<scalar_t, kBits>(in + k * record_size, op, offset, length);
        }
      });
    });
  });
}

at::Tensor dequantize_sum_cpu(const at::Tensor& payloads, const c10::optional<at::Tensor>& init_in,
                              const c10::optional<at::Tensor>& bucket_table, int64_t init_bucket_begin, int64_t bits,
                              int64_t bucket_size) {
  check_bits_and_bucket(bits, bucket_size);
  check_payload(payloads, bits, bucket_size, 3, "payloads");
  const int64_t sources = payloads.size(0), num_buckets = payloads.size(1), record_size = payloads.size(2);
  at::Tensor out = at::empty({num_buckets * bucket_size}, payloads.options().dtype(at::kFloat));
  at::Tensor init;
  BucketLayout layout{};
  if (init_in.has_value()) {
    init = init_in->contiguous();
    to_dtype(init, "init");
    check_same_device(payloads, init, "init");
    const int64_t table_rows = check_bucket_table(bucket_table, init);
    TORCH_CHECK(init_bucket_begin >= 0, "pycomm: init_bucket_begin must be >= 0, got ", init_bucket_begin);
    if (table_rows >= 0)
      TORCH_CHECK(init_bucket_begin + num_buckets <= table_rows, "pycomm: buckets [", init_bucket_begin, ", ",
                  init_bucket_begin + num_buckets, ") are outside bucket_table's ", table_rows, " rows");
    layout = make_layout(bucket_table, init.numel(), bucket_size, init_bucket_begin);
  } else {
    TORCH_CHECK(!bucket_table.has_value(), "pycomm: bucket_table is only used together with init");
  }
  const uint8_t* in = payloads.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const at::ScalarType init_type = init.defined() ? init.scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, init_type, "pycomm_dequantize_sum_cpu", [&] {
    const scalar_t* ip = init.defined() ? init.data_ptr<scalar_t>() : nullptr;
    quant::dispatch_bits(static_cast<int>(bits), [&](auto bits_c) {
      constexpr int kBits = decltype(bits_c)::value;
      at::parallel_for(0, num_buckets, bucket_grain(bucket_size), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          float* acc = op + k * bucket_size;
          std::memset(acc, 0, bucket_size * sizeof(float));
          if (ip != nullptr) {
            int64_t offset, length;
            layout.range(k, offset, length);
            for (int64_t j = 0; j < length; ++j) acc[j] = static_cast<float>(ip[offset + j]);
          }
          for (int64_t s = 0; s < sources; ++s)
            accumulate_bucket<kBits>(in + (s * num_buckets + k) * record_size, acc, bucket_size);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pycomm, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize_into", &dequantize_into_cpu);
  m.impl("dequantize_sum", &dequantize_sum_cpu);
}

}  // namespace pycomm
