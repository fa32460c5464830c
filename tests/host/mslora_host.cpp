// Host (CPU) build of the MSLoRA kernel bodies of csrc/mslora.cuh, for tests only. Every dtype
// of the device build: fp32, and fp16 / bf16 through the bit-faithful stand-ins of lowp_host.h.
// Two executors, chosen by set_schedule():
//   serial (the default): each block of the grid runs its stages one after another, each stage
//     for tid = 0 .. nt-1 in turn, which is what __syncthreads() between stages guarantees on
//     the GPU. Fast, but one copy of the body's locals serves every thread.
//   threads (a seed >= 0): each of the block's nt threads is a fiber with its own stack that
//     runs the WHOLE body, as a GPU thread does: its own copy of every local, the code between
//     stages run nt times, and each stage ends in a barrier that every fiber must reach
//     (a divergent barrier is an error). Between barriers the fibers run in an order set by the
//     seed (0: ascending tids, 1: descending, other: a shuffle per stage), and the blocks too
//     (0: ascending, else descending). A result that depends on that order is a race on the
//     GPU (two threads of a stage touching the same element, one writing), and a local that one
//     thread writes and another reads is wrong on the GPU: both show up against the serial run
//     and the reference.
// Exposes the same mslora_launch / mslora_smem_bytes as the real binding
// (tests/test_cuda_host.py), plus the storage conversions themselves (to_storage / from_storage)
// so that the tests can hold them against torch's casts.
// The kernels' host-only precondition checks (MSLORA_HOST_EXPECT, csrc/common.cuh) are on.
#define MSLORA_HOST_BUILD 1
#include "lowp_host.h"  // first: the kernels' to_f32 / from_f32 must see its overloads

#include <pybind11/pybind11.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "py_params.h"

namespace py = pybind11;
using namespace mslora;

// (dtype code, host storage type): every host instantiation comes from this one list, as
// csrc/mslora.cu's MSLORA_FOR_EACH_DTYPE_LAYOUT does for the device (__half -> host_half,
// __nv_bfloat16 -> host_bfloat16).
#define MSLORA_HOST_FOR_EACH_DTYPE(X) \
  X(kFloat32, float)                  \
  X(kFloat16, host_half)              \
  X(kBFloat16, host_bfloat16)

// f(T{}) for the storage type T of dtype code `dtype`.
template <class F>
static void with_dtype(int dtype, F&& f) {
#define MSLORA_HOST_DISPATCH(CODE, TYPE) \
  if (dtype == CODE) return f(TYPE{});
  MSLORA_HOST_FOR_EACH_DTYPE(MSLORA_HOST_DISPATCH)
#undef MSLORA_HOST_DISPATCH
  throw std::invalid_argument("host build: unknown dtype code " + std::to_string(dtype));
}

// The first device precondition (MSLORA_HOST_EXPECT) a launch broke, "" when none: the launch
// runs to its end, as a GPU kernel would, and then fails with it (a throw inside the threads
// executor's fibers could not unwind).
static std::string g_fault;

void mslora::host_precondition_failed(const char* what) {
  if (g_fault.empty()) g_fault = what;
}

// One block's dynamic shared memory: exactly `floats` floats, 128-byte aligned as the device's
// `extern __shared__ __align__(128)` array is (so the alignment preconditions are checked
// against real addresses), and a heap block of its own, so that an address sanitizer build
// sees any access past its end. Filled with NaN: any read of a value no stage wrote shows up
// in the result.
struct SharedMem {
  std::unique_ptr<float, decltype(&std::free)> mem{nullptr, &std::free};

  explicit SharedMem(int64_t floats) {
    void* m = nullptr;
    const size_t bytes = size_t(std::max<int64_t>(floats, 1)) * sizeof(float);
    if (posix_memalign(&m, 128, bytes) != 0)
      throw std::runtime_error("host build: cannot allocate shared memory");
    mem.reset(static_cast<float*>(m));
    std::fill_n(mem.get(), bytes / sizeof(float), __builtin_nanf(""));
  }
  float* data() { return mem.get(); }
};

struct HostEx {
  int nt;
  template <class F>
  void stage(F&& f) {
    for (int tid = 0; tid < nt; ++tid) f(tid);
  }
};

// ---------------------------------------------------------------- the threads executor

