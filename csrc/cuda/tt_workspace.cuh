// Host side: the sizes of a batch and the layout of the plan / gradient workspaces.
// Part of the CUDA kernels' one translation unit (included by tt_kernels.cu): internal, not an API.
#pragma once

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <array>
#include <map>

#include "tt_plan_kernels.cuh"

namespace torchrec_tt::cuda {
namespace {

// ---- host side ---------------------------------------------------------------------------------------

int bits_for(unsigned long long max_value) {  // bits to represent 0..max_value
  int b = 1;
  while (b < 64 && (max_value >> b) != 0) ++b;
  return b;
}

int threads_for(int64_t outputs) {
  int64_t t = (outputs + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(t < kWarp ? kWarp : (t > 256 ? 256 : t));
}

// Blocks per digit of child_grad_warp_kernel: about a node per warp if the level's B_k nodes fall
// evenly on its digits (fewer where they do not: the blocks without a node return at once), at most
// kMaxChildSplits (each block stages the digit's slice).
constexpr int64_t kMaxChildSplits = 8;
unsigned child_splits(int64_t level_bound, unsigned digits) {
  const int64_t warps = kWarpBlock / kWarp;
  const int64_t per_digit = (level_bound + digits - 1) / digits;
  const int64_t s = (per_digit + warps - 1) / warps;
  return static_cast<unsigned>(s < 1 ? 1 : (s > kMaxChildSplits ? kMaxChildSplits : s));
}

unsigned grid_for(int64_t items, int64_t per_block) {
  int64_t g = (items + per_block - 1) / per_block;
  g = g < 1 ? 1 : (g > kMaxGrid ? kMaxGrid : g);
  return static_cast<unsigned>(g);
}

// Host-side shape bookkeeping of one batch.
struct Sizes {
  int d = 0;
  int n = 0;
  int64_t D = 0;
  int64_t bound[kMaxCores] = {};  // B_k: upper bound on the nodes of level k
  int64_t node[kMaxCores] = {};   // S_k: fp32 elements per node of level k (m_k * r_{k+1})
  int64_t m[kMaxCores] = {};      // m_k = q_0..q_k
  int64_t max_bound = 0, max_level = 0, max_p = 0, max_core = 0;
  int id_bits = 1;
  GroupLayout group{};  // the (level, digit) sort of all nodes (backward)
  int group_bits = 1;   // key bits of that sort

  Sizes(const TTDims& t, const BatchDesc& b) {
    d = t.d;
    n = static_cast<int>(b.n);
    D = t.embedding_dim;
    int64_t prefix_rows = 1, mk = 1;
    for (int k = 0; k < d; ++k) {
      prefix_rows = prefix_rows > n ? prefix_rows : prefix_rows * t.p[k];  // saturates above n
      bound[k] = prefix_rows < n ? prefix_rows : n;
      mk *= t.q[k];
      m[k] = mk;
      node[k] = mk * t.r[k + 1];
      max_bound = max_bound > bound[k] ? max_bound : bound[k];
      max_level = max_level > bound[k] * node[k] ? max_level : bound[k] * node[k];
      max_p = max_p > t.p[k] ? max_p : t.p[k];
      const int64_t core = t.p[k] * t.r[k] * t.q[k] * t.r[k + 1];
      max_core = max_core > core ? max_core : core;
    }
    id_bits = bits_for(static_cast<unsigned long long>(t.num_embeddings));
    group.d = d;
    group.digit_bits = bits_for(static_cast<unsigned long long>(max_p));
    for (int k = 0; k < d; ++k) {
      group.node_off[k + 1] = group.node_off[k] + bound[k];
      group.seg_off[k + 1] = group.seg_off[k] + t.p[k];
    }
    group_bits = group.digit_bits + bits_for(static_cast<unsigned long long>(d));
  }
  int64_t group_nodes() const { return group.node_off[d]; }
  int64_t group_segs() const { return group.seg_off[d]; }
};

// Bump allocator over the workspace; with base == nullptr it only measures.
struct Carver {
  char* base;
  size_t used = 0;
  explicit Carver(void* b) : base(static_cast<char*>(b)) {}
  template <typename X>
  X* take(int64_t count) {
    used = (used + kAlign - 1) / kAlign * kAlign;
    X* out = base ? reinterpret_cast<X*>(base + used) : nullptr;
    used += static_cast<size_t>(count < 1 ? 1 : count) * sizeof(X);
    return out;
  }
};

// The batch's plan (sorted ids, prefix tree, partial products P_k, bag sizes): built by forward, and
// by backward unless forward's is handed over (plan_ready).
struct PlanWorkspace {
  unsigned long long *keys_in, *keys_out;
  int *pos_in, *pos_out;
  int* incl[kMaxCores];
  int* first[kMaxCores];
  int* digit[kMaxCores];
  int* parent[kMaxCores];
  int* slot;
  int* bag_of;  // each position's bag (-1: in none)
  int* bag_count;
  float* P[kMaxCores];
  // nodes of every level grouped by digit (built by backward)
  unsigned int *gkeys_in, *gkeys_out;
  int *gvals_in, *order;  // order: node numbers, sorted by (level, digit), node order within a digit
  int* seg;               // seg_start = seg, seg_end = seg + group_segs()
  void* temp;
  size_t temp_bytes;
};

// Backward's own buffers.
struct GradWorkspace {
  float *dA, *dB;   // dP_k of two consecutive levels
  float* dchild;    // per level-k node: its share of dP_{k-1}
  float* scratch;
};

// CUB's temp-storage queries run its dispatch logic on the host; the launchers need the same sizes
// several times per call and a table sees the same batch shapes step after step, so the answers are
// memoised per thread (keyed on everything they depend on, the device included).
using TempKey = std::array<int64_t, 3 + 2 * kMaxCores>;
template <typename F>
size_t memoised(TempKey key, F&& query) {
  thread_local std::map<TempKey, size_t> answers;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return query();
  key[0] = device;
  const auto it = answers.find(key);
  if (it != answers.end()) return it->second;
  if (answers.size() >= 4096) answers.clear();
  const size_t bytes = query();
  answers.emplace(key, bytes);
  return bytes;
}

size_t plan_temp_bytes(const Sizes& sz) {
  return memoised(TempKey{0, sz.n, sz.id_bits, sz.group_nodes(), sz.group_bits}, [&] {
    size_t best = 0, bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned long long*>(nullptr),
                                    static_cast<unsigned long long*>(nullptr), static_cast<const int*>(nullptr),
                                    static_cast<int*>(nullptr), sz.n, 0, sz.id_bits);
    best = bytes > best ? bytes : best;
    bytes = 0;
    int* no_levels[kMaxCores] = {};
    scan_levels(nullptr, bytes, Geo{}, nullptr, no_levels, sz.n, nullptr);
    best = bytes > best ? bytes : best;
    bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned int*>(nullptr),
                                    static_cast<unsigned int*>(nullptr), static_cast<const int*>(nullptr),
                                    static_cast<int*>(nullptr), static_cast<int>(sz.group_nodes()), 0, sz.group_bits);
    return bytes > best ? bytes : best;
  });
}

size_t carve_plan(const BatchDesc& b, const Sizes& sz, void* base, PlanWorkspace* ws) {
  PlanWorkspace w{};
  Carver cv(base);
  const int64_t n = sz.n;
  w.keys_in = cv.take<unsigned long long>(n);
  w.keys_out = cv.take<unsigned long long>(n);
  w.pos_in = cv.take<int>(n);
  w.pos_out = cv.take<int>(n);
  for (int k = 0; k < sz.d; ++k) {
    w.incl[k] = cv.take<int>(n);
    w.first[k] = cv.take<int>(sz.bound[k] + 1);
    w.digit[k] = cv.take<int>(sz.bound[k]);
    w.parent[k] = cv.take<int>(sz.bound[k]);
    w.P[k] = cv.take<float>(sz.bound[k] * sz.node[k]);
  }
  w.slot = cv.take<int>(n);
  w.bag_of = cv.take<int>(n);
  w.bag_count = cv.take<int>(b.num_bags);
  w.gkeys_in = cv.take<unsigned int>(sz.group_nodes());
  w.gkeys_out = cv.take<unsigned int>(sz.group_nodes());
  w.gvals_in = cv.take<int>(sz.group_nodes());
  w.order = cv.take<int>(sz.group_nodes());
  w.seg = cv.take<int>(2 * sz.group_segs());
  w.temp_bytes = plan_temp_bytes(sz);
  w.temp = cv.take<char>(static_cast<int64_t>(w.temp_bytes));
  if (ws) *ws = w;
  return cv.used + kAlign;  // slack: the caller's pointer need not be 256-aligned
}

// Whether backward computes level k's (k >= 1) parent gradients dP_{k-1} in one pass
// (parent_grad_kernel: no per-child buffer) rather than by digit, then reduced. One pass wins where
// a child's share is cheap to recompute from an L1-resident slice (nk = q_k r_{k+1} <= 32) and a
// parent has few children (B_k / B_{k-1} from the host bounds; a thread walks its parent's children
// serially, nk multiply-adds each): the last level of a d = 3 table when the batch spreads its ids.
bool fused_parent_grad(const TTDims& t, const Sizes& sz, int k) {
  if (sz.bound[k - 1] <= 0) return false;  // empty batch (the launchers return before any level)
  const int64_t nk = t.q[k] * t.r[k + 1];
  const int64_t fanout = (sz.bound[k] + sz.bound[k - 1] - 1) / sz.bound[k - 1];
  return nk <= 32 && nk * fanout <= 64;
}

size_t carve_grad(const TTDims& t, const Sizes& sz, void* base, GradWorkspace* ws) {
  GradWorkspace w{};
  Carver cv(base);
  int64_t child = 1;  // dchild: max over the levels k >= 1 done by digit of B_k * m_{k-1} * r_k
  for (int k = 1; k < sz.d; ++k) {
    if (fused_parent_grad(t, sz, k)) continue;
    const int64_t c = sz.bound[k] * sz.m[k - 1] * t.r[k];
    child = c > child ? c : child;
  }
  w.dA = cv.take<float>(sz.max_level);
  w.dB = cv.take<float>(sz.max_level);
  w.dchild = cv.take<float>(child);
  w.scratch = cv.take<float>(sz.max_core);
  if (ws) *ws = w;
  return cv.used + kAlign;
}

Geo make_geo(const TTDims& t) {
  Geo g{};
  g.d = t.d;
  g.N = static_cast<unsigned long long>(t.num_embeddings);
  unsigned long long div = 1;
  for (int k = t.d - 1; k >= 0; --k) {
    g.div[k] = div;
    g.p[k] = static_cast<unsigned long long>(t.p[k]);
    div *= static_cast<unsigned long long>(t.p[k]);
  }
  return g;
}

void* align_up(void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<void*>((v + kAlign - 1) / kAlign * kAlign);
}

}  // namespace
}  // namespace torchrec_tt::cuda
