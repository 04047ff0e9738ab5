// Small dense products used by the TT chain on CPU. The matrices are tiny (a few to a few
// hundred rows/columns), so BLAS call overhead would dominate: these loops keep the inner
// dimension contiguous so the compiler vectorises it, and are compiled for AVX-512, AVX2 and
// baseline x86-64 with runtime dispatch (gcc target_clones).
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TT_MULTIVERSION
#endif

namespace torchrec_tt::cpu {

// C[rows, n] += sum_t A(row, t) * B[t, :], with A(row, t) = a[row * a_row + t * a_col].
// Covers C += A @ B (a_row = depth, a_col = 1) and C += A^T @ B (a_row = 1, a_col = rows).
template <typename T>
inline __attribute__((always_inline)) void rank_update(T* __restrict__ c, const T* __restrict__ a,
                                                       int64_t a_row, int64_t a_col, const T* __restrict__ b,
                                                       int64_t rows, int64_t depth, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict__ ci = c + i * n;
    const T* ai = a + i * a_row;
    int64_t t = 0;
    for (; t + 4 <= depth; t += 4) {  // four rows of B per pass: C is loaded and stored 4x less
      const T a0 = ai[t * a_col], a1 = ai[(t + 1) * a_col], a2 = ai[(t + 2) * a_col], a3 = ai[(t + 3) * a_col];
      const T* b0 = b + t * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += a0 * b0[j] + a1 * b0[n + j] + a2 * b0[2 * n + j] + a3 * b0[3 * n + j];
    }
    for (; t < depth; ++t) {
      const T at = ai[t * a_col];
      const T* bt = b + t * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += at * bt[j];
    }
  }
}

// Entry points, one per dtype; tt_gemm.cpp compiles each for several ISAs (the template body is
// inlined into each clone) and the loader picks the best one for the running CPU.
#define TT_DECLARE_GEMMS(T)                                                             \
  void gemm_nn_acc(T* c, const T* a, const T* b, int64_t m, int64_t k, int64_t n);  \
  void gemm_tn_acc(T* c, const T* a, const T* b, int64_t m, int64_t r, int64_t n);

TT_DECLARE_GEMMS(float)
TT_DECLARE_GEMMS(double)
#undef TT_DECLARE_GEMMS

}  // namespace torchrec_tt::cpu
