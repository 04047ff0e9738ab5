// Kernels of the plan (validation, sort keys, prefix tree, digit groups) and of the forward pass.
// Part of the CUDA kernels' one translation unit (included by tt_kernels.cu): internal, not an API.
#pragma once

#include <cub/device/device_scan.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/tabulate_output_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include "tt_device_common.cuh"

namespace torchrec_tt::cuda {
namespace {

// ---- validation -----------------------------------------------------------------------------------

__device__ __forceinline__ unsigned long long err_key(unsigned long long kind, int64_t pos) {
  return (kind << kErrorKindShift) | (static_cast<unsigned long long>(pos) & kErrorPosMask);
}

__global__ void init_record_kernel(ErrorRecord* rec) {
  rec->key = kNoErrorKey;
  rec->value0 = 0;
  rec->value1 = 0;
  rec->dropped = 0;
}

// Checks of position i (an offset, an id and its weight): folds the first error into best and
// counts an out-of-range id into dropped.
template <typename T, typename Id>
__device__ __forceinline__ void check_position(int64_t i, const Id* __restrict__ ids, int64_t n,
                                               const int64_t* __restrict__ off, int64_t count, bool include_last,
                                               const T* __restrict__ psw, unsigned long long N, bool record_ids,
                                               unsigned long long& best, unsigned long long& dropped) {
  if (i < count) {
    const int64_t o = off[i];
    if (i == 0 && o != 0) best = min(best, err_key(kErrOffsetsStart, 0));
    if (i > 0 && o < off[i - 1]) best = min(best, err_key(kErrOffsetsDecreasing, i));
    if (i == count - 1 && (include_last ? o != n : o > n)) best = min(best, err_key(kErrLastOffset, i));
  }
  if (i < n) {
    if (psw != nullptr && !is_finite_f(to_f(psw[i]))) best = min(best, err_key(kErrWeightNotFinite, 0));
    const long long id = static_cast<long long>(ids[i]);
    if (id < 0 || static_cast<unsigned long long>(id) >= N) {
      ++dropped;
      if (record_ids) best = min(best, err_key(kErrIdOutOfRange, i));
    }
  }
}

// The values the host message needs for the winning error key.
template <typename Id>
__device__ __forceinline__ void record_values(unsigned long long key, const Id* __restrict__ ids,
                                              const int64_t* __restrict__ off, ErrorRecord* rec) {
  long long v0 = 0, v1 = 0;
  if (key != kNoErrorKey) {
    const unsigned long long kind = key >> kErrorKindShift;
    const int64_t pos = static_cast<int64_t>(key & kErrorPosMask);
    if (kind == kErrOffsetsStart) v0 = off[0];
    if (kind == kErrOffsetsDecreasing) {
      v0 = off[pos];
      v1 = off[pos - 1];
    }
    if (kind == kErrLastOffset) v0 = off[pos];
    if (kind == kErrIdOutOfRange) v0 = static_cast<long long>(ids[pos]);
  }
  rec->value0 = static_cast<unsigned long long>(v0);
  rec->value1 = static_cast<unsigned long long>(v1);
}

// Large batches: a grid of these between init_record_kernel and finalize_record_kernel.
template <typename T, typename Id>
__global__ void validate_kernel(const Id* __restrict__ ids, int64_t n, const int64_t* __restrict__ off,
                                int64_t count, bool include_last, const T* __restrict__ psw,
                                unsigned long long N, bool record_ids, ErrorRecord* rec) {
  unsigned long long best = kNoErrorKey, dropped = 0;
  const int64_t total = n > count ? n : count;
  for (int64_t i = grid_start(); i < total; i += grid_stride()) {
    check_position<T, Id>(i, ids, n, off, count, include_last, psw, N, record_ids, best, dropped);
  }
  if (best != kNoErrorKey) atomicMin(&rec->key, best);
  if (dropped != 0) atomicAdd(&rec->dropped, dropped);
}

// Fills the values of the winning error (one thread, after validate_kernel).
template <typename Id>
__global__ void finalize_record_kernel(const Id* __restrict__ ids, const int64_t* __restrict__ off,
                                       ErrorRecord* rec) {
  record_values<Id>(rec->key, ids, off, rec);
}

// Small batches: the whole record in one launch of one block (no init / finalize launches).
constexpr int kValidateBlock = 1024;
constexpr int64_t kValidateOneBlockMax = 32 * kValidateBlock;  // positions (ids or offsets)

// The whole record, computed by one block (every thread of the block calls it; it syncs).
template <typename T, typename Id>
__device__ __forceinline__ void validate_in_block(const Id* __restrict__ ids, int64_t n,
                                                  const int64_t* __restrict__ off, int64_t count, bool include_last,
                                                  const T* __restrict__ psw, unsigned long long N, bool record_ids,
                                                  ErrorRecord* rec) {
  __shared__ unsigned long long block_best, block_dropped;
  if (threadIdx.x == 0) {
    block_best = kNoErrorKey;
    block_dropped = 0;
  }
  __syncthreads();
  unsigned long long best = kNoErrorKey, dropped = 0;
  const int64_t total = n > count ? n : count;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    check_position<T, Id>(i, ids, n, off, count, include_last, psw, N, record_ids, best, dropped);
  }
  if (best != kNoErrorKey) atomicMin(&block_best, best);
  if (dropped != 0) atomicAdd(&block_dropped, dropped);
  __syncthreads();
  if (threadIdx.x == 0) {
    rec->key = block_best;
    rec->dropped = block_dropped;
    record_values<Id>(block_best, ids, off, rec);
  }
}

template <typename T, typename Id>
__global__ void validate_block_kernel(const Id* __restrict__ ids, int64_t n, const int64_t* __restrict__ off,
                                      int64_t count, bool include_last, const T* __restrict__ psw,
                                      unsigned long long N, bool record_ids, ErrorRecord* rec) {
  validate_in_block<T, Id>(ids, n, off, count, include_last, psw, N, record_ids, rec);
}

// ---- plan kernels -----------------------------------------------------------------------------------

// Sort keys (dropped ids get the sentinel N, sorted last), their positions, and each position's bag
// (for backward; computed here, per position anyway, to save backward a launch).
template <typename Id>
__global__ void make_keys_kernel(const Id* __restrict__ ids, int n, unsigned long long N, Bags bg,
                                 unsigned long long* __restrict__ keys, int* __restrict__ pos,
                                 int* __restrict__ bag_of) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const long long id = static_cast<long long>(ids[i]);
    keys[i] = (id >= 0 && static_cast<unsigned long long>(id) < N) ? static_cast<unsigned long long>(id) : N;
    pos[i] = static_cast<int>(i);
    bag_of[i] = bag_of_position(bg, static_cast<int>(i));
  }
}

