// CUDA implementation of the torchrec_tt ops (schemas in ../schema.cpp): torch glue around the
// torch-free kernels of tt_kernels.cu.
//
// Synchronisation: the forward op in bounds_check_mode 0 (error) or 1 (warn) reads one 32-byte
// validation record back to the host (one small D2H copy, after the compute kernels are queued) to
// raise the CPU op's exceptions and warnings. That is the only host synchronisation: IGNORE mode
// and both backward ops never synchronise, so they can be captured in a CUDA graph (a capture in
// error / warn mode is refused with a clear error). The backward ops validate on the device (or take
// the record their forward checked for the same batch) and, if offsets or per_sample_weights are
// invalid (which the forward would have rejected), write nothing (cores, optimizer state and core
// gradients stay untouched) instead of raising.
//
// Supported core dtypes: float32, float16, bfloat16 (fp32 accumulation; optimizer state fp32).
#ifdef TORCHREC_TT_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream (== at::cuda::); no cuBLAS headers needed
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../tt_checks.h"
#include "../tt_plan_store.h"
#include "tt_kernels.cuh"

namespace torchrec_tt::cuda_glue {
namespace {

namespace kern = torchrec_tt::cuda;

template <typename S, typename C>
struct DType {
  using scalar = S;  // ATen element type
  using cuda = C;    // element type of the kernels (same layout)
};
template <typename I>
struct IdType {
  using type = I;
};

// Calls f(DType<...>{}, IdType<...>{}) for the cores' dtype and the ids' dtype.
template <typename F>
void dispatch(const std::string& table, at::ScalarType dtype, at::ScalarType id_type, F&& f) {
  auto with_ids = [&](auto dt) {
    if (id_type == at::kLong) {
      f(dt, IdType<int64_t>{});
    } else {
      f(dt, IdType<int32_t>{});
    }
  };
  switch (dtype) {
    case at::kFloat:
      with_ids(DType<float, float>{});
      break;
    case at::kHalf:
      with_ids(DType<at::Half, __half>{});
      break;
    case at::kBFloat16:
      with_ids(DType<at::BFloat16, __nv_bfloat16>{});
      break;
    default:
      TT_CHECK(false, TYPE, table, "the CUDA kernels support float32, float16 and bfloat16 cores, got ", dtype);
  }
}

struct Prepared {
  TTShape shape;
  kern::TTDims dims;
  kern::BatchDesc batch;
  at::Tensor indices, offsets, psw;  // contiguous; offsets int64
  // Identifies the batch for handing forward's plan to its backward: the caller's own tensors (not
  // the contiguous / int64 copies above, which are new each call).
  std::optional<PlanKey> key;
};

Prepared prepare(const std::string& table, at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
                 const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode,
                 bool include_last_offset, int64_t bounds_check_mode) {
  Prepared a;
  a.shape = check_tt_args(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                          bounds_check_mode);
  TT_CHECK(cores[0].is_cuda(), VALUE, table, "CUDA kernel called with cores on ", cores[0].device());
  TT_CHECK(a.shape.d <= kern::kMaxCores, VALUE, table, "the CUDA kernels support at most ", kern::kMaxCores,
           " cores, got ", a.shape.d);
  const int64_t n = indices.numel();
  TT_CHECK(n < INT32_MAX / a.shape.d, VALUE, table, "the CUDA kernels take fewer than (2^31 - 1) / ", a.shape.d,
           " ids per call with ", a.shape.d, " cores (int32 node numbers over all levels), got ", n);
  const int64_t bags = num_bags(offsets, include_last_offset);
  TT_CHECK(bags < INT32_MAX, VALUE, table, "the CUDA kernels take fewer than 2^31 - 1 bags per call, got ", bags);
  if (offsets.numel() == 0) {
    TT_CHECK(n == 0, VALUE, table, "offsets is empty but there are ", n, " ids");
  }
  int64_t m = 1;
  for (int64_t k = 0; k < a.shape.d; ++k) {
    m *= a.shape.q[k];
    const int64_t slice = a.shape.slice_numel(k);
    TT_CHECK(m * a.shape.r[k + 1] < INT32_MAX && slice < INT32_MAX && m * a.shape.r[k] < INT32_MAX &&
                 a.shape.p[k] < (int64_t(1) << 27),
             VALUE, table, "core ", k, " is too large for the CUDA kernels (int32 sizes, p_k < 2^27)");
  }

  a.key.emplace(indices, offsets, psw, cores[0], nullptr, num_embeddings, include_last_offset);
  a.indices = indices.contiguous();
  a.offsets = offsets.to(at::kLong).contiguous();
  if (psw.has_value()) a.psw = psw->contiguous();

  auto& dm = a.dims;
  dm.d = static_cast<int>(a.shape.d);
  dm.num_embeddings = a.shape.num_embeddings;
  dm.embedding_dim = a.shape.embedding_dim;
  for (int64_t k = 0; k < a.shape.d; ++k) {
    dm.p[k] = a.shape.p[k];
    dm.q[k] = a.shape.q[k];
  }
  for (int64_t k = 0; k <= a.shape.d; ++k) dm.r[k] = a.shape.r[k];

  auto& b = a.batch;
  b.n = n;
  b.offsets = a.offsets.data_ptr<int64_t>();
  b.num_offsets = a.offsets.numel();
  b.num_bags = bags;
  b.include_last_offset = include_last_offset;
  b.mean = pooling_mode == 1;
  return a;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// Raises the CPU op's exception for the first error in the (host copy of the) record, then warns
// about dropped ids in warn mode.
void raise_from_record(const std::string& table, const Prepared& a, const at::Tensor& rec_cpu, BoundsCheckMode mode) {
  const int64_t* r = rec_cpu.data_ptr<int64_t>();
  const auto key = static_cast<unsigned long long>(r[0]);
  const int64_t v0 = r[1], v1 = r[2], dropped = r[3];
  const int64_t n = a.batch.n;
  if (key != kern::kNoErrorKey) {
    const unsigned long long kind = key >> kern::kErrorKindShift;
    const auto pos = static_cast<int64_t>(key & kern::kErrorPosMask);
    switch (kind) {
      case kern::kErrOffsetsStart:
        TT_CHECK(false, VALUE, table, "offsets must start at 0, got ", v0);
        break;
      case kern::kErrOffsetsDecreasing:
        TT_CHECK(false, VALUE, table, "offsets must be non-decreasing, but offsets[", pos, "]=", v0, " < offsets[",
                 pos - 1, "]=", v1);
        break;
      case kern::kErrLastOffset:
        if (a.batch.include_last_offset) {
          TT_CHECK(false, VALUE, table, "with include_last_offset=True the last offset (", v0,
                   ") must equal the number of ids (", n, ")");
        } else {
          TT_CHECK(false, VALUE, table, "the last offset (", v0, ") is beyond the number of ids (", n, ")");
        }
        break;
      case kern::kErrWeightNotFinite:
        TT_CHECK(false, VALUE, table, "per_sample_weights contains NaN or infinity");
        break;
      case kern::kErrIdOutOfRange:
        TT_CHECK(false, INDEX, table, v0 < 0 ? "negative id " : "id ", v0, " at position ", pos,
                 " is out of range [0, ", a.shape.num_embeddings, ")");
        break;
      default:
        TT_CHECK(false, VALUE, table, "internal error: unknown validation record kind ", kind);
    }
  }
  if (dropped > 0 && mode == BoundsCheckMode::kWarn) {
    warn_dropped_ids(table, dropped, n, a.shape.num_embeddings);
  }
}

at::Tensor forward(const std::string& table, const Prepared& a, at::TensorList cores, int64_t bounds_check_mode) {
  const c10::cuda::CUDAGuard device_guard(cores[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto mode = static_cast<BoundsCheckMode>(bounds_check_mode);
  const bool validate = mode != BoundsCheckMode::kIgnore;
  if (validate) {  // checked before any launch, so a failed capture leaves nothing half-recorded
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TT_CHECK(capture == cudaStreamCaptureStatusNone, VALUE, table, "bounds_check_mode ",
             mode == BoundsCheckMode::kError ? "'error'" : "'warn'",
             " reads the batch's validation record back to the host, which CUDA graph capture does not allow; "
             "capture lookups with bounds_check_mode='ignore'");
  }
  const int64_t B = a.batch.num_bags, D = a.shape.embedding_dim;
  const bool compute = a.batch.n > 0 && B > 0;
  at::Tensor out = compute ? at::empty({B, D}, cores[0].options()) : at::zeros({B, D}, cores[0].options());
  // Small batches: the plan kernel validates in the same launch, also in ignore mode when a backward
  // can follow (the record guards that backward, which then launches no validation of its own).
  const bool keep_plan = compute && plan_wanted_by_backward(cores[0]);
  const bool plan_checks = compute && kern::forward_validates(a.dims, a.batch) && (validate || keep_plan);
  at::Tensor record, plan;
  if (validate || plan_checks) record = at::empty({4}, cores[0].options().dtype(at::kLong));
  dispatch(table, cores[0].scalar_type(), a.indices.scalar_type(), [&](auto dt, auto it) {
    using S = typename decltype(dt)::scalar;
    using T = typename decltype(dt)::cuda;
    using Id = typename decltype(it)::type;
    const Id* ids = a.indices.numel() > 0 ? a.indices.data_ptr<Id>() : nullptr;
    const T* psw = a.psw.defined() ? reinterpret_cast<const T*>(a.psw.data_ptr<S>()) : nullptr;
    auto* rec = record.defined() ? reinterpret_cast<kern::ErrorRecord*>(record.data_ptr<int64_t>()) : nullptr;
    const bool id_errors = mode == BoundsCheckMode::kError;
    if (validate && !plan_checks) {
      C10_CUDA_CHECK((kern::launch_validate<T, Id>(a.dims, a.batch, ids, psw, id_errors, rec, stream)));
    }
    if (!compute) return;
    kern::CorePtrs<const T> cp;
    for (int64_t k = 0; k < a.shape.d; ++k) cp.ptr[k] = reinterpret_cast<const T*>(cores[k].data_ptr<S>());
    const size_t bytes = kern::forward_workspace_bytes(a.dims, a.batch);
    plan = workspace(bytes, cores[0]);
    C10_CUDA_CHECK((kern::launch_forward<T, Id>(a.dims, a.batch, ids, psw, cp, reinterpret_cast<T*>(out.data_ptr<S>()),
                                                plan_checks ? rec : nullptr, id_errors, plan.data_ptr(), bytes,
                                                stream)));
  });
  if (validate) {
    // The only host synchronisation of these ops (error / warn mode): a 32-byte copy.
    const at::Tensor rec_cpu = record.to(at::kCPU);
    raise_from_record(table, a, rec_cpu, mode);
  }
  if (keep_plan) {  // a valid batch whose backward can follow
    auto saved = std::make_shared<SavedBatch>();
    saved->device_workspace = plan;
    saved->device_record = record;  // validated above (error / warn mode, or by the small-batch plan kernel)
    put_plan(*a.key, std::move(saved));
  }
  return out;
}

// Shared by both backward ops: core_grads empty -> fused update (update.opt != kNone).
void backward(const std::string& table, const Prepared& a, const at::Tensor& grad_output, at::TensorList cores,
              const std::vector<at::Tensor>& core_grads, const kern::UpdateArgs& update, at::Tensor* psw_grad) {
  if (a.batch.n == 0 || a.batch.num_bags == 0) return;
  const c10::cuda::CUDAGuard device_guard(cores[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor grad = grad_output.contiguous();
  // The plan its forward built (a training step sorts and dedupes its ids once), else a new one.
  const size_t plan_bytes = kern::forward_workspace_bytes(a.dims, a.batch);
  const auto saved = take_plan(*a.key);
  const bool plan_ready = saved && saved->device_workspace.defined() &&
                          saved->device_workspace.device() == cores[0].device() &&
                          static_cast<size_t>(saved->device_workspace.numel()) >= plan_bytes;
  // The guard of the writes: forward's validation record of this very batch when it checked one
  // (error / warn mode, or the small-batch plan kernel), else a device-side validation here (never
  // read back; no id errors: backward drops invalid ids, as on CPU).
  const bool checked = plan_ready && saved->device_record.defined();
  at::Tensor record = checked ? saved->device_record : at::empty({4}, cores[0].options().dtype(at::kLong));
  dispatch(table, cores[0].scalar_type(), a.indices.scalar_type(), [&](auto dt, auto it) {
    using S = typename decltype(dt)::scalar;
    using T = typename decltype(dt)::cuda;
    using Id = typename decltype(it)::type;
    const Id* ids = a.indices.data_ptr<Id>();
    const T* psw = a.psw.defined() ? reinterpret_cast<const T*>(a.psw.data_ptr<S>()) : nullptr;
    auto* rec = reinterpret_cast<kern::ErrorRecord*>(record.data_ptr<int64_t>());
    if (!checked) C10_CUDA_CHECK((kern::launch_validate<T, Id>(a.dims, a.batch, ids, psw, false, rec, stream)));
    kern::CorePtrs<T> cp, gp;
    for (int64_t k = 0; k < a.shape.d; ++k) {
      cp.ptr[k] = reinterpret_cast<T*>(cores[k].data_ptr<S>());
      if (!core_grads.empty()) gp.ptr[k] = reinterpret_cast<T*>(core_grads[k].data_ptr<S>());
    }
    T* pg = psw_grad != nullptr ? reinterpret_cast<T*>(psw_grad->data_ptr<S>()) : nullptr;
    at::Tensor plan = plan_ready ? saved->device_workspace : workspace(plan_bytes, cores[0]);
    const size_t bytes = kern::backward_workspace_bytes(a.dims, a.batch);
    at::Tensor ws = workspace(bytes, cores[0]);
    C10_CUDA_CHECK((kern::launch_backward<T, Id>(a.dims, a.batch, ids, psw, reinterpret_cast<const T*>(grad.data_ptr<S>()),
                                                 cp, gp, update, pg, rec, plan.data_ptr(), plan_bytes, plan_ready,
                                                 ws.data_ptr(), bytes, stream)));
  });
}

at::Tensor tt_embedding_bag(at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode,
                            bool include_last_offset, int64_t bounds_check_mode, c10::string_view table_name) {
  const std::string table(table_name);
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                         bounds_check_mode);
  return forward(table, a, cores, bounds_check_mode);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> tt_embedding_bag_backward(
    const at::Tensor& grad_output, at::TensorList cores, const at::Tensor& indices, const at::Tensor& offsets,
    const std::optional<at::Tensor>& psw, int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
    bool psw_grad, c10::string_view table_name) {
  const std::string table(table_name);
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset, 0);
  check_grad_output(table, grad_output, a.batch.num_bags, a.shape, cores[0]);
  TT_CHECK(!psw_grad || psw.has_value(), VALUE, table, "per_sample_weights_grad needs per_sample_weights");
  std::vector<at::Tensor> grads;
  for (const auto& c : cores) grads.push_back(at::zeros_like(c));
  at::Tensor grad_psw = psw_grad ? at::zeros_like(*psw) : at::empty({0}, cores[0].options());
  backward(table, a, grad_output, cores, grads, kern::UpdateArgs{}, psw_grad ? &grad_psw : nullptr);
  return {grads, grad_psw};
}

void tt_embedding_bag_backward_fused_(const at::Tensor& grad_output, at::TensorList cores,
                                      at::TensorList optimizer_state, const at::Tensor& indices,
                                      const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
                                      int64_t num_embeddings, int64_t pooling_mode, bool include_last_offset,
                                      c10::string_view optimizer, double learning_rate, double eps,
                                      c10::string_view table_name) {
  const std::string table(table_name);
  const auto opt = parse_optimizer(table, std::string(optimizer));
  const auto a = prepare(table, cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset, 0);
  check_grad_output(table, grad_output, a.batch.num_bags, a.shape, cores[0]);
  check_optimizer_state(table, opt, cores, optimizer_state, learning_rate, eps);
  kern::UpdateArgs upd;
  switch (opt) {
    case FusedOptimizer::kSgd:
      upd.opt = kern::Optimizer::kSgd;
      break;
    case FusedOptimizer::kAdagrad:
      upd.opt = kern::Optimizer::kAdagrad;
      break;
    case FusedOptimizer::kRowwiseAdagrad:
      upd.opt = kern::Optimizer::kRowwiseAdagrad;
      break;
  }
  upd.lr = static_cast<float>(learning_rate);
  upd.eps = static_cast<float>(eps);
  for (size_t k = 0; k < optimizer_state.size(); ++k) upd.state[k] = optimizer_state[k].data_ptr<float>();
  backward(table, a, grad_output, cores, {}, upd, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) {
  m.impl("tt_embedding_bag", &tt_embedding_bag);
  m.impl("tt_embedding_bag_backward", &tt_embedding_bag_backward);
  m.impl("tt_embedding_bag_backward_fused_", &tt_embedding_bag_backward_fused_);
}

}  // namespace torchrec_tt::cuda_glue
#endif  // TORCHREC_TT_CUDA
