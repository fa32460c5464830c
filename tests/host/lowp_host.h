// Host (CPU) stand-ins for CUDA's __half and __nv_bfloat16, for the host test build of the
// kernel bodies only (tests/host/mslora_host.cpp). Each is a 2-byte storage type, so the
// kernels' raw T arrays alias torch's float16 / bfloat16 tensors, and each has the same
// to_f32 / from_f32<T> overloads in namespace mslora as csrc/common.cuh gives the CUDA types:
//
//   host_half      IEEE binary16 held as _Float16 (g++ >= 12, x86-64). float -> half rounds to
//                  nearest even (the compiler's conversion, libgcc's __truncsfhf2 or F16C), like
//                  __float2half_rn: subnormals kept, overflow to inf, NaN stays NaN.
//   host_bfloat16  the upper 16 bits of a float. float -> bf16 rounds to nearest even on the
//                  bits, overflow to inf, NaN -> the canonical NaN 0x7fff, exactly as
//                  __float2bfloat16_rn does.
//
// Include this before mslora.cuh (py_params.h), so that the kernels' unqualified to_f32 calls
// see these overloads at their definition; the types also live in namespace mslora, so
// argument-dependent lookup finds them at instantiation either way.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.cuh"

#ifdef __CUDACC__
#error "lowp_host.h is for the host test build only; the device build uses cuda_fp16/cuda_bf16"
#endif

namespace mslora {

struct host_half {
  _Float16 v;
};

struct host_bfloat16 {
  std::uint16_t bits;
};

static_assert(sizeof(host_half) == 2 && alignof(host_half) == 2, "fp16 storage must be 2 bytes");
static_assert(sizeof(host_bfloat16) == 2 && alignof(host_bfloat16) == 2,
              "bf16 storage must be 2 bytes");

inline float to_f32(host_half h) { return static_cast<float>(h.v); }  // exact

inline float to_f32(host_bfloat16 b) {  // exact: the bf16 bits are a float's upper half
  const std::uint32_t u = std::uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <>
inline host_half from_f32<host_half>(float v) {
  return host_half{static_cast<_Float16>(v)};
}

template <>
inline host_bfloat16 from_f32<host_bfloat16>(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return host_bfloat16{0x7fffu};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even; carries into inf
  return host_bfloat16{std::uint16_t(u >> 16)};
}

}  // namespace mslora