// ---- the prefix tree's counts: every level's "new node" flags scanned in one pass ----------------------
// incl[k][i] = number of distinct prefixes of length k+1 among sorted ids 0..i (dropped ids, sorted
// last, add none). One CUB scan over per-id vectors of d flags, read off the sorted keys on the fly and
// written straight into the per-level arrays, replaces a flag kernel and d scans (2d + 1 launches).

struct LevelCounts {
  int c[kMaxCores];
};

struct AddLevelCounts {
  __host__ __device__ LevelCounts operator()(const LevelCounts& a, const LevelCounts& b) const {
    LevelCounts r;
#pragma unroll
    for (int k = 0; k < kMaxCores; ++k) r.c[k] = a.c[k] + b.c[k];
    return r;
  }
};

// Sorted id i's flags: 1 at level k where it starts a new prefix of length k+1.
struct NewNodeFlags {
  Geo g;
  const unsigned long long* keys;
  __host__ __device__ LevelCounts operator()(int i) const {
    LevelCounts f{};
    const unsigned long long key = keys[i];
    if (key >= g.N) return f;
    const unsigned long long prev = i > 0 ? keys[i - 1] : 0ull;
    for (int k = 0; k < g.d; ++k) f.c[k] = (i == 0 || key / g.div[k] != prev / g.div[k]) ? 1 : 0;
    return f;
  }
};

