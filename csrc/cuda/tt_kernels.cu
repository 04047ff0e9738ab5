// CUDA kernels of the torchrec_tt ops; see tt_kernels.cuh for the algorithm. No torch headers.
//
// Conventions: positions, node numbers and counts are int (the glue rejects n >= 2^31 - 1);
// element offsets are computed in int64. Products are accumulated in fp32 for every core dtype.
// Half/bfloat16 values are converted only through the explicit intrinsics, so this file builds
// under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <array>
#include <map>

#include "tt_kernels.cuh"

namespace torchrec_tt::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpBlock = 256;  // threads of the warp-per-item kernels (8 items per block)
constexpr int kFlatBlock = 256;  // threads of the element-wise kernels
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr size_t kAlign = 256;

// ---- small device helpers ------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Exponent-bits test: unaffected by --use_fast_math.
__device__ __forceinline__ bool is_finite_f(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Deterministic block sum (fixed tree); the result is valid in thread 0. blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float v, float* red /* >= 32 floats of shared memory */) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp;
  if (lane == 0) red[w] = v;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x == 0) {
    const int nw = blockDim.x / kWarp;
    for (int i = 0; i < nw; ++i) s += red[i];
  }
  return s;
}

template <typename X>
__device__ __forceinline__ X clampv(X v, X lo, X hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// ---- plan: the sorted ids and their prefix tree ---------------------------------------------------

struct Geo {
  int d;
  unsigned long long N;                      // num_embeddings, also the sentinel key
  unsigned long long div[kMaxCores];         // prefix of length k+1 of id = id / div[k]
  unsigned long long p[kMaxCores];
};

struct Plan {
  int n;                              // ids
  const unsigned long long* keys;     // sorted ids (sentinel N for invalid ones, at the end)
  const int* pos;                     // original position of each sorted id
  const int* incl[kMaxCores];         // per level: inclusive scan of "new node" flags over sorted ids
  const int* first[kMaxCores];        // per level: first sorted index of each node, [count] = #valid ids
  const int* digit[kMaxCores];        // per level: digit i_k of each node
  const int* parent[kMaxCores];       // per level k >= 1: node of level k-1
  const int* slot;                    // position -> unique row (last-level node) or -1
};

// Number of nodes of level k (device-resident; n >= 1 whenever a kernel runs).
__device__ __forceinline__ int level_count(const Plan& pl, int k) { return pl.incl[k][pl.n - 1]; }

struct Bags {
  const int64_t* off;
  int64_t count;     // entries of off
  int64_t num_bags;
  int n;
};

// Ids of bag b are positions [s, e); clamped so bad offsets (IGNORE mode) stay memory-safe.
__device__ __forceinline__ void bag_range(const Bags& bg, int64_t b, int& s, int& e) {
  const int64_t n = bg.n;
  const int64_t st = clampv<int64_t>(bg.off[b], 0, n);
  const int64_t en = b + 1 < bg.count ? bg.off[b + 1] : n;
  s = static_cast<int>(st);
  e = static_cast<int>(clampv<int64_t>(en, st, n));
}

// Bag holding position pos (the last bag whose start <= pos, if pos is inside it), or -1.
__device__ __forceinline__ int bag_of_position(const Bags& bg, int pos) {
  int64_t lo = 0, hi = bg.num_bags;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (bg.off[mid] <= pos) lo = mid + 1; else hi = mid;
  }
  const int64_t b = lo - 1;
  if (b < 0) return -1;
  int s, e;
  bag_range(bg, b, s, e);
  return (pos >= s && pos < e) ? static_cast<int>(b) : -1;
}

__device__ __forceinline__ int64_t grid_start() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }
__device__ __forceinline__ int64_t warp_start() { return grid_start() / kWarp; }
__device__ __forceinline__ int64_t warp_stride() { return grid_stride() / kWarp; }

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

template <typename T, typename Id>
__global__ void validate_kernel(const Id* __restrict__ ids, int64_t n, const int64_t* __restrict__ off,
                                int64_t count, bool include_last, const T* __restrict__ psw,
                                unsigned long long N, bool record_ids, ErrorRecord* rec) {
  unsigned long long best = kNoErrorKey, dropped = 0;
  const int64_t total = n > count ? n : count;
  for (int64_t i = grid_start(); i < total; i += grid_stride()) {
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
  if (best != kNoErrorKey) atomicMin(&rec->key, best);
  if (dropped != 0) atomicAdd(&rec->dropped, dropped);
}

// Fills the values of the winning error (one thread, after validate_kernel).
template <typename Id>
__global__ void finalize_record_kernel(const Id* __restrict__ ids, const int64_t* __restrict__ off,
                                       ErrorRecord* rec) {
  const unsigned long long key = rec->key;
  if (key == kNoErrorKey) return;
  const unsigned long long kind = key >> kErrorKindShift;
  const int64_t pos = static_cast<int64_t>(key & kErrorPosMask);
  long long v0 = 0, v1 = 0;
  if (kind == kErrOffsetsStart) v0 = off[0];
  if (kind == kErrOffsetsDecreasing) {
    v0 = off[pos];
    v1 = off[pos - 1];
  }
  if (kind == kErrLastOffset) v0 = off[pos];
  if (kind == kErrIdOutOfRange) v0 = static_cast<long long>(ids[pos]);
  rec->value0 = static_cast<unsigned long long>(v0);
  rec->value1 = static_cast<unsigned long long>(v1);
}

// ---- plan kernels -----------------------------------------------------------------------------------

template <typename Id>
__global__ void make_keys_kernel(const Id* __restrict__ ids, int n, unsigned long long N,
                                 unsigned long long* __restrict__ keys, int* __restrict__ pos) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const long long id = static_cast<long long>(ids[i]);
    keys[i] = (id >= 0 && static_cast<unsigned long long>(id) < N) ? static_cast<unsigned long long>(id) : N;
    pos[i] = static_cast<int>(i);
  }
}

