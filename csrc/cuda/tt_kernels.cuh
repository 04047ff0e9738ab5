// CUDA kernels of the torchrec_tt ops, free of torch headers: plain CUDA + CUB, raw pointers,
// host-known sizes, a caller-provided workspace and a stream. The torch glue lives in
// tt_embedding_bag_cuda.cpp.
//
// Semantics are those of the CPU op (../cpu/tt_embedding_bag_cpu.cpp): core k is
// [p_k, r_{k-1}, q_k, r_k]; row i = G_0[i_0] ... G_{d-1}[i_{d-1}] over the mixed-radix digits of i
// (most significant first); sum/mean pooling with optional per-sample weights; empty bags give 0;
// ids outside [0, N) are dropped by every kernel (the bounds-check policy is applied by the caller
// from the validation record).
//
// Algorithm (no host synchronisation; every size below is bounded by host-known numbers):
//   1. (id, position) pairs are radix-sorted; invalid ids get the sentinel N and sort last.
//   2. Per level k, a flag marks the first sorted position of each distinct prefix (i_0..i_k);
//      one inclusive scan of every level's flags (read off the sorted keys) turns them into node
//      numbers. The number of nodes of a level stays on
//      the device (the last scan element); kernels are launched over the host bound
//      B_k = min(n, p_0...p_k) and exit early.
//   3. Forward: each distinct prefix product P_k (q_0..q_k x r_{k+1}, fp32) is computed once
//      (shared-prefix reuse), the last level holds each unique row once; bags pool by gathering
//      their rows in position order (deterministic, no atomics).
//   Small batches (<= 11,264 ids, N < 2^32): steps 1-2 with the validation in one launch of one block,
//      and backward's digit grouping (below) in one launch of a block per level
//      (tt_small_plan_kernels.cuh); same plan, bit for bit.
//   4. Backward (on forward's plan when the glue hands it over, else a new one): each unique row's
//      gradient is a segmented sum over its sorted occurrences; the levels are walked in reverse.
//      Backward first groups every level's nodes by (level, digit) with one more radix sort.
//      Per level k, one block per core slice v (a) computes for each node j with digit v its share
//      dP_k[j] @ G_k[v]^T of its parent's gradient (slice staged once in shared memory; 4x4 tiles per
//      thread, or a warp per node where the reduction is long and the rank wide), after which
//      dP_{k-1}[parent] sums its children's shares in node order (levels with short slices and few
//      children per parent: one pass per parent instead, each share recomputed, same operations in the
//      same order); then (b) sums dG_k[v] = sum_j P_{k-1}[parent_j]^T @ dP_k[j] in node order (E rows
//      of one column per thread in registers; spare thread groups split the nodes, partial tiles added
//      in split order). No floating-point atomics anywhere: results are bitwise reproducible. Fused
//      mode applies the optimizer to each touched slice in (b), which runs after (a), the last read of
//      core k.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace torchrec_tt::cuda {

// Compile-time bound on the number of cores (the host glue rejects larger d with a clear error).
constexpr int kMaxCores = 8;

// Shapes of a TT table: p, q have d entries, r has d + 1 (r[0] = r[d] = 1).
struct TTDims {
  int d = 0;
  int64_t num_embeddings = 0;
  int64_t embedding_dim = 0;
  int64_t p[kMaxCores] = {};
  int64_t q[kMaxCores] = {};
  int64_t r[kMaxCores + 1] = {};
};

// One batch. `offsets` is int64 on the device (the glue converts int32 offsets).
struct BatchDesc {
  int64_t n = 0;  // number of ids
  const int64_t* offsets = nullptr;
  int64_t num_offsets = 0;
  int64_t num_bags = 0;
  bool include_last_offset = false;
  bool mean = false;
};

// Validation record, written by launch_validate into device memory (32 bytes).
// key = kind << 56 | position, the smallest key wins (so the reported error is the one the CPU op
// would raise first); kNoErrorKey when the batch is valid.
enum ErrorKind : unsigned long long {
  kErrNone = 0,
  kErrOffsetsStart = 1,       // value0 = offsets[0]
  kErrOffsetsDecreasing = 2,  // position b, value0 = offsets[b], value1 = offsets[b-1]
  kErrLastOffset = 3,         // position count-1, value0 = offsets[count-1]
  kErrWeightNotFinite = 4,    // per_sample_weights has NaN/inf
  kErrIdOutOfRange = 5,       // position i, value0 = ids[i] (as int64)
};
constexpr unsigned long long kNoErrorKey = ~0ull;
constexpr int kErrorKindShift = 56;
constexpr unsigned long long kErrorPosMask = (1ull << kErrorKindShift) - 1;

