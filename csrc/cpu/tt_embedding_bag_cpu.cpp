// CPU implementation of the torchrec_tt ops (schemas in ../schema.cpp).
//
// Each batch's ids are deduped and arranged as a prefix tree (tt_plan.h), so every distinct
// prefix product G_1[i_1]...G_k[i_k] is computed once; the tree is walked level by level in
// parallel over nodes. A training forward leaves its plan and partial products for the backward
// of the same batch (../tt_plan_store.h). Backward walks the tree in reverse; the gradient of each
// core slice is summed by exactly one thread (nodes are grouped by digit), so no atomics and the
// result does not depend on the thread count. With a hot-row cache, cached ids are left out of the
// tree: their rows are read from, and their gradients applied to, the cache's uncompressed rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../tt_checks.h"
#include "tt_gemm.h"
#include "tt_partials.h"
#include "tt_plan.h"
#include "../tt_plan_store.h"

namespace torchrec_tt::cpu {
namespace {

// Coefficient of id `pos` in its bag's pooled output.
template <typename T>
inline T pool_coef(const TTPlan& plan, const T* psw, bool mean, int64_t pos) {
  T c = psw ? psw[pos] : T(1);
  if (mean) c /= static_cast<T>(plan.bag_valid[plan.bag_of[pos]]);
  return c;
}

// The batch's cached rows, gathered in plan order (cache slots are scattered over a table of
// cache rows larger than the CPU caches: one prefetched pass, then the pooling reads a compact copy).
template <typename T>
const T* gather_cached_rows(const TTPlan& plan, const T* cache_w, int64_t D) {
  if (plan.num_cached() == 0) return nullptr;
  T* rows = scratch<T>(kCachedRows, plan.num_cached() * D);
  parallel_chunks(0, plan.num_cached(), 256, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      if (c + kPrefetchAhead < hi) __builtin_prefetch(cache_w + plan.cached_slot[c + kPrefetchAhead] * D);
      std::copy_n(cache_w + plan.cached_slot[c] * D, D, rows + c * D);
    }
  });
  return rows;
}

// Row of the id at `pos`: a leaf of the prefix tree, or a cached row (plan.slot <= -2) of the
// batch's gathered cached rows.
template <typename T>
inline const T* row_of(const TTShape& s, const TTPlan& plan, const Partials<T>& P, const T* cached_rows, int64_t pos) {
  const int64_t u = plan.slot[pos];
  return u >= 0 ? P.node(plan, s.d - 1, u) : cached_rows + (-2 - u) * s.embedding_dim;
}

template <typename T>
at::Tensor forward_impl(const TTShape& s, const TTPlan& plan, at::TensorList cores,
                        const std::optional<at::Tensor>& psw_opt, bool mean, SavedBatch* keep,
                        const T* cache_w = nullptr) {
  auto out = at::zeros({plan.num_bags, s.embedding_dim}, cores[0].options());
  const auto P = compute_partials<T>(s, plan, cores, s.d - 1, nullptr, keep);
  const at::Tensor psw_t = psw_opt.has_value() ? psw_opt->contiguous() : at::Tensor();
  const T* psw = psw_t.defined() ? psw_t.data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  const int64_t D = s.embedding_dim;
  const T* cached_rows = cache_w ? gather_cached_rows(plan, cache_w, D) : nullptr;
  parallel_chunks(0, plan.num_bags, kBagGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      T* ob = o + b * D;
      for (int64_t pos = plan.bag_start[b]; pos < plan.bag_start[b + 1]; ++pos) {
        if (plan.slot[pos] == -1) continue;
        const T c = pool_coef(plan, psw, mean, pos);
        const T* row = row_of(s, plan, P, cached_rows, pos);
        for (int64_t e = 0; e < D; ++e) ob[e] += c * row[e];
      }
    }
  });
  return out;
}