// flags[k * n + i] = 1 where sorted id i starts a new prefix of length k+1.
__global__ void mark_kernel(Geo g, const unsigned long long* __restrict__ keys, int n, int* __restrict__ flags) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const unsigned long long key = keys[i];
    const bool valid = key < g.N;
    const unsigned long long prev = i > 0 ? keys[i - 1] : 0ull;
    for (int k = 0; k < g.d; ++k) {
      int f = 0;
      if (valid) f = (i == 0 || key / g.div[k] != prev / g.div[k]) ? 1 : 0;
      flags[int64_t(k) * n + i] = f;
    }
  }
}

struct PlanOut {
  int* first[kMaxCores];
  int* slot;
};

__global__ void scatter_kernel(Geo g, Plan pl, PlanOut po, const int* __restrict__ flags) {
  const int n = pl.n;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const unsigned long long key = pl.keys[i];
    const int p = pl.pos[i];
    if (key >= g.N) {
      po.slot[p] = -1;
      continue;
    }
    for (int k = 0; k < g.d; ++k) {
      if (flags[int64_t(k) * n + i]) po.first[k][pl.incl[k][i] - 1] = static_cast<int>(i);
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

// P_k[j] = P_{k-1}[parent] (m_prev x rk) @ G_k[digit] (rk x nk), one block per node; level 0 copies
// the core slice. Outputs are fp32, m_prev x nk = (q_0..q_k) x r_{k+1}.
template <typename T>
__global__ void chain_kernel(Plan pl, int k, const T* __restrict__ core, const float* __restrict__ p_in,
                             float* __restrict__ p_out, int m_prev, int rk, int nk) {
  const int cnt = level_count(pl, k);
  const int64_t slice = int64_t(rk) * nk;
  const int64_t s_in = int64_t(m_prev) * rk, s_out = int64_t(m_prev) * nk;
  for (int64_t j = blockIdx.x; j < cnt; j += gridDim.x) {
    const T* G = core + pl.digit[k][j] * slice;
    float* out = p_out + j * s_out;
    if (k == 0) {
      for (int64_t idx = threadIdx.x; idx < s_out; idx += blockDim.x) out[idx] = to_f(G[idx]);
      continue;
    }
    const float* P = p_in + int64_t(pl.parent[k][j]) * s_in;
    for (int64_t idx = threadIdx.x; idx < s_out; idx += blockDim.x) {
      const int64_t a = idx / nk, c = idx - a * nk;
      const float* pa = P + a * rk;
      float acc = 0.f;
#pragma unroll 8
      for (int t = 0; t < rk; ++t) acc += pa[t] * to_f(G[int64_t(t) * nk + c]);  // loads in flight together
      out[idx] = acc;
    }
  }
}

// Number of kept (valid) ids per bag; one warp per bag.
__global__ void bag_count_kernel(Bags bg, const int* __restrict__ slot, int* __restrict__ bag_count) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t b = warp_start(); b < bg.num_bags; b += warp_stride()) {
    int s, e;
    bag_range(bg, b, s, e);
    int c = 0;
    for (int p = s + lane; p < e; p += kWarp) c += slot[p] >= 0 ? 1 : 0;
    c = warp_sum(c);
    if (lane == 0) bag_count[b] = c;
  }
}

// out[b] = sum over kept ids of coef * row; one warp per bag, ids in position order (deterministic).
template <typename T>
__global__ void pool_kernel(Bags bg, const int* __restrict__ slot, const int* __restrict__ bag_count,
                            const T* __restrict__ psw, const float* __restrict__ rows, int D, bool mean,
                            T* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t b = warp_start(); b < bg.num_bags; b += warp_stride()) {
    int s, e;
    bag_range(bg, b, s, e);
    const float cnt = static_cast<float>(bag_count[b]);
    for (int c = lane; c < D; c += kWarp) {
      float acc = 0.f;
      for (int p = s; p < e; ++p) {
        const int u = slot[p];
        if (u < 0) continue;
        float coef = psw != nullptr ? to_f(psw[p]) : 1.f;
        if (mean) coef /= cnt;
        acc += coef * rows[int64_t(u) * D + c];
      }
      out[b * D + c] = from_f<T>(acc);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------

__global__ void bag_of_kernel(Bags bg, int* __restrict__ bag_of) {
  for (int64_t i = grid_start(); i < bg.n; i += grid_stride()) bag_of[i] = bag_of_position(bg, static_cast<int>(i));
}

// d out[b] / d psw[pos] = <row, grad[b]> (/ count for mean); one warp per position.
template <typename T>
__global__ void psw_grad_kernel(int n, const int* __restrict__ slot, const int* __restrict__ bag_of,
                                const int* __restrict__ bag_count, const float* __restrict__ rows,
                                const T* __restrict__ grad, int D, bool mean, T* __restrict__ psw_grad) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t p = warp_start(); p < n; p += warp_stride()) {
    const int u = slot[p], b = bag_of[p];
    float dot = 0.f;
    if (u >= 0 && b >= 0) {
      for (int c = lane; c < D; c += kWarp) dot += rows[int64_t(u) * D + c] * to_f(grad[int64_t(b) * D + c]);
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      float v = 0.f;
      if (u >= 0 && b >= 0) v = mean ? dot / static_cast<float>(bag_count[b]) : dot;
      psw_grad[p] = from_f<T>(v);
    }
  }
}

// Occurrence p of a row contributes coef * grad[bag]: its bag (-1: none) and coefficient.
template <typename T>
__device__ __forceinline__ int occurrence(int p, const int* bag_of, const int* bag_count, const T* psw, bool mean,
                                          float& coef) {
  const int b = bag_of[p];
  coef = 0.f;
  if (b >= 0) {
    coef = psw != nullptr ? to_f(psw[p]) : 1.f;
    if (mean) coef /= static_cast<float>(bag_count[b]);
  }
  return b;
}

