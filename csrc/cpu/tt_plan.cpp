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
  keys.resize(n);
  pos.resize(n);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free keep; the rare bad id is handled below
    const int64_t id = static_cast<int64_t>(ids[i]);
    keys[kept] = id;
    pos[kept] = i;
    kept += (id >= 0) & (id < s.num_embeddings);
  }
  if (kept < n) {
    for (int64_t i = 0; i < n && mode == BoundsCheckMode::kError; ++i) {
      const int64_t id = static_cast<int64_t>(ids[i]);
      TT_CHECK(id >= 0 && id < s.num_embeddings, INDEX, table, id < 0 ? "negative id " : "id ", id,
               " at position ", i, " is out of range [0, ", s.num_embeddings, ")");
    }
    if (mode == BoundsCheckMode::kWarn) {
      warn_dropped_ids(table, n - kept, n, s.num_embeddings);
    }
  }
  keys.resize(kept);
  pos.resize(kept);
}

// Mixed-radix digits (i_1, ..., i_d) of an id. 64-bit integer division costs tens of cycles and
// the plan needs d - 1 of them per distinct id, so they are done as a multiply by the reciprocal
// in double precision (exact for ids < 2^52 after a +-1 correction).
struct DigitSplitter {
  std::vector<int64_t> p;
  std::vector<double> inv;

  explicit DigitSplitter(const TTShape& s) : p(s.p), inv(s.d) {
    for (int64_t k = 0; k < s.d; ++k) inv[k] = 1.0 / static_cast<double>(p[k]);
  }
  void operator()(int64_t id, int64_t* digits) const {
    for (int64_t k = static_cast<int64_t>(p.size()) - 1; k > 0; --k) {
      int64_t q = static_cast<int64_t>(static_cast<double>(id) * inv[k]);
      q -= q * p[k] > id;
      q += (q + 1) * p[k] <= id;
      digits[k] = id - q * p[k];
      id = q;
    }
    digits[0] = id;
  }
};

