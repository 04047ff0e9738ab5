#include "tt_gemm.h"

namespace torchrec_tt::cpu {

// C[m, n] += A[m, k] @ B[k, n]
#define TT_DEFINE_GEMMS(T)                                                                                    \
  TT_MULTIVERSION void gemm_nn_acc(T* c, const T* a, const T* b, int64_t m, int64_t k, int64_t n) {      \
    rank_update<T>(c, a, k, 1, b, m, k, n);                                                               \
  }                                                                                                       \
  /* C[r, n] += A[m, r]^T @ B[m, n] */                                                                     \
  TT_MULTIVERSION void gemm_tn_acc(T* c, const T* a, const T* b, int64_t m, int64_t r, int64_t n) {      \
    rank_update<T>(c, a, 1, r, b, r, m, n);                                                               \
  }
TT_DEFINE_GEMMS(float)
TT_DEFINE_GEMMS(double)
#undef TT_DEFINE_GEMMS

}  // namespace torchrec_tt::cpu