// nt fibers, each a GPU thread of one block (see the file comment). One pool, reused for every
// block: stacks of kStack bytes each below a PROT_NONE guard page (an overflow faults instead
// of corrupting a neighbour).
class FiberBlock {
 public:
  static constexpr size_t kStack = 256 * 1024, kGuard = 4096;

  explicit FiberBlock(int nt) : nt_(nt), ctx_(nt), stages_(nt), done_(nt) {
    bytes_ = size_t(nt) * (kStack + kGuard);
    void* m = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("host build: cannot map the fiber stacks");
    mem_ = static_cast<char*>(m);
    for (int t = 0; t < nt; ++t) mprotect(mem_ + size_t(t) * (kStack + kGuard), kGuard, PROT_NONE);
  }
  ~FiberBlock() { munmap(mem_, bytes_); }
  FiberBlock(const FiberBlock&) = delete;
  FiberBlock& operator=(const FiberBlock&) = delete;

  // Runs body(tid) as nt fibers to completion; between two barriers the fibers run in the order
  // order(round) gives (a permutation of 0 .. nt-1). Throws when the fibers do not all reach
  // the same barriers.
  void run(const std::function<void(int)>& body,
           const std::function<std::vector<int>(int)>& order) {
    body_ = &body;
    current_ = this;  // what entry() reads when a fiber starts
    for (int t = 0; t < nt_; ++t) {
      getcontext(&ctx_[t]);
      ctx_[t].uc_stack.ss_sp = mem_ + size_t(t) * (kStack + kGuard) + kGuard;
      ctx_[t].uc_stack.ss_size = kStack;
      ctx_[t].uc_link = &sched_;
      makecontext(&ctx_[t], reinterpret_cast<void (*)()>(&FiberBlock::entry), 1, t);
      stages_[t] = 0;
      done_[t] = 0;
    }
    for (int round = 0;; ++round) {
      const std::vector<int> ord = order(round);
      for (int t : ord)
        swapcontext(&sched_, &ctx_[t]);  // back at its next barrier, or when its body returns
      const int finished = std::accumulate(done_.begin(), done_.end(), 0);
      if (finished == nt_) return;
      if (finished != 0 || std::count(stages_.begin(), stages_.end(), round + 1) != nt_)
        throw std::runtime_error(
            "host build: divergent barrier: after barrier " + std::to_string(round) + ", " +
            std::to_string(finished) + " of " + std::to_string(nt_) +
            " threads returned and the others wait at a stage's end (the GPU's __syncthreads() "
            "would hang or be undefined)");
    }
  }

  // A stage's end, from fiber tid: wait until every fiber gets here (back to the scheduler).
  void barrier(int tid) {
    ++stages_[tid];
    swapcontext(&ctx_[tid], &sched_);
  }

 private:
  static void entry(int tid) {
    FiberBlock* self = current_;
    (*self->body_)(tid);
    self->done_[tid] = 1;
  }  // returns to uc_link: the scheduler

  static inline FiberBlock* current_ = nullptr;
  int nt_;
  std::vector<ucontext_t> ctx_;
  ucontext_t sched_{};
  std::vector<int> stages_, done_;
  const std::function<void(int)>* body_ = nullptr;
  char* mem_ = nullptr;
  size_t bytes_ = 0;
};

// The executor a fiber's body sees: a stage runs for this thread only, then waits at the barrier.
struct FiberEx {
  int nt;
  int tid;
  FiberBlock* block;
  template <class F>
  void stage(F&& f) {
    f(tid);
    block->barrier(tid);
  }
};

// The order of the fibers between the barriers `round` and `round + 1` for schedule `seed`.
static std::vector<int> fiber_order(int nt, int64_t seed, int round) {
  std::vector<int> v(nt);
  std::iota(v.begin(), v.end(), 0);
  if (seed == 1) std::reverse(v.begin(), v.end());
  if (seed >= 2) {
    std::mt19937_64 rng(uint64_t(seed) * 1000003u + uint64_t(round));
    std::shuffle(v.begin(), v.end(), rng);
  }
  return v;
}

// Threads per block: the device's kThreads (csrc/mslora.cu).
constexpr int kHostThreads = 256;
// < 0: the serial executor; >= 0: the threads executor with this schedule seed.
static int64_t g_schedule = -1;

// The one fiber pool, made at the first threads-executor block and reused by every later one.
static FiberBlock& fiber_pool() {
  static FiberBlock fibers(kHostThreads);
  return fibers;
}

