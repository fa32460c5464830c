// Host-side launchers of the CUDA kernels: plain C++ signatures (raw pointers, sizes, stream),
// no torch and no pybind11. Each returns a cudaError_t as int (0 = success), read right after
// the launch with cudaGetLastError(). Shapes, dtypes and devices are checked in Python before.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "mslora.cuh"

namespace mslora {

// y = GELU(x) elementwise over n contiguous elements of dtype (DType code).
int gelu_launch(int dtype, const void* x, void* y, int64_t n, cudaStream_t stream);

// Runs MSLoRA kernel `kernel` (Kernel enum of mslora.cuh) for dtype code and layout on a
// (gx, gy) grid of 256-thread blocks with its dynamic shared memory (smem_floats).
int mslora_launch(int kernel, int dtype, bool nhwc, const Params& p, int64_t gx, int64_t gy,
                  cudaStream_t stream);

}  // namespace mslora
