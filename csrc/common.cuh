// Shared helpers for the mslora_kernels CUDA sources. No torch headers anywhere in csrc/.
//
// Everything marked MSLORA_HD compiles both as device code (nvcc) and as plain host C++
// (g++), so that the per-element math can be checked on a CPU against PyTorch
// (tests/test_cuda_host.py builds csrc's headers with the host compiler).
#pragma once

#include <cstdint>
#include <cmath>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define MSLORA_HD __host__ __device__ __forceinline__
#else
#define MSLORA_HD inline
#endif

namespace mslora {

// Preconditions that the GPU enforces only by faulting (a vector or WMMA access off its
// alignment): the host test build (tests/host, which defines MSLORA_HOST_BUILD) checks them where
// the device code relies on them, records the first one broken, and fails the launch with it;
// the device build checks nothing.
#if defined(MSLORA_HOST_BUILD) && !defined(__CUDACC__)
void host_precondition_failed(const char* what);  // tests/host/mslora_host.cpp
#define MSLORA_HOST_EXPECT(cond, what) \
  ((cond) ? (void)0 : ::mslora::host_precondition_failed(what))
#else
#define MSLORA_HOST_EXPECT(cond, what) ((void)0)
#endif

// Whether p is a multiple of `bytes` (a power of two) in the address space.
MSLORA_HD bool is_aligned(const void* p, std::uintptr_t bytes) {
  return (reinterpret_cast<std::uintptr_t>(p) & (bytes - 1)) == 0;
}

// Dtype codes shared with the Python launchers (mslora_kernels/cuda/_ext.py).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// fp32 <-> storage type conversions.
MSLORA_HD float to_f32(float v) { return v; }
template <typename T> MSLORA_HD T from_f32(float v);
template <> MSLORA_HD float from_f32<float>(float v) { return v; }
#ifdef __CUDACC__
MSLORA_HD float to_f32(__half v) { return __half2float(v); }
MSLORA_HD float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> MSLORA_HD __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> MSLORA_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// Exact (erf) GELU: x * Phi(x).
MSLORA_HD float gelu(float x) { return 0.5f * x * (1.0f + erff(x * kInvSqrt2)); }

// d GELU / dx = Phi(x) + x * phi(x).
MSLORA_HD float gelu_grad(float x) {
  return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

MSLORA_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

MSLORA_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mslora