constexpr int kRowCols = 16;  // columns a lane sums at a time for a hot id (registers)

// dRow[u] = sum over the occurrences of unique id u (sorted order) of coef * grad[bag]; one warp per
// id, deterministic either way. Up to 32 occurrences: lanes over columns, the occurrences' (bag,
// coef) fetched at once and walked in order by shuffles, unrolled so the gradient reads are in flight
// together. More (a hot id): lane l sums occurrences l, l + 32, ... over kRowCols columns at a time,
// then a fixed shuffle tree adds the lanes' sums, instead of one long chain of dependent reads.
template <typename T>
__global__ void row_grad_kernel(Plan pl, int last, const int* __restrict__ bag_of, const int* __restrict__ bag_count,
                                const T* __restrict__ psw, const T* __restrict__ grad, int D, bool mean,
                                float* __restrict__ d_rows) {
  const int lane = threadIdx.x % kWarp;
  const int cnt = level_count(pl, last);
  for (int64_t u = warp_start(); u < cnt; u += warp_stride()) {  // warp-uniform
    const int o0 = pl.first[last][u], o1 = pl.first[last][u + 1];
    if (o1 - o0 <= kWarp) {
      float coef = 0.f;
      const int b = o0 + lane < o1 ? occurrence(pl.pos[o0 + lane], bag_of, bag_count, psw, mean, coef) : -1;
      for (int c0 = 0; c0 < D; c0 += kWarp) {
        const int c = c0 + lane;
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < kWarp; ++i) {
          const int bi = __shfl_sync(0xffffffffu, b, i);
          const float ci = __shfl_sync(0xffffffffu, coef, i);
          if (bi >= 0 && c < D) acc += ci * to_f(grad[int64_t(bi) * D + c]);
        }
        if (c < D) d_rows[u * D + c] = acc;
      }
      continue;
    }
    for (int c0 = 0; c0 < D; c0 += kRowCols) {
      float part[kRowCols];
#pragma unroll
      for (int j = 0; j < kRowCols; ++j) part[j] = 0.f;
      for (int o = o0 + lane; o < o1; o += kWarp) {
        float coef;
        const int b = occurrence(pl.pos[o], bag_of, bag_count, psw, mean, coef);
        if (b < 0) continue;
        const T* g = grad + int64_t(b) * D + c0;
#pragma unroll
        for (int j = 0; j < kRowCols; ++j) {
          if (c0 + j < D) part[j] += coef * to_f(g[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < kRowCols; ++j) {
        const float v = warp_sum(part[j]);  // the same xor tree in every lane
        if (lane == j && c0 + j < D) d_rows[u * D + c0 + j] = v;
      }
    }
  }
}

__global__ void digit_keys_kernel(Plan pl, int k, int64_t bound, unsigned int sentinel, unsigned int* __restrict__ keys,
                                  int* __restrict__ vals) {
  const int cnt = level_count(pl, k);
  for (int64_t j = grid_start(); j < bound; j += grid_stride()) {
    keys[j] = j < cnt ? static_cast<unsigned int>(pl.digit[k][j]) : sentinel;
    vals[j] = static_cast<int>(j);
  }
}

// Nodes of digit v are sorted entries [seg_start[v], seg_end[v]) (both zeroed beforehand).
__global__ void segments_kernel(const unsigned int* __restrict__ keys, int64_t bound, unsigned int sentinel,
                                int* __restrict__ seg_start, int* __restrict__ seg_end) {
  for (int64_t t = grid_start(); t < bound; t += grid_stride()) {
    const unsigned int key = keys[t];
    if (key >= sentinel) continue;
    if (t == 0 || keys[t - 1] != key) seg_start[key] = static_cast<int>(t);
    if (t + 1 == bound || keys[t + 1] != key) seg_end[key] = static_cast<int>(t + 1);
  }
}

// One level of the backward walk: the nodes of level k grouped by digit (seg_start/seg_end index
// `order`, the level's nodes sorted by digit, node order kept within a digit).
struct LevelArgs {
  int k;
  int m_prev, rk, nk;    // dP_k[j] is m_prev x nk, P_{k-1}[parent] is m_prev x rk, a core slice rk x nk
  const int* seg_start;
  const int* seg_end;
  const int* order;
  const float* p_prev;   // P_{k-1} (unused for k == 0)
  const float* dp;       // dP_k
};

// Row stride of a core slice staged in shared memory: odd, so the threads of a warp that read one
// column of consecutive rows hit distinct banks.
__host__ __device__ __forceinline__ int staged_ld(int nk) { return nk % 2 == 0 ? nk + 1 : nk; }

constexpr int kNodeChunk = 256;  // most node numbers a block stages in shared memory at a time

// Stages node numbers [o0, o0 + cn) of `order` (and their parents at level k > 0) in shared memory.
__device__ __forceinline__ void stage_nodes(const Plan& pl, const LevelArgs& a, int o0, int cn, int* node_s,
                                            int* parent_s) {
  for (int q = threadIdx.x; q < cn; q += blockDim.x) {
    const int j = a.order[o0 + q];
    node_s[q] = j;
    parent_s[q] = a.k > 0 ? pl.parent[a.k][j] : 0;
  }
}

// dst[x] = load(x) for x < n, by the whole block, kStageBatch independent loads in flight per thread
// (a plain loop would wait for each load before the next one).
constexpr int kStageBatch = 8;
template <typename Load>
__device__ __forceinline__ void stage_copy(float* dst, int n, Load load) {
  for (int x0 = threadIdx.x; x0 < n; x0 += kStageBatch * blockDim.x) {
    float v[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int x = x0 + u * static_cast<int>(blockDim.x);
      v[u] = x < n ? load(x) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int x = x0 + u * static_cast<int>(blockDim.x);
      if (x < n) dst[x] = v[u];
    }
  }
}

// dchild[j] (m_prev x rk) = dP_k[j] (m_prev x nk) @ G_k[digit_j]^T (nk x rk). One block per digit: the
// core slice is staged once in shared memory (rows padded to an odd stride), then chunks of `chunk`
// nodes have their dP_k rows staged with independent loads, and each thread computes output elements
// from shared memory. Without room for the slice and one node (chunk == 0) everything is read from
// global memory. Reads core k: runs before slice_grad_kernel updates it.
template <typename T>
__global__ void child_grad_kernel(Plan pl, LevelArgs a, int chunk, const T* __restrict__ core,
                                  float* __restrict__ dchild) {
  extern __shared__ float smem[];
  __shared__ int node_s[kNodeChunk];
  __shared__ int parent_s[kNodeChunk];
  const int v = blockIdx.x;
  const int s = a.seg_start[v], e = a.seg_end[v];
  if (s >= e) return;  // block-uniform
  const bool staged = chunk > 0;
  const int step = staged ? chunk : kNodeChunk;
  const int64_t slice = int64_t(a.rk) * a.nk;
  const T* G = core + int64_t(v) * slice;
  const int ld = staged_ld(a.nk);
  float* g_s = smem;
  float* d_s = smem + a.rk * ld;
  const int s_k = a.m_prev * a.nk;
  if (staged) {
    for (int idx = threadIdx.x; idx < slice; idx += blockDim.x) {
      const int t = idx / a.nk;
      g_s[t * ld + (idx - t * a.nk)] = to_f(G[idx]);
    }
  }
  const int per_node = a.m_prev * a.rk;
  for (int o0 = s; o0 < e; o0 += step) {
    const int cn = e - o0 < step ? e - o0 : step;
    __syncthreads();  // the previous chunk has been used
    stage_nodes(pl, a, o0, cn, node_s, parent_s);
    __syncthreads();
    if (staged) {
      stage_copy(d_s, cn * s_k, [&](int x) {
        const int q = x / s_k;
        return a.dp[int64_t(node_s[q]) * s_k + (x - q * s_k)];
      });
      __syncthreads();
    }
    for (int64_t x = threadIdx.x; x < int64_t(cn) * per_node; x += blockDim.x) {
      const int q = static_cast<int>(x / per_node);
      const int r = static_cast<int>(x - int64_t(q) * per_node);
      const int am = r / a.rk, t = r - am * a.rk;
      float acc = 0.f;
      if (staged) {
        const float* drow = d_s + q * s_k + am * a.nk;
        const float* g = g_s + t * ld;
#pragma unroll 8
        for (int c = 0; c < a.nk; ++c) acc += drow[c] * g[c];
      } else {
        const float* drow = a.dp + int64_t(node_s[q]) * s_k + int64_t(am) * a.nk;
        const T* g = G + int64_t(t) * a.nk;
#pragma unroll 8
        for (int c = 0; c < a.nk; ++c) acc += drow[c] * to_f(g[c]);
      }
      dchild[int64_t(node_s[q]) * per_node + r] = acc;
    }
  }
}

// dP_{k-1}[jp] = sum of dchild over the children of jp (contiguous node numbers, summed in order:
// deterministic). One thread per output element.
__global__ void dprev_reduce_kernel(Plan pl, int k, const float* __restrict__ dchild, float* __restrict__ dprev,
                                    int per_node, int64_t bound_prev) {
  const int64_t cnt = level_count(pl, k - 1);
  const int64_t total = (cnt < bound_prev ? cnt : bound_prev) * per_node;
  for (int64_t q = grid_start(); q < total; q += grid_stride()) {
    const int64_t jp = q / per_node;
    const int64_t r = q - jp * per_node;
    const int s = pl.first[k - 1][jp], e = pl.first[k - 1][jp + 1];
    const int c0 = pl.incl[k][s] - 1, c1 = pl.incl[k][e - 1];  // children [c0, c1)
    float acc = 0.f;
    for (int j = c0; j < c1; ++j) acc += dchild[int64_t(j) * per_node + r];
    dprev[q] = acc;
  }
}

struct UpdateSlice {
  Optimizer opt;
  float lr, eps;
  float* state;    // adagrad: like the core; rowwise: [p_k]
  float* scratch;  // rowwise: p_k * slice floats
  const ErrorRecord* guard;
};

constexpr int kSliceE = 8;  // slice elements per thread and pass (registers)

// One block per core slice v: dG_k[v] (rk x nk) = sum over the nodes with digit v (in node order) of
// P_{k-1}[parent]^T @ dP_k[node], then stored (dense gradients) or applied (fused optimizer). Each
// thread accumulates up to kSliceE elements in registers while the block walks the node list once,
// in chunks of `chunk` nodes whose P_{k-1} and dP_k rows are first staged in shared memory with
// independent loads (the walk would otherwise wait on one L2 read after another); chunk == 0: read
// them from global memory.
template <typename T>
__global__ void slice_grad_kernel(Plan pl, LevelArgs a, UpdateSlice u, int chunk, T* __restrict__ core,
                                  T* __restrict__ core_grad) {
  extern __shared__ float stage[];
  __shared__ float red[kWarp];
  __shared__ float scale_s;
  __shared__ int node_s[kNodeChunk];
  __shared__ int parent_s[kNodeChunk];
  const int v = blockIdx.x;
  const int s = a.seg_start[v], e = a.seg_end[v];
  if (s >= e) return;                                           // slice not touched by the batch
  if (u.guard != nullptr && u.guard->key != kNoErrorKey) return;  // invalid batch: write nothing
  const bool staged = chunk > 0;
  const int step = staged ? chunk : kNodeChunk;
  const int64_t slice = int64_t(a.rk) * a.nk;
  const int s_prev = a.k > 0 ? a.m_prev * a.rk : 0;  // floats of P_{k-1}[parent] (none at level 0)
  const int s_k = a.m_prev * a.nk;
  const int row = s_prev + s_k;                        // floats staged per node
  const int64_t base = int64_t(v) * slice;
  const int64_t per_pass = int64_t(blockDim.x) * kSliceE;
  float sq = 0.f;
  for (int64_t p0 = 0; p0 < slice; p0 += per_pass) {
    // elements p0 + i * blockDim.x + threadIdx.x, i < n_i (block-uniform)
    const int64_t left = (slice - p0 + blockDim.x - 1) / blockDim.x;
    const int n_i = static_cast<int>(left < kSliceE ? left : kSliceE);
    float acc[kSliceE];
    int tt[kSliceE], cc[kSliceE];
#pragma unroll
    for (int i = 0; i < kSliceE; ++i) {
      acc[i] = 0.f;
      int64_t idx = p0 + int64_t(i) * blockDim.x + threadIdx.x;
      if (idx >= slice) idx = 0;  // computed but never written
      tt[i] = static_cast<int>(idx / a.nk);
      cc[i] = static_cast<int>(idx - int64_t(tt[i]) * a.nk);
    }
    for (int o0 = s; o0 < e; o0 += step) {
      const int cn = e - o0 < step ? e - o0 : step;
      __syncthreads();  // the previous chunk has been used
      stage_nodes(pl, a, o0, cn, node_s, parent_s);
      __syncthreads();
      if (staged) {
        stage_copy(stage, cn * row, [&](int x) {
          const int q = x / row;
          const int r = x - q * row;
          return r < s_prev ? a.p_prev[int64_t(parent_s[q]) * s_prev + r]
                            : a.dp[int64_t(node_s[q]) * s_k + (r - s_prev)];
        });
        __syncthreads();
      }
      for (int q = 0; q < cn; ++q) {
        // pointers advanced row by row: the loop body is two loads and an FMA per element
        const float* pm = staged ? stage + q * row : a.p_prev + int64_t(parent_s[q]) * s_prev;
        const float* dm = staged ? stage + q * row + s_prev : a.dp + int64_t(node_s[q]) * s_k;
        if (a.k == 0) {
#pragma unroll
          for (int i = 0; i < kSliceE; ++i) {
            if (i < n_i) acc[i] += dm[cc[i]];
          }
        } else {
          for (int m = 0; m < a.m_prev; ++m, pm += a.rk, dm += a.nk) {
#pragma unroll
            for (int i = 0; i < kSliceE; ++i) {
              if (i < n_i) acc[i] += pm[tt[i]] * dm[cc[i]];
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kSliceE; ++i) {
      const int64_t idx = p0 + int64_t(i) * blockDim.x + threadIdx.x;
      if (i >= n_i || idx >= slice) continue;
      const int64_t w = base + idx;
      const float g = acc[i];
      switch (u.opt) {
        case Optimizer::kNone:
          core_grad[w] = from_f<T>(g);
          break;
        case Optimizer::kSgd:
          core[w] = from_f<T>(to_f(core[w]) - u.lr * g);
          break;
        case Optimizer::kAdagrad: {
          const float st = u.state[w] + g * g;
          u.state[w] = st;
          core[w] = from_f<T>(to_f(core[w]) - u.lr * g / (sqrtf(st) + u.eps));
          break;
        }
        case Optimizer::kRowwiseAdagrad:
          u.scratch[w] = g;
          sq += g * g;
          break;
      }
    }
  }
  if (u.opt == Optimizer::kRowwiseAdagrad) {  // block-uniform branch
    const float total = block_sum(sq, red);
    if (threadIdx.x == 0) {
      const float st = u.state[v] + total / static_cast<float>(slice);
      u.state[v] = st;
      scale_s = u.lr / (sqrtf(st) + u.eps);
    }
    __syncthreads();
    const float scale = scale_s;
    for (int64_t idx = threadIdx.x; idx < slice; idx += blockDim.x) {
      const int64_t w = base + idx;  // written by this same thread above (p0 is a multiple of blockDim.x)
      core[w] = from_f<T>(to_f(core[w]) - scale * u.scratch[w]);
    }
  }
}

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
  }
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
  int* flags;
  int* incl[kMaxCores];
  int* first[kMaxCores];
  int* digit[kMaxCores];
  int* parent[kMaxCores];
  int* slot;
  int* bag_count;
  float* P[kMaxCores];
  void* temp;
  size_t temp_bytes;
};

// Backward's own buffers.
struct GradWorkspace {
  int* bag_of;
  float *dA, *dB;   // dP_k of two consecutive levels
  float* dchild;    // per level-k node: its share of dP_{k-1}
  unsigned int *dkeys_in, *dkeys_out;
  int *dvals_in, *dvals_out;
  int* seg;         // seg_start = seg, seg_end = seg + max_p
  float* scratch;
  void* temp;
  size_t temp_bytes;
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
  return memoised(TempKey{0, sz.n, sz.id_bits}, [&] {
    size_t best = 0, bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned long long*>(nullptr),
                                    static_cast<unsigned long long*>(nullptr), static_cast<const int*>(nullptr),
                                    static_cast<int*>(nullptr), sz.n, 0, sz.id_bits);
    best = bytes > best ? bytes : best;
    bytes = 0;
    cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<const int*>(nullptr), static_cast<int*>(nullptr), sz.n);
    return bytes > best ? bytes : best;
  });
}

size_t grad_temp_bytes(const TTDims& t, const Sizes& sz) {
  TempKey key{0, -1, sz.d};
  for (int k = 0; k < sz.d; ++k) {
    key[3 + 2 * k] = sz.bound[k];
    key[4 + 2 * k] = t.p[k];
  }
  return memoised(key, [&] {
    size_t best = 0;
    for (int k = 0; k < sz.d; ++k) {
      size_t bytes = 0;
      cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned int*>(nullptr),
                                      static_cast<unsigned int*>(nullptr), static_cast<const int*>(nullptr),
                                      static_cast<int*>(nullptr), static_cast<int>(sz.bound[k]), 0,
                                      bits_for(static_cast<unsigned long long>(t.p[k])));
      best = bytes > best ? bytes : best;
    }
    return best;
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
  w.flags = cv.take<int>(int64_t(sz.d) * n);
  for (int k = 0; k < sz.d; ++k) {
    w.incl[k] = cv.take<int>(n);
    w.first[k] = cv.take<int>(sz.bound[k] + 1);
    w.digit[k] = cv.take<int>(sz.bound[k]);
    w.parent[k] = cv.take<int>(sz.bound[k]);
    w.P[k] = cv.take<float>(sz.bound[k] * sz.node[k]);
  }
  w.slot = cv.take<int>(n);
  w.bag_count = cv.take<int>(b.num_bags);
  w.temp_bytes = plan_temp_bytes(sz);
  w.temp = cv.take<char>(static_cast<int64_t>(w.temp_bytes));
  if (ws) *ws = w;
  return cv.used + kAlign;  // slack: the caller's pointer need not be 256-aligned
}

size_t carve_grad(const TTDims& t, const Sizes& sz, void* base, GradWorkspace* ws) {
  GradWorkspace w{};
  Carver cv(base);
  int64_t child = 1;  // dchild: max over k >= 1 of B_k * m_{k-1} * r_k
  for (int k = 1; k < sz.d; ++k) {
    const int64_t c = sz.bound[k] * sz.m[k - 1] * t.r[k];
    child = c > child ? c : child;
  }
  w.bag_of = cv.take<int>(sz.n);
  w.dA = cv.take<float>(sz.max_level);
  w.dB = cv.take<float>(sz.max_level);
  w.dchild = cv.take<float>(child);
  w.dkeys_in = cv.take<unsigned int>(sz.max_bound);
  w.dkeys_out = cv.take<unsigned int>(sz.max_bound);
  w.dvals_in = cv.take<int>(sz.max_bound);
  w.dvals_out = cv.take<int>(sz.max_bound);
  w.seg = cv.take<int>(2 * sz.max_p);
  w.scratch = cv.take<float>(sz.max_core);
  w.temp_bytes = grad_temp_bytes(t, sz);
  w.temp = cv.take<char>(static_cast<int64_t>(w.temp_bytes));
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

#define TT_CUDA_TRY(expr)                 \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)
#define TT_LAUNCHED() TT_CUDA_TRY(cudaGetLastError())

void* align_up(void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<void*>((v + kAlign - 1) / kAlign * kAlign);
}

// The plan's device pointers inside its workspace (no launch).
Plan plan_view(const Sizes& sz, const PlanWorkspace& w) {
  Plan pl{};
  pl.n = sz.n;
  pl.keys = w.keys_out;
  pl.pos = w.pos_out;
  pl.slot = w.slot;
  for (int k = 0; k < sz.d; ++k) {
    pl.incl[k] = w.incl[k];
    pl.first[k] = w.first[k];
    pl.digit[k] = w.digit[k];
    pl.parent[k] = w.parent[k];
  }
  return pl;
}

// Sorts the ids and builds the prefix tree (steps 1-2), then P_0..P_last_level and the bag sizes.
template <typename T, typename Id>
cudaError_t build_plan(const TTDims& t, const Sizes& sz, const Bags& bg, const Id* ids, CorePtrs<const T> cores,
                       int last_level, const PlanWorkspace& w, cudaStream_t stream) {
  const Geo g = make_geo(t);
  const int n = sz.n;
  make_keys_kernel<Id><<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(ids, n, g.N, w.keys_in, w.pos_in);
  TT_LAUNCHED();
  size_t tb = w.temp_bytes;
  TT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(w.temp, tb, static_cast<const unsigned long long*>(w.keys_in), w.keys_out,
                                              static_cast<const int*>(w.pos_in), w.pos_out, n, 0, sz.id_bits,
                                              stream));
  mark_kernel<<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(g, w.keys_out, n, w.flags);
  TT_LAUNCHED();
  for (int k = 0; k < sz.d; ++k) {
    tb = w.temp_bytes;
    TT_CUDA_TRY(cub::DeviceScan::InclusiveSum(w.temp, tb, static_cast<const int*>(w.flags + int64_t(k) * n),
                                              w.incl[k], n, stream));
  }
  const Plan pl = plan_view(sz, w);
  PlanOut po{};
  NodeOut no{};
  for (int k = 0; k < sz.d; ++k) {
    po.first[k] = w.first[k];
    no.digit[k] = w.digit[k];
    no.parent[k] = w.parent[k];
  }
  po.slot = w.slot;
  scatter_kernel<<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(g, pl, po, w.flags);
  TT_LAUNCHED();
  node_info_kernel<<<grid_for(sz.max_bound, kFlatBlock), kFlatBlock, 0, stream>>>(g, pl, no, sz.max_bound);
  TT_LAUNCHED();
  for (int k = 0; k <= last_level; ++k) {
    const int m_prev = k == 0 ? 1 : static_cast<int>(sz.m[k - 1]);
    const int rk = static_cast<int>(t.r[k]);
    const int nk = static_cast<int>(t.q[k] * t.r[k + 1]);
    chain_kernel<T><<<grid_for(sz.bound[k], 1), threads_for(int64_t(m_prev) * nk), 0, stream>>>(
        pl, k, cores.ptr[k], k == 0 ? nullptr : w.P[k - 1], w.P[k], m_prev, rk, nk);
    TT_LAUNCHED();
  }
  bag_count_kernel<<<grid_for(bg.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(bg, w.slot, w.bag_count);
  TT_LAUNCHED();
  return cudaSuccess;
}

Bags make_bags(const BatchDesc& b) {
  Bags bg{};
  bg.off = b.offsets;
  bg.count = b.num_offsets;
  bg.num_bags = b.num_bags;
  bg.n = static_cast<int>(b.n);
  return bg;
}

// Dynamic shared memory for staging (below the 48 KiB a block may use without opting in, leaving
// room for the kernels' static arrays).
constexpr int64_t kStageBytes = 40 * 1024;

// One level of the backward walk (k = d-1 .. 0): groups the level's nodes by digit, computes dP_{k-1}
// (from core k, before it changes) and then the slice gradients / updates of core k.
template <typename T>
cudaError_t backward_level(const TTDims& t, const Sizes& sz, int k, const Plan& pl, const PlanWorkspace& pw,
                           const GradWorkspace& gw, const float* d_cur, float* d_prev, T* core, T* core_grad,
                           const UpdateArgs& update, const ErrorRecord* guard, cudaStream_t stream) {
  const int m_prev = k == 0 ? 1 : static_cast<int>(sz.m[k - 1]);
  const int rk = static_cast<int>(t.r[k]);
  const int nk = static_cast<int>(t.q[k] * t.r[k + 1]);
  const int64_t slice = int64_t(rk) * nk;
  // Group the nodes of level k by digit (radix sort, sentinel p_k for the unused tail).
  const unsigned int sentinel = static_cast<unsigned int>(t.p[k]);
  const int64_t bound = sz.bound[k];
  digit_keys_kernel<<<grid_for(bound, kFlatBlock), kFlatBlock, 0, stream>>>(pl, k, bound, sentinel, gw.dkeys_in,
                                                                           gw.dvals_in);
  TT_LAUNCHED();
  size_t tb = gw.temp_bytes;
  TT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(gw.temp, tb, static_cast<const unsigned int*>(gw.dkeys_in), gw.dkeys_out,
                                              static_cast<const int*>(gw.dvals_in), gw.dvals_out,
                                              static_cast<int>(bound), 0,
                                              bits_for(static_cast<unsigned long long>(t.p[k])), stream));
  int* seg_start = gw.seg;
  int* seg_end = gw.seg + sz.max_p;
  TT_CUDA_TRY(cudaMemsetAsync(gw.seg, 0, sizeof(int) * 2 * sz.max_p, stream));
  segments_kernel<<<grid_for(bound, kFlatBlock), kFlatBlock, 0, stream>>>(gw.dkeys_out, bound, sentinel, seg_start,
                                                                          seg_end);
  TT_LAUNCHED();
  LevelArgs a{};
  a.k = k;
  a.m_prev = m_prev;
  a.rk = rk;
  a.nk = nk;
  a.seg_start = seg_start;
  a.seg_end = seg_end;
  a.order = gw.dvals_out;
  a.p_prev = k == 0 ? nullptr : pw.P[k - 1];
  a.dp = d_cur;
  const unsigned digits = static_cast<unsigned>(t.p[k]);
  // Nodes per staged chunk: as many as fit next to what is staged once (0: no staging).
  const auto chunk_for = [](int64_t fixed, int64_t per_node) {
    const int64_t c = per_node > 0 ? (kStageBytes - fixed) / per_node : 0;
    return static_cast<int>(c <= 0 ? 0 : (c > kNodeChunk ? kNodeChunk : c));
  };
  if (k > 0) {  // dP_{k-1}: the last read of core k, before its update below
    const int64_t slice_bytes = int64_t(sizeof(float)) * rk * staged_ld(nk);
    const int chunk = chunk_for(slice_bytes, int64_t(sizeof(float)) * m_prev * nk);
    const size_t smem = chunk > 0 ? static_cast<size_t>(slice_bytes + int64_t(sizeof(float)) * chunk * m_prev * nk) : 0;
    child_grad_kernel<T><<<digits, kWarpBlock, smem, stream>>>(pl, a, chunk, core, gw.dchild);
    TT_LAUNCHED();
    const int per_node = m_prev * rk;
    dprev_reduce_kernel<<<grid_for(sz.bound[k - 1] * per_node, kFlatBlock), kFlatBlock, 0, stream>>>(
        pl, k, gw.dchild, d_prev, per_node, sz.bound[k - 1]);
    TT_LAUNCHED();
  }
  UpdateSlice u{};
  u.opt = update.opt;
  u.lr = update.lr;
  u.eps = update.eps;
  u.state = update.state[k];
  u.scratch = gw.scratch;
  u.guard = guard;
  // at least 256 threads: small slices still have many nodes' rows to stage
  const int threads = static_cast<int>(slice >= 512 ? 512 : (slice > 256 ? (slice + kWarp - 1) / kWarp * kWarp : 256));
  const int64_t row_bytes = int64_t(sizeof(float)) * m_prev * ((k > 0 ? rk : 0) + nk);
  const int chunk = chunk_for(0, row_bytes);
  slice_grad_kernel<T><<<digits, threads, static_cast<size_t>(chunk * row_bytes), stream>>>(pl, a, u, chunk, core,
                                                                                          core_grad);
  TT_LAUNCHED();
  return cudaSuccess;
}

}  // namespace

size_t forward_workspace_bytes(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0) return 0;
  const Sizes sz(dims, batch);
  return carve_plan(batch, sz, nullptr, nullptr);
}

size_t backward_workspace_bytes(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0) return 0;
  const Sizes sz(dims, batch);
  return carve_grad(dims, sz, nullptr, nullptr);
}