// Gradient of a row: its occurrences' bag gradients, weighted, summed into `du`.
template <typename T>
inline void row_grad(const TTPlan& plan, const T* psw, bool mean, const T* g, int64_t D, const int64_t* occ,
                     int64_t count, T* du) {
  std::fill_n(du, D, T(0));
  for (int64_t o = 0; o < count; ++o) {
    const int64_t pos = occ[o];
    const T c = pool_coef(plan, psw, mean, pos);
    const T* gb = g + plan.bag_of[pos] * D;
    for (int64_t e = 0; e < D; ++e) du[e] += c * gb[e];
  }
}

// Reverse walk of the prefix tree. on_slice(k, digit, grad) receives the full gradient of core
// slice G_k[digit] exactly once, after the last read of core k: it may update the core in place.
// on_cached_row(slot, grad) receives the gradient of each cached row once (cache_w: the cache's rows).
template <typename T, typename OnSlice, typename OnCachedRow>
void backward_impl(const TTShape& s, const TTPlan& plan, at::TensorList cores, const at::Tensor& grad_out,
                   const std::optional<at::Tensor>& psw_opt, bool mean, T* psw_grad, OnSlice on_slice,
                   const T* cache_w, OnCachedRow on_cached_row, const SavedBatch* saved) {
  const int64_t D = s.embedding_dim;
  const auto P = compute_partials<T>(s, plan, cores, psw_grad ? s.d - 1 : s.d - 2, saved, nullptr);
  const at::Tensor psw_t = psw_opt.has_value() ? psw_opt->contiguous() : at::Tensor();
  const T* psw = psw_t.defined() ? psw_t.data_ptr<T>() : nullptr;
  const auto g_t = grad_out.contiguous();
  const T* g = g_t.data_ptr<T>();

  if (psw_grad) {  // only the plain op asks for weight gradients, and it has no cache
    TORCH_INTERNAL_ASSERT(cache_w == nullptr, "per-sample-weight gradients of a cached lookup");
    parallel_chunks(0, static_cast<int64_t>(plan.slot.size()), kBagGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t pos = lo; pos < hi; ++pos) {
        if (plan.slot[pos] == -1) continue;
        const T* row = row_of<T>(s, plan, P, nullptr, pos);
        const T* gb = g + plan.bag_of[pos] * D;
        T dot = 0;
        for (int64_t e = 0; e < D; ++e) dot += row[e] * gb[e];
        psw_grad[pos] = mean ? dot / static_cast<T>(plan.bag_valid[plan.bag_of[pos]]) : dot;
      }
    });
  }

  // Cached rows: one gradient per unique cached id (distinct slots, so updates do not race); the
  // rows are scattered over the cache, so they are prefetched for writing a few ids ahead.
  parallel_chunks(0, plan.num_cached(), kRowGrain, [&](int64_t lo, int64_t hi) {
    thread_local std::vector<T> du;
    du.resize(D);
    for (int64_t c = lo; c < hi; ++c) {
      if (c + kPrefetchAhead < hi) __builtin_prefetch(cache_w + plan.cached_slot[c + kPrefetchAhead] * D, 1);
      const int64_t first = plan.cached_occ_start[c];
      row_grad(plan, psw, mean, g, D, plan.cached_occ.data() + first, plan.cached_occ_start[c + 1] - first, du.data());
      on_cached_row(plan.cached_slot[c], du.data());
    }
  });

  // Gradient of each unique rebuilt row.
  size_t cur_slot = kRowGrad, prev_slot = kPrevGrad;
  T* d_cur = scratch<T>(cur_slot, plan.num_unique() * D);
  parallel_chunks(0, plan.num_unique(), kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t first = plan.occ_start[u];
      row_grad(plan, psw, mean, g, D, plan.occ.data() + first, plan.occ_start[u + 1] - first, d_cur + u * D);
    }
  });

  int64_t m = D;
  for (int64_t k = s.d - 1; k >= 1; --k) {
    const int64_t n = s.q[k] * s.r[k + 1];  // columns of a slice G_k[i] viewed r_k x (q_k r_{k+1})
    m /= s.q[k];                            // m_{k-1}
    const T* core = cores[k].data_ptr<T>();
    const int64_t slice = s.slice_numel(k);
    // dP_{k-1}[parent] = sum over children of dP_k[child] @ G_k[digit]^T (reads core k: before its
    // update). The touched slices are transposed once so the products vectorise along r_k. Each
    // parent's thread accumulates its children's products in place, unless one parent holds so large
    // a share of the level's children that its thread would hold up the level (skewed ids put most
    // children under a few parents): then the per-child products run in parallel over children, and
    // a cheap per-parent sum follows. The choice depends on the batch only, not on the thread count
    // (the two sum in different orders). The per-child buffer (a write and a read of m_{k-1} x r_k
    // values per child) made the Kaggle table's last level 2.5x slower at 2 threads (140 vs 56 us),
    // so one thread taking up to 1/8 of a level's products should still win up to ~20 threads.
    const auto& start = plan.by_digit_start[k];
    const auto& order = plan.by_digit[k];
    T* core_t = scratch<T>(kCoreT, s.p[k] * slice);
    parallel_chunks(0, s.p[k], kNodeGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t v = lo; v < hi; ++v) {
        if (start[v] == start[v + 1]) continue;
        transpose(core_t + v * slice, core + v * slice, s.r[k], n);
      }
    });
    const int64_t block = m * s.r[k];
    T* d_prev = scratch<T>(prev_slot, plan.level_size(k - 1) * block);
    const auto& fc = plan.first_child[k - 1];
    int64_t fan_out = 0;
    for (int64_t jp = 0; jp < plan.level_size(k - 1); ++jp) fan_out = std::max(fan_out, fc[jp + 1] - fc[jp]);
    const auto child_product = [&](T* dst, int64_t j) {
      gemm_nn_acc(dst, d_cur + j * m * n, core_t + plan.digit[k][j] * slice, m, n, s.r[k]);
    };
    if (fan_out <= kFusedFanOut || fan_out * kFanOutShare <= plan.level_size(k)) {  // sums per parent
      parallel_chunks(0, plan.level_size(k - 1), kNodeGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t jp = lo; jp < hi; ++jp) {
          std::fill_n(d_prev + jp * block, block, T(0));
          for (int64_t j = fc[jp]; j < fc[jp + 1]; ++j) child_product(d_prev + jp * block, j);
        }
      });
    } else {
      T* per_child = scratch<T>(kChildGrad, plan.level_size(k) * block);
      parallel_chunks(0, plan.level_size(k), kNodeGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) {
          std::fill_n(per_child + j * block, block, T(0));
          child_product(per_child + j * block, j);
        }
      });
      parallel_chunks(0, plan.level_size(k - 1), kNodeGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t jp = lo; jp < hi; ++jp) {
          T* dst = d_prev + jp * block;
          std::fill_n(dst, block, T(0));
          for (int64_t j = fc[jp]; j < fc[jp + 1]; ++j) {
            const T* src = per_child + j * block;
            for (int64_t e = 0; e < block; ++e) dst[e] += src[e];
          }
        }
      });
    }
    // dG_k[v] = sum over nodes with digit v of P_{k-1}[parent]^T @ dP_k[node], one thread per slice:
    // the nodes' P and dP rows are stacked so the sum is one product of depth (nodes x m_{k-1}), whose
    // register tiles then stay in registers across all the nodes.
    // A narrow level's slice gradient is summed transposed, dG^T = sum dP^T @ P.
    const int64_t p_rows = m * s.r[k];
    const bool narrow = narrow_level(s, k);
    parallel_chunks(0, s.p[k], kNodeGrain, [&](int64_t lo, int64_t hi) {
      thread_local std::vector<T> buf, buf_t, a_stack, b_stack;  // per worker, reused across calls
      buf.resize(slice);
      if (narrow) buf_t.resize(slice);
      for (int64_t v = lo; v < hi; ++v) {
        const int64_t nodes = start[v + 1] - start[v];
        if (nodes == 0) continue;
        a_stack.resize(std::max<size_t>(a_stack.size(), nodes * p_rows));
        b_stack.resize(std::max<size_t>(b_stack.size(), nodes * m * n));
        stack_parent_partials(plan, P, k, v, p_rows, a_stack.data());
        for (int64_t t = 0; t < nodes; ++t)
          std::copy_n(d_cur + order[start[v] + t] * m * n, m * n, b_stack.data() + t * m * n);
        if (narrow) {
          std::fill(buf_t.begin(), buf_t.end(), T(0));
          gemm_tn_acc(buf_t.data(), b_stack.data(), a_stack.data(), nodes * m, n, s.r[k]);
          transpose(buf.data(), buf_t.data(), n, s.r[k]);
        } else {
          std::fill(buf.begin(), buf.end(), T(0));
          gemm_tn_acc(buf.data(), a_stack.data(), b_stack.data(), nodes * m, s.r[k], n);
        }
        on_slice(k, v, buf.data());
      }
    });
    std::swap(cur_slot, prev_slot);
    d_cur = d_prev;
  }
  // Level 0 nodes have distinct digits: their gradient is the core-0 slice gradient.
  parallel_chunks(0, plan.level_size(0), kNodeGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) on_slice(0, plan.digit[0][j], d_cur + j * s.slice_numel(0));
  });
}

