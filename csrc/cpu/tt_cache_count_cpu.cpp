// Hot-row cache bookkeeping of one lookup in one pass (CPU): what TTRowCache._count does with a
// handful of tensor ops (masks, sums, index_add_, a boolean gather, two slice writes), done while
// the lookup's `where` is still in cache. Same results bit for bit: hits add `weight` to their
// slot's counter in position order, missed ids are appended in position order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../tt_checks.h"

namespace torchrec_tt::cpu {
namespace {

void check_count_args(const std::string& table, const at::Tensor& where, const at::Tensor& indices,
                      const at::Tensor& slot_counts, const at::Tensor& hit_stats, const at::Tensor& pending_ids,
                      const at::Tensor& pending_steps, int64_t fill, bool training) {
  for (const auto* t : {&where, &indices, &slot_counts, &hit_stats, &pending_ids, &pending_steps}) {
    TT_CHECK(t->device().is_cpu(), VALUE, table, "cache counting runs on CPU tensors, got one on ", t->device());
    TT_CHECK(t->dim() == 1 && t->is_contiguous(), VALUE, table,
             "cache counting takes contiguous 1-d tensors, got shape ", t->sizes());
  }
  TT_CHECK(where.scalar_type() == at::kLong && indices.scalar_type() == at::kLong &&
               hit_stats.scalar_type() == at::kLong && pending_ids.scalar_type() == at::kLong &&
               pending_steps.scalar_type() == at::kLong && slot_counts.scalar_type() == at::kDouble,
           TYPE, table, "cache counting takes int64 where/ids/stats/pending buffers and float64 slot counts");
  TT_CHECK(where.numel() == indices.numel(), VALUE, table, "where has ", where.numel(), " entries for ",
           indices.numel(), " ids");
  TT_CHECK(hit_stats.numel() >= 2, VALUE, table, "hit_stats needs 2 entries (hits, misses)");
  TT_CHECK(pending_ids.numel() == pending_steps.numel(), VALUE, table,
           "pending_ids and pending_steps differ in size");
  TT_CHECK(!training || (fill >= 0 && fill + indices.numel() <= pending_ids.numel()), VALUE, table,
           "pending buffer of ",
           pending_ids.numel(), " entries cannot take ", indices.numel(), " more ids at fill ", fill,
           " (merge first)");
}

// Returns the number of ids appended to the pending buffer (0 when not training).
at::Tensor tt_cache_count_(const at::Tensor& where, const at::Tensor& indices, at::Tensor& slot_counts,
                           at::Tensor& hit_stats, at::Tensor& pending_ids, at::Tensor& pending_steps, int64_t fill,
                           double weight, int64_t step, bool training, c10::string_view table_name) {
  const std::string table(table_name);
  check_count_args(table, where, indices, slot_counts, hit_stats, pending_ids, pending_steps, fill, training);
  const int64_t n = where.numel(), slots = slot_counts.numel();
  const int64_t* w = where.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {  // validate before writing anything
    TT_CHECK(w[i] >= -2 && w[i] < slots, INDEX, table, "cache slot ", w[i], " at position ", i,
             " is outside [-2, ", slots, ")");
  }
  const int64_t* ids = indices.data_ptr<int64_t>();
  double* counts = slot_counts.data_ptr<double>();
  int64_t* p_ids = pending_ids.data_ptr<int64_t>() + fill;
  int64_t* p_steps = pending_steps.data_ptr<int64_t>() + fill;
  int64_t hits = 0, misses = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] >= 0) {
      ++hits;
      if (training) counts[w[i]] += weight;
    } else if (w[i] == -1) {
      if (training) {
        p_ids[misses] = ids[i];
        p_steps[misses] = step;
      }
      ++misses;
    }
  }
  int64_t* stats = hit_stats.data_ptr<int64_t>();
  stats[0] += hits;
  stats[1] += misses;
  return at::scalar_tensor(training ? misses : 0, where.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) { m.impl("tt_cache_count_", &tt_cache_count_); }

}  // namespace torchrec_tt::cpu