// Runs body(ex) for one block with the chosen executor (ex: HostEx, or each fiber's FiberEx).
template <class Body>
static void run_with_executor(Body&& body) {
  if (g_schedule < 0) {
    HostEx ex{kHostThreads};
    body(ex);
    return;
  }
  FiberBlock& fibers = fiber_pool();
  fibers.run(
      [&](int tid) {
        FiberEx ex{kHostThreads, tid, &fibers};
        body(ex);
      },
      [](int round) { return fiber_order(kHostThreads, g_schedule, round); });
}

// ---------------------------------------------------------------- launch

template <typename T, bool kNHWC, class Ex>
static void run_block(int k, const Params& p, int x, int y, float* sm, Ex& ex) {
  switch (k) {
    case kPrep: prep_body<T, kNHWC>(p, x, sm, ex); break;
    case kFwd: fwd_body<T, kNHWC>(p, x, y, sm, ex); break;
    case kBwdTile: bwd_tile_body<T, kNHWC>(p, x, y, sm, ex); break;
    case kBwdDz: bwd_dz_body<T, kNHWC>(p, x, sm, ex); break;
    case kBwdDx: bwd_dx_body<T, kNHWC>(p, x, sm, ex); break;
    case kPack: pack_body<T>(p, x, y, ex); break;
    case kBwdPool: bwd_pool_body(p, x, ex); break;
    case kBwdFinish: bwd_finish_body<T>(p, x, ex); break;
  }
}

static int launch(const std::string& kernel, int dtype, bool nhwc, py::dict ints, py::dict ptrs,
                  std::uintptr_t) {
  const int k = kernel_id(kernel);
  if (k < 0) throw std::invalid_argument("unknown kernel " + kernel);
  const Params p = params_from_dicts(ints, ptrs);
  if (dtype == kFloat32 && p.tc)  // as mslora_launch refuses it
    throw std::invalid_argument("host build: tc set for fp32");
  const auto g = grid_of(k, p);
  // The device's grid limits, so that a launcher that would exceed them fails here too.
  if (g.first < 1 || g.first > 2147483647 || g.second < 1 || g.second > 65535)
    throw std::invalid_argument("host build: grid (" + std::to_string(g.first) + ", " +
                                std::to_string(g.second) + ") outside CUDA's limits");
  const bool reversed = g_schedule > 0;  // the threads executor's blocks: see the file comment
  g_fault.clear();
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t iy = 0; iy < g.second; ++iy) {
      for (int64_t ix = 0; ix < g.first; ++ix) {
        const int64_t by = reversed ? g.second - 1 - iy : iy;
        const int64_t bx = reversed ? g.first - 1 - ix : ix;
        SharedMem sm(smem_floats(k, p));
        run_with_executor([&](auto& ex) {
          if (nhwc) run_block<T, true>(k, p, int(bx), int(by), sm.data(), ex);
          else run_block<T, false>(k, p, int(bx), int(by), sm.data(), ex);
        });
      }
    }
  });
  if (!g_fault.empty())
    throw std::runtime_error("host build: kernel " + kernel + " broke a device precondition: " +
                             g_fault);
  return 0;
}

// The precondition checks on their own, for the tests: "mma" runs block_mma on one 16x16x16
// fp16 tile with every operand `offset` bytes past a 128-byte boundary; "vec" one 16-byte
// load_ws_vec of 8 fp16 values `offset` bytes past one. Returns the precondition broken, "" if
// none.
static std::string check_preconditions(const std::string& which, int offset) {
  if (which != "mma" && which != "vec") throw std::invalid_argument("unknown check " + which);
  g_fault.clear();
  SharedMem buf(4 * 1024);
  char* base = reinterpret_cast<char*>(buf.data()) + offset;
  if (which == "mma") {
    const host_half* a = reinterpret_cast<const host_half*>(base);
    const host_half* b = reinterpret_cast<const host_half*>(base + 1024);
    float* out = reinterpret_cast<float*>(base + 2048);
    std::fill_n(buf.data(), 768, 0.0f);  // a and b: zeros in either storage type
    block_mma<host_half>(MmaArgs<host_half>{a, nullptr, 16, b, 16, out, 16, 16, 16, 16, 1,
                                            false}, 0, 32);
  } else {
    std::fill_n(buf.data(), 16, 0.0f);
    float v[8];
    load_ws_vec<8>(reinterpret_cast<const host_half*>(base), v);
  }
  return g_fault;
}

