// Device helpers and the plan layout shared by every CUDA kernel (algorithm: tt_kernels.cuh).
// Part of the CUDA kernels' one translation unit (included by tt_kernels.cu): internal, not an API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tt_kernels.cuh"

namespace torchrec_tt::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpBlock = 256;  // threads of the warp-per-item kernels (8 items per block)
constexpr int kFlatBlock = 256;  // threads of the element-wise kernels
#ifndef TORCHREC_TT_MAX_GRID  // (the CPU emulator of tests/cuda_emu sets a small one: loops then take several turns)
#define TORCHREC_TT_MAX_GRID (int64_t(1) << 20)
#endif
constexpr int64_t kMaxGrid = TORCHREC_TT_MAX_GRID;  // grid-stride loops cover the rest
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

// acc plus, in lane order over the lanes i < n, coef_i * src[row_i * D + c], lane i holding (row_i,
// coef_i); a row < 0 and a column c >= D add nothing. Every lane of the warp calls it with the same n
// (shuffles). Pooling walks a bag's positions with it, row gradients an id's occurrences: the rows'
// reads do not wait on one another's row numbers.
template <typename S>
__device__ __forceinline__ float add_lane_rows(float acc, int n, int row, float coef, const S* __restrict__ src, int D,
                                               int c) {
#pragma unroll 4
  for (int i = 0; i < n; ++i) {
    const int ri = __shfl_sync(0xffffffffu, row, i);
    const float ci = __shfl_sync(0xffffffffu, coef, i);
    if (ri >= 0 && c < D) acc += ci * to_f(src[int64_t(ri) * D + c]);
  }
  return acc;
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

}  // namespace
}  // namespace torchrec_tt::cuda
