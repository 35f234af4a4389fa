// Device check of csrc/include/pycomm/philox.h: evaluates the Philox4x32-10
// known-answer vectors in a kernel. Built by CMake when nvcc is found; run it
// (or `ctest` configured with -DPYCOMM_CUDA_TESTS=ON) on a machine with a GPU.
// Exit status: 0 pass, 1 fail, 77 no usable CUDA device (skipped).
#include <cuda_runtime.h>

#include <stdio.h>

#include "philox_kat.h"
#include "pycomm/philox.h"

namespace {

// The vectors travel as a kernel argument (host constexpr data is not
// addressable from device code).
struct KatTable {
  pycomm_test::PhiloxKat kats[pycomm_test::kPhiloxKatCount];
};

__global__ void philox_kat_kernel(const KatTable table, uint32_t* out) {
  const int i = static_cast<int>(threadIdx.x);
  if (i >= pycomm_test::kPhiloxKatCount) return;
  const pycomm_test::PhiloxKat& kat = table.kats[i];
  pycomm::philox::Block counter;
  for (int w = 0; w < 4; ++w) counter.v[w] = kat.counter[w];
  const pycomm::philox::Block r = pycomm::philox::philox4x32_10(counter, kat.key[0], kat.key[1]);
  for (int w = 0; w < 4; ++w) out[4 * i + w] = r.v[w];
}

bool cuda_ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  fprintf(stderr, "philox_kat_cuda: %s: %s\n", what, cudaGetErrorString(err));
  return false;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    printf("philox_kat_cuda: no CUDA device, skipped\n");
    return 77;
  }
  constexpr int kWords = 4 * pycomm_test::kPhiloxKatCount;
  uint32_t* d_out = nullptr;
  if (!cuda_ok(cudaMalloc(&d_out, kWords * sizeof(uint32_t)), "cudaMalloc")) return 1;
  KatTable table;
  for (int i = 0; i < pycomm_test::kPhiloxKatCount; ++i) table.kats[i] = pycomm_test::kPhiloxKats[i];
  philox_kat_kernel<<<1, 32>>>(table, d_out);
  uint32_t host[kWords] = {};
  const bool ok = cuda_ok(cudaGetLastError(), "launch") &&
                  cuda_ok(cudaMemcpy(host, d_out, sizeof(host), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(d_out);
  if (!ok) return 1;
  int failures = 0;
  for (int i = 0; i < pycomm_test::kPhiloxKatCount; ++i) {
    for (int w = 0; w < 4; ++w) {
      if (host[4 * i + w] != pycomm_test::kPhiloxKats[i].expected[w]) {
        fprintf(stderr, "FAIL: vector %d word %d: got %08x, expected %08x\n", i, w, host[4 * i + w],
                pycomm_test::kPhiloxKats[i].expected[w]);
        ++failures;
      }
    }
  }
  if (failures != 0) return 1;
  printf("philox_kat_cuda: all Philox4x32-10 vectors match on device\n");
  return 0;
}
