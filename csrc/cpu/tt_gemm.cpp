#include "tt_gemm.h"

namespace torchrec_tt::cpu {

namespace {
// Whether the x86-64-v4 (AVX-512) clone runs on this CPU: room for 4-row register tiles. Both
// tile heights are compiled into every clone; only the one that fits the registers runs.
bool wide_registers() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool wide = __builtin_cpu_supports("x86-64-v4");
  return wide;
#else
  return false;
#endif
}
}  // namespace

// C[m, n] += A[m, k] @ B[k, n]
#define TT_DEFINE_GEMMS(T)                                                                                    \
  TT_MULTIVERSION void gemm_nn_acc(T* c, const T* a, const T* b, int64_t m, int64_t k, int64_t n) {      \
    if (wide_registers()) return rank_update<T, 4>(c, a, k, 1, b, m, k, n);                               \
    rank_update<T, 2>(c, a, k, 1, b, m, k, n);                                                            \
  }                                                                                                       \
  /* C[r, n] += A[m, r]^T @ B[m, n] */                                                                     \
  TT_MULTIVERSION void gemm_tn_acc(T* c, const T* a, const T* b, int64_t m, int64_t r, int64_t n) {      \
    if (wide_registers()) return rank_update<T, 4>(c, a, 1, r, b, r, m, n);                               \
    rank_update<T, 2>(c, a, 1, r, b, r, m, n);                                                            \
  }                                                                                                       \
  TT_MULTIVERSION void transpose(T* dst, const T* src, int64_t rows, int64_t cols) {                      \
    transpose_blocked<T>(dst, src, rows, cols);                                                           \
  }
TT_DEFINE_GEMMS(float)
TT_DEFINE_GEMMS(double)
#undef TT_DEFINE_GEMMS

}  // namespace torchrec_tt::cpu
