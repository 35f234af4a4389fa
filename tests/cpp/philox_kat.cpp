// Host check of csrc/include/pycomm/philox.h: the three Philox4x32-10
// known-answer vectors, and the stream layout the quantizer relies on.
#include <stdio.h>

#include "philox_kat.h"
#include "pycomm/philox.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int index) {
  if (!ok) {
    fprintf(stderr, "FAIL: %s (case %d)\n", what, index);
    ++failures;
  }
}

}  // namespace

int main() {
  using namespace pycomm::philox;
  using pycomm_test::kPhiloxKats;

  for (int i = 0; i < pycomm_test::kPhiloxKatCount; ++i) {
    Block counter;
    for (int w = 0; w < 4; ++w) counter.v[w] = kPhiloxKats[i].counter[w];
    const Block out = philox4x32_10(counter, kPhiloxKats[i].key[0], kPhiloxKats[i].key[1]);
    for (int w = 0; w < 4; ++w) {
      if (out.v[w] != kPhiloxKats[i].expected[w]) {
        fprintf(stderr, "FAIL: vector %d word %d: got %08x, expected %08x\n", i, w, out.v[w],
                kPhiloxKats[i].expected[w]);
        ++failures;
      }
    }
  }

  // block_at / uint32_at: element i of a stream is word i % 4 of the block with
  // counter (lo32(i / 4), hi32(i / 4), stream, 0) and key (lo32(seed), hi32(seed)).
  const uint64_t seed = 0x0123456789abcdefull;
  const uint64_t indices[] = {0, 1, 2, 3, 4, 7, 0xfffffffcull, 0x4'0000'0005ull, ~0ull};
  int case_index = 0;
  for (uint64_t index : indices) {
    Block counter;
    counter.v[0] = static_cast<uint32_t>(index >> 2);
    counter.v[1] = static_cast<uint32_t>(index >> 34);
    counter.v[2] = kStreamStochasticRounding;
    counter.v[3] = 0u;
    const Block block = philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    expect(uint32_at(seed, kStreamStochasticRounding, index) == block.v[index & 3], "uint32_at layout", case_index);
    ++case_index;
  }

  // uint32_to_unit_float: 24 random bits, exactly in [0, 1).
  expect(uint32_to_unit_float(0u) == 0.0f, "unit float of 0", 0);
  expect(uint32_to_unit_float(0xffffffffu) == 1.0f - 1.0f / 16777216.0f, "unit float of 2^32-1", 0);
  expect(uint32_to_unit_float(0x80000000u) == 0.5f, "unit float of 2^31", 0);

  if (failures != 0) {
    fprintf(stderr, "philox_kat: %d failure(s)\n", failures);
    return 1;
  }
  printf("philox_kat: all Philox4x32-10 checks passed\n");
  return 0;
}
