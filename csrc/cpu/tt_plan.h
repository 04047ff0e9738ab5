// The work plan of one batch on CPU: which rows to rebuild (each unique id once), which partial
// products they share (ids with the same leading digits share G1[i1]...G_k[i_k]), and how ids map
// back to bags. Built once per call in O(n log n) for n ids; the products then run over it in parallel.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../tt_checks.h"

namespace torchrec_tt::cpu {

struct TTPlan {
  int64_t num_bags = 0;
  std::vector<int64_t> bag_start;  // num_bags + 1 entries: ids of bag b are [bag_start[b], bag_start[b+1])
  std::vector<int64_t> bag_of;     // id position -> bag
  std::vector<int64_t> slot;       // id position -> unique row slot, -1 if the id was dropped
  std::vector<int64_t> bag_valid;  // ids kept per bag (mean pooling divides by it)
  std::vector<int64_t> occ_start;  // CSR: positions of each unique row's occurrences
  std::vector<int64_t> occ;
  // Prefix tree, level k = 0..d-1 holds the distinct prefixes (i_1..i_{k+1}) of the sorted ids;
  // the last level holds the unique ids themselves (slot order).
  std::vector<std::vector<int64_t>> digit;        // digit i_{k+1} of each node
  std::vector<std::vector<int64_t>> parent;       // node of level k-1 (k >= 1)
  std::vector<std::vector<int64_t>> first_child;  // CSR of children at level k+1 (k < d-1)
  // Nodes of level k grouped by digit, so each core slice's gradient is summed by one thread.
  std::vector<std::vector<int64_t>> by_digit_start, by_digit;

  int64_t num_unique() const { return static_cast<int64_t>(occ_start.size()) - 1; }
  int64_t level_size(int64_t k) const { return static_cast<int64_t>(digit[k].size()); }
};

// Checks the values of ids/offsets/weights (per bounds_check_mode) and builds the plan.
TTPlan build_plan(const std::string& table, const TTShape& s, const at::Tensor& indices,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
                  bool include_last_offset, BoundsCheckMode mode, bool group_by_digit);

}  // namespace torchrec_tt::cpu