template <typename T, typename Id>
cudaError_t launch_validate(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            bool record_id_errors, ErrorRecord* record, cudaStream_t stream) {
  init_record_kernel<<<1, 1, 0, stream>>>(record);
  TT_LAUNCHED();
  const int64_t total = batch.n > batch.num_offsets ? batch.n : batch.num_offsets;
  if (total > 0) {
    validate_kernel<T, Id><<<grid_for(total, kFlatBlock), kFlatBlock, 0, stream>>>(
        ids, batch.n, batch.offsets, batch.num_offsets, batch.include_last_offset, psw,
        static_cast<unsigned long long>(dims.num_embeddings), record_id_errors, record);
    TT_LAUNCHED();
    finalize_record_kernel<Id><<<1, 1, 0, stream>>>(ids, batch.offsets, record);
    TT_LAUNCHED();
  }
  return cudaSuccess;
}

template <typename T, typename Id>
cudaError_t launch_forward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                           CorePtrs<const T> cores, T* out, void* plan_workspace, size_t plan_bytes,
                           cudaStream_t stream) {
  if (batch.n <= 0 || batch.num_bags <= 0) return cudaSuccess;  // caller returns zeros
  const Sizes sz(dims, batch);
  if (carve_plan(batch, sz, nullptr, nullptr) > plan_bytes) return cudaErrorInvalidValue;
  PlanWorkspace w{};
  carve_plan(batch, sz, align_up(plan_workspace), &w);
  const Bags bg = make_bags(batch);
  TT_CUDA_TRY((build_plan<T, Id>(dims, sz, bg, ids, cores, sz.d - 1, w, stream)));
  pool_kernel<T><<<grid_for(batch.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
      bg, w.slot, w.bag_count, psw, w.P[sz.d - 1], static_cast<int>(sz.D), batch.mean, out);
  TT_LAUNCHED();
  return cudaSuccess;
}