struct StoreLevelCounts {
  int* incl[kMaxCores];
  int d;
  __host__ __device__ void operator()(int i, const LevelCounts& v) const {
    for (int k = 0; k < d; ++k) incl[k][i] = v.c[k];
  }
};

// The scan (temp == nullptr: CUB's temp-storage query, as every CUB call).
inline cudaError_t scan_levels(void* temp, size_t& temp_bytes, const Geo& g, const unsigned long long* keys,
                               int* const* incl, int n, cudaStream_t stream) {
  StoreLevelCounts store{};
  store.d = g.d;
  for (int k = 0; k < g.d; ++k) store.incl[k] = incl[k];
  const auto flags = thrust::make_transform_iterator(thrust::counting_iterator<int>(0), NewNodeFlags{g, keys});
  return cub::DeviceScan::InclusiveScan(temp, temp_bytes, flags, thrust::make_tabulate_output_iterator(store),
                                        AddLevelCounts{}, n, stream);
}

struct PlanOut {
  int* first[kMaxCores];
  int* slot;
};

__global__ void scatter_kernel(Geo g, Plan pl, PlanOut po) {
  const int n = pl.n;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const unsigned long long key = pl.keys[i];
    const int p = pl.pos[i];
    if (key >= g.N) {
      po.slot[p] = -1;
      continue;
    }
    for (int k = 0; k < g.d; ++k) {
      const int c = pl.incl[k][i];
      if (c != (i > 0 ? pl.incl[k][i - 1] : 0)) po.first[k][c - 1] = static_cast<int>(i);  // a new node
    }
    po.slot[p] = pl.incl[g.d - 1][i] - 1;
    if (i + 1 == n || pl.keys[i + 1] >= g.N) {  // last valid id: close every level's CSR
      for (int k = 0; k < g.d; ++k) po.first[k][pl.incl[k][i]] = static_cast<int>(i + 1);
    }
  }
}

struct NodeOut {
  int* digit[kMaxCores];
  int* parent[kMaxCores];
};

