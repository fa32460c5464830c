// Element-wise exact (erf) GELU: the first, trivial CUDA kernel that proves the build, the
// binding and the compile check end to end.
#include "common.cuh"
#include "launchers.h"

namespace mslora {

// y[i] = GELU(x[i]) for i < n over flat contiguous buffers; computes in fp32, stores in T.
// Grid-stride loop: each thread handles elements i = tid, tid + stride, ... (64-bit indices).
template <typename T>
__global__ void gelu_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = from_f32<T>(gelu(to_f32(x[i])));
  }
}

template <typename T>
static int gelu_launch_t(const void* x, void* y, int64_t n, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = cdiv(n, kThreads) < 65535 * 8 ? cdiv(n, kThreads) : 65535 * 8;
  gelu_kernel<T><<<int(blocks), kThreads, 0, stream>>>(static_cast<const T*>(x),
                                                       static_cast<T*>(y), n);
  return int(cudaGetLastError());
}

int gelu_launch(int dtype, const void* x, void* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return 0;
  switch (dtype) {
    case kFloat32: return gelu_launch_t<float>(x, y, n, stream);
    case kFloat16: return gelu_launch_t<__half>(x, y, n, stream);
    case kBFloat16: return gelu_launch_t<__nv_bfloat16>(x, y, n, stream);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace mslora