template <typename T>
void apply_fused_update(FusedOptimizer opt, T* w, T* state, int64_t numel, const T* grad, T lr, T eps) {
  switch (opt) {
    case FusedOptimizer::kSgd:
      for (int64_t e = 0; e < numel; ++e) w[e] -= lr * grad[e];
      break;
    case FusedOptimizer::kAdagrad:
      for (int64_t e = 0; e < numel; ++e) {
        state[e] += grad[e] * grad[e];
        w[e] -= lr * grad[e] / (std::sqrt(state[e]) + eps);
      }
      break;
    case FusedOptimizer::kRowwiseAdagrad: {  // one accumulator per core slice (the slice is the "row")
      T sq = 0;  // vectorised sum (a plain loop would be one serial add chain over the whole slice)
#pragma omp simd reduction(+ : sq)
      for (int64_t e = 0; e < numel; ++e) sq += grad[e] * grad[e];
      *state += sq / static_cast<T>(numel);
      const T scale = lr / (std::sqrt(*state) + eps);
      for (int64_t e = 0; e < numel; ++e) w[e] -= scale * grad[e];
      break;
    }
  }
}

struct Args {
  TTShape shape;
  std::shared_ptr<const TTPlan> plan;
  // forward: where to keep its partial products for the backward (null: none will follow);
  // backward: what its forward kept (null: recompute)
  std::shared_ptr<SavedBatch> saved;
};