__global__ void node_info_kernel(Geo g, Plan pl, NodeOut no, int64_t max_bound) {
  for (int k = 0; k < g.d; ++k) {
    const int cnt = level_count(pl, k);
    for (int64_t j = grid_start(); j < cnt && j < max_bound; j += grid_stride()) {
      const unsigned long long key = pl.keys[pl.first[k][j]];
      no.digit[k][j] = static_cast<int>((key / g.div[k]) % g.p[k]);
      if (k > 0) no.parent[k][j] = pl.incl[k - 1][pl.first[k][j]] - 1;
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------------

// acc[i] += sum over t of P[i][t] * G[t][c] (t ascending) for the rows i < a_n of P (row stride rk) and
// column c of G (row stride nk). Where rk % 4 == 0, P's rows come as float4s (P is a workspace:
// 16-byte aligned): per 4 t, ROWS vector loads and 4 slice loads feed 4 * ROWS FMAs instead of
// 4 * (ROWS + 1) scalar loads, which left the load/store unit the limit of config (b)'s chain. The slice
// is read as scalars: the cores are the caller's tensors, with no alignment promised.
template <typename T, int ROWS>
__device__ __forceinline__ void rows_times_column(const float* __restrict__ P, int rk, int a_n, const T* __restrict__ G,
                                                  int nk, int c, float (&acc)[ROWS]) {
  if (rk % 4 == 0) {
#pragma unroll 2
    for (int t = 0; t < rk; t += 4) {
      const float g0 = to_f(G[int64_t(t) * nk + c]), g1 = to_f(G[int64_t(t + 1) * nk + c]);
      const float g2 = to_f(G[int64_t(t + 2) * nk + c]), g3 = to_f(G[int64_t(t + 3) * nk + c]);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        if (i < a_n) {
          const float4 p = __ldg(reinterpret_cast<const float4*>(P + int64_t(i) * rk + t));
          acc[i] += p.x * g0;
          acc[i] += p.y * g1;
          acc[i] += p.z * g2;
          acc[i] += p.w * g3;
        }
      }
    }
    return;
  }
#pragma unroll 8
  for (int t = 0; t < rk; ++t) {  // loads of several t in flight together
    const float g = to_f(G[int64_t(t) * nk + c]);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      if (i < a_n) acc[i] += __ldg(P + int64_t(i) * rk + t) * g;
    }
  }
}

// P_k[j] = P_{k-1}[parent] (m_prev x rk) @ G_k[digit] (rk x nk), one block per node; level 0 copies
// the core slice. Outputs are fp32, m_prev x nk = (q_0..q_k) x r_{k+1}. Each thread computes
// column c of ROWS consecutive rows: a slice value read once (coalesced over c) feeds ROWS FMAs
// (ROWS = 4 for wide slices, where the slice reads dominate; 1 for narrow ones, to keep threads busy).
template <typename T, int ROWS>
__global__ void chain_kernel(Plan pl, int k, const T* __restrict__ core, const float* __restrict__ p_in,
                             float* __restrict__ p_out, int m_prev, int rk, int nk) {
  const int cnt = level_count(pl, k);
  const int64_t slice = int64_t(rk) * nk;
  const int64_t s_in = int64_t(m_prev) * rk, s_out = int64_t(m_prev) * nk;
  const int row_groups = (m_prev + ROWS - 1) / ROWS;
  for (int64_t j = blockIdx.x; j < cnt; j += gridDim.x) {
    const T* G = core + pl.digit[k][j] * slice;
    float* out = p_out + j * s_out;
    if (k == 0) {
      for (int64_t idx = threadIdx.x; idx < s_out; idx += blockDim.x) out[idx] = to_f(G[idx]);
      continue;
    }
    const float* P = p_in + int64_t(pl.parent[k][j]) * s_in;
    for (int idx = threadIdx.x; idx < row_groups * nk; idx += blockDim.x) {
      const int a0 = idx / nk * ROWS, c = idx - idx / nk * nk;
      const int a_n = m_prev - a0 < ROWS ? m_prev - a0 : ROWS;
      float acc[ROWS] = {};
      rows_times_column<T, ROWS>(P + int64_t(a0) * rk, rk, a_n, G, nk, c, acc);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        if (i < a_n) out[int64_t(a0 + i) * nk + c] = acc[i];
      }
    }
  }
}

// Number of kept (valid) ids in bag b (every lane of the warp gets it).
__device__ __forceinline__ int kept_in_bag(const int* __restrict__ slot, int s, int e, int lane) {
  int c = 0;
  for (int p = s + lane; p < e; p += kWarp) c += slot[p] >= 0 ? 1 : 0;
  return warp_sum(c);
}

// bag_count[b] = kept ids of bag b; one warp per bag (backward's own plan: forward's pool writes them).
__global__ void bag_count_kernel(Bags bg, const int* __restrict__ slot, int* __restrict__ bag_count) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t b = warp_start(); b < bg.num_bags; b += warp_stride()) {
    int s, e;
    bag_range(bg, b, s, e);
    const int c = kept_in_bag(slot, s, e, lane);
    if (lane == 0) bag_count[b] = c;
  }
}

