// Host (CPU) build of the MSLoRA kernel bodies of csrc/mslora.cuh, for tests only: each block
// of the grid runs its stages one after another, each stage for tid = 0 .. nt-1 in turn, which
// is exactly what __syncthreads() between stages guarantees on the GPU. fp32 only. Exposes the
// same mslora_launch / mslora_smem_bytes as the real binding (tests/test_cuda_host.py).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <vector>

#include "py_params.h"

namespace py = pybind11;
using namespace mslora;

struct HostEx {
  int nt;
  template <class F>
  void stage(F&& f) {
    for (int tid = 0; tid < nt; ++tid) f(tid);
  }
};

static int launch(const std::string& kernel, int dtype, bool nhwc, py::dict ints, py::dict ptrs,
                  std::uintptr_t) {
  if (dtype != kFloat32) throw std::invalid_argument("host build: float32 only");
  const int k = kernel_id(kernel);
  if (k < 0) throw std::invalid_argument("unknown kernel " + kernel);
  const Params p = params_from_dicts(ints, ptrs);
  const auto g = grid_of(k, p);
  HostEx ex{256};
  for (int64_t by = 0; by < g.second; ++by) {
    for (int64_t bx = 0; bx < g.first; ++bx) {
      // Fill shared memory with NaN: any read of a value no stage wrote shows up in the result.
      std::vector<float> sm(size_t(smem_floats(k, p)) + 1, __builtin_nanf(""));
      const int x = int(bx), y = int(by);
      switch (k) {
        case kPrep: nhwc ? prep_body<float, true>(p, x, sm.data(), ex) : prep_body<float, false>(p, x, sm.data(), ex); break;
        case kFwd: nhwc ? fwd_body<float, true>(p, x, y, sm.data(), ex) : fwd_body<float, false>(p, x, y, sm.data(), ex); break;
        case kBwdTile: nhwc ? bwd_tile_body<float, true>(p, x, y, sm.data(), ex) : bwd_tile_body<float, false>(p, x, y, sm.data(), ex); break;
        case kBwdDz: nhwc ? bwd_dz_body<float, true>(p, x, y, sm.data(), ex) : bwd_dz_body<float, false>(p, x, y, sm.data(), ex); break;
        case kBwdDx: nhwc ? bwd_dx_body<float, true>(p, x, sm.data(), ex) : bwd_dx_body<float, false>(p, x, sm.data(), ex); break;
      }
    }
  }
  return 0;
}

PYBIND11_MODULE(mslora_host, m) {
  m.def("mslora_launch", &launch);
  m.def("mslora_smem_bytes", [](const std::string& kernel, py::dict ints) {
    return int64_t(sizeof(float)) * smem_floats(kernel_id(kernel), params_from_dicts(ints, py::dict()));
  });
}