// Checks the arguments and returns the batch's plan: the one its forward stored (backward of a
// training step), or a new one (stored by forward when a backward can follow).
Args prepare(const std::string& table, at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
             const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode,
             bool include_last_offset, int64_t bounds_check_mode, bool backward, const CacheMap* cache = nullptr,
             const at::Tensor* cache_map = nullptr) {
  Args a;
  a.shape = check_tt_args(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                          bounds_check_mode);
  TT_CHECK(cores[0].device().is_cpu(), VALUE, table, "CPU kernel called with cores on ", cores[0].device());
  const auto dtype = cores[0].scalar_type();
  TT_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, TYPE, table,
           "CPU kernels take float32, float64, float16 or bfloat16 cores, got ", dtype);
  const auto key = [&] {
    return PlanKey(indices, offsets, psw, cores[0], cache_map, num_embeddings, include_last_offset);
  };
  if (backward) {
    auto saved = take_plan(key());
    if (saved && saved->plan) {  // (an entry of the CUDA op has no host plan; keys on CPU tensors never match one)
      a.saved = std::move(saved);
      a.plan = a.saved->plan;
      return a;
    }
  }
  const bool store = !backward && plan_wanted_by_backward(cores[0]);  // no key to build for inference
  // Backward drops what forward was told to drop (an error would already have been raised there).
  const auto mode = backward ? BoundsCheckMode::kIgnore : static_cast<BoundsCheckMode>(bounds_check_mode);
  a.plan = std::make_shared<const TTPlan>(
      build_plan(table, a.shape, indices, offsets, psw, include_last_offset, mode, cache));
  if (store) {
    a.saved = std::make_shared<SavedBatch>();
    a.saved->plan = a.plan;
    put_plan(key(), a.saved);
  }
  return a;
}

