#include "tt_plan.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace torchrec_tt::cpu {
namespace {

template <typename Id>
void collect_valid_ids(const std::string& table, const TTShape& s, const Id* ids, int64_t n,
                       BoundsCheckMode mode, std::vector<int64_t>& keys, std::vector<int64_t>& pos) {
  keys.reserve(n);
  pos.reserve(n);
  int64_t dropped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    if (id >= 0 && id < s.num_embeddings) {
      keys.push_back(id);
      pos.push_back(i);
      continue;
    }
    TT_CHECK(mode != BoundsCheckMode::kError, INDEX, table, id < 0 ? "negative id " : "id ", id,
             " at position ", i, " is out of range [0, ", s.num_embeddings, ")");
    ++dropped;
  }
  if (dropped > 0 && mode == BoundsCheckMode::kWarn) {
    TORCH_WARN("torchrec_tt: table '", table, "': dropped ", dropped, " of ", n, " ids outside [0, ",
               s.num_embeddings, ")");
  }
}

// Stable LSD radix sort of (key, value) pairs by key, keys in [0, max_key): a few linear passes,
// much cheaper than a comparison sort for the batch sizes of embedding lookups.
void radix_sort_pairs(std::vector<int64_t>& keys, std::vector<int64_t>& vals, int64_t max_key) {
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  const size_t n = keys.size();
  std::vector<int64_t> k2(n), v2(n), count(kBuckets);
  for (int shift = 0; shift < 64 && (max_key - 1) >> shift > 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t here = c;
      c = sum;
      sum += here;
    }
    for (size_t i = 0; i < n; ++i) {
      const int64_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      k2[dst] = keys[i];
      v2[dst] = vals[i];
    }
    keys.swap(k2);
    vals.swap(v2);
  }
}

}  // namespace

TTPlan build_plan(const std::string& table, const TTShape& s, const at::Tensor& indices,
                  const at::Tensor& offsets_in, const std::optional<at::Tensor>& per_sample_weights,
                  bool include_last_offset, BoundsCheckMode mode, bool group_by_digit,
                  const CacheMap* cache) {
  TTPlan plan;
  const int64_t n = indices.numel();
  const auto offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t count = offsets.numel();
  check_offsets_values(table, off, count, n, include_last_offset);
  if (per_sample_weights.has_value() && n > 0) {
    TT_CHECK(at::isfinite(*per_sample_weights).all().item<bool>(), VALUE, table,
             "per_sample_weights contains NaN or infinity");
  }
  plan.num_bags = num_bags(offsets, include_last_offset);

  std::vector<int64_t> keys, positions;  // valid ids and where they occur, sorted by id
  const auto ids = indices.contiguous();
  if (ids.scalar_type() == at::kLong) {
    collect_valid_ids(table, s, ids.data_ptr<int64_t>(), n, mode, keys, positions);
  } else {
    collect_valid_ids(table, s, ids.data_ptr<int32_t>(), n, mode, keys, positions);
  }
  radix_sort_pairs(keys, positions, s.num_embeddings);

  plan.bag_of.assign(n, -1);
  plan.slot.assign(n, -1);
  plan.bag_valid.assign(plan.num_bags, 0);
  plan.bag_start.assign(plan.num_bags + 1, n);
  for (int64_t b = 0; b < plan.num_bags; ++b) {
    plan.bag_start[b] = off[b];
    const int64_t end = b + 1 < count ? off[b + 1] : n;
    std::fill(plan.bag_of.begin() + off[b], plan.bag_of.begin() + end, b);
  }
  if (plan.num_bags > 0) plan.bag_start[plan.num_bags] = include_last_offset ? off[count - 1] : n;

  // Divisors to read the prefix of length k+1 of an id: id / (p_{k+2} * ... * p_d).
  std::vector<int64_t> div(s.d, 1);
  for (int64_t k = s.d - 2; k >= 0; --k) div[k] = div[k + 1] * s.p[k + 1];
  plan.digit.assign(s.d, {});
  plan.parent.assign(s.d, {});
  std::vector<int64_t> last_prefix(s.d, -1);
  plan.occ.reserve(keys.size());
  int64_t last_id = -1, cached = -1;  // cache slot of the current id, -1 if it is rebuilt
  for (size_t i = 0; i < keys.size(); ++i) {
    const int64_t id = keys[i];
    if (id != last_id) {
      last_id = id;
      cached = cache ? cache->lookup(id) : -1;
      if (cached >= 0) {
        plan.cached_slot.push_back(cached);
        plan.cached_occ_start.push_back(static_cast<int64_t>(plan.cached_occ.size()));
      } else {
        plan.occ_start.push_back(static_cast<int64_t>(plan.occ.size()));
        bool new_branch = false;  // once a prefix changes, all longer prefixes are new nodes too
        for (int64_t k = 0; k < s.d; ++k) {
          const int64_t prefix = id / div[k];
          if (new_branch || prefix != last_prefix[k]) {
            new_branch = true;
            last_prefix[k] = prefix;
            plan.digit[k].push_back(prefix % s.p[k]);
            if (k > 0) plan.parent[k].push_back(plan.level_size(k - 1) - 1);
          }
        }
      }
    }
    if (cached >= 0) {
      plan.cached_occ.push_back(positions[i]);
      plan.slot[positions[i]] = -2 - cached;
    } else {
      plan.occ.push_back(positions[i]);
    }
  }
  plan.occ_start.push_back(static_cast<int64_t>(plan.occ.size()));
  plan.cached_occ_start.push_back(static_cast<int64_t>(plan.cached_occ.size()));
  for (int64_t u = 0; u + 1 < static_cast<int64_t>(plan.occ_start.size()); ++u) {
    for (int64_t o = plan.occ_start[u]; o < plan.occ_start[u + 1]; ++o) plan.slot[plan.occ[o]] = u;
  }
  for (int64_t pos = 0; pos < n; ++pos) {
    if (plan.slot[pos] != -1) ++plan.bag_valid[plan.bag_of[pos]];
  }

  plan.first_child.assign(s.d, {});
  for (int64_t k = 0; k + 1 < s.d; ++k) {
    auto& fc = plan.first_child[k];
    fc.assign(plan.level_size(k) + 1, 0);
    for (int64_t par : plan.parent[k + 1]) ++fc[par + 1];
    for (int64_t j = 0; j < plan.level_size(k); ++j) fc[j + 1] += fc[j];
  }
  if (group_by_digit) {  // counting sort of each level's nodes by digit
    plan.by_digit_start.assign(s.d, {});
    plan.by_digit.assign(s.d, {});
    for (int64_t k = 0; k < s.d; ++k) {
      auto& start = plan.by_digit_start[k];
      auto& order = plan.by_digit[k];
      start.assign(s.p[k] + 1, 0);
      for (int64_t dg : plan.digit[k]) ++start[dg + 1];
      for (int64_t v = 0; v < s.p[k]; ++v) start[v + 1] += start[v];
      order.resize(plan.level_size(k));
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t j = 0; j < plan.level_size(k); ++j) order[fill[plan.digit[k][j]]++] = j;
    }
  }
  return plan;
}

}  // namespace torchrec_tt::cpu