// Writes the float just past a block's shared memory of `floats` floats: an address sanitizer
// build must report it (the test that its run would see a kernel do the same).
static void shared_overflow(int64_t floats) {
  SharedMem sm(floats);
  volatile float* p = sm.data();
  p[floats] = 1.0f;
}

// ------------------------------------------- toy bodies: what the threads executor must catch

// Runs one of three deliberately wrong block bodies (and their right twins) under the executor
// chosen by set_schedule, so that the tests can show the threads executor catches each class of
// defect the serial one hides. Returns the per-thread results (nt floats).
//   "shared_local" / "shared_local_ok": a body-scope local written by thread 0 in one stage and
//     read by every thread in the next (wrong: on the GPU it is thread 0's own register) / the
//     value passed through shared memory instead.
//   "race" / "race_ok": each thread reads its neighbour's shared-memory slot in the same stage
//     that the neighbour writes it / in the next stage.
//   "divergent": thread 0 skips the second stage's barrier.
static int tid_of(const HostEx&) { return -1; }  // the serial executor: every thread at once
static int tid_of(const FiberEx& ex) { return ex.tid; }

static std::vector<float> toy(const std::string& which) {
  if (which != "shared_local" && which != "shared_local_ok" && which != "race" &&
      which != "race_ok" && which != "divergent")
    throw std::invalid_argument("unknown toy body " + which);
  const int nt = kHostThreads;
  std::vector<float> out(nt, __builtin_nanf("")), smv(nt, __builtin_nanf(""));
  float* sm = smv.data();
  run_with_executor([&](auto& ex) {
    const int my_tid = tid_of(ex);
    if (which == "shared_local" || which == "shared_local_ok") {
      float v = -1.0f;
      ex.stage([&](int tid) {
        if (tid == 0) {
          v = 42.0f;
          sm[0] = 42.0f;
        }
      });
      const bool ok = which == "shared_local_ok";
      ex.stage([&](int tid) { out[tid] = ok ? sm[0] + float(tid) : v + float(tid); });
    } else if (which == "race" || which == "race_ok") {
      ex.stage([&](int tid) {
        sm[tid] = float(tid);
        if (which == "race") out[tid] = sm[(tid + 1) % nt];
      });
      ex.stage([&](int tid) {
        if (which == "race_ok") out[tid] = sm[(tid + 1) % nt];
      });
    } else if (which == "divergent") {
      ex.stage([&](int tid) { out[tid] = float(tid); });
      if (my_tid != 0) ex.stage([&](int) {});
    }
  });
  return out;
}

// dst[i] = from_f32<T>(src[i]) for n floats at src into n T at dst (the kernels' store).
static void to_storage(int dtype, std::uintptr_t src, std::uintptr_t dst, int64_t n) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const float* s = reinterpret_cast<const float*>(src);
    T* d = reinterpret_cast<T*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = from_f32<T>(s[i]);
  });
}

// dst[i] = to_f32(src[i]) for n T at src into n floats at dst (the kernels' load).
static void from_storage(int dtype, std::uintptr_t src, std::uintptr_t dst, int64_t n) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* s = reinterpret_cast<const T*>(src);
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = to_f32(s[i]);
  });
}

// A signed int overflow (undefined behaviour): an undefined behaviour sanitizer build must stop
// at it, as it would at an overflowing index in a kernel. Returns a + b otherwise.
static int add_ints(int a, int b) {
  volatile int x = a;
  return x + b;
}

PYBIND11_MODULE(mslora_host, m) {
  m.def("mslora_launch", &launch);
  m.def("set_schedule", [](int64_t seed) { g_schedule = seed; },
        "< 0: the serial executor (default); >= 0: the threads executor with this seed");
  m.def("toy", &toy);
  m.def("mslora_smem_bytes", [](const std::string& kernel, py::dict ints) {
    return int64_t(sizeof(float)) * smem_floats(kernel_id(kernel), params_from_dicts(ints, py::dict()));
  });
  m.def("check_preconditions", &check_preconditions);
  m.def("shared_overflow", &shared_overflow);
  m.def("add_ints", &add_ints);
  m.def("to_storage", &to_storage);
  m.def("from_storage", &from_storage);
}
