// A CPU emulator of the CUDA features csrc/cuda uses, for testing the kernels on machines without a
// GPU (tests/test_cuda_emulated.py). Not a performance model: it checks indexing, synchronisation and
// determinism. Included (kernels.cpp) in front of csrc/cuda's sources after build.py has rewritten
// their launches (`k<<<g, b, s, st>>>(args)` -> `::emu::launch(...)`), dynamic shared memory
// (`extern __shared__ T x[];` -> `T* x = ::emu::dynamic_smem<T>();`) and static shared memory (a
// poison_once call after each declaration).
//
// Each block runs as blockDim.x fibers (ucontext) on the calling thread, one block after another.
// A fiber runs until it reaches a synchronisation point (__syncthreads, a *_sync warp intrinsic,
// a CUB block collective), so every missing barrier shows up as a wrong result, not as a lucky
// interleaving. EMU_SCHEDULE=reverse / shuffle runs blocks and threads in reverse / random order:
// a kernel whose result depends on the order of blocks, or of threads between barriers, gives
// different answers.
// __shared__ variables are function-local statics (blocks run one at a time); they and dynamic
// shared memory are filled with 0xff bytes (NaN floats, -1 ints) for every block. A deadlock (threads
// waiting at different barriers, a warp intrinsic with exited lanes) or misuse (lanes of a warp at
// different intrinsics, a mask leaving out lanes) stops the launch and is reported by cudaGetLastError
// as cudaErrorLaunchFailure, with a message on stderr. What it cannot see: README.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxDynamicSmem = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize

// Which warp intrinsic an exchange is (all lanes of one exchange must call the same one).
enum class WarpOp : int { kShfl, kShflUp, kShflXor, kBallot, kSyncwarp };

struct WarpState {
  int arrived = 0;
  unsigned gen = 0;
  WarpOp op = WarpOp::kShfl;  // of the exchange under way (set by its first lane)
  uint64_t slot[2][kWarp];    // exchange values, double-buffered by generation parity
};

// What a kernel asked of a block, over all its launches: checked against ptxas' registers and static
// shared memory by tests/test_cuda_emulated.py (the limits a real launch would fail on).
struct LaunchRecord {
  unsigned long long launches = 0;
  unsigned max_threads = 0;
  size_t max_dynamic_smem = 0;
  size_t max_static_smem = 0;  // of the __shared__ declarations reached (ptxas counts them all)
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};