struct ErrorRecord {
  unsigned long long key;      // kNoErrorKey or kind << 56 | position
  unsigned long long value0;   // int64 bit patterns
  unsigned long long value1;
  unsigned long long dropped;  // number of ids outside [0, N)
};
static_assert(sizeof(ErrorRecord) == 32, "ErrorRecord must stay 4 x 8 bytes (the glue reads it as int64[4])");

enum class Optimizer : int { kNone = 0, kSgd = 1, kAdagrad = 2, kRowwiseAdagrad = 3 };

// Fused update: state[k] is fp32, shaped like core k (adagrad) or [p_k] (rowwise_adagrad).
struct UpdateArgs {
  Optimizer opt = Optimizer::kNone;
  float lr = 0.f;
  float eps = 0.f;
  float* state[kMaxCores] = {};
};

template <typename T>
struct CorePtrs {
  T* ptr[kMaxCores] = {};
};

// Bytes of workspace the launchers need (host-only computation, no launch; CUB's temp-storage sizes
// are queried here); 0 when there is nothing to compute (n == 0). The forward workspace holds the
// batch's plan (sorted ids, prefix tree, partial products, bag sizes); backward takes a plan
// workspace of the same size plus its own of backward_workspace_bytes.
// Plan memory is O(n * sum_k min(1, p_0..p_k / n) * q_0..q_k * r_{k+1}) fp32 plus a few int arrays of n.
size_t forward_workspace_bytes(const TTDims& dims, const BatchDesc& batch);
size_t backward_workspace_bytes(const TTDims& dims, const BatchDesc& batch);

// Validation: checks offsets (start at 0, non-decreasing, last offset), per_sample_weights
// finiteness and ids; fills *record (device memory) on `stream`. record_id_errors: report the first
// out-of-range id as an error (bounds_check_mode 0); out-of-range ids are always counted in
// record->dropped. Never traps, never synchronises.
template <typename T, typename Id>
cudaError_t launch_validate(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            bool record_id_errors, ErrorRecord* record, cudaStream_t stream);

// True where launch_forward validates the batch itself (small batches: one launch validates and
// builds the plan), filling `record` as launch_validate would; the caller then launches no validation.
bool forward_validates(const TTDims& dims, const BatchDesc& batch);

// Forward: out [num_bags, D] (every bag written). plan_workspace: forward_workspace_bytes bytes; on
// return it holds the batch's plan, which the backward of the same batch (same ids, offsets, weights
// and cores) may take instead of building its own. record: written where forward_validates() (then
// non-null), with out-of-range ids reported as errors if record_id_errors; ignored otherwise.
template <typename T, typename Id>
cudaError_t launch_forward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                           CorePtrs<const T> cores, T* out, ErrorRecord* record, bool record_id_errors,
                           void* plan_workspace, size_t plan_bytes, cudaStream_t stream);

// Backward. grad_out [num_bags, D]. With update.opt == kNone the slice gradients are written into
// core_grads (zero-initialised by the caller; untouched slices stay 0); otherwise the optimizer is
// applied to `cores` in place. psw_grad (nullable) receives d out / d per_sample_weights.
// guard (nullable): a validation record of the same batch; if it holds an offsets/weights error,
// nothing is written to cores, state or core_grads (device-side check, no synchronisation).
// plan_ready: plan_workspace holds this batch's plan from launch_forward (backward adds only its
// digit groups); otherwise the plan is built into it. workspace: backward_workspace_bytes bytes.
template <typename T, typename Id>
cudaError_t launch_backward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            const T* grad_out, CorePtrs<T> cores, CorePtrs<T> core_grads,
                            const UpdateArgs& update, T* psw_grad, const ErrorRecord* guard, void* plan_workspace,
                            size_t plan_bytes, bool plan_ready, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

}  // namespace torchrec_tt::cuda
