// Small dense products used by the TT chain on CPU. The matrices are tiny (a few to a few
// hundred rows/columns), so BLAS call overhead would dominate: these loops keep the inner
// dimension contiguous so the compiler vectorises it, and are compiled for AVX-512, AVX2 and
// baseline x86-64 with runtime dispatch (gcc target_clones).
#pragma once
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TT_MULTIVERSION
#endif

namespace torchrec_tt::cpu {

// C[rows, cols] += sum_t A(row, t) * B[t, :], with A(row, t) = a[row * a_row + t * a_col]; C and B rows
// are ldc / ldb apart. The column loop is contiguous (vectorised); four rows of B per pass so C is
// loaded and stored 4x less. Used for column blocks narrower than a register tile.
template <typename T>
inline __attribute__((always_inline)) void rank_update_rows(T* __restrict__ c, int64_t ldc, const T* __restrict__ a,
                                                            int64_t a_row, int64_t a_col, const T* __restrict__ b,
                                                            int64_t ldb, int64_t rows, int64_t depth, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict__ ci = c + i * ldc;
    const T* ai = a + i * a_row;
    int64_t t = 0;
    for (; t + 4 <= depth; t += 4) {
      const T a0 = ai[t * a_col], a1 = ai[(t + 1) * a_col], a2 = ai[(t + 2) * a_col], a3 = ai[(t + 3) * a_col];
      const T* b0 = b + t * ldb;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j)
        ci[j] += a0 * b0[j] + a1 * b0[ldb + j] + a2 * b0[2 * ldb + j] + a3 * b0[3 * ldb + j];
    }
    for (; t < depth; ++t) {
      const T at = ai[t * a_col];
      const T* bt = b + t * ldb;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) ci[j] += at * bt[j];
    }
  }
}

// One MT x (NV vectors) block of C kept in registers over the whole depth: B is read once per block
// and C loaded and stored once (instead of once per pass of the row loop above). GCC vector types
// (64 bytes) become one zmm, two ymm or four xmm registers depending on the clone's ISA.
template <typename T>
struct Vec64;  // (an alias template cannot carry vector_size: GCC drops it on a dependent type)
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64), aligned(alignof(float))));
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64), aligned(alignof(double))));
};

template <typename T, int MT, int NV>
inline __attribute__((always_inline)) void register_tile(T* __restrict__ c, int64_t ldc, const T* __restrict__ a,
                                                         int64_t a_row, int64_t a_col, const T* __restrict__ b,
                                                         int64_t ldb, int64_t depth) {
  using V = typename Vec64<T>::type;
  constexpr int L = 64 / sizeof(T);
  V acc[MT][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t t = 0; t < depth; ++t) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) __builtin_memcpy(&bv[v], b + t * ldb + v * L, sizeof(V));
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const T av = a[i * a_row + t * a_col];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V cv;
      __builtin_memcpy(&cv, c + i * ldc + v * L, sizeof(V));
      cv += acc[i][v];
      __builtin_memcpy(c + i * ldc + v * L, &cv, sizeof(V));
    }
}

// C[rows, n] += sum_t A(row, t) * B[t, :] (C, B contiguous with n columns).
// Covers C += A @ B (a_row = depth, a_col = 1) and C += A^T @ B (a_row = 1, a_col = rows).
// MT rows per tile: 2 x 2 accumulators (8 ymm on AVX2) leave room for B; AVX-512's 32 registers
// take 4 rows (B is then read once per 4 rows of C, and the FMAs, not the loads, set the pace).
template <typename T, int MT>
inline __attribute__((always_inline)) void rank_update(T* __restrict__ c, const T* __restrict__ a,
                                                       int64_t a_row, int64_t a_col, const T* __restrict__ b,
                                                       int64_t rows, int64_t depth, int64_t n) {
  constexpr int NV = 2;                        // 64-byte vectors per tile row
  constexpr int NT = NV * 64 / int(sizeof(T));  // columns per tile
  int64_t j0 = 0;
  for (; j0 + NT <= n; j0 += NT) {
    int64_t i0 = 0;
    for (; i0 + MT <= rows; i0 += MT)
      register_tile<T, MT, NV>(c + i0 * n + j0, n, a + i0 * a_row, a_row, a_col, b + j0, n, depth);
    if constexpr (MT > 2) {
      for (; i0 + 2 <= rows; i0 += 2)
        register_tile<T, 2, NV>(c + i0 * n + j0, n, a + i0 * a_row, a_row, a_col, b + j0, n, depth);
    }
    for (; i0 < rows; ++i0) register_tile<T, 1, NV>(c + i0 * n + j0, n, a + i0 * a_row, a_row, a_col, b + j0, n, depth);
  }
  if (j0 < n) rank_update_rows<T>(c + j0, n, a, a_row, a_col, b + j0, n, rows, depth, n - j0);
}