struct Runtime {
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<unsigned char> dyn_smem;
  ucontext_t sched;
  std::function<void()> body;
  int cur = 0;
  int live = 0;
  int bar_arrived = 0;
  unsigned bar_gen = 0;
  int bar_count[2] = {0, 0};   // __syncthreads_count's sums, by generation parity
  int bar_called[2] = {0, 0};  // threads that reached that barrier (not counting exited ones)
  unsigned long progress = 0;
  uint3 tid{0, 0, 0};
  cudaError_t last_error = cudaSuccess;
  const char* violation = nullptr;  // misuse seen during this launch (reported as a launch failure)
  unsigned long long block_serial = 0;
  std::vector<std::pair<const void*, unsigned long long>> poisoned;  // static __shared__: block last poisoned
  const char* kernel = nullptr;                // the launch under way
  std::vector<const void*> static_seen;        // its static __shared__ variables reached so far
  size_t static_smem = 0;                      // their bytes
  std::map<std::string, LaunchRecord> launches;  // every kernel launched since the last clear (launch_log)
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

// EMU_SCHEDULE: the order of blocks, and of threads in each round between synchronisation points:
// "forward" (default), "reverse", or "shuffle" (a new random order every round, seeded by EMU_SEED).
enum class Schedule { kForward, kReverse, kShuffle };
inline Schedule schedule() {
  const char* v = std::getenv("EMU_SCHEDULE");
  if (v != nullptr && std::strcmp(v, "reverse") == 0) return Schedule::kReverse;
  if (v != nullptr && std::strcmp(v, "shuffle") == 0) return Schedule::kShuffle;
  return Schedule::kForward;
}

// 0..n-1 in the schedule's order.
inline void order(std::vector<unsigned>& o, unsigned n, Schedule s, uint64_t& rng) {
  o.resize(n);
  for (unsigned i = 0; i < n; ++i) o[i] = s == Schedule::kReverse ? n - 1 - i : i;
  if (s != Schedule::kShuffle) return;
  for (unsigned i = n; i > 1; --i) {  // Fisher-Yates with a 64-bit LCG
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    std::swap(o[i - 1], o[(rng >> 33) % i]);
  }
}

inline uint64_t seed() {
  const char* v = std::getenv("EMU_SEED");
  return v != nullptr ? std::strtoull(v, nullptr, 10) * 2 + 1 : 0x9e3779b97f4a7c15ull;
}

inline void yield() {
  Runtime& r = rt();
  swapcontext(&r.fibers[r.cur].ctx, &r.sched);
  r.tid.x = static_cast<unsigned>(r.cur);
}

// Block barrier: exited threads count as arrived.
inline void release_barrier_if_complete() {
  Runtime& r = rt();
  if (r.bar_arrived > 0 && r.bar_arrived >= r.live) {
    r.bar_arrived = 0;
    ++r.bar_gen;
    r.bar_count[r.bar_gen & 1] = 0;
    r.bar_called[r.bar_gen & 1] = 0;
  }
}

// Returns the number of threads that passed a non-zero `pred` (__syncthreads_count).
inline int syncthreads(int pred = 0) {
  Runtime& r = rt();
  const unsigned gen = r.bar_gen;
  r.bar_count[gen & 1] += pred != 0;
  ++r.bar_called[gen & 1];
  ++r.bar_arrived;
  ++r.progress;
  release_barrier_if_complete();
  while (r.bar_gen == gen) yield();
  return r.bar_count[gen & 1];
}

inline unsigned lanes_present(int warp) {
  const int n = static_cast<int>(rt().block_dim.x) - warp * kWarp;
  return n >= kWarp ? 0xffffffffu : ((1u << n) - 1u);
}

// Deposits `bits` for this lane and waits for every lane of the warp; returns the generation whose
// slots hold the exchanged values. Only masks naming every lane of the warp are emulated (what
// csrc/cuda uses); a partial mask, or lanes meeting at different intrinsics, is reported as misuse.
inline unsigned warp_exchange(WarpOp op, unsigned mask, uint64_t bits) {
  Runtime& r = rt();
  const int t = r.cur, lane = t % kWarp;
  WarpState& w = r.warps[t / kWarp];
  const unsigned gen = w.gen;
  const unsigned present = lanes_present(t / kWarp);
  if ((mask & present) != present) r.violation = "a warp intrinsic with a mask that leaves out lanes of the warp";
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    r.violation = "lanes of one warp met at different warp intrinsics";
  }
  const int expected = __builtin_popcount(present);
  w.slot[gen & 1][lane] = bits;
  ++r.progress;
  if (++w.arrived >= expected) {
    w.arrived = 0;
    ++w.gen;
  }
  while (w.gen == gen) yield();
  return gen;
}

