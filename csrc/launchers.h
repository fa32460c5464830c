// Host-side launchers of the CUDA kernels: plain C++ signatures (raw pointers, sizes, stream),
// no torch and no pybind11. Each returns a cudaError_t as int (0 = success), read right after
// the launch with cudaGetLastError(). Shapes, dtypes and devices are checked in Python before.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace mslora {

// y = GELU(x) elementwise over n contiguous elements of dtype (DType code).
int gelu_launch(int dtype, const void* x, void* y, int64_t n, cudaStream_t stream);

}  // namespace mslora
