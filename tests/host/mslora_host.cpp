// Host (CPU) build of the MSLoRA kernel bodies of csrc/mslora.cuh, for tests only: each block
// of the grid runs its stages one after another, each stage for tid = 0 .. nt-1 in turn, which
// is exactly what __syncthreads() between stages guarantees on the GPU. Every dtype of the
// device build: fp32, and fp16 / bf16 through the bit-faithful stand-ins of lowp_host.h.
// Exposes the same mslora_launch / mslora_smem_bytes as the real binding
// (tests/test_cuda_host.py), plus the storage conversions themselves (to_storage / from_storage)
// so that the tests can hold them against torch's casts.
#include "lowp_host.h"  // first: the kernels' to_f32 / from_f32 must see its overloads

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "py_params.h"

namespace py = pybind11;
using namespace mslora;

// (dtype code, host storage type): every host instantiation comes from this one list, as
// csrc/mslora.cu's MSLORA_FOR_EACH_DTYPE_LAYOUT does for the device (__half -> host_half,
// __nv_bfloat16 -> host_bfloat16).
#define MSLORA_HOST_FOR_EACH_DTYPE(X) \
  X(kFloat32, float)                  \
  X(kFloat16, host_half)              \
  X(kBFloat16, host_bfloat16)

// f(T{}) for the storage type T of dtype code `dtype`.
template <class F>
static void with_dtype(int dtype, F&& f) {
#define MSLORA_HOST_DISPATCH(CODE, TYPE) \
  if (dtype == CODE) return f(TYPE{});
  MSLORA_HOST_FOR_EACH_DTYPE(MSLORA_HOST_DISPATCH)
#undef MSLORA_HOST_DISPATCH
  throw std::invalid_argument("host build: unknown dtype code " + std::to_string(dtype));
}

struct HostEx {
  int nt;
  template <class F>
  void stage(F&& f) {
    for (int tid = 0; tid < nt; ++tid) f(tid);
  }
};

template <typename T, bool kNHWC>
static void run_block(int k, const Params& p, int x, int y, float* sm, HostEx& ex) {
  switch (k) {
    case kPrep: prep_body<T, kNHWC>(p, x, sm, ex); break;
    case kFwd: fwd_body<T, kNHWC>(p, x, y, sm, ex); break;
    case kBwdTile: bwd_tile_body<T, kNHWC>(p, x, y, sm, ex); break;
    case kBwdDz: bwd_dz_body<T, kNHWC>(p, x, sm, ex); break;
    case kBwdDx: bwd_dx_body<T, kNHWC>(p, x, sm, ex); break;
  }
}

static int launch(const std::string& kernel, int dtype, bool nhwc, py::dict ints, py::dict ptrs,
                  std::uintptr_t) {
  const int k = kernel_id(kernel);
  if (k < 0) throw std::invalid_argument("unknown kernel " + kernel);
  const Params p = params_from_dicts(ints, ptrs);
  const auto g = grid_of(k, p);
  // The device's grid limits, so that a launcher that would exceed them fails here too.
  if (g.first < 1 || g.first > 2147483647 || g.second < 1 || g.second > 65535)
    throw std::invalid_argument("host build: grid (" + std::to_string(g.first) + ", " +
                                std::to_string(g.second) + ") outside CUDA's limits");
  HostEx ex{256};
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t by = 0; by < g.second; ++by) {
      for (int64_t bx = 0; bx < g.first; ++bx) {
        // Fill shared memory with NaN: any read of a value no stage wrote shows up in the result.
        std::vector<float> sm(size_t(smem_floats(k, p)) + 1, __builtin_nanf(""));
        if (nhwc) run_block<T, true>(k, p, int(bx), int(by), sm.data(), ex);
        else run_block<T, false>(k, p, int(bx), int(by), sm.data(), ex);
      }
    }
  });
  return 0;
}

// dst[i] = from_f32<T>(src[i]) for n floats at src into n T at dst (the kernels' store).
static void to_storage(int dtype, std::uintptr_t src, std::uintptr_t dst, int64_t n) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const float* s = reinterpret_cast<const float*>(src);
    T* d = reinterpret_cast<T*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = from_f32<T>(s[i]);
  });
}

// dst[i] = to_f32(src[i]) for n T at src into n floats at dst (the kernels' load).
static void from_storage(int dtype, std::uintptr_t src, std::uintptr_t dst, int64_t n) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* s = reinterpret_cast<const T*>(src);
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = to_f32(s[i]);
  });
}

PYBIND11_MODULE(mslora_host, m) {
  m.def("mslora_launch", &launch);
  m.def("mslora_smem_bytes", [](const std::string& kernel, py::dict ints) {
    return int64_t(sizeof(float)) * smem_floats(kernel_id(kernel), params_from_dicts(ints, py::dict()));
  });
  m.def("to_storage", &to_storage);
  m.def("from_storage", &from_storage);
}