CacheMap cache_map_of(const at::Tensor& map, const at::Tensor& cache_weight) {
  CacheMap c;
  c.rows = cache_weight.size(0);
  c.shift = cache_slot_bits(c.rows);
  c.log_size = cache_map_log_size(c.rows);
  c.entries = map.data_ptr<int64_t>();
  return c;
}

constexpr auto kNoCachedRows = [](int64_t, const void*) {};

// float16 / bfloat16 cores (and the tensors that share their dtype) as float32 copies: the kernels
// compute in fp32, as the CUDA kernels accumulate, and a fused step writes its fp32 result back
// rounded once. TT cores are small (that is the point of them), so a copy per call costs little
// next to the lookup; float32 / float64 tensors are used as they are.
struct Fp32View {
  bool converted;
  std::vector<at::Tensor> cores;
  std::optional<at::Tensor> psw;

  // `saved`: the batch's forward / backward hand-over; forward leaves its core copies there and the
  // backward takes them (the cores cannot change in between without a stale plan, as with partials).
  Fp32View(at::TensorList original, const std::optional<at::Tensor>& w, SavedBatch* saved, bool backward)
      : converted(at::isReducedFloatingType(original[0].scalar_type())) {
    if (converted && backward && saved != nullptr && saved->fp32_cores.size() == original.size()) {
      cores = std::move(saved->fp32_cores);
      saved->fp32_cores.clear();
    } else {
      for (const auto& c : original) cores.push_back(up(c));
      if (converted && !backward && saved != nullptr) saved->fp32_cores = cores;
    }
    if (w.has_value()) psw = up(*w);
  }
  // A tensor of the cores' dtype (grad_output, cache rows) as the kernels take it.
  at::Tensor up(const at::Tensor& t) const { return converted && t.defined() ? t.to(at::kFloat) : t; }
  at::Tensor down(const at::Tensor& t, const at::Tensor& like) const { return converted ? t.to(like.dtype()) : t; }
  // After a fused step: the updated fp32 copies back into the caller's tensors.
  void write_back(at::TensorList original) const { write_back(original, cores); }
  void write_back(at::TensorList original, at::TensorList copies) const {
    if (!converted) return;
    for (size_t k = 0; k < copies.size(); ++k) original[k].copy_(copies[k]);
  }
};

at::Tensor tt_embedding_bag(at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode,
                            bool include_last_offset, int64_t bounds_check_mode, c10::string_view table_name) {
  const std::string table(table_name);
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         bounds_check_mode, false);
  const Fp32View f(cores, psw, a.saved.get(), false);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(f.cores[0].scalar_type(), "tt_embedding_bag_cpu", [&] {
    out = forward_impl<scalar_t>(a.shape, *a.plan, f.cores, f.psw, pooling_mode == 1, a.saved.get());
  });
  return f.down(out, cores[0]);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward(
    const at::Tensor& grad_output, at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
    bool psw_grad, c10::string_view table_name) {
  const std::string table(table_name);
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         0, true);
  check_grad_output(table, grad_output, a.plan->num_bags, a.shape, cores[0]);
  TT_CHECK(!psw_grad || psw.has_value(), VALUE, table, "per_sample_weights_grad needs per_sample_weights");
  const Fp32View f(cores, psw, a.saved.get(), true);
  std::vector<at::Tensor> grads;
  for (const auto& c : f.cores) grads.push_back(at::zeros_like(c));
  at::Tensor grad_psw = psw_grad ? at::zeros_like(*f.psw) : at::empty({0}, f.cores[0].options());
  AT_DISPATCH_FLOATING_TYPES(f.cores[0].scalar_type(), "tt_embedding_bag_backward_cpu", [&] {
    std::vector<scalar_t*> gp;
    for (auto& t : grads) gp.push_back(t.data_ptr<scalar_t>());
    backward_impl<scalar_t>(
        a.shape, *a.plan, f.cores, f.up(grad_output), f.psw, pooling_mode == 1,
        psw_grad ? grad_psw.data_ptr<scalar_t>() : nullptr,
        [&](int64_t k, int64_t v, const scalar_t* gs) {
          const int64_t n = a.shape.slice_numel(k);
          std::copy(gs, gs + n, gp[k] + v * n);
        },
        nullptr, kNoCachedRows, a.saved.get());
  });
  for (auto& g : grads) g = f.down(g, cores[0]);
  return {grads, f.down(grad_psw, cores[0])};
}

