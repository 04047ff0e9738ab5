// Argument checks shared by every device implementation. Each error names the table and the
// problem, and is raised before anything is written, so a rejected batch leaves cores and
// optimizer state untouched.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <string>
#include <vector>

namespace torchrec_tt {

enum class PoolingMode : int64_t { kSum = 0, kMean = 1 };
// Same values as fbgemm_gpu's BoundsCheckMode (FATAL, WARNING, IGNORE); NONE is not offered.
enum class BoundsCheckMode : int64_t { kError = 0, kWarn = 1, kIgnore = 2 };
enum class FusedOptimizer { kSgd, kAdagrad, kRowwiseAdagrad };

// Shapes of a TT table, read off its cores: core k is [p_k, r_{k-1}, q_k, r_k].
struct TTShape {
  int64_t d = 0;
  int64_t num_embeddings = 0;
  int64_t embedding_dim = 0;
  std::vector<int64_t> p, q, r;  // r has d + 1 entries, r[0] = r[d] = 1
  // Size of one core slice G_k[i_k]: r_{k-1} * q_k * r_k numbers (0-based k: r[k] * q[k] * r[k+1]).
  int64_t slice_numel(int64_t k) const { return r[k] * q[k] * r[k + 1]; }
};

// Warn mode's warning about dropped ids, as a Python UserWarning (catchable with `warnings`):
// torch.ops calls into C++ ops do not turn TORCH_WARN into Python warnings themselves.
void warn_dropped_ids(const std::string& table, int64_t dropped, int64_t n, int64_t num_embeddings);

// Validates metadata (dtypes, devices, ranks, sizes); values are checked by the device code.
TTShape check_tt_args(
    const std::string& table,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t num_embeddings,
    int64_t pooling_mode,
    bool include_last_offset,
    int64_t bounds_check_mode);

// Number of bags described by `offsets` under the include_last_offset convention.
int64_t num_bags(const at::Tensor& offsets, bool include_last_offset);

void check_grad_output(const std::string& table, const at::Tensor& grad, int64_t bags, const TTShape& s,
                       const at::Tensor& like);

FusedOptimizer parse_optimizer(const std::string& table, const std::string& name);

// Everything the fused forward checks beyond the plain forward (the optimizer name, its state and
// hyper-parameters), so a bad optimizer configuration fails before any step. Every device's fused
// forward is this check followed by its plain forward.
void check_fused_args(const std::string& table, at::TensorList cores, at::TensorList optimizer_state,
                      const at::Tensor& indices, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& per_sample_weights, int64_t num_embeddings,
                      int64_t pooling_mode, bool include_last_offset, int64_t bounds_check_mode,
                      const std::string& optimizer, double learning_rate, double eps);

void check_optimizer_state(const std::string& table, FusedOptimizer opt, at::TensorList cores,
                           at::TensorList state, double learning_rate, double eps);

// Hot-row cache arguments: rows [C, D] like the cores, optimizer state for them ([C, D] Adagrad,
// [C] row-wise Adagrad, ignored for SGD), the id -> slot map of TTRowCache (int64 [2^b],
// b = cache_map_log_size(C), linear probing, entries id << cache_slot_bits(C) | slot, -1 empty)
// and the per-slot "trained" flags ([C] bool).
void check_cache_args(const std::string& table, FusedOptimizer opt, at::TensorList cores, int64_t num_embeddings,
                      const at::Tensor& cache_weight, const at::Tensor& cache_state, const at::Tensor& cache_map,
                      const at::Tensor& cache_trained);
// Bits of a map entry that hold the slot: bit length of C (at least 1), as TTRowCache computes it.
int64_t cache_slot_bits(int64_t rows);
// log2 of the map's size for a cache of C rows (at least 2 C entries), as TTRowCache computes it.
int64_t cache_map_log_size(int64_t rows);

// Checks the values of offsets (and per_sample_weights) on the host: first offset 0,
// non-decreasing, consistent with the number of ids; weights finite.
void check_offsets_values(const std::string& table, const int64_t* offsets, int64_t count,
                          int64_t num_ids, bool include_last_offset);

}  // namespace torchrec_tt

#define TT_CHECK(cond, kind, table, ...) \
  TORCH_CHECK_##kind(cond, "torchrec_tt: table '", table, "': ", __VA_ARGS__)
