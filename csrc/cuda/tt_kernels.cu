// CUDA kernels of the torchrec_tt ops; see tt_kernels.cuh for the algorithm. No torch headers.
//
// Conventions: positions, node numbers and counts are int (the glue rejects n >= 2^31 - 1);
// element offsets are computed in int64. Products are accumulated in fp32 for every core dtype.
// Half/bfloat16 values are converted only through the explicit intrinsics, so this file builds
// under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

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
      for (int t = 0; t < rk; ++t) acc += pa[t] * to_f(G[int64_t(t) * nk + c]);
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

// dRow[u] = sum over the occurrences of unique id u (sorted order) of coef * grad[bag]; warp per id.
template <typename T>
__global__ void row_grad_kernel(Plan pl, int last, const int* __restrict__ bag_of, const int* __restrict__ bag_count,
                                const T* __restrict__ psw, const T* __restrict__ grad, int D, bool mean,
                                float* __restrict__ d_rows) {
  const int lane = threadIdx.x % kWarp;
  const int cnt = level_count(pl, last);
  for (int64_t u = warp_start(); u < cnt; u += warp_stride()) {
    const int o0 = pl.first[last][u], o1 = pl.first[last][u + 1];
    for (int c = lane; c < D; c += kWarp) {
      float acc = 0.f;
      for (int o = o0; o < o1; ++o) {
        const int p = pl.pos[o];
        const int b = bag_of[p];
        if (b < 0) continue;
        float coef = psw != nullptr ? to_f(psw[p]) : 1.f;
        if (mean) coef /= static_cast<float>(bag_count[b]);
        acc += coef * to_f(grad[int64_t(b) * D + c]);
      }
      d_rows[u * D + c] = acc;
    }
  }
}

