// Building blocks of the CPU kernels (tt_embedding_bag_cpu.cpp): per-thread scratch, a
// load-balanced parallel loop, and the partial products of the prefix tree's levels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../tt_checks.h"
#include "../tt_plan_store.h"
#include "tt_gemm.h"
#include "tt_plan.h"

namespace torchrec_tt::cpu {

constexpr int64_t kNodeGrain = 8;   // prefix-tree nodes: a small product each
constexpr int64_t kRowGrain = 64;   // row gradients: a few sums each; fewer turns of the shared counter
constexpr int64_t kBagGrain = 64;
constexpr int64_t kFusedFanOut = 32;  // parents with up to this many children sum their own gradient,
constexpr int64_t kFanOutShare = 8;   // ... or with up to 1/8 of the level's children
constexpr int64_t kPrefetchAhead = 16;  // scattered cache rows are prefetched this many ids ahead

// Scratch buffers reused across calls on the calling thread (worker threads only see pointers).
// Fresh multi-MB vectors every step cost page faults, since glibc hands large blocks back to the
// OS on free: that was half of the step time at the benchmark configuration. Contents are stale:
// every user initialises what it reads.
enum ScratchSlot : size_t { kRowGrad = 0, kPrevGrad, kChildGrad, kCoreT, kCachedRows, kFirstLevel };

template <typename T>
inline T* scratch(size_t slot, size_t numel) {
  thread_local std::vector<std::vector<T>> pool;
  if (pool.size() <= slot) pool.resize(slot + 1);
  if (pool[slot].size() < numel) pool[slot].resize(numel);
  return pool[slot].data();
}

// at::parallel_for gives each thread one equal share of the range; on a shared machine one late
// thread then holds up every level. Here the threads take chunks of `grain` items from a shared
// counter instead, so a slow or busy thread just takes fewer chunks.
template <typename F>
inline void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t chunks = (end - begin + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (chunks <= 0) return;
  if (threads <= 1 || at::in_parallel_region()) return f(begin, end);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t lo = begin + c * grain;
      f(lo, std::min(end, lo + grain));
    }
  });
}

// Partial products P_k[j] (m_k x r_{k+1}, m_k = q_0...q_k) of the prefix-tree nodes of levels 0..last.
template <typename T>
struct Partials {
  const T* core0 = nullptr;
  std::vector<T*> level;        // scratch, level k >= 1
  std::vector<int64_t> stride;  // elements per node at level k

  const T* node(const TTPlan& plan, int64_t k, int64_t j) const {
    return k == 0 ? core0 + plan.digit[0][j] * stride[0] : level[k] + j * stride[k];
  }
};

// A level whose slices are narrower than its rank (n = q_k r_{k+1} < r_k: the last core, n = q_d):
// its products and slice gradients are computed transposed, so the register tiles run along r_k
// or the nodes instead of along n columns.
inline bool narrow_level(const TTShape& s, int64_t k) { return s.q[k] * s.r[k + 1] < s.r[k]; }

// The partial products P_{k-1} (node_numel = m_{k-1} r_k values each) of the parents of level k's
// nodes with digit v, one after the other in `dst`, in the plan's by-digit order.
template <typename T>
void stack_parent_partials(const TTPlan& plan, const Partials<T>& P, int64_t k, int64_t v, int64_t node_numel,
                           T* dst) {
  const auto& start = plan.by_digit_start[k];
  const auto& order = plan.by_digit[k];
  for (int64_t t = 0; t < start[v + 1] - start[v]; ++t)
    std::copy_n(P.node(plan, k - 1, plan.parent[k][order[start[v] + t]]), node_numel, dst + t * node_numel);
}

// P_k of a narrow level's nodes: one product per slice, summed transposed over the nodes with that
// digit, [P_k]^T (n x nodes m) = G_k[v]^T @ [P_{k-1}]^T.
template <typename T>
void narrow_level_products(const TTShape& s, const TTPlan& plan, const Partials<T>& P, const T* core, int64_t k,
                           int64_t m_prev) {
  const int64_t r = s.r[k], n = s.q[k] * s.r[k + 1], slice = s.slice_numel(k);
  const auto& start = plan.by_digit_start[k];
  const auto& order = plan.by_digit[k];
  parallel_chunks(0, s.p[k], kNodeGrain, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<T> stack, stack_t, out_t;  // per worker, reused across calls
    for (int64_t v = lo; v < hi; ++v) {
      const int64_t nodes = start[v + 1] - start[v], rows = nodes * m_prev;
      if (nodes == 0) continue;
      stack.resize(std::max<size_t>(stack.size(), rows * r));
      stack_t.resize(std::max<size_t>(stack_t.size(), rows * r));
      out_t.resize(std::max<size_t>(out_t.size(), rows * n));
      stack_parent_partials(plan, P, k, v, m_prev * r, stack.data());
      transpose(stack_t.data(), stack.data(), rows, r);
      std::fill_n(out_t.data(), rows * n, T(0));
      gemm_tn_acc(out_t.data(), core + v * slice, stack_t.data(), r, n, rows);
      for (int64_t t = 0; t < nodes; ++t) {  // node t's P_k (m_prev x n) is columns t m_prev.. of out_t
        T* dst = P.level[k] + order[start[v] + t] * P.stride[k];
        for (int64_t a = 0; a < m_prev; ++a)
          for (int64_t c = 0; c < n; ++c) dst[a * n + c] = out_t[c * rows + t * m_prev + a];
      }
    }
  });
}

// Partial products of levels 0..last: the levels its forward kept in `reuse` are taken as they are
// (backward); with `keep`, the computed levels are kept there for the backward (forward).
template <typename T>
Partials<T> compute_partials(const TTShape& s, const TTPlan& plan, at::TensorList cores, int64_t last,
                             const SavedBatch* reuse, SavedBatch* keep) {
  Partials<T> P;
  P.core0 = cores[0].data_ptr<T>();
  P.level.resize(last + 1);
  P.stride.resize(last + 1);
  if (keep) keep->partials.resize(last + 1);
  int64_t m = s.q[0];
  P.stride[0] = m * s.r[1];
  for (int64_t k = 1; k <= last; ++k) {
    const int64_t m_prev = m;
    m *= s.q[k];
    P.stride[k] = m * s.r[k + 1];
    const int64_t numel = plan.level_size(k) * P.stride[k];
    if (reuse && k < static_cast<int64_t>(reuse->partials.size()) && reuse->partials[k].defined() &&
        reuse->partials[k].numel() == numel && reuse->partials[k].scalar_type() == cores[0].scalar_type()) {
      P.level[k] = reuse->partials[k].data_ptr<T>();
      continue;
    }
    if (keep) {
      keep->partials[k] = at::empty({numel}, cores[0].options().requires_grad(false));
      P.level[k] = keep->partials[k].data_ptr<T>();
    } else {
      P.level[k] = scratch<T>(kFirstLevel + k, numel);
    }
    const T* core = cores[k].data_ptr<T>();
    const int64_t slice = s.slice_numel(k);
    if (narrow_level(s, k)) {
      narrow_level_products(s, plan, P, core, k, m_prev);
      continue;
    }
    parallel_chunks(0, plan.level_size(k), kNodeGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        std::fill_n(P.level[k] + j * P.stride[k], P.stride[k], T(0));
        gemm_nn_acc(P.level[k] + j * P.stride[k], P.node(plan, k - 1, plan.parent[k][j]),
                    core + plan.digit[k][j] * slice, m_prev, s.r[k], s.q[k] * s.r[k + 1]);
      }
    });
  }
  return P;
}

}  // namespace torchrec_tt::cpu