template <typename T, typename Id>
cudaError_t launch_backward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            const T* grad_out, CorePtrs<T> cores, CorePtrs<T> core_grads,
                            const UpdateArgs& update, T* psw_grad, const ErrorRecord* guard, void* plan_workspace,
                            size_t plan_bytes, bool plan_ready, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (batch.n <= 0 || batch.num_bags <= 0) return cudaSuccess;  // no id is in a bag: nothing to do
  const Sizes sz(dims, batch);
  if (carve_plan(batch, sz, nullptr, nullptr) > plan_bytes) return cudaErrorInvalidValue;
  if (carve_grad(dims, sz, nullptr, nullptr) > workspace_bytes) return cudaErrorInvalidValue;
  PlanWorkspace pw{};
  GradWorkspace gw{};
  carve_plan(batch, sz, align_up(plan_workspace), &pw);
  carve_grad(dims, sz, align_up(workspace), &gw);
  const int d = sz.d;
  const int last = d - 1;
  const Bags bg = make_bags(batch);
  if (!plan_ready) {  // forward's plan holds every level and the bag sizes; a new one needs P_last only for psw_grad
    CorePtrs<const T> ccores{};
    for (int k = 0; k < d; ++k) ccores.ptr[k] = cores.ptr[k];
    TT_CUDA_TRY((build_plan<T, Id>(dims, sz, bg, ids, ccores, psw_grad != nullptr ? last : last - 1, pw, stream)));
  }
  const Plan pl = plan_view(sz, pw);
  const int n = sz.n;
  const int D = static_cast<int>(sz.D);
  bag_of_kernel<<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(bg, gw.bag_of);
  TT_LAUNCHED();
  if (psw_grad != nullptr) {
    psw_grad_kernel<T><<<grid_for(int64_t(n) * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
        n, pw.slot, gw.bag_of, pw.bag_count, pw.P[last], grad_out, D, batch.mean, psw_grad);
    TT_LAUNCHED();
  }
  float* d_cur = gw.dA;
  float* d_other = gw.dB;
  row_grad_kernel<T><<<grid_for(sz.bound[last] * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
      pl, last, gw.bag_of, pw.bag_count, psw, grad_out, D, batch.mean, d_cur);
  TT_LAUNCHED();
  for (int k = last; k >= 0; --k) {
    TT_CUDA_TRY(backward_level<T>(dims, sz, k, pl, pw, gw, d_cur, d_other, cores.ptr[k], core_grads.ptr[k], update,
                                  guard, stream));
    float* tmp = d_cur;
    d_cur = d_other;
    d_other = tmp;
  }
  return cudaSuccess;
}

#define TT_INSTANTIATE(T, Id)                                                                                   \
  template cudaError_t launch_validate<T, Id>(const TTDims&, const BatchDesc&, const Id*, const T*, bool,      \
                                              ErrorRecord*, cudaStream_t);                                      \
  template cudaError_t launch_forward<T, Id>(const TTDims&, const BatchDesc&, const Id*, const T*,             \
                                             CorePtrs<const T>, T*, void*, size_t, cudaStream_t);               \
  template cudaError_t launch_backward<T, Id>(const TTDims&, const BatchDesc&, const Id*, const T*, const T*, \
                                              CorePtrs<T>, CorePtrs<T>, const UpdateArgs&, T*,                  \
                                              const ErrorRecord*, void*, size_t, bool, void*, size_t,           \
                                              cudaStream_t);
#define TT_INSTANTIATE_IDS(T) \
  TT_INSTANTIATE(T, int32_t)  \
  TT_INSTANTIATE(T, int64_t)
TT_INSTANTIATE_IDS(float)
TT_INSTANTIATE_IDS(__half)
TT_INSTANTIATE_IDS(__nv_bfloat16)
#undef TT_INSTANTIATE_IDS
#undef TT_INSTANTIATE

}  // namespace torchrec_tt::cuda
