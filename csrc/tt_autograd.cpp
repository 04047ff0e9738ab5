// Autograd formulas of the lookup ops (one for every device). In C++ rather than through
// torch.library.register_autograd so that a training step runs no Python between the module's call
// and the kernels: the Python formulas cost ~90 us per forward + backward on a small CPU batch, more
// than the kernels themselves, and on a GPU that host time is what the device waits for.
//
// Each forward runs its op below autograd; each backward calls the matching backward op.
// Fused ops: backward updates the cores (and optimizer state, cache rows) in place and returns no
// gradient for them, as FBGEMM's fused TBE does; they are kept by reference, like the Python
// formulas did, not saved as variables (saving would make the in-place update an autograd error).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "tt_plan_store.h"

namespace torchrec_tt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Number of scalar (non-tensor) arguments after per_sample_weights in the lookup schemas.
constexpr size_t kScalarArgsPlain = 5;  // num_embeddings .. table_name
constexpr size_t kScalarArgsFused = 8;  // num_embeddings .. table_name, with optimizer, lr, eps

// Saved arguments shared by the three formulas.
void save_common(AutogradContext* ctx, int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
                 c10::string_view table_name) {
  ctx->saved_data["num_embeddings"] = num_embeddings;
  ctx->saved_data["pooling_mode"] = pooling_mode;
  ctx->saved_data["include_last_offset"] = include_last_offset;
  ctx->saved_data["table_name"] = std::string(table_name);
}

void save_optimizer(AutogradContext* ctx, at::TensorList cores, at::TensorList optimizer_state,
                    c10::string_view optimizer, double learning_rate, double eps) {
  ctx->saved_data["cores"] = cores.vec();
  ctx->saved_data["optimizer_state"] = optimizer_state.vec();
  ctx->saved_data["optimizer"] = std::string(optimizer);
  ctx->saved_data["learning_rate"] = learning_rate;
  ctx->saved_data["eps"] = eps;
}

// What a fused backward reads back: save_common's and save_optimizer's values.
struct FusedArgs {
  std::vector<at::Tensor> cores, state;
  int64_t num_embeddings, pooling_mode;
  bool include_last_offset;
  std::string optimizer, table;
  double learning_rate, eps;

  explicit FusedArgs(AutogradContext* ctx)
      : cores(ctx->saved_data["cores"].toTensorVector()),
        state(ctx->saved_data["optimizer_state"].toTensorVector()),
        num_embeddings(ctx->saved_data["num_embeddings"].toInt()),
        pooling_mode(ctx->saved_data["pooling_mode"].toInt()),
        include_last_offset(ctx->saved_data["include_last_offset"].toBool()),
        optimizer(ctx->saved_data["optimizer"].toStringRef()),
        table(ctx->saved_data["table_name"].toStringRef()),
        learning_rate(ctx->saved_data["learning_rate"].toDouble()),
        eps(ctx->saved_data["eps"].toDouble()) {}
};

// The cores a fused formula records. Its backward returns no gradient for any core (the update is
// fused), so one core that requires grad is enough for the output to require grad and for backward
// to run; the others go in detached (same storage and version counter, updated in place all the
// same). Every recorded input that requires grad costs an AccumulateGrad node the engine runs each
// step, d per table (FBGEMM's TBE keeps one placeholder parameter for the same reason).
std::vector<at::Tensor> one_recorded_core(at::TensorList cores) {
  std::vector<at::Tensor> out = cores.vec();
  if (!at::GradMode::is_enabled()) return out;
  bool recorded = false;
  for (auto& c : out) {
    if (!c.requires_grad()) continue;
    if (recorded) {
      c = c.detach();
    } else {
      recorded = true;
    }
  }
  return out;
}

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// ---- tt_embedding_bag: dense core gradients (torch.optim) --------------------------------------