// Fused backward over a plan: the optimizer step on every touched core slice and, with a cache, on
// every touched cached row (marked in `trained`, so the cache knows which rows to write back).
template <typename T>
void fused_backward(const Args& a, FusedOptimizer opt, at::TensorList cores, at::TensorList optimizer_state,
                    const at::Tensor& grad_output, const std::optional<at::Tensor>& psw, bool mean, double lr_d,
                    double eps_d, T* cache_w = nullptr, T* cache_state = nullptr, bool* trained = nullptr) {
  std::vector<T*> w, st;
  for (const auto& t : cores) w.push_back(t.data_ptr<T>());
  for (const auto& t : optimizer_state) st.push_back(t.data_ptr<T>());
  const auto lr = static_cast<T>(lr_d);
  const auto eps = static_cast<T>(eps_d);
  const int64_t D = a.shape.embedding_dim;
  backward_impl<T>(
      a.shape, *a.plan, cores, grad_output, psw, mean, nullptr,
      [&](int64_t k, int64_t v, const T* gs) {
        const int64_t n = a.shape.slice_numel(k);
        T* state = nullptr;
        if (opt == FusedOptimizer::kAdagrad) state = st[k] + v * n;
        if (opt == FusedOptimizer::kRowwiseAdagrad) state = st[k] + v;
        apply_fused_update<T>(opt, w[k] + v * n, state, n, gs, lr, eps);
      },
      cache_w,
      [&](int64_t slot, const T* gs) {
        T* state = nullptr;
        if (opt == FusedOptimizer::kAdagrad) state = cache_state + slot * D;
        if (opt == FusedOptimizer::kRowwiseAdagrad) state = cache_state + slot;
        apply_fused_update<T>(opt, cache_w + slot * D, state, D, gs, lr, eps);
        trained[slot] = true;
      },
      a.saved.get());
}

void tt_embedding_bag_backward_fused_(const at::Tensor& grad_output, at::TensorList cores,
                                      at::TensorList optimizer_state, const at::Tensor& indices,
                                      const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
                                      int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
                                      c10::string_view optimizer, double learning_rate, double eps,
                                      c10::string_view table_name) {
  const std::string table(table_name);
  const auto opt = parse_optimizer(table, std::string(optimizer));
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         0, true);
  check_grad_output(table, grad_output, a.plan->num_bags, a.shape, cores[0]);
  check_optimizer_state(table, opt, cores, optimizer_state, learning_rate, eps);
  const Fp32View f(cores, psw, a.saved.get(), true);
  AT_DISPATCH_FLOATING_TYPES(f.cores[0].scalar_type(), "tt_embedding_bag_backward_fused_cpu", [&] {
    fused_backward<scalar_t>(a, opt, f.cores, optimizer_state, f.up(grad_output), f.psw, pooling_mode == 1,
                             learning_rate, eps);
  });
  f.write_back(cores);
}

// ---- hot-row cache: cached ids read (and train) an uncompressed row instead of the TT chain ----

