// Kernels of the backward pass: row gradients, per-level parent gradients, core-slice updates.
// Part of the CUDA kernels' one translation unit (included by tt_kernels.cu): internal, not an API.
#pragma once

#include "tt_device_common.cuh"

namespace torchrec_tt::cuda {
namespace {

// ---- backward --------------------------------------------------------------------------------------

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
    const int occ = o1 - o0;  // warp-uniform
    if (occ <= kWarp) {
      float coef = 0.f;
      const int b = lane < occ ? occurrence(pl.pos[o0 + lane], bag_of, bag_count, psw, mean, coef) : -1;
      for (int c0 = 0; c0 < D; c0 += kWarp) {
        const int c = c0 + lane;
        const float acc = add_lane_rows(0.f, occ, b, coef, grad, D, c);  // occ turns: most ids occur once
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

// Row stride of rows staged in shared memory (core slice rows, per-node rows): the row length
// rounded up to an odd number, so lanes that read the same column of different rows hit distinct banks.
__host__ __device__ __forceinline__ int odd_stride(int len) { return len | 1; }

// Row stride of rows read as float4 where lanes take different rows: a multiple of 4 floats and an odd
// number of float4s, so the 8 lanes of one 128-bit shared-memory phase hit 8 distinct groups of banks.
__host__ __device__ __forceinline__ int quad_stride(int len) { return 4 * (((len + 3) / 4) | 1); }

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

constexpr int kChildTile = 4;  // child_grad_kernel: each thread computes a 4 x 4 tile of outputs

// dst[q * ld + r] = load(q, r) for q < rows, r < len, by the whole block, kStageBatch independent
// loads in flight per thread (a plain loop would wait for each load before the next one).
constexpr int kStageBatch = 8;
template <typename Load>
__device__ __forceinline__ void stage_rows(float* dst, int rows, int len, int ld, Load load) {
  const int n = rows * len;
  for (int x0 = threadIdx.x; x0 < n; x0 += kStageBatch * blockDim.x) {
    float v[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int x = x0 + u * static_cast<int>(blockDim.x);
      const int q = x / len;
      v[u] = x < n ? load(q, x - q * len) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int x = x0 + u * static_cast<int>(blockDim.x);
      const int q = x / len;
      if (x < n) dst[q * ld + (x - q * len)] = v[u];
    }
  }
}

// The start of one chunk of a digit's nodes, [o0, o0 + cn) with cn = min(step, e - o0): once every
// thread is done with the previous chunk, stages the chunk's node numbers (and parents) and, where the
// kernel stages rows, calls stage(cn) for them; returns cn with everything staged visible to the block.
template <typename StageRows>
__device__ __forceinline__ int begin_chunk(const Plan& pl, const LevelArgs& a, int o0, int e, int step, int* node_s,
                                           int* parent_s, bool staged, StageRows stage) {
  const int cn = e - o0 < step ? e - o0 : step;
  __syncthreads();  // the previous chunk has been used
  stage_nodes(pl, a, o0, cn, node_s, parent_s);
  __syncthreads();
  if (staged) {
    stage(cn);
    __syncthreads();
  }
  return cn;
}

// dchild[j] (m_prev x rk) = dP_k[j] (m_prev x nk) @ G_k[digit_j]^T (nk x rk). One block per digit: the
// core slice is staged once in shared memory (rows padded to an odd stride), then chunks of `chunk`
// nodes have their dP_k rows staged with independent loads, and each thread computes a 4 x 4 tile
// of outputs from shared memory. Without room for the slice and one node (chunk == 0) everything is
// read from global memory. Reads core k: runs before slice_grad_kernel updates it.
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
  const int ld = odd_stride(a.nk);
  float* g_s = smem;
  float* d_s = smem + a.rk * ld;
  const int s_k = a.m_prev * a.nk;
  if (staged) stage_rows(g_s, a.rk, a.nk, ld, [&](int t, int c) { return to_f(G[int64_t(t) * a.nk + c]); });
  const int per_node = a.m_prev * a.rk;
  for (int o0 = s; o0 < e; o0 += step) {
    const int cn = begin_chunk(pl, a, o0, e, step, node_s, parent_s, staged, [&](int n) {
      stage_rows(d_s, n, s_k, s_k, [&](int q, int r) { return a.dp[int64_t(node_s[q]) * s_k + r]; });
    });
    // 4 x 4 output tiles (rows am0.., columns t0..): per c, 4 dP and 4 slice values feed 16 FMAs
    const int am_tiles = (a.m_prev + kChildTile - 1) / kChildTile, t_tiles = (a.rk + kChildTile - 1) / kChildTile;
    const int tiles = am_tiles * t_tiles;
    for (int64_t x = threadIdx.x; x < int64_t(cn) * tiles; x += blockDim.x) {
      const int q = static_cast<int>(x / tiles);
      const int r = static_cast<int>(x - int64_t(q) * tiles);
      const int am0 = (r / t_tiles) * kChildTile, t0 = (r % t_tiles) * kChildTile;
      const int am_n = a.m_prev - am0 < kChildTile ? a.m_prev - am0 : kChildTile;
      const int t_n = a.rk - t0 < kChildTile ? a.rk - t0 : kChildTile;
      float acc[kChildTile][kChildTile] = {};
      const float* drow = (staged ? d_s + q * s_k : a.dp + int64_t(node_s[q]) * s_k) + am0 * a.nk;
      for (int c = 0; c < a.nk; ++c) {
        float dv[kChildTile], gv[kChildTile];
#pragma unroll
        for (int i = 0; i < kChildTile; ++i) {
          dv[i] = i < am_n ? drow[i * a.nk + c] : 0.f;
          gv[i] = i >= t_n ? 0.f : (staged ? g_s[(t0 + i) * ld + c] : to_f(G[int64_t(t0 + i) * a.nk + c]));
        }
#pragma unroll
        for (int i = 0; i < kChildTile; ++i) {
#pragma unroll
          for (int j = 0; j < kChildTile; ++j) acc[i][j] += dv[i] * gv[j];
        }
      }
      float* out = dchild + int64_t(node_s[q]) * per_node + int64_t(am0) * a.rk + t0;
#pragma unroll
      for (int i = 0; i < kChildTile; ++i) {
#pragma unroll
        for (int j = 0; j < kChildTile; ++j) {
          if (i < am_n && j < t_n) out[i * a.rk + j] = acc[i][j];
        }
      }
    }
  }
}

// child_grad_kernel for levels with a long reduction (nk >= 32) and wide ranks (rk >= 16), where its
// 4 x 4 tiles leave most threads idle (config (b), level 1: 8 tiles per node, 88 per 256 threads).
// `splits` blocks per digit (block b: digit b / splits) each stage the slice transposed (nk rows of
// rk, odd stride) and take every splits-th run of a digit's nodes. (One block per digit gave (b)'s
// level 1 only 220 blocks of 8 warps for ~10,000 nodes; splitting them measured 3-10 % faster on an
// H200 (session 14: (b) 69.3 -> 67.0 us, (a) 17.2 -> 15.4), so occupancy is not what bounds this
// kernel.) Each warp takes one node at a time, lane l computing columns t = l, l + 32, ... of up to
// 4 rows: per c, the 4 dP_k values are broadcast loads (same address in every lane) and the slice
// value a conflict-free shared load. Each output is summed over c in ascending order, as in
// child_grad_kernel, by one warp: the split changes no result.
constexpr int kChildRows = 4;

template <typename T>
__global__ void child_grad_warp_kernel(Plan pl, LevelArgs a, int splits, const T* __restrict__ core,
                                       float* __restrict__ dchild) {
  extern __shared__ float g_t[];
  const int v = static_cast<int>(blockIdx.x) / splits;
  const int part = static_cast<int>(blockIdx.x) - v * splits;
  const int warps = blockDim.x / kWarp;
  const int s = a.seg_start[v] + part * warps, e = a.seg_end[v];
  if (s >= e) return;  // block-uniform: no node of this digit for this block
  const int nk = a.nk, rk = a.rk, ld = odd_stride(rk);
  const T* G = core + int64_t(v) * rk * nk;
  for (int x = threadIdx.x; x < rk * nk; x += blockDim.x) {  // G[t][c] -> g_t[c][t], coalesced reads
    const int t = x / nk;
    g_t[(x - t * nk) * ld + t] = to_f(G[x]);
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int s_k = a.m_prev * nk;
  for (int o = s + static_cast<int>(threadIdx.x) / kWarp; o < e; o += warps * splits) {
    const int j = a.order[o];
    const float* dp = a.dp + int64_t(j) * s_k;
    float* out = dchild + int64_t(j) * a.m_prev * rk;
    for (int am0 = 0; am0 < a.m_prev; am0 += kChildRows) {
      const int am_n = a.m_prev - am0 < kChildRows ? a.m_prev - am0 : kChildRows;
      const float* drow = dp + int64_t(am0) * nk;
      for (int t = lane; t - lane < rk; t += kWarp) {  // warp-uniform trip count
        const bool live = t < rk;
        float acc[kChildRows] = {};
#pragma unroll 4
        for (int c = 0; c < nk; ++c) {
          const float g = live ? g_t[c * ld + t] : 0.f;
#pragma unroll
          for (int i = 0; i < kChildRows; ++i) {
            if (i < am_n) acc[i] += __ldg(drow + i * nk + c) * g;
          }
        }
        if (live) {
#pragma unroll
          for (int i = 0; i < kChildRows; ++i) {
            if (i < am_n) out[int64_t(am0 + i) * rk + t] = acc[i];
          }
        }
      }
    }
  }
}

// The children of node jp of level k - 1: level-k nodes [c0, c1) (contiguous node numbers).
__device__ __forceinline__ void children_of(const Plan& pl, int k, int64_t jp, int& c0, int& c1) {
  const int s = pl.first[k - 1][jp], e = pl.first[k - 1][jp + 1];
  c0 = pl.incl[k][s] - 1;
  c1 = pl.incl[k][e - 1];
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
    int c0, c1;
    children_of(pl, k, jp, c0, c1);
    float acc = 0.f;
    for (int j = c0; j < c1; ++j) acc += dchild[int64_t(j) * per_node + r];
    dprev[q] = acc;
  }
}

// dP_{k-1}[jp] (m_prev x rk) = sum over the children j of jp (in node order) of dP_k[j] (m_prev x nk) @
// G_k[digit_j]^T (nk x rk) in one pass, for levels with short slices and few children per parent
// (fused_parent_grad, tt_workspace.cuh). There the digit-grouped kernels above share little (a slice
// of rk x nk floats, L1-resident) but write, then dprev_reduce_kernel re-reads, a share of m_prev x rk
// floats per child: (b)'s last level, 16 x 32 floats per 16 x 4 of dP_k. One thread per column t and
// run of kParentRows rows (lanes of a warp: consecutive t, dP_k loads broadcast): the chain of
// dependent loads to a child's slice (first, incl, digit) and each slice value serve kParentRows
// outputs instead of one. Each share is summed over c in ascending order and the shares are added in
// child order: the same floating-point operations, in the same order, as those kernels (bitwise-equal
// results). Reads core k: runs before slice_grad_kernel updates it.
constexpr int kParentRows = 4;

// Threads per parent node of parent_grad_kernel (its launcher sizes the grid with it).
__host__ __device__ __forceinline__ int parent_grad_threads(int m_prev, int rk) {
  return (m_prev + kParentRows - 1) / kParentRows * rk;
}

template <typename T>
__global__ void parent_grad_kernel(Plan pl, int k, int m_prev, int rk, int nk, const T* __restrict__ core,
                                   const float* __restrict__ dp, float* __restrict__ dprev, int64_t bound_prev) {
  const int64_t cnt = level_count(pl, k - 1);
  const int per_node = parent_grad_threads(m_prev, rk);
  const int64_t total = (cnt < bound_prev ? cnt : bound_prev) * per_node;
  const int64_t slice = int64_t(rk) * nk;
  for (int64_t q = grid_start(); q < total; q += grid_stride()) {
    const int64_t jp = q / per_node;
    const int r = static_cast<int>(q - jp * per_node);
    const int run = r / rk, t = r - run * rk;
    const int am0 = run * kParentRows;
    const int rows = m_prev - am0 < kParentRows ? m_prev - am0 : kParentRows;
    int c0, c1;
    children_of(pl, k, jp, c0, c1);
    float acc[kParentRows] = {};
    for (int j = c0; j < c1; ++j) {
      const float* drow = dp + (int64_t(j) * m_prev + am0) * nk;
      const T* g = core + pl.digit[k][j] * slice + int64_t(t) * nk;
      float share[kParentRows] = {};
      for (int c = 0; c < nk; ++c) {
        const float gv = to_f(g[c]);
#pragma unroll
        for (int i = 0; i < kParentRows; ++i) {
          if (i < rows) share[i] += __ldg(drow + i * nk + c) * gv;
        }
      }
#pragma unroll
      for (int i = 0; i < kParentRows; ++i) acc[i] += share[i];
    }
    float* out = dprev + (jp * m_prev + am0) * rk + t;
#pragma unroll
    for (int i = 0; i < kParentRows; ++i) {
      if (i < rows) out[int64_t(i) * rk] = acc[i];
    }
  }
}

struct UpdateSlice {
  Optimizer opt;
  float lr, eps;
  float* state;    // adagrad: like the core; rowwise: [p_k]
  float* scratch;  // rowwise: p_k * slice floats
  const ErrorRecord* guard;
};

// How a block of `threads` threads covers a core slice (rk x nk) in slice_grad_kernel: `cols`
// consecutive threads take consecutive columns, each thread a run of E consecutive rows (E
// accumulators in registers; one dP load feeds E FMAs), `row_groups` groups of rows per pass, and
// the remaining thread groups split the nodes (node q of a chunk goes to split q % splits), their
// partial sums added in split order at the end (deterministic).
struct SliceTiling {
  int cols, row_groups, splits;
};

// Whether slice_grad_kernel<E> reads each P_{k-1} run of E rows as float4s (the runs must be 16-byte
// aligned: E and rk multiples of 4; never at level 0, where rk = r_0 = 1), and the stride of its staged
// node rows then.
__host__ __device__ __forceinline__ bool slice_reads_quads(int E, int rk) { return E % 4 == 0 && rk % 4 == 0; }
__host__ __device__ __forceinline__ int slice_row_stride(int row, bool quads) {
  return quads ? quad_stride(row) : odd_stride(row);
}

// Applies the optimizer (or stores the gradient) for slice element w.
template <typename T>
__device__ __forceinline__ void apply_update(const UpdateSlice& u, int64_t w, float g, T* core, T* core_grad,
                                             float& sq) {
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
    case Optimizer::kRowwiseAdagrad:  // applied once the whole slice's squared norm is known
      u.scratch[w] = g;
      sq += g * g;
      break;
  }
}

// acc[i] += sum over m of P_{k-1}[parent][m][t0 + i] * dP_k[node][m][c] for one node (pm = &P[0][t0],
// dm = &dP[0][c]), m ascending. With quads (slice_reads_quads) a 16-byte load brings 4 rows: per m, E / 4
// loads (broadcast within a row group) and one dP load feed E FMAs, instead of E + 1 loads.
template <int E>
__device__ __forceinline__ void accumulate_node(const float* pm, const float* dm, const LevelArgs& a, bool quads,
                                                const bool (&row_ok)[E], float (&acc)[E]) {
  for (int m = 0; m < a.m_prev; ++m, pm += a.rk, dm += a.nk) {
    const float dv = *dm;
    if constexpr (E % 4 == 0) {
      if (quads) {
#pragma unroll
        for (int i = 0; i < E; i += 4) {
          if (row_ok[i]) {  // rk % 4 == 0: rows i..i+3 are all in or all out
            const float4 p4 = *reinterpret_cast<const float4*>(pm + i);
            acc[i] += p4.x * dv;
            acc[i + 1] += p4.y * dv;
            acc[i + 2] += p4.z * dv;
            acc[i + 3] += p4.w * dv;
          }
        }
        continue;
      }
    }
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if (row_ok[i]) acc[i] += pm[i] * dv;
    }
  }
}

// One block per core slice v: dG_k[v] (rk x nk) = sum over the nodes with digit v (in node order) of
// P_{k-1}[parent]^T @ dP_k[node], then stored (dense gradients) or applied (fused optimizer). The
// block walks the digit's nodes in chunks of `chunk` nodes whose P_{k-1} and dP_k rows are first
// staged in shared memory with independent loads (chunk == 0: read from global memory); each thread
// accumulates E rows of one column (see SliceTiling).
template <typename T, int E>
__global__ void slice_grad_kernel(Plan pl, LevelArgs a, UpdateSlice u, SliceTiling st, int chunk,
                                  T* __restrict__ core, T* __restrict__ core_grad) {
  extern __shared__ float4 smem4[];  // max(chunk rows, splits' partial tiles); float4: 16-byte aligned
  float* smem = reinterpret_cast<float*>(smem4);
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
  const int s_prev = a.k > 0 ? a.m_prev * a.rk : 0;  // floats of P_{k-1}[parent] (none at level 0)
  const int s_k = a.m_prev * a.nk;
  const int row = s_prev + s_k;                        // floats staged per node
  const bool quads = slice_reads_quads(E, a.rk);
  const int row_ld = slice_row_stride(row, quads);
  const int64_t base = int64_t(v) * a.rk * a.nk;
  // this thread's place in the tiling
  const int col_lane = threadIdx.x % st.cols;
  const int group = threadIdx.x / st.cols;
  const int row_group = group % st.row_groups;
  const int split = group / st.row_groups;           // >= st.splits: no accumulation (staging only)
  const int tile_rows = st.row_groups * E;
  float sq = 0.f;
  for (int c_base = 0; c_base < a.nk; c_base += st.cols) {
    for (int t_base = 0; t_base < a.rk; t_base += tile_rows) {
      const int c = c_base + col_lane;
      const int t0 = t_base + row_group * E;
      const bool active = split < st.splits && c < a.nk;
      float acc[E];
      bool row_ok[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        acc[i] = 0.f;
        row_ok[i] = t0 + i < a.rk;
      }
      for (int o0 = s; o0 < e; o0 += step) {
        const int cn = begin_chunk(pl, a, o0, e, step, node_s, parent_s, staged, [&](int n) {
          stage_rows(smem, n, row, row_ld, [&](int q, int r) {
            return r < s_prev ? a.p_prev[int64_t(parent_s[q]) * s_prev + r]
                              : a.dp[int64_t(node_s[q]) * s_k + (r - s_prev)];
          });
        });
        if (!active) continue;
        for (int q = split; q < cn; q += st.splits) {
          if (a.k == 0) {  // dG_0[v] = dP_0[node] (rk = 1, one row)
            acc[0] += staged ? smem[q * row_ld + c] : a.dp[int64_t(node_s[q]) * s_k + c];
          } else if (staged) {  // two calls: each inlined with its pointers' address space known
            accumulate_node<E>(smem + q * row_ld + t0, smem + q * row_ld + s_prev + c, a, quads, row_ok, acc);
          } else {
            accumulate_node<E>(a.p_prev + int64_t(parent_s[q]) * s_prev + t0, a.dp + int64_t(node_s[q]) * s_k + c, a,
                               quads, row_ok, acc);
          }
        }
      }
      if (st.splits > 1) {  // add the splits' partial tiles in split order
        float* part = smem;  // [splits][tile_rows][cols]
        __syncthreads();     // the last chunk's rows are no longer read
        if (active) {
#pragma unroll
          for (int i = 0; i < E; ++i) part[(split * tile_rows + row_group * E + i) * st.cols + col_lane] = acc[i];
        }
        __syncthreads();
        if (active && split == 0) {
          for (int sp = 1; sp < st.splits; ++sp) {
#pragma unroll
            for (int i = 0; i < E; ++i) acc[i] += part[(sp * tile_rows + row_group * E + i) * st.cols + col_lane];
          }
        }
      }
      if (active && split == 0) {
#pragma unroll
        for (int i = 0; i < E; ++i) {
          if (row_ok[i]) apply_update(u, base + int64_t(t0 + i) * a.nk + c, acc[i], core, core_grad, sq);
        }
      }
    }
  }
  if (u.opt == Optimizer::kRowwiseAdagrad) {  // block-uniform branch
    const int64_t slice = int64_t(a.rk) * a.nk;
    const float total = block_sum(sq, red);  // (its barrier also publishes every thread's scratch writes)
    if (threadIdx.x == 0) {
      const float st_v = u.state[v] + total / static_cast<float>(slice);
      u.state[v] = st_v;
      scale_s = u.lr / (sqrtf(st_v) + u.eps);
    }
    __syncthreads();
    const float scale = scale_s;
    for (int64_t idx = threadIdx.x; idx < slice; idx += blockDim.x) {
      const int64_t w = base + idx;
      core[w] = from_f<T>(to_f(core[w]) - scale * u.scratch[w]);
    }
  }
}

}  // namespace
}  // namespace torchrec_tt::cuda