struct LookupFn : public torch::autograd::Function<LookupFn> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList cores, const at::Tensor& indices,
                            const at::Tensor& offsets, const std::optional<at::Tensor>& psw, int64_t num_embeddings,
                            int64_t pooling_mode, bool include_last_offset, int64_t bounds_check_mode,
                            c10::string_view table_name) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("torchrec_tt::tt_embedding_bag", "")
                               .typed<at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, int64_t, int64_t, bool, int64_t,
                                                 c10::string_view)>();
    save_common(ctx, num_embeddings, pooling_mode, include_last_offset, table_name);
    ctx->saved_data["psw_grad"] = psw.has_value() && psw->requires_grad();
    variable_list saved{indices, offsets, psw.value_or(at::Tensor())};
    saved.insert(saved.end(), cores.begin(), cores.end());
    ctx->save_for_backward(saved);
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset, bounds_check_mode,
                   table_name);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torchrec_tt::tt_embedding_bag_backward", "")
            .typed<std::tuple<std::vector<at::Tensor>, at::Tensor>(
                const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&,
                const std::optional<at::Tensor>&, int64_t, int64_t, bool, bool, c10::string_view)>();
    const auto saved = ctx->get_saved_variables();
    const std::vector<at::Tensor> cores(saved.begin() + 3, saved.end());
    const bool psw_grad = ctx->saved_data["psw_grad"].toBool();
    const std::string table = ctx->saved_data["table_name"].toStringRef();
    auto [core_grads, grad_psw] =
        op.call(grad[0], cores, saved[0], saved[1], optional_tensor(saved[2]),
                ctx->saved_data["num_embeddings"].toInt(), ctx->saved_data["pooling_mode"].toInt(),
                ctx->saved_data["include_last_offset"].toBool(), psw_grad, table);
    // One entry per forward input: the cores, indices, offsets, per_sample_weights, the scalars.
    variable_list out(core_grads.begin(), core_grads.end());
    out.emplace_back();
    out.emplace_back();
    out.push_back(psw_grad ? grad_psw : at::Tensor());
    out.resize(out.size() + kScalarArgsPlain);
    return out;
  }
};

at::Tensor lookup_autograd(at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode,
                           bool include_last_offset, int64_t bounds_check_mode, c10::string_view table_name) {
  const NoBackwardGuard eval(!at::GradMode::is_enabled());
  return LookupFn::apply(cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         bounds_check_mode, table_name);
}

// ---- tt_embedding_bag_fused: the optimizer step runs in backward ----------------------------------

struct FusedLookupFn : public torch::autograd::Function<FusedLookupFn> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList cores, at::TensorList optimizer_state,
                            const at::Tensor& indices, const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
                            int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
                            int64_t bounds_check_mode, c10::string_view optimizer, double learning_rate, double eps,
                            c10::string_view table_name) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("torchrec_tt::tt_embedding_bag_fused", "")
                               .typed<at::Tensor(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, int64_t, int64_t, bool, int64_t,
                                                 c10::string_view, double, double, c10::string_view)>();
    save_common(ctx, num_embeddings, pooling_mode, include_last_offset, table_name);
    save_optimizer(ctx, cores, optimizer_state, optimizer, learning_rate, eps);
    ctx->save_for_backward({indices, offsets, psw.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(cores, optimizer_state, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                   bounds_check_mode, optimizer, learning_rate, eps, table_name);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torchrec_tt::tt_embedding_bag_backward_fused_", "")
            .typed<void(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, int64_t, int64_t, bool, c10::string_view, double, double,
                        c10::string_view)>();
    const auto saved = ctx->get_saved_variables();
    const FusedArgs f(ctx);
    {
      at::NoGradGuard no_grad;
      op.call(grad[0], f.cores, f.state, saved[0], saved[1], optional_tensor(saved[2]), f.num_embeddings,
              f.pooling_mode, f.include_last_offset, f.optimizer, f.learning_rate, f.eps, f.table);
    }
    // No gradient for any input: cores, state, indices, offsets, per_sample_weights, the scalars.
    return variable_list(f.cores.size() + f.state.size() + 3 + kScalarArgsFused);
  }
};