// Stable LSD radix sort of (key, value) pairs by key, keys in [0, max_key): a few linear passes,
// much cheaper than a comparison sort for the batch sizes of embedding lookups.
void radix_sort_pairs(std::vector<int64_t>& keys, std::vector<int64_t>& vals, int64_t max_key) {
  constexpr int kBits = 12;  // two passes for tables up to 16.7M rows
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
                  bool include_last_offset, BoundsCheckMode mode, const CacheMap* cache) {
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

  plan.bag_of.resize(n);
  plan.slot.assign(n, -1);
  plan.bag_valid.resize(plan.num_bags);
  plan.bag_start.resize(plan.num_bags + 1);

  // Runs of equal keys: one per distinct id (run_start[r] is written again until run r begins).
  const int64_t nk = static_cast<int64_t>(keys.size());
  std::vector<int64_t> run_start(nk + 1);
  int64_t runs = 0;
  for (int64_t i = 0; i < nk; ++i) {
    run_start[runs] = i;
    runs += i == 0 || keys[i] != keys[i - 1];
  }
  run_start[runs] = nk;
  run_start.resize(runs + 1);

  // Per distinct id, in parallel: its cache slot (-1: rebuilt) and, if rebuilt, its digits.
  std::vector<int64_t> cache_slot(runs, -1), digits(runs * s.d);
  const DigitSplitter split(s);
  at::parallel_for(0, runs, 512, [&](int64_t lo, int64_t hi) {
    constexpr int64_t kAhead = 16;  // the map is larger than the caches: overlap its loads
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t id = keys[run_start[r]];
      if (cache && r + kAhead < hi) cache->prefetch(keys[run_start[r + kAhead]]);
      if (cache) cache_slot[r] = cache->lookup(id);
      if (cache_slot[r] < 0) split(id, digits.data() + r * s.d);
    }
  });

  // Prefix tree over the rebuilt ids and the CSR starts of both kinds of ids: one pass over the
  // distinct ids (sorted, so a node's prefix differs from the previous rebuilt id's or is shared).
  plan.occ_start.resize(runs + 1);
  plan.cached_slot.resize(cache ? runs : 0);
  plan.cached_occ_start.resize(cache ? runs + 1 : 1);
  plan.digit.assign(s.d, std::vector<int64_t>(runs));
  plan.parent.assign(s.d, std::vector<int64_t>(runs));
  std::vector<int64_t> level(s.d, 0), run_index(runs);  // run -> plan.slot of its positions
  int64_t rebuilt = 0, cached = 0, n_occ = 0, n_cached_occ = 0;
  const int64_t* last = nullptr;  // digits of the previous rebuilt id
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t len = run_start[r + 1] - run_start[r];
    if (cache_slot[r] >= 0) {
      plan.cached_slot[cached] = cache_slot[r];
      plan.cached_occ_start[cached] = n_cached_occ;
      run_index[r] = -2 - cached++;
      n_cached_occ += len;
      continue;
    }
    plan.occ_start[rebuilt] = n_occ;
    run_index[r] = rebuilt++;
    n_occ += len;
    const int64_t* dg = digits.data() + r * s.d;
    int64_t k = 0;  // the first level whose prefix differs from the previous rebuilt id's
    while (last && k < s.d && dg[k] == last[k]) ++k;
    for (; k < s.d; ++k) {  // once a prefix changes, all longer prefixes are new nodes too
      plan.digit[k][level[k]] = dg[k];
      if (k > 0) plan.parent[k][level[k]] = level[k - 1] - 1;
      ++level[k];
    }
    last = dg;
  }
  plan.occ_start[rebuilt] = n_occ;
  plan.occ_start.resize(rebuilt + 1);
  plan.cached_occ_start[cached] = n_cached_occ;
  plan.cached_occ_start.resize(cached + 1);
  plan.cached_slot.resize(cached);
  for (int64_t k = 0; k < s.d; ++k) {
    plan.digit[k].resize(level[k]);
    plan.parent[k].resize(k > 0 ? level[k] : 0);
  }

  // Occurrence lists and each position's slot (disjoint writes per distinct id: in parallel).
  plan.occ.resize(n_occ);
  plan.cached_occ.resize(n_cached_occ);
  at::parallel_for(0, runs, 512, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t u = run_index[r];
      int64_t* dst = u < 0 ? plan.cached_occ.data() + plan.cached_occ_start[-2 - u]
                           : plan.occ.data() + plan.occ_start[u];
      for (int64_t i = run_start[r]; i < run_start[r + 1]; ++i) {
        *dst++ = positions[i];
        plan.slot[positions[i]] = u;
      }
    }
  });

  // Bags: each position's bag and the ids kept per bag (mean pooling divides by it).
  at::parallel_for(0, plan.num_bags, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t end = b + 1 < count ? off[b + 1] : n;
      int64_t kept = 0;
      for (int64_t pos = off[b]; pos < end; ++pos) {
        plan.bag_of[pos] = b;
        kept += plan.slot[pos] != -1;
      }
      plan.bag_start[b] = off[b];
      plan.bag_valid[b] = kept;
    }
  });
  if (plan.num_bags > 0) plan.bag_start[plan.num_bags] = include_last_offset ? off[count - 1] : n;

  plan.first_child.assign(s.d, {});
  for (int64_t k = 0; k + 1 < s.d; ++k) {
    auto& fc = plan.first_child[k];
    fc.assign(plan.level_size(k) + 1, 0);
    for (int64_t par : plan.parent[k + 1]) ++fc[par + 1];
    for (int64_t j = 0; j < plan.level_size(k); ++j) fc[j + 1] += fc[j];
  }
  // Each level's nodes grouped by digit (counting sort).
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
  return plan;
}

}  // namespace torchrec_tt::cpu
