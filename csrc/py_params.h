// Params from the Python launcher's two dicts (sizes/options/tiling ints, and pointers as
// ints); a key that is absent is 0. Shared by the binding and the host test harness.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mslora.cuh"

namespace mslora {

inline Params params_from_dicts(const pybind11::dict& ints, const pybind11::dict& ptrs) {
  auto I = [&](const char* k) { return ints.contains(k) ? ints[k].cast<int>() : 0; };
  auto P = [&](const char* k) -> void* {
    return ptrs.contains(k) ? reinterpret_cast<void*>(ptrs[k].cast<std::uintptr_t>()) : nullptr;
  };
  auto F = [&](const char* k) { return static_cast<float*>(P(k)); };
  Params p{};
  p.N = I("N"); p.C = I("C"); p.H = I("H"); p.W = I("W"); p.D = I("D"); p.G = I("G");
  const auto ks = ints.contains("ks") ? ints["ks"].cast<std::vector<int>>() : std::vector<int>{};
  p.nk = int(ks.size()) < kMaxPaths ? int(ks.size()) : kMaxPaths;
  p.R = 0;
  for (int i = 0; i < p.nk; ++i) {
    p.ks[i] = ks[i];
    p.R = ks[i] / 2 > p.R ? ks[i] / 2 : p.R;
  }
  p.prenorm = I("prenorm"); p.enhance = I("enhance"); p.pool = I("pool"); p.gate = I("gate");
  p.shuffle = I("shuffle");
  p.TH = I("TH"); p.TW = I("TW"); p.CH = I("CH"); p.PB = I("PB"); p.tc = I("tc");
  p.x = P("x"); p.out = P("out"); p.dout = P("dout"); p.dx = P("dx");
  p.proj = P("proj"); p.down = P("down"); p.dw = F("dw"); p.pw = P("pw"); p.up = P("up");
  p.norm_w = F("norm_w"); p.norm_b = F("norm_b"); p.enorm_w = F("enorm_w");
  p.enorm_b = F("enorm_b"); p.gate_w = F("gate_w"); p.gate_b = F("gate_b");
  p.proj_t = P("proj_t"); p.down_t = P("down_t"); p.pw_t = P("pw_t"); p.up_t = P("up_t");
  p.zmean = F("zmean"); p.pool_dz = F("pool_dz"); p.xstats = F("xstats");
  p.gsig = F("gsig");
  p.z = F("z"); p.ds0 = F("ds0");  // the fp32 workspaces; the others of type T (ws<T>)
  p.s = P("s"); p.mp = P("mp"); p.dt = P("dt"); p.da = P("da"); p.dz = P("dz");
  p.u = P("u"); p.z_lowp = I("z_lowp");
  p.part_enorm_w = F("part_enorm_w"); p.part_enorm_b = F("part_enorm_b");
  p.part_pool = F("part_pool"); p.part_dw = F("part_dw"); p.part_gate_w = F("part_gate_w");
  p.part_gate_b = F("part_gate_b"); p.part_norm_w = F("part_norm_w");
  p.part_norm_b = F("part_norm_b");
  p.dz_blocks = I("dz_blocks");
  // the small kernels' segment tables: lists of tuples of ints (pointers as ints)
  auto table = [&](const char* k) {
    return ptrs.contains(k) ? ptrs[k].cast<std::vector<std::vector<int64_t>>>()
                            : std::vector<std::vector<int64_t>>{};
  };
  auto ptr = [](int64_t v) { return reinterpret_cast<void*>(static_cast<std::uintptr_t>(v)); };
  const auto pack = table("pack"), grads = table("grads");
  if (pack.size() > size_t(kMaxPack) || grads.size() > size_t(kMaxGrads))
    throw std::invalid_argument("mslora: too many pack or gradient segments");
  p.npack = int(pack.size());
  for (int i = 0; i < p.npack; ++i) {  // (src, dst, rows, cols, widen)
    if (pack[i].size() != 5) throw std::invalid_argument("mslora: a pack segment has 5 ints");
    p.pack[i] = PackSeg{ptr(pack[i][0]), ptr(pack[i][1]), int(pack[i][2]), int(pack[i][3]),
                        int(pack[i][4])};
  }
  p.ngrad = int(grads.size());
  for (int i = 0; i < p.ngrad; ++i) {  // (src, len, rows)
    if (grads[i].size() != 3) throw std::invalid_argument("mslora: a gradient segment has 3 ints");
    p.grad[i] = GradSeg{ptr(grads[i][0]), grads[i][1], int(grads[i][2])};
  }
  p.gacc = F("gacc"); p.gout = P("gout"); p.acc_in = I("acc_in"); p.acc_out = I("acc_out");
  return p;
}

// Grid of a kernel: (x, y).
inline std::pair<int64_t, int64_t> grid_of(int kernel, const Params& p) {
  if (kernel == kPrep || kernel == kBwdDx) return {cdiv(int64_t(p.N) * p.H * p.W, p.PB), 1};
  if (kernel == kBwdDz) return {p.dz_blocks, 1};  // persistent: each block a run of tiles
  if (kernel == kPack) return {pack_blocks(p), p.npack};
  if (kernel == kBwdPool) return {p.N, 1};
  if (kernel == kBwdFinish) return {cdiv(grad_total(p), kSmallChunk), 1};
  return {tiles_per_image(p), p.N};
}

inline int kernel_id(const std::string& name) {
  if (name == "prep") return kPrep;
  if (name == "fwd") return kFwd;
  if (name == "bwd_tile") return kBwdTile;
  if (name == "bwd_dz") return kBwdDz;
  if (name == "bwd_dx") return kBwdDx;
  if (name == "pack") return kPack;
  if (name == "bwd_pool") return kBwdPool;
  if (name == "bwd_finish") return kBwdFinish;
  return -1;
}

}  // namespace mslora