at::Tensor fused_lookup_autograd(at::TensorList cores, at::TensorList optimizer_state, const at::Tensor& indices,
                                 const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
                                 int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
                                 int64_t bounds_check_mode, c10::string_view optimizer, double learning_rate,
                                 double eps, c10::string_view table_name) {
  const NoBackwardGuard eval(!at::GradMode::is_enabled());
  const auto recorded = one_recorded_core(cores);  // (apply finds variables in a TensorList, not a vector)
  return FusedLookupFn::apply(at::TensorList(recorded), optimizer_state, indices, offsets, psw, num_embeddings,
                              pooling_mode, include_last_offset, bounds_check_mode, optimizer, learning_rate, eps,
                              table_name);
}

// ---- tt_cached_embedding_bag_fused: fused step on core slices and cached rows ----------------------

struct CachedLookupFn : public torch::autograd::Function<CachedLookupFn> {
  static variable_list forward(AutogradContext* ctx, at::TensorList cores, at::TensorList optimizer_state,
                               const at::Tensor& cache_weight, const at::Tensor& cache_state,
                               const at::Tensor& cache_map, const at::Tensor& cache_trained,
                               const at::Tensor& indices, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode,
                               bool include_last_offset, int64_t bounds_check_mode, c10::string_view optimizer,
                               double learning_rate, double eps, c10::string_view table_name) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torchrec_tt::tt_cached_embedding_bag_fused", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(
                at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                int64_t, bool, int64_t, c10::string_view, double, double, c10::string_view)>();
    save_common(ctx, num_embeddings, pooling_mode, include_last_offset, table_name);
    save_optimizer(ctx, cores, optimizer_state, optimizer, learning_rate, eps);
    ctx->saved_data["cache"] = std::vector<at::Tensor>{cache_weight, cache_state, cache_map, cache_trained};
    ctx->save_for_backward({indices, offsets, psw.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below;
    auto [pooled, where] = op.call(cores, optimizer_state, cache_weight, cache_state, cache_map, cache_trained,
                                   indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                                   bounds_check_mode, optimizer, learning_rate, eps, table_name);
    ctx->mark_non_differentiable({where});
    return {pooled, where};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("torchrec_tt::tt_cached_embedding_bag_backward_fused_", "")
            .typed<void(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, int64_t, int64_t, bool, c10::string_view, double, double,
                        c10::string_view)>();
    const auto saved = ctx->get_saved_variables();
    const FusedArgs f(ctx);
    const auto cache = ctx->saved_data["cache"].toTensorVector();
    {
      at::NoGradGuard no_grad;
      op.call(grad[0], f.cores, f.state, cache[0], cache[1], cache[2], cache[3], saved[0], saved[1],
              optional_tensor(saved[2]), f.num_embeddings, f.pooling_mode, f.include_last_offset, f.optimizer,
              f.learning_rate, f.eps, f.table);
    }
    // No gradient for any input: cores, state, the four cache tensors, indices, offsets,
    // per_sample_weights, the scalars.
    return variable_list(f.cores.size() + f.state.size() + 7 + kScalarArgsFused);
  }
};

std::tuple<at::Tensor, at::Tensor> cached_lookup_autograd(
    at::TensorList cores, at::TensorList optimizer_state, const at::Tensor& cache_weight,
    const at::Tensor& cache_state, const at::Tensor& cache_map, const at::Tensor& cache_trained,
    const at::Tensor& indices, const at::Tensor& offsets, const std::optional<at::Tensor>& psw, int64_t num_embeddings,
    int64_t pooling_mode, bool include_last_offset, int64_t bounds_check_mode, c10::string_view optimizer,
    double learning_rate, double eps, c10::string_view table_name) {
  const NoBackwardGuard eval(!at::GradMode::is_enabled());
  const auto recorded = one_recorded_core(cores);
  auto out = CachedLookupFn::apply(at::TensorList(recorded), optimizer_state, cache_weight, cache_state, cache_map,
                                   cache_trained, indices, offsets, psw, num_embeddings, pooling_mode,
                                   include_last_offset, bounds_check_mode, optimizer, learning_rate, eps, table_name);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, Autograd, m) {
  m.impl("tt_embedding_bag", &lookup_autograd);
  m.impl("tt_embedding_bag_fused", &fused_lookup_autograd);
  m.impl("tt_cached_embedding_bag_fused", &cached_lookup_autograd);
}

}  // namespace torchrec_tt