// out[b] = sum over kept ids of coef * row, and bag_count[b] for backward; one warp per bag, ids in
// position order (deterministic).
template <typename T>
__global__ void pool_kernel(Bags bg, const int* __restrict__ slot, int* __restrict__ bag_count,
                            const T* __restrict__ psw, const float* __restrict__ rows, int D, bool mean,
                            T* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t b = warp_start(); b < bg.num_bags; b += warp_stride()) {
    int s, e;
    bag_range(bg, b, s, e);
    const int kept = kept_in_bag(slot, s, e, lane);
    if (lane == 0) bag_count[b] = kept;
    const float cnt = static_cast<float>(kept);
    for (int c0 = 0; c0 < D; c0 += kWarp) {  // warp-uniform trip counts (shuffles below)
      const int c = c0 + lane;
      float acc = 0.f;
      for (int p0 = s; p0 < e; p0 += kWarp) {
        // 32 positions' slots and coefficients in one coalesced load, broadcast in position order
        const int p = p0 + lane;
        const int u_l = p < e ? slot[p] : -1;
        float coef_l = psw != nullptr && p < e ? to_f(psw[p]) : 1.f;
        if (mean) coef_l /= cnt;
        acc = add_lane_rows(acc, e - p0 < kWarp ? e - p0 : kWarp, u_l, coef_l, rows, D, c);
      }
      if (c < D) out[b * D + c] = from_f<T>(acc);
    }
  }
}

// Where each level's nodes sit in the one (level, digit) sort of all levels' nodes.
struct GroupLayout {
  int d;
  int digit_bits;                    // key = level << digit_bits | digit; level d marks unused slots
  int64_t node_off[kMaxCores + 1];   // level k's nodes are sort entries [node_off[k], node_off[k+1])
  int64_t seg_off[kMaxCores + 1];    // level k's digits are segments [seg_off[k], seg_off[k+1])
};

// Sort keys of every level's nodes (values: the node number within its level); also zeroes the
// segment bounds that group_segments_kernel fills after the sort (an absent digit stays empty).
__global__ void group_keys_kernel(Plan pl, GroupLayout gl, unsigned int* __restrict__ keys, int* __restrict__ vals,
                                  int* __restrict__ seg) {
  const int64_t total = gl.node_off[gl.d];
  const int64_t seg_entries = 2 * gl.seg_off[gl.d];
  for (int64_t x = grid_start(); x < seg_entries; x += grid_stride()) seg[x] = 0;
  for (int64_t x = grid_start(); x < total; x += grid_stride()) {
    int k = 0;
    while (x >= gl.node_off[k + 1]) ++k;
    const int64_t j = x - gl.node_off[k];
    const bool used = j < level_count(pl, k);
    keys[x] = used ? (static_cast<unsigned int>(k) << gl.digit_bits) | static_cast<unsigned int>(pl.digit[k][j])
                   : static_cast<unsigned int>(gl.d) << gl.digit_bits;
    vals[x] = static_cast<int>(j);
  }
}

// After the sort: the nodes of level k with digit v are sorted entries [seg_start[s], seg_end[s]),
// s = seg_off[k] + v (both zeroed by group_keys_kernel: an absent digit is an empty segment).
__global__ void group_segments_kernel(GroupLayout gl, const unsigned int* __restrict__ keys, int* __restrict__ seg_start,
                                      int* __restrict__ seg_end) {
  const int64_t total = gl.node_off[gl.d];
  const unsigned int digit_mask = (1u << gl.digit_bits) - 1u;
  for (int64_t x = grid_start(); x < total; x += grid_stride()) {
    const unsigned int key = keys[x];
    const int k = static_cast<int>(key >> gl.digit_bits);
    if (k >= gl.d) continue;
    const int64_t sg = gl.seg_off[k] + (key & digit_mask);
    if (x == 0 || keys[x - 1] != key) seg_start[sg] = static_cast<int>(x);
    if (x + 1 == total || keys[x + 1] != key) seg_end[sg] = static_cast<int>(x + 1);
  }
}

}  // namespace
}  // namespace torchrec_tt::cuda
