// The work plan of one batch on CPU: which rows to rebuild (each unique id once), which partial
// products they share (ids with the same leading digits share G1[i1]...G_k[i_k]), and how ids map
// back to bags. Built once per call in O(n log n) for n ids; the products then run over it in parallel.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../tt_checks.h"

namespace torchrec_tt::cpu {

// Read-only view of a hot-row cache's id -> slot map (built in Python by TTRowCache._rebuild_map):
// open addressing with linear probing over 2^log_size entries (id << shift | slot), -1 = empty;
// Fibonacci hashing. A probe stops at an empty entry, or after the whole table (a malformed map).
struct CacheMap {
  const int64_t* entries = nullptr;
  int64_t log_size = 0, shift = 0, rows = 0;

  int64_t home(int64_t id) const {
    return static_cast<int64_t>((static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ULL) >> (64 - log_size));
  }
  // Cache slot of a valid id, -1 if it is not cached.
  int64_t lookup(int64_t id) const {
    const int64_t size = int64_t(1) << log_size;
    for (int64_t i = home(id), n = 0; n < size && entries[i] >= 0; i = (i + 1) & (size - 1), ++n) {
      if ((entries[i] >> shift) == id) {
        const int64_t slot = entries[i] & ((int64_t(1) << shift) - 1);
        return slot < rows ? slot : -1;
      }
    }
    return -1;
  }
  void prefetch(int64_t id) const { __builtin_prefetch(entries + home(id)); }
};

struct TTPlan {
  int64_t num_bags = 0;
  std::vector<int64_t> bag_start;  // num_bags + 1 entries: ids of bag b are [bag_start[b], bag_start[b+1])
  std::vector<int64_t> bag_of;     // id position -> bag
  // id position -> unique row slot (>= 0, rebuilt from the cores), -1 if the id was dropped, or
  // -2 - c for the c-th cached unique id (its row is in cache slot cached_slot[c]; never rebuilt).
  std::vector<int64_t> slot;
  std::vector<int64_t> bag_valid;  // ids kept per bag (mean pooling divides by it)
  std::vector<int64_t> occ_start;  // CSR: positions of each unique row's occurrences
  std::vector<int64_t> occ;
  // Cached unique ids: their cache slot and the CSR of their occurrences (empty without a cache).
  std::vector<int64_t> cached_slot, cached_occ_start, cached_occ;
  // Prefix tree, level k = 0..d-1 holds the distinct prefixes (i_1..i_{k+1}) of the sorted ids;
  // the last level holds the unique ids themselves (slot order).
  std::vector<std::vector<int64_t>> digit;        // digit i_{k+1} of each node
  std::vector<std::vector<int64_t>> parent;       // node of level k-1 (k >= 1)
  std::vector<std::vector<int64_t>> first_child;  // CSR of children at level k+1 (k < d-1)
  // Nodes of level k grouped by digit: each core slice's gradient is summed by one thread, and a
  // narrow level's products run one per slice.
  std::vector<std::vector<int64_t>> by_digit_start, by_digit;

  int64_t num_unique() const { return static_cast<int64_t>(occ_start.size()) - 1; }
  int64_t num_cached() const { return static_cast<int64_t>(cached_slot.size()); }
  int64_t level_size(int64_t k) const { return static_cast<int64_t>(digit[k].size()); }
};

// Checks the values of ids/offsets/weights (per bounds_check_mode) and builds the plan. With a
// cache, ids it holds are left out of the prefix tree (their rows are copies, not products).
TTPlan build_plan(const std::string& table, const TTShape& s, const at::Tensor& indices,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
                  bool include_last_offset, BoundsCheckMode mode, const CacheMap* cache = nullptr);

}  // namespace torchrec_tt::cpu