template <typename V>
inline uint64_t to_bits(V v) {
  static_assert(sizeof(V) <= 8, "warp exchange of a value wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(V));
  return b;
}

template <typename V>
inline V shuffle_from(unsigned gen, int src, V own) {
  Runtime& r = rt();
  if (src < 0) return own;
  if (((lanes_present(r.cur / kWarp) >> src) & 1u) == 0) r.violation = "a shuffle from a lane the block does not have";
  V v;
  std::memcpy(&v, &r.warps[r.cur / kWarp].slot[gen & 1][src], sizeof(V));
  return v;
}

// Fills a static __shared__ variable with 0xff bytes the first time a block reaches its declaration
// (build.py adds the call), so a read before the block wrote it does not see the last block's data.
inline void poison_once(const void* p, size_t n) {
  Runtime& r = rt();
  if (std::find(r.static_seen.begin(), r.static_seen.end(), p) == r.static_seen.end()) {
    r.static_seen.push_back(p);  // a block's static + dynamic shared memory must fit the 48 KiB (no opt-in)
    r.static_smem += n;
    if (r.static_smem + r.dyn_smem.size() > kMaxDynamicSmem && r.violation == nullptr)
      r.violation = "static + dynamic shared memory over 48 KiB";
  }
  for (auto& e : r.poisoned) {
    if (e.first != p) continue;
    if (e.second != r.block_serial) {
      e.second = r.block_serial;
      std::memset(const_cast<void*>(p), 0xff, n);
    }
    return;
  }
  r.poisoned.emplace_back(p, r.block_serial);
  std::memset(const_cast<void*>(p), 0xff, n);
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(rt().dyn_smem.data());
}

inline void fiber_main() {
  Runtime& r = rt();
  r.tid.x = static_cast<unsigned>(r.cur);
  r.body();
  r.fibers[r.cur].done = true;
  --r.live;
  ++r.progress;
  release_barrier_if_complete();
}  // returns to r.sched (uc_link)

struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  LaunchCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

inline void fail(cudaError_t e, const char* kernel, const char* why) {
  std::fprintf(stderr, "emu: launch of %s failed: %s\n", kernel, why);
  rt().last_error = e;
}

// Runs every block of a launch on this thread; body() is one thread's kernel call.
inline void run_grid(const LaunchCfg& c, const char* kernel, std::function<void()> body) {
  Runtime& r = rt();
  if (r.last_error != cudaSuccess) return;  // a failed launch poisons the stream, as on a device
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  if (c.block.y != 1 || c.block.z != 1 || c.grid.y != 1 || c.grid.z != 1)
    return fail(cudaErrorInvalidConfiguration, kernel, "the emulator runs 1-D launches only");
  if (threads == 0 || threads > 1024 || c.grid.x == 0)
    return fail(cudaErrorInvalidConfiguration, kernel, "block of 0 or > 1024 threads, or empty grid");
  if (c.smem > kMaxDynamicSmem) return fail(cudaErrorInvalidValue, kernel, "dynamic shared memory over 48 KiB");
  r.violation = nullptr;  // (the last launch may have left one: it stopped at the first report)
  r.kernel = kernel;
  r.static_seen.clear();
  r.static_smem = 0;
  r.block_dim = c.block;
  r.grid_dim = c.grid;
  r.body = std::move(body);
  r.fibers.resize(threads);
  for (auto& f : r.fibers)
    if (f.stack.size() < kStackBytes) f.stack.resize(kStackBytes);
  r.warps.assign((threads + kWarp - 1) / kWarp, WarpState{});
  const Schedule sched = schedule();
  uint64_t rng = seed();
  std::vector<unsigned> blocks, turn;
  order(blocks, c.grid.x, sched, rng);
  for (const unsigned b : blocks) {
    r.block_idx = uint3{b, 0, 0};
    ++r.block_serial;
    r.dyn_smem.assign(c.smem, 0xff);
    r.live = static_cast<int>(threads);
    r.bar_arrived = 0;
    r.bar_count[0] = r.bar_count[1] = 0;
    r.bar_called[0] = r.bar_called[1] = 0;
    for (auto& w : r.warps) w.arrived = 0;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = r.fibers[t];
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &r.sched;
      makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
      const unsigned long before = r.progress;
      bool any = false;
      order(turn, threads, sched, rng);
      for (const unsigned t : turn) {
        if (r.fibers[t].done) continue;
        any = true;
        r.cur = static_cast<int>(t);
        swapcontext(&r.sched, &r.fibers[t].ctx);
      }
      if (!any) break;
      if (r.progress == before) {
        char why[160];
        std::snprintf(why, sizeof why, "deadlock in block %u: %d of %u threads wait at barriers that never open",
                      b, r.live, threads);
        return fail(cudaErrorLaunchFailure, kernel, why);
      }
    }
    if (r.violation != nullptr) return fail(cudaErrorLaunchFailure, kernel, r.violation);  // (cleared at launch)
  }
  LaunchRecord& rec = r.launches[kernel];
  ++rec.launches;
  rec.max_threads = std::max(rec.max_threads, threads);
  rec.max_dynamic_smem = std::max(rec.max_dynamic_smem, c.smem);
  rec.max_static_smem = std::max(rec.max_static_smem, r.static_smem);
}