// dP_{k-1}[jp] (m_prev x rk) = sum over children j of dP_k[j] (m_prev x nk) @ G_k[digit_j]^T (nk x rk).
// One block per parent; children in node order (deterministic). Reads core k.
template <typename T>
__global__ void dprev_kernel(Plan pl, int k, const T* __restrict__ core, const float* __restrict__ dp,
                             float* __restrict__ dprev, int m_prev, int rk, int nk) {
  const int cnt = level_count(pl, k - 1);
  const int64_t slice = int64_t(rk) * nk;
  const int64_t s_k = int64_t(m_prev) * nk, s_prev = int64_t(m_prev) * rk;
  for (int64_t jp = blockIdx.x; jp < cnt; jp += gridDim.x) {
    const int s = pl.first[k - 1][jp], e = pl.first[k - 1][jp + 1];
    const int c0 = pl.incl[k][s] - 1, c1 = pl.incl[k][e - 1];  // children [c0, c1)
    for (int64_t idx = threadIdx.x; idx < s_prev; idx += blockDim.x) {
      const int64_t a = idx / rk, t = idx - a * rk;
      float acc = 0.f;
      for (int j = c0; j < c1; ++j) {
        const float* drow = dp + int64_t(j) * s_k + a * nk;
        const T* grow = core + pl.digit[k][j] * slice + t * nk;
        for (int c = 0; c < nk; ++c) acc += drow[c] * to_f(grow[c]);
      }
      dprev[jp * s_prev + idx] = acc;
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

struct SliceArgs {
  int k;
  int m_prev, rk, nk;
  const int* seg_start;
  const int* seg_end;
  const int* order;      // level-k nodes sorted by digit
  const float* p_prev;   // P_{k-1} (unused for k == 0)
  const float* dp;       // dP_k
  Optimizer opt;
  float lr, eps;
  float* state;          // adagrad: like the core; rowwise: [p_k]
  float* scratch;        // rowwise: p_k * slice floats
  const ErrorRecord* guard;
};

// One block per core slice v: dG_k[v] (rk x nk) = sum over nodes with digit v (in node order) of
// P_{k-1}[parent]^T @ dP_k[node], then either stored (dense) or applied (fused optimizer).
template <typename T>
__global__ void slice_kernel(Plan pl, SliceArgs a, T* __restrict__ core, T* __restrict__ core_grad) {
  __shared__ float red[kWarp];
  __shared__ float scale_s;
  const int v = blockIdx.x;
  const int s = a.seg_start[v], e = a.seg_end[v];
  if (s >= e) return;                                           // slice not touched by the batch
  if (a.guard != nullptr && a.guard->key != kNoErrorKey) return;  // invalid batch: write nothing
  const int64_t slice = int64_t(a.rk) * a.nk;
  const int64_t s_prev = int64_t(a.m_prev) * a.rk, s_k = int64_t(a.m_prev) * a.nk;
  const int64_t base = int64_t(v) * slice;
  float sq = 0.f;
  for (int64_t idx = threadIdx.x; idx < slice; idx += blockDim.x) {
    const int64_t t = idx / a.nk, c = idx - t * a.nk;
    float acc = 0.f;
    for (int o = s; o < e; ++o) {
      const int j = a.order[o];
      const float* d = a.dp + int64_t(j) * s_k + c;
      if (a.k == 0) {
        acc += d[0];
      } else {
        const float* pp = a.p_prev + int64_t(pl.parent[a.k][j]) * s_prev + t;
        for (int m = 0; m < a.m_prev; ++m) acc += pp[int64_t(m) * a.rk] * d[int64_t(m) * a.nk];
      }
    }
    const int64_t w = base + idx;
    switch (a.opt) {
      case Optimizer::kNone:
        core_grad[w] = from_f<T>(acc);
        break;
      case Optimizer::kSgd:
        core[w] = from_f<T>(to_f(core[w]) - a.lr * acc);
        break;
      case Optimizer::kAdagrad: {
        const float st = a.state[w] + acc * acc;
        a.state[w] = st;
        core[w] = from_f<T>(to_f(core[w]) - a.lr * acc / (sqrtf(st) + a.eps));
        break;
      }
      case Optimizer::kRowwiseAdagrad:
        a.scratch[w] = acc;
        sq += acc * acc;
        break;
    }
  }
  if (a.opt == Optimizer::kRowwiseAdagrad) {  // block-uniform branch
    const float total = block_sum(sq, red);
    if (threadIdx.x == 0) {
      const float st = a.state[v] + total / static_cast<float>(slice);
      a.state[v] = st;
      scale_s = a.lr / (sqrtf(st) + a.eps);
    }
    __syncthreads();
    const float scale = scale_s;
    for (int64_t idx = threadIdx.x; idx < slice; idx += blockDim.x) {
      const int64_t w = base + idx;  // written by this same thread above
      core[w] = from_f<T>(to_f(core[w]) - scale * a.scratch[w]);
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

struct Workspace {
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
  // backward only
  int* bag_of;
  float *dA, *dB;
  unsigned int *dkeys_in, *dkeys_out;
  int *dvals_in, *dvals_out;
  int *seg_start, *seg_end;
  float* scratch;
  void* temp;
  size_t temp_bytes;
};

size_t cub_temp_bytes(const TTDims& t, const Sizes& sz, bool backward) {
  size_t best = 0, bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned long long*>(nullptr),
                                  static_cast<unsigned long long*>(nullptr), static_cast<const int*>(nullptr),
                                  static_cast<int*>(nullptr), sz.n, 0, sz.id_bits);
  best = bytes > best ? bytes : best;
  bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<const int*>(nullptr), static_cast<int*>(nullptr), sz.n);
  best = bytes > best ? bytes : best;
  if (backward) {
    for (int k = 0; k < sz.d; ++k) {
      bytes = 0;
      cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned int*>(nullptr),
                                      static_cast<unsigned int*>(nullptr), static_cast<const int*>(nullptr),
                                      static_cast<int*>(nullptr), static_cast<int>(sz.bound[k]), 0,
                                      bits_for(static_cast<unsigned long long>(t.p[k])));
      best = bytes > best ? bytes : best;
    }
  }
  return best;
}

size_t carve(const TTDims& t, const BatchDesc& b, const Sizes& sz, bool backward, void* base, Workspace* ws) {
  Workspace w{};
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
  if (backward) {
    w.bag_of = cv.take<int>(n);
    w.dA = cv.take<float>(sz.max_level);
    w.dB = cv.take<float>(sz.max_level);
    w.dkeys_in = cv.take<unsigned int>(sz.max_bound);
    w.dkeys_out = cv.take<unsigned int>(sz.max_bound);
    w.dvals_in = cv.take<int>(sz.max_bound);
    w.dvals_out = cv.take<int>(sz.max_bound);
    w.seg_start = cv.take<int>(sz.max_p);
    w.seg_end = cv.take<int>(sz.max_p);
    w.scratch = cv.take<float>(sz.max_core);
  }
  w.temp_bytes = cub_temp_bytes(t, sz, backward);
  w.temp = cv.take<char>(static_cast<int64_t>(w.temp_bytes));
  if (ws) *ws = w;
  return cv.used + kAlign;  // slack: the caller's pointer need not be 256-aligned
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

// Sorts the ids and builds the prefix tree (steps 1-2), then P_0..P_last.
template <typename T, typename Id>
cudaError_t build_plan(const TTDims& t, const Sizes& sz, const Id* ids, CorePtrs<const T> cores, int last_level,
                       Workspace& w, Plan& pl, cudaStream_t stream) {
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
  pl = Plan{};
  pl.n = n;
  pl.keys = w.keys_out;
  pl.pos = w.pos_out;
  pl.slot = w.slot;
  PlanOut po{};
  NodeOut no{};
  for (int k = 0; k < sz.d; ++k) {
    pl.incl[k] = w.incl[k];
    pl.first[k] = w.first[k];
    pl.digit[k] = w.digit[k];
    pl.parent[k] = w.parent[k];
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

}  // namespace

size_t forward_workspace_bytes(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0) return 0;
  const Sizes sz(dims, batch);
  return carve(dims, batch, sz, false, nullptr, nullptr);
}

size_t backward_workspace_bytes(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0) return 0;
  const Sizes sz(dims, batch);
  return carve(dims, batch, sz, true, nullptr, nullptr);
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
                           CorePtrs<const T> cores, T* out, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (batch.n <= 0 || batch.num_bags <= 0) return cudaSuccess;  // caller returns zeros
  const Sizes sz(dims, batch);
  Workspace w{};
  if (carve(dims, batch, sz, false, nullptr, nullptr) > workspace_bytes) return cudaErrorInvalidValue;
  carve(dims, batch, sz, false, align_up(workspace), &w);
  Plan pl{};
  TT_CUDA_TRY((build_plan<T, Id>(dims, sz, ids, cores, sz.d - 1, w, pl, stream)));
  const Bags bg = make_bags(batch);
  bag_count_kernel<<<grid_for(batch.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(bg, w.slot, w.bag_count);
  TT_LAUNCHED();
  pool_kernel<T><<<grid_for(batch.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
      bg, w.slot, w.bag_count, psw, w.P[sz.d - 1], static_cast<int>(sz.D), batch.mean, out);
  TT_LAUNCHED();
  return cudaSuccess;
}

template <typename T, typename Id>
cudaError_t launch_backward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            const T* grad_out, CorePtrs<T> cores, CorePtrs<T> core_grads,
                            const UpdateArgs& update, T* psw_grad, const ErrorRecord* guard, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  if (batch.n <= 0 || batch.num_bags <= 0) return cudaSuccess;  // no id is in a bag: nothing to do
  const Sizes sz(dims, batch);
  Workspace w{};
  if (carve(dims, batch, sz, true, nullptr, nullptr) > workspace_bytes) return cudaErrorInvalidValue;
  carve(dims, batch, sz, true, align_up(workspace), &w);
  CorePtrs<const T> ccores{};
  for (int k = 0; k < sz.d; ++k) ccores.ptr[k] = cores.ptr[k];
  const int d = sz.d;
  const int last = d - 1;
  Plan pl{};
  TT_CUDA_TRY((build_plan<T, Id>(dims, sz, ids, ccores, psw_grad != nullptr ? last : last - 1, w, pl, stream)));
  const Bags bg = make_bags(batch);
  const int n = sz.n;
  const int D = static_cast<int>(sz.D);
  bag_count_kernel<<<grid_for(batch.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(bg, w.slot, w.bag_count);
  TT_LAUNCHED();
  bag_of_kernel<<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(bg, w.bag_of);
  TT_LAUNCHED();
  if (psw_grad != nullptr) {
    psw_grad_kernel<T><<<grid_for(int64_t(n) * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
        n, w.slot, w.bag_of, w.bag_count, w.P[last], grad_out, D, batch.mean, psw_grad);
    TT_LAUNCHED();
  }
  float* d_cur = w.dA;
  float* d_other = w.dB;
  row_grad_kernel<T><<<grid_for(sz.bound[last] * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
      pl, last, w.bag_of, w.bag_count, psw, grad_out, D, batch.mean, d_cur);
  TT_LAUNCHED();
  for (int k = last; k >= 0; --k) {
    const int m_prev = k == 0 ? 1 : static_cast<int>(sz.m[k - 1]);
    const int rk = static_cast<int>(dims.r[k]);
    const int nk = static_cast<int>(dims.q[k] * dims.r[k + 1]);
    if (k > 0) {  // dP_{k-1}: the last read of core k, before its update below
      dprev_kernel<T><<<grid_for(sz.bound[k - 1], 1), threads_for(int64_t(m_prev) * rk), 0, stream>>>(
          pl, k, cores.ptr[k], d_cur, d_other, m_prev, rk, nk);
      TT_LAUNCHED();
    }
    // Group the nodes of level k by digit (radix sort, sentinel p_k for the unused tail).
    const unsigned int sentinel = static_cast<unsigned int>(dims.p[k]);
    const int64_t bound = sz.bound[k];
    digit_keys_kernel<<<grid_for(bound, kFlatBlock), kFlatBlock, 0, stream>>>(pl, k, bound, sentinel, w.dkeys_in,
                                                                             w.dvals_in);
    TT_LAUNCHED();
    size_t tb = w.temp_bytes;
    TT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(w.temp, tb, static_cast<const unsigned int*>(w.dkeys_in), w.dkeys_out,
                                                static_cast<const int*>(w.dvals_in), w.dvals_out,
                                                static_cast<int>(bound), 0,
                                                bits_for(static_cast<unsigned long long>(dims.p[k])), stream));
    TT_CUDA_TRY(cudaMemsetAsync(w.seg_start, 0, sizeof(int) * dims.p[k], stream));
    TT_CUDA_TRY(cudaMemsetAsync(w.seg_end, 0, sizeof(int) * dims.p[k], stream));
    segments_kernel<<<grid_for(bound, kFlatBlock), kFlatBlock, 0, stream>>>(w.dkeys_out, bound, sentinel,
                                                                            w.seg_start, w.seg_end);
    TT_LAUNCHED();
    SliceArgs a{};
    a.k = k;
    a.m_prev = m_prev;
    a.rk = rk;
    a.nk = nk;
    a.seg_start = w.seg_start;
    a.seg_end = w.seg_end;
    a.order = w.dvals_out;
    a.p_prev = k == 0 ? nullptr : w.P[k - 1];
    a.dp = d_cur;
    a.opt = update.opt;
    a.lr = update.lr;
    a.eps = update.eps;
    a.state = update.state[k];
    a.scratch = w.scratch;
    a.guard = guard;
    const int64_t slice = int64_t(rk) * nk;
    slice_kernel<T><<<static_cast<unsigned>(dims.p[k]), threads_for(slice), 0, stream>>>(pl, a, cores.ptr[k],
                                                                                        core_grads.ptr[k]);
    TT_LAUNCHED();
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
                                              const ErrorRecord*, void*, size_t, cudaStream_t);
#define TT_INSTANTIATE_IDS(T) \
  TT_INSTANTIATE(T, int32_t)  \
  TT_INSTANTIATE(T, int64_t)
TT_INSTANTIATE_IDS(float)
TT_INSTANTIATE_IDS(__half)
TT_INSTANTIATE_IDS(__nv_bfloat16)
#undef TT_INSTANTIATE_IDS
#undef TT_INSTANTIATE

}  // namespace torchrec_tt::cuda
