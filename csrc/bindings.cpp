// The thin pybind11 binding of mslora_kernels._C: device pointers and the CUDA stream arrive
// as Python ints, sizes as ints; every function returns the cudaError_t code of its launch.
// All checks (device, dtype, shape, contiguity) happen in Python before these are called.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cuda_runtime.h>

#include "launchers.h"
#include "py_params.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mslora_kernels CUDA kernels (raw-pointer binding; use mslora_kernels.cuda)";
  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(cudaError_t(code))); },
        "The CUDA runtime's message for an error code.");
  m.def("gelu", [](int dtype, std::uintptr_t x, std::uintptr_t y, int64_t n, std::uintptr_t stream) {
          return mslora::gelu_launch(dtype, ptr<const void>(x), ptr<void>(y), n, stream_of(stream));
        }, py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("n"), py::arg("stream"));
  m.def("mslora_smem_bytes", [](const std::string& kernel, py::dict ints) {
          return int64_t(sizeof(float)) *
                 mslora::smem_floats(mslora::kernel_id(kernel), mslora::params_from_dicts(ints, py::dict()));
        }, "Dynamic shared memory (bytes) of an MSLoRA kernel for the given sizes and tiling.");
  m.def("mslora_launch", [](const std::string& kernel, int dtype, bool nhwc, py::dict ints,
                            py::dict ptrs, std::uintptr_t stream) {
          const int k = mslora::kernel_id(kernel);
          if (k < 0) return int(cudaErrorInvalidValue);
          const mslora::Params p = mslora::params_from_dicts(ints, ptrs);
          const auto g = mslora::grid_of(k, p);
          return mslora::mslora_launch(k, dtype, nhwc, p, g.first, g.second, stream_of(stream));
        }, py::arg("kernel"), py::arg("dtype"), py::arg("nhwc"), py::arg("ints"), py::arg("ptrs"),
        py::arg("stream"),
        "Launch one MSLoRA kernel (prep, fwd, bwd_tile, bwd_dz, bwd_dx, pack, bwd_pool, "
        "bwd_finish); returns the CUDA error code.");
}
