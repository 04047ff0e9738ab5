#include "tt_checks.h"

#include <torch/csrc/Exceptions.h>  // torch::PyWarningHandler

#include <bit>

namespace torchrec_tt {

int64_t num_bags(const at::Tensor& offsets, bool include_last_offset) {
  const int64_t n = offsets.numel();
  return include_last_offset ? std::max<int64_t>(n - 1, 0) : n;
}

TTShape check_tt_args(
    const std::string& table,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t num_embeddings,
    int64_t pooling_mode,
    bool include_last_offset,
    int64_t bounds_check_mode) {
  TTShape s;
  s.d = static_cast<int64_t>(cores.size());
  TT_CHECK(s.d >= 2, VALUE, table, "a TT table needs at least 2 cores, got ", s.d);
  const auto& c0 = cores[0];
  TT_CHECK(at::isFloatingType(c0.scalar_type()), TYPE, table, "cores must be floating point, got ",
           c0.scalar_type());
  s.r.push_back(1);
  for (int64_t k = 0; k < s.d; ++k) {
    const auto& c = cores[k];
    TT_CHECK(c.dim() == 4, VALUE, table, "core ", k, " must be 4-D [p, r_in, q, r_out], got shape ",
             c.sizes());
    TT_CHECK(c.scalar_type() == c0.scalar_type(), TYPE, table, "core ", k, " has dtype ", c.scalar_type(),
             " but core 0 has ", c0.scalar_type());
    TT_CHECK(c.device() == c0.device(), VALUE, table, "core ", k, " is on ", c.device(), " but core 0 is on ",
             c0.device());
    TT_CHECK(c.is_contiguous(), VALUE, table, "core ", k, " must be contiguous");
    TT_CHECK(c.size(1) == s.r.back(), VALUE, table, "core ", k, " has input rank ", c.size(1),
             " but the previous output rank is ", s.r.back());
    TT_CHECK(c.size(0) > 0 && c.size(2) > 0 && c.size(3) > 0, VALUE, table, "core ", k,
             " has an empty dimension: ", c.sizes());
    s.p.push_back(c.size(0));
    s.q.push_back(c.size(2));
    s.r.push_back(c.size(3));
  }
  TT_CHECK(s.r.back() == 1, VALUE, table, "the last core must have output rank 1, got ", s.r.back());
  int64_t rows = 1, dim = 1;
  for (int64_t k = 0; k < s.d; ++k) {
    TT_CHECK(rows <= (int64_t(1) << 52) / s.p[k], VALUE, table, "product of p_shapes exceeds 2^52 rows");
    rows *= s.p[k];
    dim *= s.q[k];
  }
  TT_CHECK(num_embeddings > 0 && num_embeddings <= rows, VALUE, table, "num_embeddings=", num_embeddings,
           " must be in [1, prod(p_shapes)=", rows, "]");
  s.num_embeddings = num_embeddings;
  s.embedding_dim = dim;

  for (const auto* t : {&indices, &offsets}) {
    const char* what = t == &indices ? "indices" : "offsets";
    TT_CHECK(t->scalar_type() == at::kLong || t->scalar_type() == at::kInt, TYPE, table, what,
             " must be int32 or int64, got ", t->scalar_type());
    TT_CHECK(t->dim() == 1, VALUE, table, what, " must be 1-D, got shape ", t->sizes());
    TT_CHECK(t->device() == c0.device(), VALUE, table, what, " is on ", t->device(),
             " but the cores are on ", c0.device());
  }
  if (per_sample_weights.has_value()) {
    const auto& w = *per_sample_weights;
    TT_CHECK(w.scalar_type() == c0.scalar_type(), TYPE, table, "per_sample_weights has dtype ",
             w.scalar_type(), " but the cores have ", c0.scalar_type());
    TT_CHECK(w.dim() == 1 && w.numel() == indices.numel(), VALUE, table,
             "per_sample_weights must be 1-D with one weight per id (", indices.numel(), "), got shape ",
             w.sizes());
    TT_CHECK(w.device() == c0.device(), VALUE, table, "per_sample_weights is on ", w.device(),
             " but the cores are on ", c0.device());
  }
  TT_CHECK(pooling_mode == 0 || pooling_mode == 1, VALUE, table, "pooling_mode must be 0 (sum) or 1 (mean), got ",
           pooling_mode);
  TT_CHECK(bounds_check_mode >= 0 && bounds_check_mode <= 2, VALUE, table,
           "bounds_check_mode must be 0 (error), 1 (warn) or 2 (ignore), got ", bounds_check_mode);
  TT_CHECK(!include_last_offset || offsets.numel() >= 1, VALUE, table,
           "with include_last_offset=True offsets needs at least one entry");
  return s;
}

void check_grad_output(const std::string& table, const at::Tensor& grad, int64_t bags, const TTShape& s,
                       const at::Tensor& like) {
  TT_CHECK(grad.dim() == 2 && grad.size(0) == bags && grad.size(1) == s.embedding_dim, VALUE, table,
           "grad_output must have shape [", bags, ", ", s.embedding_dim, "], got ", grad.sizes());
  TT_CHECK(grad.scalar_type() == like.scalar_type(), TYPE, table, "grad_output has dtype ", grad.scalar_type(),
           " but the cores have ", like.scalar_type());
  TT_CHECK(grad.device() == like.device(), VALUE, table, "grad_output is on ", grad.device(),
           " but the cores are on ", like.device());
}

FusedOptimizer parse_optimizer(const std::string& table, const std::string& name) {
  if (name == "sgd") return FusedOptimizer::kSgd;
  if (name == "adagrad") return FusedOptimizer::kAdagrad;
  if (name == "rowwise_adagrad") return FusedOptimizer::kRowwiseAdagrad;
  TT_CHECK(false, VALUE, table, "unsupported fused optimizer '", name,
           "' (supported: sgd, adagrad, rowwise_adagrad; use optimizer=None and any torch.optim "
           "optimizer for the rest)");
  return FusedOptimizer::kSgd;
}

void check_fused_args(const std::string& table, at::TensorList cores, at::TensorList optimizer_state,
                      const at::Tensor& indices, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& per_sample_weights, int64_t num_embeddings,
                      int64_t pooling_mode, bool include_last_offset, int64_t bounds_check_mode,
                      const std::string& optimizer, double learning_rate, double eps) {
  const auto opt = parse_optimizer(table, optimizer);
  check_tt_args(table, cores, indices, offsets, per_sample_weights, num_embeddings, pooling_mode,
                include_last_offset, bounds_check_mode);
  check_optimizer_state(table, opt, cores, optimizer_state, learning_rate, eps);
}

void check_optimizer_state(const std::string& table, FusedOptimizer opt, at::TensorList cores,
                           at::TensorList state, double learning_rate, double eps) {
  TT_CHECK(std::isfinite(learning_rate) && learning_rate >= 0, VALUE, table,
           "learning_rate must be finite and >= 0, got ", learning_rate);
  TT_CHECK(std::isfinite(eps) && eps >= 0, VALUE, table, "eps must be finite and >= 0, got ", eps);
  const size_t expected = opt == FusedOptimizer::kSgd ? 0 : cores.size();
  TT_CHECK(state.size() == expected, VALUE, table, "optimizer state must have ", expected,
           " tensors for this optimizer, got ", state.size());
  for (size_t k = 0; k < state.size(); ++k) {
    const auto& st = state[k];
    const auto want = opt == FusedOptimizer::kAdagrad ? cores[k].sizes().vec()
                                                      : std::vector<int64_t>{cores[k].size(0)};
    TT_CHECK(st.sizes().vec() == want, VALUE, table, "optimizer state ", k, " must have shape ", want,
             ", got ", st.sizes());
    const auto want_dtype = at::toOpMathType(cores[k].scalar_type());
    TT_CHECK(st.scalar_type() == want_dtype, TYPE, table, "optimizer state ", k, " must have dtype ",
             want_dtype, " (the cores' accumulation type), got ", st.scalar_type());
    TT_CHECK(st.device() == cores[k].device() && st.is_contiguous(), VALUE, table, "optimizer state ", k,
             " must be contiguous and on ", cores[k].device());
  }
}

int64_t cache_slot_bits(int64_t rows) {
  return std::max<int64_t>(std::bit_width(static_cast<uint64_t>(rows)), 1);
}

int64_t cache_map_log_size(int64_t rows) {
  return std::bit_width(static_cast<uint64_t>(rows - 1)) + 1;
}

void check_cache_args(const std::string& table, FusedOptimizer opt, at::TensorList cores, int64_t num_embeddings,
                      const at::Tensor& cache_weight, const at::Tensor& cache_state, const at::Tensor& cache_map,
                      const at::Tensor& cache_trained) {
  const auto& like = cores[0];
  int64_t dim = 1;
  for (const auto& c : cores) dim *= c.size(2);
  TT_CHECK(cache_weight.dim() == 2 && cache_weight.size(0) > 0 && cache_weight.size(1) == dim, VALUE, table,
           "cache weight must have shape [rows > 0, ", dim, "], got ", cache_weight.sizes());
  TT_CHECK(cache_weight.scalar_type() == like.scalar_type(), TYPE, table, "cache weight must have the cores' dtype ",
           like.scalar_type(), ", got ", cache_weight.scalar_type());
  const int64_t rows = cache_weight.size(0);
  for (const auto* t : {&cache_weight, &cache_state, &cache_map, &cache_trained}) {
    TT_CHECK(t->device() == like.device() && t->is_contiguous(), VALUE, table,
             "cache tensors must be contiguous and on the cores' device ", like.device());
  }
  if (opt != FusedOptimizer::kSgd) {
    const auto want = opt == FusedOptimizer::kAdagrad ? cache_weight.sizes().vec() : std::vector<int64_t>{rows};
    TT_CHECK(cache_state.sizes().vec() == want, VALUE, table, "cache optimizer state must have shape ", want,
             ", got ", cache_state.sizes());
    TT_CHECK(cache_state.scalar_type() == at::toOpMathType(like.scalar_type()), TYPE, table,
             "cache optimizer state must have dtype ", at::toOpMathType(like.scalar_type()), ", got ",
             cache_state.scalar_type());
  }
  const int64_t entries = int64_t(1) << cache_map_log_size(rows);
  TT_CHECK(cache_map.scalar_type() == at::kLong && cache_map.dim() == 1 && cache_map.numel() == entries, VALUE,
           table, "cache map must be int64 [", entries, "], got ", cache_map.scalar_type(), " ", cache_map.sizes());
  TT_CHECK(cache_trained.scalar_type() == at::kBool && cache_trained.dim() == 1 && cache_trained.size(0) == rows,
           VALUE, table, "cache trained flags must be bool [", rows, "], got ", cache_trained.scalar_type(), " ",
           cache_trained.sizes());
  const int64_t id_bits = std::bit_width(static_cast<uint64_t>(num_embeddings - 1));
  TT_CHECK(id_bits + cache_slot_bits(rows) <= 62, VALUE, table, "a cache of ", rows, " rows cannot index a table of ",
           num_embeddings, " rows (ids and slots must fit together in 62 bits)");
}

void check_offsets_values(const std::string& table, const int64_t* off, int64_t count, int64_t num_ids,
                          bool include_last_offset) {
  if (count == 0) {
    TT_CHECK(num_ids == 0, VALUE, table, "offsets is empty but there are ", num_ids, " ids");
    return;
  }
  TT_CHECK(off[0] == 0, VALUE, table, "offsets must start at 0, got ", off[0]);
  for (int64_t b = 1; b < count; ++b) {
    TT_CHECK(off[b] >= off[b - 1], VALUE, table, "offsets must be non-decreasing, but offsets[", b, "]=",
             off[b], " < offsets[", b - 1, "]=", off[b - 1]);
  }
  if (include_last_offset) {
    TT_CHECK(off[count - 1] == num_ids, VALUE, table, "with include_last_offset=True the last offset (",
             off[count - 1], ") must equal the number of ids (", num_ids, ")");
  } else {
    TT_CHECK(off[count - 1] <= num_ids, VALUE, table, "the last offset (", off[count - 1],
             ") is beyond the number of ids (", num_ids, ")");
  }
}

void warn_dropped_ids(const std::string& table, int64_t dropped, int64_t n, int64_t num_embeddings) {
  // The handler buffers the warning and hands it to Python's warnings module when it goes out of
  // scope (taking the GIL); if a warnings filter turns it into an error, that error is raised.
  torch::PyWarningHandler to_python;
  TORCH_WARN("torchrec_tt: table '", table, "': dropped ", dropped, " of ", n, " ids outside [0, ", num_embeddings,
             ")");
}

}  // namespace torchrec_tt