template <typename... P, typename... A>
void launch(const LaunchCfg& c, const char* name, void (*kernel)(P...), A&&... args) {
  std::tuple<P...> params(std::forward<A>(args)...);  // converted to the parameter types, as a launch does
  run_grid(c, name, [kernel, &params] {
    auto mine = params;  // each thread its own copy of the parameters
    std::apply(kernel, mine);
  });
}

}  // namespace emu

#define threadIdx (::emu::rt().tid)
#define blockIdx (::emu::rt().block_idx)
#define blockDim (::emu::rt().block_dim)
#define gridDim (::emu::rt().grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }
inline int __syncthreads_count(int pred) { return ::emu::syncthreads(pred); }
inline int __syncthreads_or(int pred) { return ::emu::syncthreads(pred) > 0; }
inline int __syncthreads_and(int pred) {
  const unsigned gen = ::emu::rt().bar_gen;
  const int count = ::emu::syncthreads(pred);
  return count == ::emu::rt().bar_called[gen & 1];
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::warp_exchange(::emu::WarpOp::kSyncwarp, mask, 0); }
inline void __threadfence() {}

template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  const int lane = ::emu::rt().cur % 32;
  const unsigned g = ::emu::warp_exchange(::emu::WarpOp::kShfl, mask, ::emu::to_bits(v));
  return ::emu::shuffle_from<V>(g, (lane & ~(width - 1)) + (src & (width - 1)), v);
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  const int lane = ::emu::rt().cur % 32;
  const unsigned g = ::emu::warp_exchange(::emu::WarpOp::kShflUp, mask, ::emu::to_bits(v));
  const int src = lane - static_cast<int>(delta);
  return ::emu::shuffle_from<V>(g, src < (lane & ~(width - 1)) ? -1 : src, v);
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  const int lane = ::emu::rt().cur % 32;
  const unsigned g = ::emu::warp_exchange(::emu::WarpOp::kShflXor, mask, ::emu::to_bits(v));
  const int src = lane ^ lane_mask;
  return ::emu::shuffle_from<V>(g, src >= (lane & ~(width - 1)) + width ? -1 : src, v);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const int warp = ::emu::rt().cur / 32;
  const unsigned g = ::emu::warp_exchange(::emu::WarpOp::kBallot, mask, pred ? 1 : 0);
  unsigned out = 0;
  const unsigned present = mask & ::emu::lanes_present(warp);
  for (int l = 0; l < 32; ++l)
    if (((present >> l) & 1u) && ::emu::rt().warps[warp].slot[g & 1][l]) out |= 1u << l;
  return out;
}

// Fibers switch only at synchronisation points, so read-modify-writes are atomic as they stand.
template <typename T, typename V>
inline T atomicAdd(T* p, V v) {
  const T old = *p;
  *p = old + static_cast<T>(v);
  return old;
}
template <typename T, typename V>
inline T atomicMin(T* p, V v) {
  const T old = *p;
  if (static_cast<T>(v) < old) *p = static_cast<T>(v);
  return old;
}
template <typename T, typename V>
inline T atomicMax(T* p, V v) {
  const T old = *p;
  if (static_cast<T>(v) > old) *p = static_cast<T>(v);
  return old;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// CUDA's device-side min / max overloads.
#define EMU_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long)
EMU_MINMAX(unsigned long)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
EMU_MINMAX(float)
EMU_MINMAX(double)
#undef EMU_MINMAX

extern "C" inline cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t e = ::emu::rt().last_error;
  ::emu::rt().last_error = cudaSuccess;
  return e;
}
extern "C" inline cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

#include "emu_cub.h"