std::tuple<at::Tensor, at::Tensor> tt_cached_embedding_bag_fused(
    at::TensorList cores, at::TensorList optimizer_state, const at::Tensor& cache_weight,
    const at::Tensor& cache_state, const at::Tensor& cache_map, const at::Tensor& cache_trained,
    const at::Tensor& indices, const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
    int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset, int64_t bounds_check_mode,
    c10::string_view optimizer, double learning_rate, double eps, c10::string_view table_name) {
  const std::string table(table_name);
  check_fused_args(table, cores, optimizer_state, indices, offsets, psw, num_embeddings, pooling_mode,
                   include_last_offset, bounds_check_mode, std::string(optimizer), learning_rate, eps);
  check_cache_args(table, parse_optimizer(table, std::string(optimizer)), cores, num_embeddings, cache_weight,
                   cache_state, cache_map, cache_trained);
  const auto cache = cache_map_of(cache_map, cache_weight);
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         bounds_check_mode, false, &cache, &cache_map);
  const Fp32View f(cores, psw, a.saved.get(), false);
  const at::Tensor rows = f.up(cache_weight);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(f.cores[0].scalar_type(), "tt_cached_embedding_bag_cpu", [&] {
    out = forward_impl<scalar_t>(a.shape, *a.plan, f.cores, f.psw, pooling_mode == 1, a.saved.get(),
                                 rows.data_ptr<scalar_t>());
  });
  out = f.down(out, cores[0]);
  // where each id went: its cache slot, -1 rebuilt from the cores, -2 dropped (out of range)
  auto where = at::empty({indices.numel()}, indices.options().dtype(at::kLong));
  int64_t* w = where.data_ptr<int64_t>();
  const auto& slot = a.plan->slot;
  const auto& cached_slot = a.plan->cached_slot;
  for (size_t pos = 0; pos < slot.size(); ++pos) {
    w[pos] = slot[pos] >= 0 ? -1 : slot[pos] == -1 ? -2 : cached_slot[-2 - slot[pos]];
  }
  return {out, where};
}

void tt_cached_embedding_bag_backward_fused_(
    const at::Tensor& grad_output, at::TensorList cores, at::TensorList optimizer_state,
    const at::Tensor& cache_weight, const at::Tensor& cache_state, const at::Tensor& cache_map,
    const at::Tensor& cache_trained, const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
    c10::string_view optimizer, double learning_rate, double eps, c10::string_view table_name) {
  const std::string table(table_name);
  const auto opt = parse_optimizer(table, std::string(optimizer));
  check_cache_args(table, opt, cores, num_embeddings, cache_weight, cache_state, cache_map, cache_trained);
  const auto cache = cache_map_of(cache_map, cache_weight);
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         0, true, &cache, &cache_map);
  check_grad_output(table, grad_output, a.plan->num_bags, a.shape, cores[0]);
  check_optimizer_state(table, opt, cores, optimizer_state, learning_rate, eps);
  const Fp32View f(cores, psw, a.saved.get(), true);
  const at::Tensor rows = f.up(cache_weight);
  AT_DISPATCH_FLOATING_TYPES(f.cores[0].scalar_type(), "tt_cached_embedding_bag_backward_fused_cpu", [&] {
    fused_backward<scalar_t>(a, opt, f.cores, optimizer_state, f.up(grad_output), f.psw, pooling_mode == 1,
                             learning_rate, eps, rows.data_ptr<scalar_t>(),
                             opt == FusedOptimizer::kSgd ? nullptr : cache_state.data_ptr<scalar_t>(),
                             cache_trained.data_ptr<bool>());
  });
  f.write_back(cores);
  f.write_back(cache_weight, rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("tt_embedding_bag", &tt_embedding_bag);
  m.impl("tt_embedding_bag_backward", &tt_embedding_bag_backward);
  m.impl("tt_embedding_bag_backward_fused_", &tt_embedding_bag_backward_fused_);
  m.impl("tt_cached_embedding_bag_fused", &tt_cached_embedding_bag_fused);
  m.impl("tt_cached_embedding_bag_backward_fused_", &tt_cached_embedding_bag_backward_fused_);
}

}  // namespace torchrec_tt::cpu
