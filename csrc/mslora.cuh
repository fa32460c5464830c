// MSLoRA forward and backward kernel bodies (SPEC section 1, DESIGN.md's pass plan).
//
// Every kernel body here is a sequence of block-wide STAGES: `ex.stage([&](int tid) {...})`.
// On the GPU (mslora.cu) a stage runs once per thread (tid = threadIdx.x) and is followed by
// __syncthreads(); on the host (tests/host/mslora_host.cpp) the same stage runs for tid = 0..nt-1
// in turn. Inside a stage a thread only touches the elements its strided loop gives it, so the
// two executions compute the same thing, and the whole algorithm (index math, tiling, halo,
// shuffle, every gradient) is checked on a CPU against PyTorch's autograd. The host build also
// runs each thread as a fiber with its own locals, in ascending, descending and shuffled order
// between the barriers: the results must be bitwise the same (no race within a stage, no local
// that one thread writes and another reads).
//
// Data: x / out / dout / dx are of type T (float, __half, __nv_bfloat16) in the physical layout
// NCHW (kNHWC = false) or NHWC (kNHWC = true). Weights: see Params. The D-channel workspaces are
// pixel-major [pixel = n*H*W + h*W + w][channel]: s, m', dt, da and dz of type T (as the
// reference holds them in the compute dtype), z and ds0 fp32 (see Params); a kernel rounds each
// value once on store (ws_store) and converts to fp32 on load (ws_load). Math and accumulation
// are fp32 throughout.
//
// Kernels (the Python launcher mslora_kernels/cuda/mslora.py orchestrates them):
//   prep     (1-D grid over pixel blocks of PB): z = down(u) -> ws z; under prenorm x's LN_C
//            statistics, under gate the gates' sigmoids, for the kernels after it. [F1 / B0]
//   fwd      (grid (tiles, N), TH x TW pixel tiles): multi-scale depthwise from a z halo tile
//            in shared memory (channel chunks of CH; a thread computes a run of kRun outputs
//            along W of one channel and row), GELU, gate, pool, enhance, t = pw(s),
//            a = proj(u), m = a * t, shuffle by indexing, y = up(m'), out = x + y.  [F2]
//   bwd_tile (same tiling): recomputes s0, s, t, a; from dout: dm, da, dt, ds, ds0 (enhance
//            backward); writes ws s, m', dt, da, ds0 and per-tile partial sums for enorm and
//            the pool path.                                                          [B1]
//   bwd_dz   (same tiling, persistent: 1-D grid of Params::dz_blocks blocks, block b takes
//            tiles b, b + dz_blocks, ... in that order): z with a double halo per channel chunk
//            in shared memory; recomputes c_i on tile + halo (runs along W), dc_i = ds0 sig_i
//            GELU'(c_i) (ds0 read from ws), then dz = sum_i flip(K_i) * dc_i + gate and pool
//            terms -> ws dz; dK_i (a thread: one kernel row, all its taps) and gate weight/bias
//            grads (ds0 GELU(c_i) kept from the same pass, summed over channels) summed over the
//            block's tiles into ONE partial row per block (so the partials' size does not grow
//            with N*H*W).                                                             [B2]
//   bwd_dx   (1-D grid over pixel blocks of PB): du = P^T da + Q^T dz, dx = dout + du or
//            LayerNorm_C backward (prenorm), per-block partial norm weight/bias grads; under
//            prenorm in NHWC also u = LN_C(x) for the proj / down weight GEMMs.       [B3]
//   pack     (grid (blocks, segments)): the weights as the kernels read them (Params), from the
//            module's: the products' transposes, the taps, norms and gate in fp32.
//   bwd_pool (grid N): pool's term of dz per image from bwd_tile's partials.
//   bwd_finish (1-D grid over the gradients' elements): every weight gradient, flat in weight
//            order: the per-tile / per-block partials summed in a fixed order (so every weight
//            gradient is deterministic), the dense ones (proj, down, pw, up: GEMMs in T with fp32
//            accumulation over the workspaces, done by the launcher with torch) taken as they
//            are, each added to the earlier image slices' fp32 sum and cast to T.
#pragma once

#include "common.cuh"
#include "tc.cuh"