// In-register transpose of one L x L block (L = 32 bytes / sizeof(T): 8 floats or 4 doubles):
// log2(L) rounds that swap the off-diagonal h x h sub-blocks, h = 1, 2, ... L/2, each round one
// two-source shuffle per row (vunpck/vshuf/vperm2f128 on AVX2). About 3 shuffles per 8 values
// instead of one strided scalar load per value.
template <typename T>
struct Vec32 {
  static constexpr int L = 32 / sizeof(T);
  typedef T type __attribute__((vector_size(32), aligned(alignof(T))));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_index;
  typedef lane_index mask __attribute__((vector_size(32)));
};

template <typename T, int H>
inline __attribute__((always_inline)) void swap_blocks(typename Vec32<T>::type* r) {
  using V = Vec32<T>;
  typename V::mask lo, hi;  // lane p of block 2H: from row i (p < H) or row i + H (p >= H)
  for (int p = 0; p < V::L; ++p) {
    const int base = p / (2 * H) * (2 * H), off = p % (2 * H);
    lo[p] = off < H ? base + off : V::L + base + off - H;
    hi[p] = off < H ? base + H + off : V::L + base + off;
  }
#pragma GCC unroll 8
  for (int i = 0; i < V::L; ++i) {
    if (i % (2 * H) >= H) continue;
    const typename V::type a = r[i], b = r[i + H];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + H] = __builtin_shuffle(a, b, hi);
  }
}

template <typename T>
inline __attribute__((always_inline)) void transpose_block(T* __restrict__ dst, int64_t ld_dst,
                                                           const T* __restrict__ src, int64_t ld_src) {
  using V = Vec32<T>;
  typename V::type r[V::L];
#pragma GCC unroll 8
  for (int i = 0; i < V::L; ++i) __builtin_memcpy(&r[i], src + i * ld_src, sizeof(r[i]));
  swap_blocks<T, 1>(r);
  swap_blocks<T, 2>(r);
  if constexpr (V::L == 8) swap_blocks<T, 4>(r);
#pragma GCC unroll 8
  for (int i = 0; i < V::L; ++i) __builtin_memcpy(dst + i * ld_dst, &r[i], sizeof(r[i]));
}

// dst[cols, rows] = src[rows, cols]^T: L x L blocks in registers, the edges element by element.
template <typename T>
inline __attribute__((always_inline)) void transpose_blocked(T* __restrict__ dst, const T* __restrict__ src,
                                                             int64_t rows, int64_t cols) {
  constexpr int L = Vec32<T>::L;
  const int64_t rows_b = rows / L * L, cols_b = cols / L * L;
  for (int64_t r0 = 0; r0 < rows_b; r0 += L)
    for (int64_t c0 = 0; c0 < cols_b; c0 += L)
      transpose_block<T>(dst + c0 * rows + r0, rows, src + r0 * cols + c0, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < rows_b ? cols_b : 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// Entry points, one per dtype; tt_gemm.cpp compiles each for several ISAs (the template body is
// inlined into each clone) and the loader picks the best one for the running CPU.
#define TT_DECLARE_GEMMS(T)                                                             \
  void gemm_nn_acc(T* c, const T* a, const T* b, int64_t m, int64_t k, int64_t n);  \
  void gemm_tn_acc(T* c, const T* a, const T* b, int64_t m, int64_t r, int64_t n);  \
  void transpose(T* dst, const T* src, int64_t rows, int64_t cols);

TT_DECLARE_GEMMS(float)
TT_DECLARE_GEMMS(double)
#undef TT_DECLARE_GEMMS

}  // namespace torchrec_tt::cpu
