// Tensor-core block products for the MSLoRA kernels (fp16 / bf16 operands, fp32 accumulation):
// the dense D x D pointwise products (t = pw(s), ds = pw^T(dt)) and the grouped 1x1 products
// between C and D channels (proj, down, up and their transposes), which together are most of
// the adapter's arithmetic per pixel (D^2 + 3 C D / G forward, against D * sum k^2 for the
// depthwise part).
//
// On the GPU each warp runs WMMA 16x16x16 tiles (sm_80 and newer: both fp16 and bf16). On the
// host build (tests/host) the same function computes the same tiles with plain loops over the
// same staged operands, so everything around the product (staging, padding, groups, chunks,
// which rows and columns are read back) is checked on a CPU; the WMMA calls themselves on the
// GPU.
#pragma once

#include "common.cuh"

#if defined(__CUDA_ARCH__)
#include <mma.h>
#endif

namespace mslora {

// 16-bit storage types run their channel products on tensor cores (when Params::tc is set).
template <typename T>
constexpr bool kTensorCoreType = sizeof(T) == 2;

// K (reduction) columns of one group staged per chunk.
constexpr int kTcK = 32;

MSLORA_HD int round16(int v) { return (v + 15) / 16 * 16; }

// The operands of one grouped product, staged in shared memory (see block_mma).
template <typename T>
struct MmaArgs {
  const T* a;      // A, row-major, row stride lda; group g's columns start at g * kTcK
  const T* a_lo;   // A's remainder (same layout), or nullptr when A is exact in T
  int lda;
  const T* b;      // B^T: row g * Np + n holds column n of group g's B, row stride ldb
  int ldb;
  float* out;      // out[i * ldo + g * Np + n], fp32
  int ldo;
  int Mp, Np, Kp;  // padded sizes: rows, columns per group, reduction steps (multiples of 16)
  int groups;
  bool accumulate; // add to out (a later K chunk) instead of overwriting it
};

// out_g (+)= A_g B_g for every group g, over padded sizes, fp32 accumulation. A is an fp32
// operand split into its rounding to T (a) and the rounding of the remainder (a_lo), so the
// product keeps about twice T's mantissa; B (weights) is exact in T. Every thread of the block
// calls it from one stage (tid, nt = block size, a multiple of 32); warp w computes the 16x16
// output tiles w, w + nt/32, ... All pointers are 32-byte aligned, lda and ldb multiples of 8,
// ldo a multiple of 4 (WMMA's load/store rules).
template <typename T>
MSLORA_HD void block_mma(const MmaArgs<T>& m, int tid, int nt) {
  const int warp = tid / 32, nwarps = nt / 32, tn = m.Np / 16, tm = m.Mp / 16;
  const int tiles = m.groups * tm * tn;
  for (int tile = warp; tile < tiles; tile += nwarps) {
    const int g = tile / (tm * tn), i0 = (tile / tn % tm) * 16, n0 = (tile % tn) * 16;
    const int j0 = g * m.Np + n0;  // output / B^T row
    const T* a = m.a + i0 * m.lda + g * kTcK;
    const T* a_lo = m.a_lo ? m.a_lo + i0 * m.lda + g * kTcK : nullptr;
    const T* b = m.b + j0 * m.ldb;
    float* out = m.out + i0 * m.ldo + j0;
#if defined(__CUDA_ARCH__)
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (m.accumulate) wmma::load_matrix_sync(acc, out, m.ldo, wmma::mem_row_major);
    else wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < m.Kp; k0 += 16) {
      wmma::load_matrix_sync(fb, b + k0, m.ldb);
      wmma::load_matrix_sync(fa, a + k0, m.lda);
      wmma::mma_sync(acc, fa, fb, acc);
      if (a_lo) {
        wmma::load_matrix_sync(fa, a_lo + k0, m.lda);
        wmma::mma_sync(acc, fa, fb, acc);
      }
    }
    wmma::store_matrix_sync(out, acc, m.ldo, wmma::mem_row_major);
#else
    if (tid % 32 != 0) continue;  // one "lane" does the warp's tile on the host
    // WMMA's load / store rules, which the GPU enforces by faulting (see the comment above).
    MSLORA_HOST_EXPECT(is_aligned(a, 32) && (!a_lo || is_aligned(a_lo, 32)) &&
                           is_aligned(b, 32) && is_aligned(out, 32),
                       "block_mma: a WMMA operand is not 32-byte aligned");
    MSLORA_HOST_EXPECT(m.lda % 8 == 0 && m.ldb % 8 == 0 && m.ldo % 4 == 0,
                       "block_mma: a WMMA leading dimension is not a multiple of 8 (A, B) or "
                       "4 (out) elements");
    MSLORA_HOST_EXPECT(m.Mp % 16 == 0 && m.Np % 16 == 0 && m.Kp % 16 == 0,
                       "block_mma: padded sizes are not multiples of 16");
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 16; ++j) {
        float acc = m.accumulate ? out[i * m.ldo + j] : 0.0f;
        for (int k = 0; k < m.Kp; ++k)
          acc += (to_f32(a[i * m.lda + k]) + (a_lo ? to_f32(a_lo[i * m.lda + k]) : 0.0f)) *
                 to_f32(b[j * m.ldb + k]);
        out[i * m.ldo + j] = acc;
      }
    }
#endif
  }
}

}  // namespace mslora
