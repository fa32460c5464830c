// Params from the Python launcher's two dicts (sizes/options/tiling ints, and pointers as
// ints); a key that is absent is 0. Shared by the binding and the host test harness.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
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
  p.part_enorm_w = F("part_enorm_w"); p.part_enorm_b = F("part_enorm_b");
  p.part_pool = F("part_pool"); p.part_dw = F("part_dw"); p.part_gate_w = F("part_gate_w");
  p.part_gate_b = F("part_gate_b"); p.part_norm_w = F("part_norm_w");
  p.part_norm_b = F("part_norm_b");
  p.dz_blocks = I("dz_blocks");
  return p;
}

// Grid of a kernel: (x, y).
inline std::pair<int64_t, int64_t> grid_of(int kernel, const Params& p) {
  if (kernel == kPrep || kernel == kBwdDx) return {cdiv(int64_t(p.N) * p.H * p.W, p.PB), 1};
  if (kernel == kBwdDz) return {p.dz_blocks, 1};  // persistent: each block a run of tiles
  return {tiles_per_image(p), p.N};
}

inline int kernel_id(const std::string& name) {
  if (name == "prep") return kPrep;
  if (name == "fwd") return kFwd;
  if (name == "bwd_tile") return kBwdTile;
  if (name == "bwd_dz") return kBwdDz;
  if (name == "bwd_dx") return kBwdDx;
  return -1;
}

}  // namespace mslora
