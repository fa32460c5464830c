// Tensor-core block products for the MSLoRA tile kernels (fp16 / bf16 operands, fp32
// accumulation): the dense D x D pointwise products t = s R^T (forward and backward) and
// ds = dt R (backward), the largest per-pixel FLOP count of the adapter (D^2 per pixel against
// D * sum k^2 for the depthwise part).
//
// On the GPU each warp runs WMMA 16x16x16 tiles (sm_80 and newer: both fp16 and bf16). On the
// host build (tests/host) the same function computes the same tiles with plain loops over the
// same staged operands, so everything around the product (staging, padding, which rows and
// columns are read back) is checked on a CPU; the WMMA call itself is checked on the GPU.
#pragma once

#include <type_traits>

#include "common.cuh"

#if defined(__CUDA_ARCH__)
#include <mma.h>
#endif

namespace mslora {

// 16-bit storage types run their D x D products on tensor cores (when Params::tc is set).
template <typename T>
constexpr bool kTensorCoreType = sizeof(T) == 2;

MSLORA_HD int round16(int v) { return (v + 15) / 16 * 16; }
// Row stride (elements) of a staged 16-bit operand: padded by 8 elements (16 bytes) so that
// the rows of a 16x16 fragment fall in different shared-memory banks; a multiple of 8 as WMMA
// requires.
MSLORA_HD int tc_ld(int cols) { return round16(cols) + 8; }
// Row stride (floats) of the fp32 product: a multiple of 4 as WMMA requires, padded by 4.
MSLORA_HD int tc_ld_out(int cols) { return round16(cols) + 4; }

// out = A * B over padded sizes Mp x Np x Kp (multiples of 16), fp32 accumulation:
//   A: a[i * lda + k] + a_lo[i * lda + k], row-major, type T: an fp32 operand split into its
//      rounding to T and the rounding of the remainder, so that the product keeps about twice
//      T's mantissa (B, the weights, is exact in T): the tensor-core result is then as
//      accurate as the fp32 CUDA-core product, at twice the (small) MMA work;
//   B: kBT ? b[n * ldb + k] (b holds B's columns as rows: out = A b^T)
//          : b[k * ldb + n] (row-major: out = A b);
//   out: out[i * ldo + n], fp32.
// Every thread of the block calls it from one stage (tid, nt = block size, a multiple of 32);
// warp w computes the 16x16 output tiles w, w + nt/32, ... All pointers are 32-byte aligned and
// lda, ldb are multiples of 8, ldo a multiple of 4 (WMMA's load/store rules).
template <typename T, bool kBT>
MSLORA_HD void block_mma(const T* a, const T* a_lo, int lda, const T* b, int ldb, float* out,
                         int ldo, int Mp, int Np, int Kp, int tid, int nt) {
  const int warp = tid / 32, nwarps = nt / 32, tn = Np / 16, tiles = (Mp / 16) * tn;
  for (int tile = warp; tile < tiles; tile += nwarps) {
    const int i0 = (tile / tn) * 16, j0 = (tile % tn) * 16;
#if defined(__CUDA_ARCH__)
    using namespace nvcuda;
    using BLayout = typename std::conditional<kBT, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < Kp; k0 += 16) {
      wmma::load_matrix_sync(fb, kBT ? b + j0 * ldb + k0 : b + k0 * ldb + j0, ldb);
      wmma::load_matrix_sync(fa, a + i0 * lda + k0, lda);
      wmma::mma_sync(acc, fa, fb, acc);
      wmma::load_matrix_sync(fa, a_lo + i0 * lda + k0, lda);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + i0 * ldo + j0, acc, ldo, wmma::mem_row_major);
#else
    if (tid % 32 != 0) continue;  // one "lane" does the warp's tile on the host
    for (int i = i0; i < i0 + 16; ++i) {
      for (int j = j0; j < j0 + 16; ++j) {
        float acc = 0.0f;
        for (int k = 0; k < Kp; ++k)
          acc += (to_f32(a[i * lda + k]) + to_f32(a_lo[i * lda + k])) *
                 to_f32(kBT ? b[j * ldb + k] : b[k * ldb + j]);
        out[i * ldo + j] = acc;
      }
    }
#endif
  }
}

}  // namespace mslora