namespace mslora {

constexpr int kMaxPaths = 8;
constexpr float kLnEps = 1e-6f;
// pack's segments (Params::pack): the 4 products' transposes, kMaxPaths taps, 6 vectors (norm,
// enorm, gate); bwd_finish's (Params::grad): a weight gradient each, the taps' in one.
constexpr int kMaxPack = 4 + kMaxPaths + 6;
constexpr int kMaxGrads = 5 + 6;
// Elements per block of pack (per segment) and bwd_finish: a block's threads stride over them.
constexpr int kSmallChunk = 1024;

// One weight for pack: a (rows, cols) matrix of T at src to dst, transposed to (cols, rows) in
// T (widen = 0), or its rows * cols values converted to fp32 in order (widen = 1).
struct PackSeg {
  const void* src;
  void* dst;
  int rows, cols, widen;
};

// One weight gradient (or a run of them with one source, the taps') for bwd_finish: len
// elements in the checkpoint's order, a dense product's result of type T at src (rows = 0), or
// the sum of `rows` fp32 partial rows of len at src, in row order.
struct GradSeg {
  const void* src;
  int64_t len;
  int rows;
};

// Everything a kernel needs; filled by the binding from the launcher's dicts (missing = 0).
struct Params {
  // sizes
  int N, C, H, W, D, G;
  int nk;                  // number of depthwise paths
  int ks[kMaxPaths];       // their kernel sizes (odd)
  int R;                   // max radius = max(ks) / 2
  // options
  int prenorm, enhance, pool, gate, shuffle;
  // tiling
  int TH, TW, CH;          // tile rows, cols, channel chunk (tile kernels)
  int PB;                  // pixels per block (prep / bwd_dx)
  int tc;                  // fp16/bf16 only: the channel products on tensor cores (tc.cuh)
  // activations (type T, layout per kNHWC)
  const void* x;
  void* out;
  const void* dout;
  void* dx;
  // weights, contiguous in their checkpoint shapes: the channel products' of type T (they are
  // T values: read through wl<T>, exact in fp32; half the bytes of fp32 copies where every tile
  // or pixel block stages them), the others fp32
  const void *proj, *down, *pw, *up;
  const float* dw;        // every path's (D, k, k) packed in order
  const float *norm_w, *norm_b, *enorm_w, *enorm_b, *gate_w, *gate_b;
  // the products' transposes (T), [j][e] = w[e][j]: proj_t, down_t (C/G, D), pw_t (D, D),
  // up_t (D/G, C).
  // Where a warp's lanes differ in w's row index (the CUDA-core products of fp32, whose lanes
  // differ in the output channel; the tensor-core operand staging of the transposed products
  // ds = pw^T dt, dm' = up^T dout and du = proj^T da + down^T dz, whose lanes differ in k),
  // their loads of w fell a row apart, a sector a lane; of w_t they are neighbours.
  const void *proj_t, *down_t, *pw_t, *up_t;
  const float* zmean;     // (N, D) mean over H, W of z (pool)
  float* xstats;          // (N*H*W, 2) LN_C mean and 1/std of x (prenorm): prep writes it,
                          // fwd / bwd_tile / bwd_dx read it
  float* gsig;            // (N*H*W, nk) sigmoid(gate_w[i] . z + gate_b[i]) (gate): prep writes
                          // it, fwd / bwd_tile / bwd_dz read it (on their tiles and halos)
  float* pool_dz;         // (N, D) (sum_HW ds0) * GELU'(zmean) / (H W) (pool): bwd_pool writes
                          // it, bwd_dz reads it
  // workspaces, pixel-major (N*H*W, D): z and ds0 fp32: the depthwise passes read them with
  // halos and they feed the few-element weight gradients (dK, gate), which a 16-bit z or ds0
  // pushed past SPEC's 2x bound on fp16 / bf16 (tests/test_cuda_host.py); s, mp, dt, da, dz of
  // type T (ws<T>): they feed per-pixel products and the dense GEMMs.
  // In the forward z is of type T instead (z_lowp): its only readers there are fwd's depthwise
  // sums and prep's gate logits, whose precision the reference's own z, rounded to x's dtype,
  // sets; half the bytes of fp32 on both of z's trips through memory.
  float *z, *ds0;
  void *s, *mp, *dt, *da, *dz;
  int z_lowp;             // prep: z of type T (the forward) rather than fp32 (the backward)
  // (N*H*W, C) pixel-major u = LN_C(x) of type T (prenorm, NHWC memory; else null): bwd_dx
  // writes it, from the x-hat its LayerNorm backward computes anyway, for the launcher's proj /
  // down weight gradients. Not in NCHW memory, where its pixel-fastest loop would store a warp's
  // 32 values C elements apart: 32 sectors a store instruction, a full L2 transaction for every
  // element; the launcher's pixel-major copy and LayerNorm move whole lines.
  void* u;
  // fp32 per-tile / per-block partial sums, (blocks, ...)
  float *part_enorm_w, *part_enorm_b, *part_pool;      // (tiles, D)
  float *part_dw;                                       // (dz_blocks, D * sum k^2)
  float *part_gate_w, *part_gate_b;                     // (dz_blocks, nk * D), (dz_blocks, nk)
  float *part_norm_w, *part_norm_b;                     // (blocks, C)
  // bwd_dz: number of blocks (= partial rows); the launcher's bound, at most N * tiles/image
  int dz_blocks;
  // pack: the weights above (the transposes, dw, the norms and gate in fp32) from the module's
  int npack;
  PackSeg pack[kMaxPack];
  // bwd_finish: the weight gradients, flat in weight order, from the GEMM results and partials;
  // plus gacc's (fp32, the earlier image slices') under acc_in; to gacc under acc_out (for the
  // next slice); cast to T into gout if given (the last slice)
  int ngrad;
  GradSeg grad[kMaxGrads];
  float* gacc;
  void* gout;
  int acc_in, acc_out;
};

// ---------------------------------------------------------------- small per-element helpers

MSLORA_HD int64_t hw(const Params& p) { return int64_t(p.H) * p.W; }

// Element i of a channel-product weight (Params: type T), in fp32.
template <typename T>
MSLORA_HD float wl(const void* w, int64_t i) { return to_f32(static_cast<const T*>(w)[i]); }

// Element offset of (n, c, pixel q = h*W + w) in an activation of the physical layout.
template <bool kNHWC>
MSLORA_HD int64_t act_index(const Params& p, int n, int c, int64_t q) {
  return kNHWC ? (int64_t(n) * hw(p) + q) * p.C + c : (int64_t(n) * p.C + c) * hw(p) + q;
}

template <typename T, bool kNHWC>
MSLORA_HD float load_act(const Params& p, const void* a, int n, int c, int64_t q) {
  return to_f32(static_cast<const T*>(a)[act_index<kNHWC>(p, n, c, q)]);
}

template <typename T, bool kNHWC>
MSLORA_HD void store_act(const Params& p, void* a, int n, int c, int64_t q, float v) {
  static_cast<T*>(a)[act_index<kNHWC>(p, n, c, q)] = from_f32<T>(v);
}

// A D-channel workspace (Params::z ... dz) of storage type T or float (see Params): the typed
// pointer of a T one, load, store (one rounding).
template <typename T>
MSLORA_HD T* ws(void* w) { return static_cast<T*>(w); }
template <typename T>
MSLORA_HD float ws_load(const T* w, int64_t i) { return to_f32(w[i]); }
template <typename T>
MSLORA_HD void ws_store(T* w, int64_t i, float v) { w[i] = from_f32<T>(v); }

// u = x, or LayerNorm_C(x) under prenorm (stats of this pixel given).
template <typename T, bool kNHWC>
MSLORA_HD float load_u(const Params& p, int n, int c, int64_t q, float mu, float rstd) {
  const float v = load_act<T, kNHWC>(p, p.x, n, c, q);
  return p.prenorm ? (v - mu) * rstd * p.norm_w[c] + p.norm_b[c] : v;
}

// Grouped 1x1 conv C -> D at one pixel, output channel e: sum_j w[e][j] * u[g(e)*C/G + j], from
// the transposed weight w_t[j][e] (Params::proj_t / down_t).
template <typename T, bool kNHWC>
MSLORA_HD float grouped_in(const Params& p, const void* w_t, int e, int n, int64_t q, float mu,
                           float rstd) {
  const int cg = p.C / p.G, c0 = (e / (p.D / p.G)) * cg;
  float acc = 0.f;
  for (int j = 0; j < cg; ++j)
    acc += wl<T>(w_t, int64_t(j) * p.D + e) * load_u<T, kNHWC>(p, n, c0 + j, q, mu, rstd);
  return acc;
}

// Channel shuffle (SPEC): m' = view(G, D/G) -> transpose -> flatten.  m'[dst(e)] = m[e].
MSLORA_HD int shuffle_dst(int e, int D, int G) { return (e % (D / G)) * G + e / (D / G); }

// Offset of path i's (D, k, k) block in the packed dw weights / part_dw rows.
MSLORA_HD int64_t dw_offset(const Params& p, int i) {
  int64_t off = 0;
  for (int j = 0; j < i; ++j) off += int64_t(p.D) * p.ks[j] * p.ks[j];
  return off;
}
MSLORA_HD int dw_total(const Params& p) { return int(dw_offset(p, p.nk) / p.D); }  // sum k^2

// The depthwise taps of a channel chunk [c0, c0 + CH) of every path, staged in shared memory as
// [path][ch][k * k] (path i from NC * sum_{j < i} k_j^2, NC = min(CH, D); 0 past D): each path's
// slice of dw is one contiguous run, copied with neighbouring threads on neighbouring floats.
// The runs of outputs read them with their lanes along ch, k * k floats apart: k * k is odd, so
// 32 banks. (Read from global memory instead, every run of outputs loaded its channel's taps
// with a warp's loads k * k floats apart: up to a sector a lane, for kRun outputs' worth of
// FMAs.) bwd_dz's dK buffer has the same layout.
MSLORA_HD int taps_nc(const Params& p) { return p.CH < p.D ? p.CH : p.D; }
MSLORA_HD int64_t taps_floats(const Params& p) { return int64_t(taps_nc(p)) * dw_total(p); }
// Offset of channel ch's k x k kernel of path `path` in the staged layout.
MSLORA_HD int64_t chunk_tap(const Params& p, int path, int ch) {
  return int64_t(taps_nc(p)) * (dw_offset(p, path) / p.D) + ch * p.ks[path] * p.ks[path];
}
// Each path's run of chunk c0: f(staged offset, offset in dw's packing (dw, part_dw rows),
// floats of the chunk's channels below D, floats of the staged run).
template <class F>
MSLORA_HD void chunk_runs(const Params& p, int c0, F&& f) {
  const int nc = taps_nc(p), nch = p.D - c0 < nc ? p.D - c0 : nc;
  for (int path = 0; path < p.nk; ++path) {
    const int kk = p.ks[path] * p.ks[path];
    f(chunk_tap(p, path, 0), dw_offset(p, path) + int64_t(c0) * kk, nch * kk, nc * kk);
  }
}
MSLORA_HD void load_taps(const Params& p, int c0, float* taps, int tid, int nt) {
  chunk_runs(p, c0, [&](int64_t staged, int64_t packed, int valid, int n) {
    for (int i = tid; i < n; i += nt) taps[staged + i] = i < valid ? p.dw[packed + i] : 0.f;
  });
}

// ---------------------------------------------- depthwise rows (several outputs per thread)
//
// A thread computes a RUN of kRun consecutive outputs of one row of one channel: for each kernel
// row dy it loads the kRun + k - 1 input values of the window once into registers and reuses
// each for up to k outputs (k^2 shared-memory loads per output before, (kRun + k - 1) k / kRun
// now). The common kernel sizes are compile-time specialisations (registers only); any other
// odd k takes the generic path (same result, one shared load per tap and output).

#ifdef __CUDACC__
#define MSLORA_UNROLL _Pragma("unroll")
#define MSLORA_NO_UNROLL _Pragma("unroll 1")
#else
#define MSLORA_UNROLL
#define MSLORA_NO_UNROLL
#endif

constexpr int kRun = 8;  // outputs per thread along a row

// Kernel tap (dy, dx) of a k x k kernel Kp, or of the flipped kernel (dz = correlation of dc
// with flip(K)).
MSLORA_HD float ktap(const float* Kp, int k, bool flip, int dy, int dx) {
  return flip ? Kp[(k - 1 - dy) * k + (k - 1 - dx)] : Kp[dy * k + dx];
}

// acc[o] += sum_{dy, dx < KS} K(dy, dx) * src[dy * ld + o + dx] for o < kRun. Window columns
// j >= nwin are not read (taken as 0): they only feed outputs o >= nwin - KS + 1, which the
// caller discards.
template <int KS>
MSLORA_HD void conv_run_k(const float* src, int ld, int nwin, const float* Kp, bool flip,
                          float (&acc)[kRun]) {
  MSLORA_NO_UNROLL  // one kernel row's window live at a time (register pressure)
  for (int dy = 0; dy < KS; ++dy) {
    const float* row = src + dy * ld;
    float kw[KS];
    MSLORA_UNROLL
    for (int dx = 0; dx < KS; ++dx) kw[dx] = ktap(Kp, KS, flip, dy, dx);
    MSLORA_UNROLL
    for (int j = 0; j < kRun + KS - 1; ++j) {  // input j feeds outputs o = j - dx
      const float v = j < nwin ? row[j] : 0.f;
      MSLORA_UNROLL
      for (int o = 0; o < kRun; ++o)
        if (j - o >= 0 && j - o < KS) acc[o] += kw[j - o] * v;
    }
  }
}

MSLORA_HD void conv_run_any(int k, const float* src, int ld, int nwin, const float* Kp, bool flip,
                            float (&acc)[kRun]) {
  for (int dy = 0; dy < k; ++dy) {
    for (int dx = 0; dx < k; ++dx) {
      const float kv = ktap(Kp, k, flip, dy, dx);
      const float* s = src + dy * ld + dx;
      MSLORA_UNROLL
      for (int o = 0; o < kRun; ++o)
        if (o + dx < nwin) acc[o] += kv * s[o];
    }
  }
}

// The depthwise conv of one k x k kernel Kp (flipped if `flip`) along a run of outputs: src is
// the top-left input of output 0's window in a shared plane of row stride ld; nwin inputs of
// each row are valid (nout + k - 1 for nout wanted outputs).
MSLORA_HD void conv_run(int k, const float* src, int ld, int nwin, const float* Kp, bool flip,
                        float (&acc)[kRun]) {
  switch (k) {
    case 1: conv_run_k<1>(src, ld, nwin, Kp, flip, acc); break;
    case 3: conv_run_k<3>(src, ld, nwin, Kp, flip, acc); break;
    case 5: conv_run_k<5>(src, ld, nwin, Kp, flip, acc); break;
    case 7: conv_run_k<7>(src, ld, nwin, Kp, flip, acc); break;
    default: conv_run_any(k, src, ld, nwin, Kp, flip, acc);
  }
}

// dK row: acc[dx] += sum_{o < nout} a[o] * win[o + dx] for dx < KS, with a = a_row[0..nout)
// and win = z_row[0 .. nout + KS - 1).
template <int KS>
MSLORA_HD void xcorr_run_k(const float* a_row, const float* z_row, int nout, float (&acc)[KS]) {
  float a[kRun];
  MSLORA_UNROLL
  for (int o = 0; o < kRun; ++o) a[o] = o < nout ? a_row[o] : 0.f;
  MSLORA_UNROLL
  for (int j = 0; j < kRun + KS - 1; ++j) {  // z input j meets a[o] at tap dx = j - o
    const float v = j < nout + KS - 1 ? z_row[j] : 0.f;
    MSLORA_UNROLL
    for (int dx = 0; dx < KS; ++dx)
      if (j - dx >= 0 && j - dx < kRun) acc[dx] += a[j - dx] * v;
  }
}

// V consecutive workspace values at src as fp32: one vector load of V * sizeof(T) = 16 or 8
// bytes on the GPU (src aligned to that), V = 1 a scalar load; a plain copy on the host.
template <int V, typename T>
MSLORA_HD void load_ws_vec(const T* src, float (&v)[V]) {
#ifdef __CUDA_ARCH__
  constexpr int kBytes = V * int(sizeof(T));
  static_assert(V == 1 || kBytes == 16 || kBytes == 8, "vector loads are 8 or 16 bytes");
  T e[V];
  if constexpr (V == 1) {
    e[0] = src[0];
  } else if constexpr (kBytes == 16) {
    const uint4 q = *reinterpret_cast<const uint4*>(src);
    memcpy(e, &q, sizeof q);
  } else {
    const uint2 q = *reinterpret_cast<const uint2*>(src);
    memcpy(e, &q, sizeof q);
  }
  MSLORA_UNROLL
  for (int j = 0; j < V; ++j) v[j] = to_f32(e[j]);
#else
  MSLORA_HOST_EXPECT(is_aligned(src, V * sizeof(T)),
                     "load_ws_vec: a vector load's address is not a multiple of its size");
  for (int j = 0; j < V; ++j) v[j] = to_f32(src[j]);
#endif
}

// load_z_halo with V channels of one pixel per item (one vector load; D % V == 0, CH % V == 0,
// zimg aligned to V * sizeof(T)).
template <int V, typename T>
MSLORA_HD void load_z_halo_v(const Params& p, const T* zimg, int c0, int h0, int w0, int rows,
                             int cols, int64_t plane, float* dst, int tid, int nt) {
  const int n = rows * cols, nq = p.CH / V;
  for (int i = tid; i < nq * n; i += nt) {
    const int cq = i % nq, px = i / nq, y = px / cols, x = px % cols;
    const int h = h0 + y, w = w0 + x, d = c0 + V * cq;
    float v[V];
    MSLORA_UNROLL
    for (int j = 0; j < V; ++j) v[j] = 0.f;
    if (h >= 0 && h < p.H && w >= 0 && w < p.W && d < p.D)
      load_ws_vec<V>(zimg + (int64_t(h) * p.W + w) * p.D + d, v);
    float* o = dst + V * cq * plane + px;
    MSLORA_UNROLL
    for (int j = 0; j < V; ++j) o[j * plane] = v[j];
  }
}

// Halo tile of z channels [c0, c0 + CH): dst[ch * plane + y * cols + x] = z of image zimg
// (pixel-major [H*W][D], type T) at (h0 + y, w0 + x, c0 + ch), 0 outside the image or for
// c0 + ch >= D; y < rows, x < cols. One call per thread of a stage. A thread moves the channels
// of one pixel 16 bytes at a time (4 fp32 or 8 fp16/bf16) where D and CH are multiples of that
// many channels and zimg is 16-byte aligned, else 8 bytes at a time (2 or 4 channels) where
// those hold for 8 bytes, else one channel.
template <typename T>
MSLORA_HD void load_z_halo(const Params& p, const T* zimg, int c0, int h0, int w0, int rows,
                           int cols, int64_t plane, float* dst, int tid, int nt) {
  constexpr int kV = 16 / int(sizeof(T));
  const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(zimg);
  if (p.D % kV == 0 && p.CH % kV == 0 && addr % 16 == 0)
    load_z_halo_v<kV>(p, zimg, c0, h0, w0, rows, cols, plane, dst, tid, nt);
  else if (p.D % (kV / 2) == 0 && p.CH % (kV / 2) == 0 && addr % 8 == 0)
    load_z_halo_v<kV / 2>(p, zimg, c0, h0, w0, rows, cols, plane, dst, tid, nt);
  else
    load_z_halo_v<1>(p, zimg, c0, h0, w0, rows, cols, plane, dst, tid, nt);
}

// Per-pixel sums over the C channels (channel_sums below) run kSumParts threads per pixel;
// their partial sums take sums_scratch_floats(np, K) floats of shared memory for np pixels
// and K sums (a padded row of kSumParts + 1 per pixel and sum).
constexpr int kSumParts = 16;
MSLORA_HD int64_t sums_scratch_floats(int np, int K) { return int64_t(np) * (kSumParts + 1) * K; }

// ------------------------------------------------------------------------- tile geometry

struct Tile {
  int n, h0, w0;  // image, first row, first column
};
MSLORA_HD Tile tile_of(const Params& p, int bx, int by) {
  const int tiles_w = int(cdiv(p.W, p.TW));
  return Tile{by, (bx / tiles_w) * p.TH, (bx % tiles_w) * p.TW};
}
MSLORA_HD int tiles_per_image(const Params& p) { return int(cdiv(p.H, p.TH) * cdiv(p.W, p.TW)); }

// Local pixel pl of a tile -> pixel index q = h*W + w, or -1 outside the image.
MSLORA_HD int64_t tile_pixel(const Params& p, const Tile& t, int pl) {
  const int h = t.h0 + pl / p.TW, w = t.w0 + pl % p.TW;
  return (h < p.H && w < p.W) ? int64_t(h) * p.W + w : -1;
}

// Per-channel plane stride of a shared tile of `n` floats per channel: odd, so that the 32 lanes
// of a warp, which differ in channel, hit 32 different banks.
MSLORA_HD int64_t plane_stride(int64_t n) { return n | 1; }

MSLORA_HD int64_t align8(int64_t v) { return (v + 7) / 8 * 8; }  // floats -> 32-byte multiple

// Tensor-core operands of a kernel's channel products (Params::tc; tc.cuh, tc_gemm below), in
// floats from the kernel's shared memory, offsets 32-byte aligned: A (Mp x lda: kTcK columns per
// group, twice: its rounding to the 16-bit type and the remainder's), B^T (width x ldb) in the
// 16-bit type, and the fp32 product (Mp x ldo). `width` bounds the product's columns (all groups
// together): at least D padded (the D x D products), every group's D / G padded (the grouped
// C -> D products), and 64, the chunk of C columns of the grouped D -> C products.
struct TcSmem {
  int Mp, lda, ldb, ldo, width;
  int64_t a, a_lo, b, out, end;
};
MSLORA_HD TcSmem tc_smem(const Params& p, int rows, int64_t base) {
  TcSmem s;
  s.Mp = round16(rows);
  s.lda = p.G * kTcK + 8;  // + 16 bytes: the rows of a fragment fall in different banks
  s.ldb = kTcK + 8;
  const int dense = round16(p.D), grouped = p.G * round16(p.D / p.G);
  const int w = dense > grouped ? dense : grouped;
  s.width = w > 64 ? w : 64;
  s.ldo = s.width + 4;
  s.a = align8(base);
  s.a_lo = s.a + align8(int64_t(s.Mp) * s.lda / 2);  // 2 elements per float
  s.b = s.a_lo + align8(int64_t(s.Mp) * s.lda / 2);
  s.out = s.b + align8(int64_t(s.width) * s.ldb / 2);
  s.end = s.out + int64_t(s.Mp) * s.ldo;
  return s;
}

// Shared-memory plan of the tile kernels, in floats. One place, used by the kernels (offsets)
// and by the launcher (size, via smem_floats()). stats [P][4]; bufs x [P][D]; then the
// multi-scale sum's z halo tile zt [CH][zplane] (zplane = hh * hw_ rounded up to odd: row y,
// column x of channel ch at ch * zplane + y * hw_ + x), gate sigmoids sig [nk][P] and the
// chunk's depthwise taps (load_taps), which share their space with the tensor-core operands: the
// products only start once the sum is done. The per-pixel sums (pixel_sums: enhance's LN_D
// statistics and backward means, after the last read of zt and sig and outside the tensor-core
// products) use `scratch`, from zt on.
struct TileSmem {
  int P;              // pixels per tile
  int hh, hw_;        // halo tile rows / cols (radius R)
  int64_t stats, buf0, buf1, buf2, buf3, zt, sig, taps, scratch;  // offsets
  int64_t zplane;     // channel plane stride of zt
  TcSmem tc;
  int64_t total;
};
MSLORA_HD TileSmem tile_smem(const Params& p, int bufs) {
  TileSmem s;
  s.P = p.TH * p.TW;
  s.hh = p.TH + 2 * p.R;
  s.hw_ = p.TW + 2 * p.R;
  s.zplane = plane_stride(int64_t(s.hh) * s.hw_);
  s.stats = 0;
  s.buf0 = s.stats + 4 * int64_t(s.P);
  s.buf1 = s.buf0 + (bufs > 0 ? int64_t(s.P) * p.D : 0);
  s.buf2 = s.buf1 + (bufs > 1 ? int64_t(s.P) * p.D : 0);
  s.buf3 = s.buf2 + (bufs > 2 ? int64_t(s.P) * p.D : 0);
  s.zt = s.buf3 + (bufs > 3 ? int64_t(s.P) * p.D : 0);
  s.sig = s.zt + int64_t(p.CH) * s.zplane;
  s.taps = s.sig + int64_t(p.nk) * s.P;
  s.scratch = s.zt;
  const int64_t scratch_end = s.scratch + sums_scratch_floats(s.P, p.enhance ? 2 : 0);
  const int64_t taps_end = s.taps + taps_floats(p);
  const int64_t end = taps_end > scratch_end ? taps_end : scratch_end;
  s.tc = tc_smem(p, s.P, s.zt);
  s.total = p.tc && s.tc.end > end ? s.tc.end : end;
  return s;
}

// bwd_dz: z with a double halo (2R) [CH][zplane]; dc_i on tile + halo (R) [nk][CH][dplane];
// sigmoid of the gates on tile + halo [nk][hh * hw_]; the per-pixel gate sums dsig_i [nk][P];
// under gate, ds0 * GELU(c_i) on the tile [nk][CH][gplane] (summed over channels into dsig);
// the chunk's depthwise taps (load_taps) and its tile's dK, in the taps' layout.
// Plane strides odd (see plane_stride).
struct DzSmem {
  int P, hh, hw_, zh, zw;
  int64_t zplane, dplane, gplane;
  int64_t z2, dc, sig, dsig, gl, taps, dk, total;
};
MSLORA_HD DzSmem dz_smem(const Params& p) {
  DzSmem s;
  s.P = p.TH * p.TW;
  s.hh = p.TH + 2 * p.R;
  s.hw_ = p.TW + 2 * p.R;
  s.zh = p.TH + 4 * p.R;
  s.zw = p.TW + 4 * p.R;
  s.zplane = plane_stride(int64_t(s.zh) * s.zw);
  s.dplane = plane_stride(int64_t(s.hh) * s.hw_);
  s.gplane = plane_stride(s.P);
  s.z2 = 0;
  s.dc = s.z2 + int64_t(p.CH) * s.zplane;
  s.sig = s.dc + int64_t(p.nk) * p.CH * s.dplane;
  s.dsig = s.sig + int64_t(p.nk) * s.hh * s.hw_;
  s.gl = s.dsig + int64_t(p.nk) * s.P;
  s.taps = s.gl + (p.gate ? int64_t(p.nk) * p.CH * s.gplane : 0);
  s.dk = s.taps + taps_floats(p);
  s.total = s.dk + taps_floats(p);
  return s;
}

// prep / bwd_dx: per-pixel-block buffers: stats [PB][4], bwd_dx's du [PB][du_stride] (an odd
// row stride: the lanes of a warp that differ in pixel read 32 different banks; only where dx
// needs du whole, bwd_dx_du: prenorm's LayerNorm backward, or the CUDA-core product), then the
// tensor-core operands (Params::tc), which share their space with the scratch of the
// per-pixel sums (prenorm: prep's LN_C statistics of x, bwd_dx's two LN_C backward means; gate:
// prep's gate logits, nk a pixel); the sums and the products never run at the same time.
MSLORA_HD int du_stride(const Params& p) { return p.C | 1; }
// Whether bwd_dx keeps du in shared memory; else (tensor cores, no prenorm) the product's sink
// writes dx = dout + du itself, and the pixel block can be larger (the weights it stages, all of
// proj and down, spread over more pixels). p.tc is 0 for fp32 (the launcher's tensor_cores).
MSLORA_HD bool bwd_dx_du(const Params& p) { return p.prenorm || !p.tc; }
MSLORA_HD int64_t pixel_scratch(const Params& p, bool dx) {
  return 4 * int64_t(p.PB) + (dx && bwd_dx_du(p) ? int64_t(p.PB) * du_stride(p) : 0);
}
MSLORA_HD TcSmem pixel_tc_smem(const Params& p, bool dx) {
  return tc_smem(p, p.PB, pixel_scratch(p, dx));
}
MSLORA_HD int64_t pixel_smem_floats(const Params& p, bool dx) {
  const int gate = p.gate ? p.nk : 0;
  const int sums = dx ? 2 * p.prenorm : (gate > p.prenorm ? gate : p.prenorm);
  const int64_t end = pixel_scratch(p, dx) + sums_scratch_floats(p.PB, sums);
  const int64_t tc_end = p.tc ? pixel_tc_smem(p, dx).end : 0;
  return tc_end > end ? tc_end : end;
}

// ------------------------------------------------------------ channel products on tensor cores
// (Params::tc, 16-bit T only; tc.cuh). Each product streams its reduction through shared memory
// in chunks of kTcK columns per group (two stages a chunk: stage the operands, multiply) and
// leaves its fp32 result in the kernel's TcSmem out, which a following stage reads back.
template <typename T>
MSLORA_HD bool use_tc(const Params& p) { return kTensorCoreType<T> && p.tc; }

// out[r * ldo + g * round16(N) + n] = sum_{k < K} fa(r, g, k) * fb(g, n, k) for rows r < M,
// groups g < groups (groups * round16(N) <= L.width), columns n < N.
//   fa(r, g, k): fp32 A value of row r (callers give 0 for a pixel outside the image); split
//     into hi + lo in T (tc.cuh) unless `exact_a` (A is representable in T: x, dout, and the
//     workspaces of type T, e.g. da, dz);
//   fb(g, n, k): the weight, representable in T (the weights have the activations' dtype);
//   rows_fastest: stage A over rows first (activations of NCHW layout: neighbouring pixels are
//     neighbours in memory) instead of over k;
//   stage_a = false: A is still staged from the previous call (same fa, K <= kTcK).
template <typename T, class Ex, class FA, class FB>
MSLORA_HD void tc_gemm(const TcSmem& L, float* sm, int M, int groups, int N, int K, bool exact_a,
                       bool rows_fastest, bool stage_a, FA&& fa, FB&& fb, Ex& ex) {
  T* a = reinterpret_cast<T*>(sm + L.a);
  T* a_lo = reinterpret_cast<T*>(sm + L.a_lo);
  T* b = reinterpret_cast<T*>(sm + L.b);
  const int Np = round16(N), ka = groups * kTcK;
  for (int k0 = 0; k0 < K; k0 += kTcK) {
    const int kn = K - k0 < kTcK ? K - k0 : kTcK;
    ex.stage([&](int tid) {
      for (int i = tid; stage_a && i < L.Mp * ka; i += ex.nt) {
        const int r = rows_fastest ? i % L.Mp : i / ka, c = rows_fastest ? i / L.Mp : i % ka;
        const int g = c / kTcK, k = c % kTcK;
        const float v = r < M && k < kn ? fa(r, g, k0 + k) : 0.0f;
        const T hi = from_f32<T>(v);
        a[r * L.lda + c] = hi;
        if (!exact_a) a_lo[r * L.lda + c] = from_f32<T>(v - to_f32(hi));
      }
      for (int i = tid; i < groups * Np * kTcK; i += ex.nt) {
        const int row = i / kTcK, k = i % kTcK, g = row / Np, n = row % Np;
        b[row * L.ldb + k] = from_f32<T>(n < N && k < kn ? fb(g, n, k0 + k) : 0.0f);
      }
    });
    ex.stage([&](int tid) {
      block_mma<T>(MmaArgs<T>{a, exact_a ? nullptr : a_lo, L.lda, b, L.ldb, sm + L.out, L.ldo,
                              L.Mp, Np, round16(kn), groups, k0 > 0},
                   tid, ex.nt);
    });
  }
}

// Column of D-channel e in the out of a grouped C -> D product (groups padded to 16 columns).
MSLORA_HD int tc_col(const Params& p, int e) {
  const int dg = p.D / p.G;
  return e / dg * round16(dg) + e % dg;
}

// Where row r of a product lives: image n, pixel q (q < 0: outside the image, A row 0).
struct RowPix {
  int n;
  int64_t q;
};

// out[r][tc_col(e)] = sum_j w[e][j] u[g(e) C/G + j] at row r's pixel (grouped_in on tensor
// cores): a = proj(u), z = down(u). stats[sstride * r + 0/1]: LN_C mean / rstd (prenorm).
template <typename T, bool kNHWC, class Ex, class Pix>
MSLORA_HD void tc_grouped_in(const Params& p, const TcSmem& L, float* sm, int M, Pix&& pix,
                             const void* w, const float* stats, int sstride, Ex& ex) {
  const int cg = p.C / p.G, dg = p.D / p.G;
  tc_gemm<T>(
      L, sm, M, p.G, dg, cg, !p.prenorm, !kNHWC, true,
      [&](int r, int g, int k) {
        const RowPix rp = pix(r);
        return rp.q < 0 ? 0.0f
                        : load_u<T, kNHWC>(p, rp.n, g * cg + k, rp.q, stats[sstride * r],
                                           stats[sstride * r + 1]);
      },
      [&](int g, int n, int k) { return wl<T>(w, int64_t(g * dg + n) * cg + k); }, ex);
}

// The D x D pointwise product of a tile on tensor cores: dst[pl][e] = sum_d R(e, d) src[pl][d]
// with R(e, d) = pw[e][d] (t = pw(s)) or, `transposed`, pw[d][e] (ds = pw^T(dt)); dst may be
// src. Pixels outside the image give 0.
template <typename T, class Ex>
MSLORA_HD void tc_pw(const Params& p, const Tile& t, const TileSmem& L, float* sm,
                     const float* src, float* dst, bool transposed, Ex& ex) {
  tc_gemm<T>(
      L.tc, sm, L.P, 1, p.D, p.D, false, false, true,
      [&](int r, int, int k) {
        return tile_pixel(p, t, r) < 0 ? 0.0f : src[int64_t(r) * p.D + k];
      },
      [&](int, int n, int k) {
        return wl<T>(transposed ? p.pw_t : p.pw, int64_t(n) * p.D + k);
      },
      ex);
  const float* out = sm + L.tc.out;
  ex.stage([&](int tid) {
    for (int i = tid; i < L.P * p.D; i += ex.nt) dst[i] = out[(i / p.D) * L.tc.ldo + i % p.D];
  });
}

// a = proj(u) of a tile on tensor cores (fwd, bwd_tile): out[pl][tc_col(e)]; LN_C stats in the
// tile's stats [P][4].
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void tc_proj_tile(const Params& p, const Tile& t, const TileSmem& L, float* sm, Ex& ex) {
  tc_grouped_in<T, kNHWC>(
      p, L.tc, sm, L.P, [&](int r) { return RowPix{t.n, tile_pixel(p, t, r)}; }, p.proj,
      sm + L.stats, 4, ex);
}

// The grouped D -> C products on tensor cores, in chunks of the C channels of every group:
// for each chunk, y(r, c) = sum_{k < K} fa(r, g, k) fb(g, c, k) (c = g C/G + j over the chunk's
// columns, fb given the channel c), then sink(r, c, y) from one stage. up (K = D/G) in fwd,
// proj^T / down^T (K = 2 D/G) in bwd_dx. nhwc_order: the sink stage runs channels fastest (else
// rows fastest), for coalesced activation stores. exact_a: as tc_gemm's (A read from the
// workspaces, bwd_dx's da | dz: one product, no hi/lo split).
template <typename T, class Ex, class FA, class FB, class Sink>
MSLORA_HD void tc_grouped_out(const Params& p, const TcSmem& L, float* sm, int M, int K,
                              bool nhwc_order, bool exact_a, FA&& fa, FB&& fb, Sink&& sink,
                              Ex& ex) {
  const int cg = p.C / p.G, nc = L.width / p.G / 16 * 16;
  const float* out = sm + L.out;
  for (int j0 = 0; j0 < cg; j0 += nc) {
    const int nn = cg - j0 < nc ? cg - j0 : nc, np = round16(nn);
    tc_gemm<T>(L, sm, M, p.G, nn, K, exact_a, false, j0 == 0 || K > kTcK, fa,
               [&](int g, int n, int k) { return fb(g, g * cg + j0 + n, k); }, ex);
    ex.stage([&](int tid) {
      const int cols = p.G * nn;
      for (int i = tid; i < M * cols; i += ex.nt) {
        const int r = nhwc_order ? i / cols : i % M, col = nhwc_order ? i % cols : i / M;
        const int g = col / nn, n = col % nn;
        sink(r, g * cg + j0 + n, out[r * L.ldo + g * np + n]);
      }
    });
  }
}

// ------------------------------------------------------------ per-pixel sums over channels
//
// A per-pixel reduction over channels (LN_C's statistics of x and its backward's two means;
// enhance's LN_D statistics of s0 and its backward's two means) runs kSumParts threads per
// pixel: part(pl, j, acc) adds to acc[0 .. K) the terms of pixel pl's channels j,
// j + kSumParts, ...; the parts go through `scratch` (sums_scratch_floats), and then one
// thread per pixel adds them in order (deterministic) and hands the K sums to out(pl, sums).
// Every thread of the block is busy where one thread per pixel left most of them idle (prep and
// bwd_dx: PB <= 64 pixels, 256 threads; the tile kernels: 64) with the whole row in series.
// kPartsFastest: the threads run parts fastest (a warp reads neighbouring channels of two
// pixels: NHWC activations, and the pixel-major rows in shared memory, where a thread per pixel
// read D apart, one bank for the whole warp when 32 divides D), else pixels fastest (a warp
// reads neighbouring pixels of one channel: NCHW activations).
template <int K, bool kPartsFastest, class Ex, class Part, class Out>
MSLORA_HD void pixel_sums(int np, float* scratch, Part&& part, Out&& out, Ex& ex) {
  auto slot = [&](int pl, int j) {
    return (kPartsFastest ? int64_t(pl) * (kSumParts + 1) + j : int64_t(j) * np + pl) * K;
  };
  ex.stage([&](int tid) {
    for (int i = tid; i < np * kSumParts; i += ex.nt) {
      const int pl = kPartsFastest ? i / kSumParts : i % np;
      const int j = kPartsFastest ? i % kSumParts : i / np;
      float acc[K];
      for (int k = 0; k < K; ++k) acc[k] = 0.f;
      part(pl, j, acc);
      for (int k = 0; k < K; ++k) scratch[slot(pl, j) + k] = acc[k];
    }
  });
  ex.stage([&](int tid) {
    for (int pl = tid; pl < np; pl += ex.nt) {
      float sums[K];
      for (int k = 0; k < K; ++k) sums[k] = 0.f;
      for (int j = 0; j < kSumParts; ++j)
        for (int k = 0; k < K; ++k) sums[k] += scratch[slot(pl, j) + k];
      out(pl, sums);
    }
  });
}

// pixel_sums over the C channels of the activations at np pixels, pix(pl) -> RowPix (q < 0:
// outside the image, sums 0): f(rp, pl, c, acc) adds channel c's terms, out(pl, rp, sums).
template <int K, bool kNHWC, class Ex, class Pix, class F, class Out>
MSLORA_HD void channel_sums(const Params& p, int np, float* scratch, Pix&& pix, F&& f, Out&& out,
                            Ex& ex) {
  pixel_sums<K, kNHWC>(
      np, scratch,
      [&](int pl, int j, float* acc) {
        const RowPix rp = pix(pl);
        if (rp.q >= 0)
          for (int c = j; c < p.C; c += kSumParts) f(rp, pl, c, acc);
      },
      [&](int pl, const float* sums) { out(pl, pix(pl), sums); }, ex);
}

// pixel_sums over the D channels of np pixel-major rows in shared memory:
// f(pl, d, i = pl * D + d, acc) adds channel d's terms.
template <int K, class Ex, class F, class Out>
MSLORA_HD void row_sums(const Params& p, int np, float* scratch, F&& f, Out&& out, Ex& ex) {
  pixel_sums<K, true>(
      np, scratch,
      [&](int pl, int j, float* acc) {
        for (int d = j; d < p.D; d += kSumParts) f(pl, d, int64_t(pl) * p.D + d, acc);
      },
      out, ex);
}

// LN_C statistics of x at np pixels (two passes, fp32), into stats [np][2]: mean over C and
// 1 / sqrt(var + eps); 0 and 1 for a pixel outside the image. prep takes them once per pass
// (Params::xstats).
template <typename T, bool kNHWC, class Ex, class Pix>
MSLORA_HD void x_stats(const Params& p, int np, Pix&& pix, float* stats, float* scratch, Ex& ex) {
  channel_sums<1, kNHWC>(
      p, np, scratch, pix,
      [&](const RowPix& rp, int, int c, float* acc) {
        acc[0] += load_act<T, kNHWC>(p, p.x, rp.n, c, rp.q);
      },
      [&](int pl, const RowPix& rp, const float* sums) {
        stats[2 * pl] = rp.q < 0 ? 0.f : sums[0] / p.C;
      },
      ex);
  channel_sums<1, kNHWC>(
      p, np, scratch, pix,
      [&](const RowPix& rp, int pl, int c, float* acc) {
        const float d = load_act<T, kNHWC>(p, p.x, rp.n, c, rp.q) - stats[2 * pl];
        acc[0] += d * d;
      },
      [&](int pl, const RowPix& rp, const float* sums) {
        stats[2 * pl + 1] = rp.q < 0 ? 1.f : 1.0f / sqrtf(sums[0] / p.C + kLnEps);
      },
      ex);
}

// Pixel pl of the PB-pixel block starting at pix0 (prep, bwd_dx).
MSLORA_HD RowPix block_pixel(const Params& p, int64_t pix0, int pl) {
  const int64_t pix = pix0 + pl;
  return pix < int64_t(p.N) * hw(p) ? RowPix{int(pix / hw(p)), pix % hw(p)} : RowPix{0, -1};
}

// ------------------------------------------------------------------------------- kernels

// prep: z[pix][e] = down(u)[e] for the PB pixels of block bx (pixels flattened over N*H*W);
// under prenorm also x's LN_C statistics -> Params::xstats, under gate the gates' sigmoids ->
// Params::gsig, for the kernels after it (each pixel's once a pass, where every tile kernel
// took them again for its tile, and bwd_dz for its halo too, a thread per pixel and path over
// a z row in series).
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void prep_body(const Params& p, int bx, float* sm, Ex& ex) {
  const int64_t npix = int64_t(p.N) * hw(p), pix0 = int64_t(bx) * p.PB;
  float* stats = sm;  // [PB][2]
  auto pix = [&](int pl) { return block_pixel(p, pix0, pl); };
  if (p.prenorm) x_stats<T, kNHWC>(p, p.PB, pix, stats, sm + pixel_scratch(p, false), ex);
  const bool tc = use_tc<T>(p);
  const TcSmem L = pixel_tc_smem(p, false);
  if constexpr (kTensorCoreType<T>) {
    if (tc) tc_grouped_in<T, kNHWC>(p, L, sm, p.PB, pix, p.down, stats, 2, ex);
  }
  ex.stage([&](int tid) {
    for (int64_t i = tid; i < int64_t(p.PB) * p.D; i += ex.nt) {
      const int pl = int(i / p.D), e = int(i % p.D);
      const int64_t pix = pix0 + pl;
      if (pix >= npix) continue;
      const float mu = p.prenorm ? stats[2 * pl] : 0.f, rs = p.prenorm ? stats[2 * pl + 1] : 1.f;
      const float v = tc ? sm[L.out + pl * L.ldo + tc_col(p, e)]
                         : grouped_in<T, kNHWC>(p, p.down_t, e, int(pix / hw(p)), pix % hw(p),
                                                mu, rs);
      if (p.z_lowp)
        ws_store(ws<T>(p.z), pix * p.D + e, v);
      else
        ws_store(p.z, pix * p.D + e, v);
    }
    for (int i = tid; p.prenorm && i < 2 * p.PB; i += ex.nt)  // [PB][2] -> xstats[pix0 ...]
      if (pix0 + i / 2 < npix) p.xstats[2 * pix0 + i] = stats[i];
  });
  if (p.gate) {  // gate logits: item (path, pixel) sums gate_w[path] . z over z's row as this
                 // block just wrote it (global, visible after the barrier), 16 threads an item
    pixel_sums<1, true>(
        p.nk * p.PB, sm + pixel_scratch(p, false),
        [&](int item, int j, float* acc) {
          const int path = item / p.PB;
          const int64_t pix = pix0 + item % p.PB;
          if (pix < npix)
            for (int d = j; d < p.D; d += kSumParts)
              acc[0] += p.gate_w[path * p.D + d] *
                        (p.z_lowp ? ws_load(ws<T>(p.z), pix * p.D + d) : p.z[pix * p.D + d]);
        },
        [&](int item, const float* sums) {
          const int path = item / p.PB;
          const int64_t pix = pix0 + item % p.PB;
          if (pix < npix) p.gsig[pix * p.nk + path] = sigmoid(sums[0] + p.gate_b[path]);
        },
        ex);
  }
}

// Stages shared by fwd and bwd_tile: LN_C stats of x (from Params::xstats), gate sigmoids (from
// Params::gsig), s0 (multi-scale sum), enhance (s = GELU(LN_D(s0)), written to `s_out`, which
// may alias s0). Z: z's storage type, T in fwd (Params::z_lowp), float in bwd_tile.
// stats: [P][4] = (x mean, x rstd, s0 mean, s0 rstd).
template <typename T, bool kNHWC, typename Z, class Ex>
MSLORA_HD void branch_stages(const Params& p, const Tile& t, float* sm, const TileSmem& L,
                             float* s0, float* s_out, Ex& ex) {
  float *zt = sm + L.zt, *sig = sm + L.sig, *stats = sm + L.stats;
  const int P = L.P;
  const Z* zimg = reinterpret_cast<const Z*>(p.z) + int64_t(t.n) * hw(p) * p.D;
  ex.stage([&](int tid) {
    for (int pl = tid; pl < P; pl += ex.nt) {
      const int64_t q = tile_pixel(p, t, pl), xi = 2 * (int64_t(t.n) * hw(p) + q);
      const bool ln = p.prenorm && q >= 0;
      stats[4 * pl] = ln ? p.xstats[xi] : 0.f;
      stats[4 * pl + 1] = ln ? p.xstats[xi + 1] : 1.f;
    }
    for (int i = tid; p.gate && i < P * p.nk; i += ex.nt) {  // from prep (Params::gsig)
      const int pl = i % P, path = i / P;
      const int64_t q = tile_pixel(p, t, pl);
      sig[path * P + pl] = q >= 0 ? p.gsig[(int64_t(t.n) * hw(p) + q) * p.nk + path] : 0.f;
    }
  });
  for (int c0 = 0; c0 < p.D; c0 += p.CH) {
    ex.stage([&](int tid) {  // z halo tile of channels [c0, c0 + CH), zero outside the image
      load_z_halo(p, zimg, c0, t.h0 - p.R, t.w0 - p.R, L.hh, L.hw_, L.zplane, zt, tid, ex.nt);
      load_taps(p, c0, sm + L.taps, tid, ex.nt);
    });
    // s0 = sum_i GELU(K_i * z) (* sig_i) (+ GELU(zmean)): one item = one channel (fastest, so
    // a warp's lanes read 32 channel planes: odd plane stride, no bank conflicts) x one tile
    // row x one run of kRun columns.
    ex.stage([&](int tid) {
      const int runs = int(cdiv(p.TW, kRun)), n = p.CH * p.TH * runs;
      for (int i = tid; i < n; i += ex.nt) {
        const int ch = i % p.CH, run = (i / p.CH) % runs, ty = i / p.CH / runs, d = c0 + ch;
        if (d >= p.D) continue;
        const int x0 = run * kRun, nout = p.TW - x0 < kRun ? p.TW - x0 : kRun;
        const float* zc = zt + ch * L.zplane;
        float tot[kRun];
        MSLORA_UNROLL
        for (int o = 0; o < kRun; ++o) tot[o] = 0.f;
        for (int path = 0; path < p.nk; ++path) {
          const int k = p.ks[path], off = p.R - k / 2;
          float acc[kRun];
          MSLORA_UNROLL
          for (int o = 0; o < kRun; ++o) acc[o] = 0.f;
          conv_run(k, zc + (ty + off) * L.hw_ + x0 + off, L.hw_, nout + k - 1,
                   sm + L.taps + chunk_tap(p, path, ch), false, acc);
          const float* sg = sig + path * P + ty * p.TW + x0;
          MSLORA_UNROLL
          for (int o = 0; o < kRun; ++o) {
            if (o < nout) {
              const float e = gelu(acc[o]);
              tot[o] += p.gate ? e * sg[o] : e;
            }
          }
        }
        const float pool = p.pool ? gelu(p.zmean[int64_t(t.n) * p.D + d]) : 0.f;
        float* dst = s0 + (ty * p.TW + x0) * p.D + d;
        MSLORA_UNROLL
        for (int o = 0; o < kRun; ++o, dst += p.D)
          if (o < nout) *dst = tot[o] + pool;
      }
    });
  }
  if (p.enhance) {  // LN_D statistics of s0 (two passes)
    float* scratch = sm + L.scratch;
    row_sums<1>(
        p, P, scratch, [&](int, int, int64_t i, float* acc) { acc[0] += s0[i]; },
        [&](int pl, const float* sums) { stats[4 * pl + 2] = sums[0] / p.D; }, ex);
    row_sums<1>(
        p, P, scratch,
        [&](int pl, int, int64_t i, float* acc) {
          const float dv = s0[i] - stats[4 * pl + 2];
          acc[0] += dv * dv;
        },
        [&](int pl, const float* sums) {
          stats[4 * pl + 3] = 1.0f / sqrtf(sums[0] / p.D + kLnEps);
        },
        ex);
    ex.stage([&](int tid) {
      for (int i = tid; i < P * p.D; i += ex.nt) {
        const int pl = i / p.D, d = i % p.D;
        const float xh = (s0[i] - stats[4 * pl + 2]) * stats[4 * pl + 3];
        s_out[i] = gelu(xh * p.enorm_w[d] + p.enorm_b[d]);
      }
    });
  }
}

// t[e] = sum_d pw[e][d] s[d] at local pixel pl, from pw_t[d][e] (Params::pw_t).
template <typename T>
MSLORA_HD float pw_row(const Params& p, const float* s, int pl, int e) {
  const float* v = s + int64_t(pl) * p.D;
  float acc = 0.f;
  for (int d = 0; d < p.D; ++d) acc += wl<T>(p.pw_t, int64_t(d) * p.D + e) * v[d];
  return acc;
}

// fwd: out = x + up(shuffle(proj(u) * pw(s))) on one TH x TW tile of image by.
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void fwd_body(const Params& p, int bx, int by, float* sm, Ex& ex) {
  const Tile t = tile_of(p, bx, by);
  const TileSmem L = tile_smem(p, 2);
  float *s = sm + L.buf0, *m = sm + L.buf1, *stats = sm + L.stats;
  const int P = L.P, dg = p.D / p.G, cg = p.C / p.G;
  branch_stages<T, kNHWC, T>(p, t, sm, L, s, s, ex);  // z of type T: prep's z_lowp
  const bool tc = use_tc<T>(p);
  const float* tco = sm + L.tc.out;  // a = proj(u) on tensor cores: tco[pl * ldo + tc_col(e)]
  if constexpr (kTensorCoreType<T>) {
    if (tc) {
      tc_pw<T>(p, t, L, sm, s, s, false, ex);  // s <- t = pw(s)
      tc_proj_tile<T, kNHWC>(p, t, L, sm, ex);
    }
  }
  ex.stage([&](int tid) {  // m'[shuffle(e)] = a[e] * t[e]
    for (int i = tid; i < P * p.D; i += ex.nt) {
      const int pl = i / p.D, e = i % p.D;
      const int64_t q = tile_pixel(p, t, pl);
      if (q < 0) continue;
      const float a =
          tc ? tco[pl * L.tc.ldo + tc_col(p, e)]
             : grouped_in<T, kNHWC>(p, p.proj_t, e, t.n, q, stats[4 * pl], stats[4 * pl + 1]);
      const int k = p.shuffle ? shuffle_dst(e, p.D, p.G) : e;
      m[int64_t(pl) * p.D + k] = a * (tc ? s[i] : pw_row<T>(p, s, pl, e));
    }
  });
  // out[c] = x[c] + y[c], y[c] = sum_j up[c][j] m'[g(c)*D/G + j]
  auto store = [&](int pl, int c, float y) {
    const int64_t q = tile_pixel(p, t, pl);
    if (q >= 0) store_act<T, kNHWC>(p, p.out, t.n, c, q, load_act<T, kNHWC>(p, p.x, t.n, c, q) + y);
  };
  if (tc) {
    if constexpr (kTensorCoreType<T>) {
      tc_grouped_out<T>(
          p, L.tc, sm, P, dg, kNHWC, false,  // m' is fp32 in shared memory: hi/lo split
          [&](int r, int g, int k) {
            return tile_pixel(p, t, r) < 0 ? 0.0f : m[int64_t(r) * p.D + g * dg + k];
          },
          [&](int, int c, int k) { return wl<T>(p.up, int64_t(c) * dg + k); }, store, ex);
    }
  } else {
    ex.stage([&](int tid) {
      for (int i = tid; i < P * p.C; i += ex.nt) {
        // NHWC: channel fastest; NCHW: pixel fastest (coalesced stores either way).
        const int pl = kNHWC ? i / p.C : i % P, c = kNHWC ? i % p.C : i / P;
        if (tile_pixel(p, t, pl) < 0) continue;
        const float* mv = m + int64_t(pl) * p.D + (c / cg) * dg;
        // NHWC: the lanes differ in channel c and read up_t[j][c], neighbours. NCHW: they differ
        // in pixel, whose rows of m lie D floats apart (one bank for the whole warp when 32
        // divides D), so each starts at its own column and wraps around, reading up[c][j].
        int j = kNHWC ? 0 : pl % dg;
        float y = 0.f;
        for (int n = 0; n < dg; ++n) {
          y += (kNHWC ? wl<T>(p.up_t, int64_t(j) * p.C + c) : wl<T>(p.up, int64_t(c) * dg + j)) *
               mv[j];
          if (++j == dg) j = 0;
        }
        store(pl, c, y);
      }
    });
  }
}

// bwd_tile (B1): see the file comment. Buffers: b0 = s0, b1 = s, b2 = t then ds, b3 = a then dt.
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void bwd_tile_body(const Params& p, int bx, int by, float* sm, Ex& ex) {
  const Tile t = tile_of(p, bx, by);
  const TileSmem L = tile_smem(p, 4);
  float *s0 = sm + L.buf0, *s = p.enhance ? sm + L.buf1 : s0, *tb = sm + L.buf2, *ab = sm + L.buf3;
  float* stats = sm + L.stats;
  const int P = L.P, dg = p.D / p.G, cg = p.C / p.G;
  const int64_t tile_id = int64_t(by) * tiles_per_image(p) + bx;
  const int64_t pix0 = int64_t(t.n) * hw(p);
  branch_stages<T, kNHWC, float>(p, t, sm, L, s0, s, ex);
  const bool tc = use_tc<T>(p);
  const float* tco = sm + L.tc.out;  // grouped products on tensor cores: tco[pl * ldo + tc_col]
  if constexpr (kTensorCoreType<T>) {
    if (tc) {
      tc_pw<T>(p, t, L, sm, s, tb, false, ex);  // tb = t = pw(s)
      tc_proj_tile<T, kNHWC>(p, t, L, sm, ex);  // a
    }
  }
  ex.stage([&](int tid) {  // t, a; ws s and m'
    for (int i = tid; i < P * p.D; i += ex.nt) {
      const int pl = i / p.D, e = i % p.D;
      const int64_t q = tile_pixel(p, t, pl);
      if (q < 0) continue;
      const float a =
          tc ? tco[pl * L.tc.ldo + tc_col(p, e)]
             : grouped_in<T, kNHWC>(p, p.proj_t, e, t.n, q, stats[4 * pl], stats[4 * pl + 1]);
      const float tv = tc ? tb[i] : pw_row<T>(p, s, pl, e);
      tb[i] = tv;
      ab[i] = a;
      const int64_t row = (pix0 + q) * p.D;
      ws_store(ws<T>(p.s), row + e, s[i]);
      ws_store(ws<T>(p.mp), row + (p.shuffle ? shuffle_dst(e, p.D, p.G) : e), a * tv);
    }
  });
  if constexpr (kTensorCoreType<T>) {
    if (tc) {  // dm'[g dg + j] = sum_cc up[g cg + cc][j] dout[g cg + cc] (dout exact in T)
      tc_gemm<T>(
          L.tc, sm, P, p.G, dg, cg, true, !kNHWC, true,
          [&](int r, int g, int k) {
            const int64_t q = tile_pixel(p, t, r);
            return q < 0 ? 0.0f : load_act<T, kNHWC>(p, p.dout, t.n, g * cg + k, q);
          },
          [&](int g, int n, int k) { return wl<T>(p.up_t, int64_t(n) * p.C + g * cg + k); }, ex);
    }
  }
  ex.stage([&](int tid) {  // dm = unshuffle(up^T dout); da = dm * t; dt = dm * a (into ab)
    for (int i = tid; i < P * p.D; i += ex.nt) {
      const int pl = i / p.D, e = i % p.D;
      const int64_t q = tile_pixel(p, t, pl);
      if (q < 0) continue;
      const int k = p.shuffle ? shuffle_dst(e, p.D, p.G) : e;  // dm[e] = dm'[k]
      const int g = k / dg, j = k % dg;
      float dm = 0.f;
      if (tc) {
        dm = tco[pl * L.tc.ldo + tc_col(p, k)];
      } else {
        for (int cc = 0; cc < cg; ++cc) {
          const int c = g * cg + cc;
          dm += wl<T>(p.up, int64_t(c) * dg + j) * load_act<T, kNHWC>(p, p.dout, t.n, c, q);
        }
      }
      const int64_t row = (pix0 + q) * p.D;
      ws_store(ws<T>(p.da), row + e, dm * tb[i]);
      const float dtv = dm * ab[i];
      ws_store(ws<T>(p.dt), row + e, dtv);
      ab[i] = dtv;
    }
  });
  if (tc) {  // ds = pw^T(dt) into tb
    if constexpr (kTensorCoreType<T>) tc_pw<T>(p, t, L, sm, ab, tb, true, ex);
  } else {
    ex.stage([&](int tid) {  // ds[d] = sum_e pw[e][d] dt[e]  (into tb)
      for (int i = tid; i < P * p.D; i += ex.nt) {
        const int pl = i / p.D, d = i % p.D;
        if (tile_pixel(p, t, pl) < 0) continue;
        const float* dtv = ab + int64_t(pl) * p.D;
        float acc = 0.f;
        for (int e = 0; e < p.D; ++e) acc += wl<T>(p.pw, int64_t(e) * p.D + d) * dtv[e];
        tb[i] = acc;
      }
    });
  }
  if (p.enhance) {
    // v = xhat * gamma + beta, s = GELU(v): dv = ds * GELU'(v); dxhat = dv * gamma;
    // ds0 = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)). stats[4pl+0/1] are free
    // now (a is done) and hold the two means.
    row_sums<2>(
        p, P, sm + L.scratch,
        [&](int pl, int d, int64_t i, float* acc) {
          const float xh = (s0[i] - stats[4 * pl + 2]) * stats[4 * pl + 3];
          const float dxh = tb[i] * gelu_grad(xh * p.enorm_w[d] + p.enorm_b[d]) * p.enorm_w[d];
          acc[0] += dxh;
          acc[1] += dxh * xh;
        },
        [&](int pl, const float* sums) {
          stats[4 * pl] = sums[0] / p.D;
          stats[4 * pl + 1] = sums[1] / p.D;
        },
        ex);
    ex.stage([&](int tid) {  // ds0 into ab; dv * xhat into s (buf1), dv into tb
      for (int i = tid; i < P * p.D; i += ex.nt) {
        const int pl = i / p.D, d = i % p.D;
        const float xh = (s0[i] - stats[4 * pl + 2]) * stats[4 * pl + 3];
        const float dv = tb[i] * gelu_grad(xh * p.enorm_w[d] + p.enorm_b[d]);
        ab[i] = stats[4 * pl + 3] * (dv * p.enorm_w[d] - stats[4 * pl] - xh * stats[4 * pl + 1]);
        s[i] = dv * xh;
        tb[i] = dv;
      }
    });
  }
  const float* ds0 = p.enhance ? ab : tb;
  ex.stage([&](int tid) {  // ws ds0; per-tile partials over the tile's pixels, fixed order
    for (int i = tid; i < P * p.D; i += ex.nt) {
      const int pl = i / p.D, e = i % p.D;
      const int64_t q = tile_pixel(p, t, pl);
      if (q >= 0) ws_store(p.ds0, (pix0 + q) * p.D + e, ds0[i]);
    }
    for (int d = tid; d < p.D; d += ex.nt) {
      float pool = 0.f, gw = 0.f, gb = 0.f;
      for (int pl = 0; pl < P; ++pl) {
        if (tile_pixel(p, t, pl) < 0) continue;
        const int64_t i = int64_t(pl) * p.D + d;
        pool += ds0[i];
        if (p.enhance) {
          gw += s[i];
          gb += tb[i];
        }
      }
      if (p.pool) p.part_pool[tile_id * p.D + d] = pool;
      if (p.enhance) {
        p.part_enorm_w[tile_id * p.D + d] = gw;
        p.part_enorm_b[tile_id * p.D + d] = gb;
      }
    }
  });
}

// A block's partial row of bwd_dz, summed over its tiles: the block's first tile stores, the
// later ones add. The row is this block's alone and stages (barriers) separate its tiles, so
// there is no race, and the tiles' order is fixed: deterministic.
MSLORA_HD void add_partial(float* dst, float v, bool first) { *dst = first ? v : *dst + v; }

// bwd_dz (B2) on one tile (global index `tile` = n * tiles/image + tile in image), adding its
// dK / gate partials into partial row `row` (`first_tile`: the row's first tile). See the file
// comment.
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void bwd_dz_tile(const Params& p, int64_t tile, int64_t row, bool first_tile,
                           float* sm, Ex& ex) {
  const int tpi = tiles_per_image(p);
  const Tile t = tile_of(p, int(tile % tpi), int(tile / tpi));
  const DzSmem L = dz_smem(p);
  float *z2 = sm + L.z2, *dc = sm + L.dc, *sig = sm + L.sig, *dsig = sm + L.dsig;
  const int P = L.P, nh = L.hh * L.hw_, ktot = dw_total(p);
  const int64_t pix0 = int64_t(t.n) * hw(p);
  const float* zimg = p.z + pix0 * p.D;
  const float* dsimg = p.ds0 + pix0 * p.D;
  T* dzimg = ws<T>(p.dz) + pix0 * p.D;
  ex.stage([&](int tid) {  // gate sigmoids on tile + halo (from prep; 1 without gate); dsig = 0
    for (int i = tid; i < p.nk * nh; i += ex.nt) {
      const int path = i / nh, hy = (i % nh) / L.hw_, hx = i % L.hw_;
      const int h = t.h0 - p.R + hy, w = t.w0 - p.R + hx;
      const bool in = h >= 0 && h < p.H && w >= 0 && w < p.W;
      sig[i] = !p.gate ? 1.f
               : in    ? p.gsig[(pix0 + int64_t(h) * p.W + w) * p.nk + path]
                       : 0.f;
    }
    for (int i = tid; i < p.nk * P; i += ex.nt) dsig[i] = 0.f;
  });
  // The tile's dK of chunk c0 (L.dk, the taps' layout) into partial row `row`: per path one
  // contiguous run of the row, neighbouring threads on neighbouring floats (the dK items, lanes
  // along ch, would add to it k * k floats apart).
  auto flush_dk = [&](int c0, int tid) {
    float* dst = p.part_dw + row * p.D * ktot;
    chunk_runs(p, c0, [&](int64_t staged, int64_t packed, int valid, int) {
      for (int i = tid; i < valid; i += ex.nt)
        add_partial(dst + packed + i, sm[L.dk + staged + i], first_tile);
    });
  };
  for (int c0 = 0; c0 < p.D; c0 += p.CH) {
    ex.stage([&](int tid) {  // z with a double halo (2R), zero outside the image
      load_z_halo(p, zimg, c0, t.h0 - 2 * p.R, t.w0 - 2 * p.R, L.zh, L.zw, L.zplane, z2, tid,
                  ex.nt);
      load_taps(p, c0, sm + L.taps, tid, ex.nt);
      if (c0 > 0) flush_dk(c0 - p.CH, tid);
    });
    // dc_i = ds0 * sig_i * GELU'(c_i) on tile + halo (0 outside the image); under gate also
    // ds0 * GELU(c_i) on the tile (gl). One item = one channel (fastest) x one halo row x one
    // run of kRun columns, for one path.
    ex.stage([&](int tid) {
      const int runs = int(cdiv(L.hw_, kRun)), n = p.nk * p.CH * L.hh * runs;
      for (int i = tid; i < n; i += ex.nt) {
        const int ch = i % p.CH, run = (i / p.CH) % runs, hy = (i / p.CH / runs) % L.hh;
        const int path = i / p.CH / runs / L.hh, d = c0 + ch;
        if (d >= p.D) continue;
        const int x0 = run * kRun, nout = L.hw_ - x0 < kRun ? L.hw_ - x0 : kRun;
        const int k = p.ks[path], off = p.R - k / 2;  // window offset in z2 (double halo)
        float acc[kRun];
        MSLORA_UNROLL
        for (int o = 0; o < kRun; ++o) acc[o] = 0.f;
        conv_run(k, z2 + ch * L.zplane + (hy + off) * L.zw + x0 + off, L.zw, nout + k - 1,
                 sm + L.taps + chunk_tap(p, path, ch), false, acc);
        const int h = t.h0 - p.R + hy, ty = hy - p.R;
        const bool row_in = h >= 0 && h < p.H, row_tile = ty >= 0 && ty < p.TH;
        float* dcr = dc + (path * p.CH + ch) * L.dplane + hy * L.hw_ + x0;
        const float* sgr = sig + path * nh + hy * L.hw_ + x0;
        const int64_t glr = L.gl + (path * p.CH + ch) * L.gplane + ty * p.TW - p.R;  // + hx
        MSLORA_UNROLL
        for (int o = 0; o < kRun; ++o) {
          if (o >= nout) continue;
          const int hx = x0 + o, w = t.w0 - p.R + hx;
          const bool in = row_in && w >= 0 && w < p.W;
          const float ds = in ? ws_load(dsimg, (int64_t(h) * p.W + w) * p.D + d) : 0.f;
          dcr[o] = in ? ds * sgr[o] * gelu_grad(acc[o]) : 0.f;
          if (p.gate && row_tile && hx >= p.R && hx < p.R + p.TW)
            sm[glr + hx] = in ? ds * gelu(acc[o]) : 0.f;
        }
      }
    });
    ex.stage([&](int tid) {
      // Work of this stage, as one list: dz items, then dK items, then dsig items; each loop
      // starts where the previous one left the threads (balance).
      int done = 0;
      auto first = [&](int n_before) { return ((tid - n_before) % ex.nt + ex.nt) % ex.nt; };
      // dz on the tile: correlation of dc_i with the flipped kernels -> ws dz. One item = one
      // channel (fastest) x one tile row x one run.
      const int runs = int(cdiv(p.TW, kRun)), n_dz = p.CH * p.TH * runs;
      for (int i = tid; i < n_dz; i += ex.nt) {
        const int ch = i % p.CH, run = (i / p.CH) % runs, ty = i / p.CH / runs, d = c0 + ch;
        const int h = t.h0 + ty;
        if (d >= p.D || h >= p.H) continue;
        const int x0 = run * kRun, nout = p.TW - x0 < kRun ? p.TW - x0 : kRun;
        float acc[kRun];
        MSLORA_UNROLL
        for (int o = 0; o < kRun; ++o) acc[o] = 0.f;
        for (int path = 0; path < p.nk; ++path) {
          const int k = p.ks[path], off = p.R - k / 2;
          conv_run(k, dc + (path * p.CH + ch) * L.dplane + (ty + off) * L.hw_ + x0 + off, L.hw_,
                   nout + k - 1, sm + L.taps + chunk_tap(p, path, ch), true, acc);
        }
        // + the pool term here, so that without gate dz is rounded to T once
        const float pool = p.pool ? p.pool_dz[int64_t(t.n) * p.D + d] : 0.f;
        T* dst = dzimg + (int64_t(h) * p.W + t.w0 + x0) * p.D + d;
        MSLORA_UNROLL
        for (int o = 0; o < kRun; ++o)
          if (o < nout && t.w0 + x0 + o < p.W) ws_store(dst, int64_t(o) * p.D, acc[o] + pool);
      }
      done += n_dz;
      // the tile's dK_i[d][dy][:] = sum over tile pixels of dc_i(q) z(q + (dy, :) - r): one item
      // = one channel (fastest) x one kernel row (path, dy); all k taps of the row at once,
      // along each tile row in runs. Pixels outside the image have dc = 0 and are skipped.
      int n_dk = 0;  // CH x (kernel rows of all paths)
      for (int j = 0; j < p.nk; ++j) n_dk += p.CH * p.ks[j];
      const int rows = p.H - t.h0 < p.TH ? p.H - t.h0 : p.TH;
      const int cols = p.W - t.w0 < p.TW ? p.W - t.w0 : p.TW;
      for (int i = first(done); i < n_dk; i += ex.nt) {
        const int ch = i % p.CH, d = c0 + ch;
        int dy = i / p.CH, path = 0;
        while (dy >= p.ks[path]) dy -= p.ks[path], ++path;
        if (d >= p.D) continue;
        const int k = p.ks[path], zoff = 2 * p.R - k / 2;
        const float* dcc = dc + (path * p.CH + ch) * L.dplane + p.R * L.hw_ + p.R;
        const float* zc = z2 + ch * L.zplane + (zoff + dy) * L.zw + zoff;
        float* dst = sm + L.dk + chunk_tap(p, path, ch) + dy * k;  // flush_dk adds it to the row
        switch (k) {
#define MSLORA_DK_CASE(KS)                                                                    \
  case KS: {                                                                                  \
    float acc[KS];                                                                            \
    MSLORA_UNROLL                                                                             \
    for (int dx = 0; dx < KS; ++dx) acc[dx] = 0.f;                                            \
    for (int ty = 0; ty < rows; ++ty)                                                         \
      for (int x0 = 0; x0 < cols; x0 += kRun)                                                 \
        xcorr_run_k<KS>(dcc + ty * L.hw_ + x0, zc + ty * L.zw + x0,                           \
                        cols - x0 < kRun ? cols - x0 : kRun, acc);                            \
    MSLORA_UNROLL                                                                             \
    for (int dx = 0; dx < KS; ++dx) dst[dx] = acc[dx];                                        \
  } break;
          MSLORA_DK_CASE(1)
          MSLORA_DK_CASE(3)
          MSLORA_DK_CASE(5)
          MSLORA_DK_CASE(7)
#undef MSLORA_DK_CASE
          default:  // any other odd k: one tap at a time
            for (int dx = 0; dx < k; ++dx) {
              float acc = 0.f;
              for (int ty = 0; ty < rows; ++ty)
                for (int x = 0; x < cols; ++x) acc += dcc[ty * L.hw_ + x] * zc[ty * L.zw + x + dx];
              dst[dx] = acc;
            }
        }
      }
      done += n_dk;
      // gate: dsig_i(pl) += sum_d ds0 * GELU(c_i) over this chunk's channels (from gl)
      if (p.gate) {
        const int nch = p.D - c0 < p.CH ? p.D - c0 : p.CH;
        for (int i = first(done); i < p.nk * P; i += ex.nt) {
          const int path = i / P, pl = i % P;
          if (tile_pixel(p, t, pl) < 0) continue;
          const float* g = sm + L.gl + path * p.CH * L.gplane + pl;
          float acc = 0.f;
          for (int ch = 0; ch < nch; ++ch) acc += g[ch * L.gplane];
          dsig[i] += acc;
        }
      }
    });
  }
  ex.stage([&](int tid) { flush_dk((p.D - 1) / p.CH * p.CH, tid); });  // the last chunk's
  // Under gate: dz += sum_i gate_w[i][d] dg_i (dg_i sums ds0 GELU(c_i) over every channel
  // chunk, so this is a second rounding of dz to T, after the depthwise and pool part's; the
  // reference, too, rounds each of its gradient contributions to z), and the gate partials.
  if (!p.gate) return;
  ex.stage([&](int tid) {
    for (int i = tid; i < P * p.D; i += ex.nt) {
      const int pl = i / p.D, d = i % p.D;
      const int64_t q = tile_pixel(p, t, pl);
      if (q < 0) continue;
      float acc = 0.f;
      for (int path = 0; path < p.nk; ++path) {
        const float sg = sig[path * nh + (pl / p.TW + p.R) * L.hw_ + pl % p.TW + p.R];
        acc += p.gate_w[path * p.D + d] * dsig[path * P + pl] * sg * (1.f - sg);
      }
      ws_store(dzimg, q * p.D + d, ws_load(dzimg, q * p.D + d) + acc);
    }
    // the tile's gate grads: dw_i[d] = sum dg_i z[d], db_i = sum dg_i
    for (int i = tid; i < p.nk * (p.D + 1); i += ex.nt) {
      const int path = i / (p.D + 1), d = i % (p.D + 1);  // d == D: the bias
      float acc = 0.f;
      for (int pl = 0; pl < P; ++pl) {
        const int64_t q = tile_pixel(p, t, pl);
        if (q < 0) continue;
        const float sg = sig[path * nh + (pl / p.TW + p.R) * L.hw_ + pl % p.TW + p.R];
        const float dg = dsig[path * P + pl] * sg * (1.f - sg);
        acc += d < p.D ? dg * ws_load(zimg, q * p.D + d) : dg;
      }
      add_partial(d < p.D ? p.part_gate_w + row * p.nk * p.D + path * p.D + d
                          : p.part_gate_b + row * p.nk + path, acc, first_tile);
    }
  });
}

// bwd_dz (B2), persistent: block `block` of p.dz_blocks runs tiles block, block + dz_blocks, ...
// of all N * tiles/image, in that order, into partial row `block`. Each tile re-stages its own
// halos (bwd_dz_tile's first stages); the only value carried across tiles is the partial row.
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void bwd_dz_body(const Params& p, int block, float* sm, Ex& ex) {
  const int64_t tiles = int64_t(p.N) * tiles_per_image(p);
  for (int64_t tile = block; tile < tiles; tile += p.dz_blocks)
    bwd_dz_tile<T, kNHWC>(p, tile, block, tile == block, sm, ex);
}

// bwd_dx (B3): du = proj^T da + down^T dz (grouped); dx = dout + du, or LN_C backward.
template <typename T, bool kNHWC, class Ex>
MSLORA_HD void bwd_dx_body(const Params& p, int bx, float* sm, Ex& ex) {
  const int64_t npix = int64_t(p.N) * hw(p), pix0 = int64_t(bx) * p.PB;
  // stats [PB][4]: x mean, rstd, m1, m2; du [PB][ldu]
  const int ldu = du_stride(p);
  float *stats = sm, *du = sm + 4 * p.PB, *scratch = sm + pixel_scratch(p, true);
  auto pix = [&](int pl) { return block_pixel(p, pix0, pl); };
  const int cg = p.C / p.G, dg = p.D / p.G;
  const bool tc = use_tc<T>(p);
  const T *da = ws<T>(p.da), *dz = ws<T>(p.dz);
  if (p.prenorm) {
    ex.stage([&](int tid) {  // x's LN_C statistics, from prep
      for (int pl = tid; pl < p.PB; pl += ex.nt) {
        if (pix0 + pl >= npix) continue;
        stats[4 * pl] = p.xstats[2 * (pix0 + pl)];
        stats[4 * pl + 1] = p.xstats[2 * (pix0 + pl) + 1];
      }
    });
  }
  if (!tc) {
    ex.stage([&](int tid) {
      for (int64_t i = tid; i < int64_t(p.PB) * p.C; i += ex.nt) {
        const int pl = int(i / p.C), c = int(i % p.C);
        const int64_t pix = pix0 + pl;
        if (pix >= npix) continue;
        const int g = c / cg, j = c % cg;
        float acc = 0.f;
        for (int ee = 0; ee < dg; ++ee) {
          const int e = g * dg + ee;
          acc += wl<T>(p.proj, int64_t(e) * cg + j) * ws_load(da, pix * p.D + e) +
                 wl<T>(p.down, int64_t(e) * cg + j) * ws_load(dz, pix * p.D + e);
        }
        du[int64_t(pl) * ldu + c] = acc;
      }
    });
  }
  const bool keep = bwd_dx_du(p);  // du into shared memory; else dx = dout + du straight away
                                   // (tc then, as fp32 has p.tc = 0: mslora_launch)
  if constexpr (kTensorCoreType<T>) {
    if (tc) {  // du on tensor cores: A = [da | dz] of the group (K = 2 D/G, exact in T),
               // B = [proj; down]
      tc_grouped_out<T>(
          p, pixel_tc_smem(p, true), sm, p.PB, 2 * dg, !keep && kNHWC, true,
          [&](int r, int g, int k) {
            const int64_t pix = pix0 + r;
            if (pix >= npix) return 0.0f;
            return k < dg ? ws_load(da, pix * p.D + g * dg + k)
                          : ws_load(dz, pix * p.D + g * dg + k - dg);
          },
          [&](int g, int c, int k) {  // proj[e][j] / down[e][j], e = g dg + k, from the transposes
            const int64_t row = int64_t(c - g * cg) * p.D + g * dg;
            return wl<T>(k < dg ? p.proj_t : p.down_t, k < dg ? row + k : row + k - dg);
          },
          [&](int r, int c, float y) {
            if (keep) {
              du[int64_t(r) * ldu + c] = y;
              return;
            }
            const int64_t pix = pix0 + r;
            if (pix >= npix) return;
            const int n = int(pix / hw(p));
            const int64_t q = pix % hw(p);
            store_act<T, kNHWC>(p, p.dx, n, c, q, load_act<T, kNHWC>(p, p.dout, n, c, q) + y);
          },
          ex);
    }
  }
  if (!keep) return;
  if (p.prenorm) {  // m1 = mean_C(du * norm_w), m2 = mean_C(du * norm_w * xhat)
    channel_sums<2, kNHWC>(
        p, p.PB, scratch, pix,
        [&](const RowPix& rp, int pl, int c, float* acc) {
          const float xh =
              (load_act<T, kNHWC>(p, p.x, rp.n, c, rp.q) - stats[4 * pl]) * stats[4 * pl + 1];
          const float g = du[int64_t(pl) * ldu + c] * p.norm_w[c];
          acc[0] += g;
          acc[1] += g * xh;
        },
        [&](int pl, const RowPix&, const float* sums) {
          stats[4 * pl + 2] = sums[0] / p.C;
          stats[4 * pl + 3] = sums[1] / p.C;
        },
        ex);
    ex.stage([&](int tid) {  // norm_b's block partial: du summed over the block's pixels
      for (int c = tid; c < p.C; c += ex.nt) {
        float gb = 0.f;
        for (int pl = 0; pl < p.PB && pix0 + pl < npix; ++pl) gb += du[int64_t(pl) * ldu + c];
        p.part_norm_b[int64_t(bx) * p.C + c] = gb;
      }
    });
  }
  ex.stage([&](int tid) {  // dx; under prenorm du * xhat replaces du, for norm_w's partial
    for (int64_t i = tid; i < int64_t(p.PB) * p.C; i += ex.nt) {
      const int pl = kNHWC ? int(i / p.C) : int(i % p.PB), c = kNHWC ? int(i % p.C) : int(i / p.PB);
      const int64_t pix = pix0 + pl;
      if (pix >= npix) continue;
      const int n = int(pix / hw(p));
      const int64_t q = pix % hw(p);
      float* dup = du + int64_t(pl) * ldu + c;
      float g = *dup;
      if (p.prenorm) {
        const float xh = (load_act<T, kNHWC>(p, p.x, n, c, q) - stats[4 * pl]) * stats[4 * pl + 1];
        if (p.u) ws_store(ws<T>(p.u), pix * p.C + c, xh * p.norm_w[c] + p.norm_b[c]);
        *dup = g * xh;
        g = stats[4 * pl + 1] * (g * p.norm_w[c] - stats[4 * pl + 2] - xh * stats[4 * pl + 3]);
      }
      store_act<T, kNHWC>(p, p.dx, n, c, q, load_act<T, kNHWC>(p, p.dout, n, c, q) + g);
    }
  });
  if (p.prenorm) {  // block partial of norm_w's gradient, sum of du * xhat: from shared memory,
                    // not a third read of x a channel per thread (NCHW: loads H*W apart)
    ex.stage([&](int tid) {
      for (int c = tid; c < p.C; c += ex.nt) {
        float gw = 0.f;
        for (int pl = 0; pl < p.PB && pix0 + pl < npix; ++pl) gw += du[int64_t(pl) * ldu + c];
        p.part_norm_w[int64_t(bx) * p.C + c] = gw;
      }
    });
  }
}

// ------------------------------------------------------ the small kernels around the passes
//
// One launch each where the launcher ran a tensor op per weight or gradient: at the late stages
// of a backbone (7 x 7 maps) the passes above take a few microseconds, about a launch each.

// Blocks of pack along a segment: enough for its longest one.
MSLORA_HD int pack_blocks(const Params& p) {
  int64_t most = 1;
  for (int i = 0; i < p.npack; ++i) {
    const int64_t n = int64_t(p.pack[i].rows) * p.pack[i].cols;
    most = n > most ? n : most;
  }
  return int(cdiv(most, kSmallChunk));
}

// pack (grid (pack_blocks, npack)): segment `seg` of Params::pack, elements [bx, bx + 1) *
// kSmallChunk of it. A transpose writes dst in order (neighbouring threads on neighbouring
// elements) and reads src a row apart: the weights are small and L2-resident.
template <typename T, class Ex>
MSLORA_HD void pack_body(const Params& p, int bx, int seg, Ex& ex) {
  const PackSeg& s = p.pack[seg];
  const int64_t n = int64_t(s.rows) * s.cols, end = (int64_t(bx) + 1) * kSmallChunk;
  ex.stage([&](int tid) {
    for (int64_t i = int64_t(bx) * kSmallChunk + tid; i < n && i < end; i += ex.nt) {
      const T* src = static_cast<const T*>(s.src);
      if (s.widen) {
        static_cast<float*>(s.dst)[i] = to_f32(src[i]);
      } else {  // dst (cols, rows): element i = (j, r) is src's (r, j)
        const int64_t j = i / s.rows, r = i % s.rows;
        static_cast<T*>(s.dst)[i] = src[r * s.cols + j];
      }
    }
  });
}

// bwd_pool (grid N): pool's term of dz for image n (Params::pool_dz), from bwd_tile's per-tile
// sums of ds0 (part_pool), summed in tile order: (sum_HW ds0) GELU'(zmean) / (H W).
template <class Ex>
MSLORA_HD void bwd_pool_body(const Params& p, int n, Ex& ex) {
  const int tiles = tiles_per_image(p);
  ex.stage([&](int tid) {
    for (int d = tid; d < p.D; d += ex.nt) {
      float sum = 0.f;
      for (int t = 0; t < tiles; ++t) sum += p.part_pool[(int64_t(n) * tiles + t) * p.D + d];
      const int64_t i = int64_t(n) * p.D + d;
      p.pool_dz[i] = sum * gelu_grad(p.zmean[i]) / float(hw(p));
    }
  });
}

// Elements of bwd_finish's output: every weight gradient.
MSLORA_HD int64_t grad_total(const Params& p) {
  int64_t n = 0;
  for (int i = 0; i < p.ngrad; ++i) n += p.grad[i].len;
  return n;
}

// bwd_finish (grid cdiv(grad_total, kSmallChunk)): elements [bx, bx + 1) * kSmallChunk of the
// flat weight gradients (Params::grad, gacc, gout), each in fp32 then rounded once to T.
template <typename T, class Ex>
MSLORA_HD void bwd_finish_body(const Params& p, int bx, Ex& ex) {
  const int64_t total = grad_total(p), end = (int64_t(bx) + 1) * kSmallChunk;
  ex.stage([&](int tid) {
    for (int64_t e = int64_t(bx) * kSmallChunk + tid; e < total && e < end; e += ex.nt) {
      int seg = 0;
      int64_t i = e;
      while (i >= p.grad[seg].len) i -= p.grad[seg++].len;
      const GradSeg& s = p.grad[seg];
      float v = 0.f;
      if (s.rows == 0) {
        v = to_f32(static_cast<const T*>(s.src)[i]);
      } else {
        const float* part = static_cast<const float*>(s.src);
        for (int r = 0; r < s.rows; ++r) v += part[int64_t(r) * s.len + i];
      }
      if (p.acc_in) v = p.gacc[e] + v;
      if (p.acc_out) p.gacc[e] = v;
      if (p.gout) static_cast<T*>(p.gout)[e] = from_f32<T>(v);
    }
  });
}

enum Kernel : int {
  kPrep = 0, kFwd = 1, kBwdTile = 2, kBwdDz = 3, kBwdDx = 4, kPack = 5, kBwdPool = 6,
  kBwdFinish = 7
};

// Dynamic shared memory of a kernel, in floats (0: unknown kernel).
inline int64_t smem_floats(int kernel, const Params& p) {
  switch (kernel) {
    case kPrep: return pixel_smem_floats(p, false);
    case kFwd: return tile_smem(p, 2).total;
    case kBwdTile: return tile_smem(p, 4).total;
    case kBwdDz: return dz_smem(p).total;
    case kBwdDx: return pixel_smem_floats(p, true);
    default: return 0;
  }
}

}  // namespace mslora
