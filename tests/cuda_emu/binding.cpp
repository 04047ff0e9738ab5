// Python entry points of the emulated CUDA kernels: CPU tensors in, the torch-free API of
// csrc/cuda/tt_kernels.cuh called on their memory (the emulator runs the launches on the host).
// Mirrors what the CUDA glue (csrc/cuda/tt_embedding_bag_cuda.cpp) passes to the launchers.
#include <torch/extension.h>

#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "tt_kernels.cuh"

namespace kern = torchrec_tt::cuda;

std::pair<std::vector<int>, int> emu_selftest(const std::string& name, int threads, int seed);  // selftest.cpp
using LaunchLog = std::map<std::string, std::tuple<uint64_t, unsigned, size_t, size_t>>;
LaunchLog emu_launch_log(bool clear);  // selftest.cpp

namespace {

kern::TTDims dims_of(const std::vector<at::Tensor>& cores, int64_t num_embeddings) {
  kern::TTDims d;
  d.d = static_cast<int>(cores.size());
  d.num_embeddings = num_embeddings;
  d.embedding_dim = 1;
  d.r[0] = 1;
  for (int k = 0; k < d.d; ++k) {
    d.p[k] = cores[k].size(0);
    d.q[k] = cores[k].size(2);
    d.r[k + 1] = cores[k].size(3);
    d.embedding_dim *= d.q[k];
  }
  return d;
}

kern::BatchDesc batch_of(const at::Tensor& ids, const at::Tensor& offsets, bool include_last, bool mean) {
  kern::BatchDesc b;
  b.n = ids.numel();
  b.offsets = offsets.data_ptr<int64_t>();
  b.num_offsets = offsets.numel();
  b.num_bags = include_last ? std::max<int64_t>(offsets.numel() - 1, 0) : offsets.numel();
  b.include_last_offset = include_last;
  b.mean = mean;
  return b;
}

void check(cudaError_t e, const char* what) { TORCH_CHECK(e == cudaSuccess, what, " failed: cudaError ", int(e)); }

template <typename F>
void dispatch(const at::Tensor& core, const at::Tensor& ids, F&& f) {
  auto with_ids = [&](auto t) {
    if (ids.scalar_type() == at::kLong) f(t, int64_t{}); else f(t, int32_t{});
  };
  switch (core.scalar_type()) {
    case at::kFloat: with_ids(float{}); break;
    case at::kHalf: with_ids(__half{}); break;
    case at::kBFloat16: with_ids(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "emulated kernels: float32/float16/bfloat16 cores");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Validation record as int64[4] (key, value0, value1, dropped).
at::Tensor validate(std::vector<at::Tensor> cores, at::Tensor ids, at::Tensor offsets, std::optional<at::Tensor> psw,
                    int64_t num_embeddings, bool include_last, bool record_id_errors) {
  const auto d = dims_of(cores, num_embeddings);
  const auto b = batch_of(ids, offsets, include_last, false);
  at::Tensor rec = at::empty({4}, at::kLong);
  dispatch(cores[0], ids, [&](auto t, auto i) {
    using T = decltype(t);
    using Id = decltype(i);
    check(kern::launch_validate<T, Id>(d, b, ids.numel() ? ptr<Id>(ids) : nullptr, psw ? ptr<T>(*psw) : nullptr,
                                       record_id_errors, ptr<kern::ErrorRecord>(rec), nullptr),
          "launch_validate");
  });
  return rec;
}

// (pooled output, plan workspace, validation record or an empty tensor where forward does not validate)
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(std::vector<at::Tensor> cores, at::Tensor ids,
                                                       at::Tensor offsets, std::optional<at::Tensor> psw,
                                                       int64_t num_embeddings, bool mean, bool include_last,
                                                       bool record_id_errors) {
  const auto d = dims_of(cores, num_embeddings);
  const auto b = batch_of(ids, offsets, include_last, mean);
  at::Tensor out = at::zeros({b.num_bags, d.embedding_dim}, cores[0].options());
  if (b.n == 0 || b.num_bags == 0) return {out, at::empty({0}, at::kByte), at::empty({0}, at::kLong)};
  const size_t bytes = kern::forward_workspace_bytes(d, b);
  at::Tensor plan = at::full({static_cast<int64_t>(bytes)}, 0xff, at::kByte);  // as stale as a GPU's memory
  const bool validates = kern::forward_validates(d, b);
  at::Tensor rec = validates ? at::full({4}, -7, at::kLong) : at::empty({0}, at::kLong);
  out.fill_(std::numeric_limits<float>::quiet_NaN());  // every bag must be written
  dispatch(cores[0], ids, [&](auto t, auto i) {
    using T = decltype(t);
    using Id = decltype(i);
    kern::CorePtrs<const T> cp;
    for (int k = 0; k < d.d; ++k) cp.ptr[k] = ptr<const T>(cores[k]);
    check(kern::launch_forward<T, Id>(d, b, ptr<Id>(ids), psw ? ptr<T>(*psw) : nullptr, cp, ptr<T>(out),
                                      validates ? ptr<kern::ErrorRecord>(rec) : nullptr, record_id_errors,
                                      plan.data_ptr(), bytes, nullptr),
          "launch_forward");
  });
  return {out, plan, rec};
}

// Backward: dense core gradients (optimizer 0) or a fused update of `cores` / `state` in place.
// plan: forward's plan workspace (empty: build one); guard: a validation record (empty: none).
std::tuple<std::vector<at::Tensor>, at::Tensor> backward(at::Tensor grad, std::vector<at::Tensor> cores,
                                                         std::vector<at::Tensor> state, at::Tensor ids,
                                                         at::Tensor offsets, std::optional<at::Tensor> psw,
                                                         int64_t num_embeddings, bool mean, bool include_last,
                                                         int64_t optimizer, double lr, double eps, bool want_psw_grad,
                                                         at::Tensor plan, at::Tensor guard) {
  const auto d = dims_of(cores, num_embeddings);
  const auto b = batch_of(ids, offsets, include_last, mean);
  std::vector<at::Tensor> grads;
  if (optimizer == 0)
    for (const auto& c : cores) grads.push_back(at::zeros_like(c));
  at::Tensor pg = want_psw_grad ? at::zeros_like(*psw) : at::empty({0}, cores[0].options());
  if (b.n == 0 || b.num_bags == 0) return {grads, pg};
  const size_t plan_bytes = kern::forward_workspace_bytes(d, b);
  const bool ready = plan.numel() > 0;
  if (!ready) plan = at::full({static_cast<int64_t>(plan_bytes)}, 0xff, at::kByte);
  const size_t bytes = kern::backward_workspace_bytes(d, b);
  at::Tensor ws = at::full({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, 0xff, at::kByte);
  kern::UpdateArgs u;
  u.opt = static_cast<kern::Optimizer>(optimizer);
  u.lr = static_cast<float>(lr);
  u.eps = static_cast<float>(eps);
  for (size_t k = 0; k < state.size(); ++k) u.state[k] = state[k].data_ptr<float>();
  dispatch(cores[0], ids, [&](auto t, auto i) {
    using T = decltype(t);
    using Id = decltype(i);
    kern::CorePtrs<T> cp, gp;
    for (int k = 0; k < d.d; ++k) {
      cp.ptr[k] = ptr<T>(cores[k]);
      if (!grads.empty()) gp.ptr[k] = ptr<T>(grads[k]);
    }
    check(kern::launch_backward<T, Id>(d, b, ptr<Id>(ids), psw ? ptr<T>(*psw) : nullptr, ptr<T>(grad), cp, gp, u,
                                       want_psw_grad ? ptr<T>(pg) : nullptr,
                                       guard.numel() ? ptr<kern::ErrorRecord>(guard) : nullptr, plan.data_ptr(),
                                       plan_bytes, ready, ws.data_ptr(), bytes, nullptr),
          "launch_backward");
  });
  return {grads, pg};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("validate", &validate);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("selftest", &emu_selftest);
  m.def("launch_log", &emu_launch_log, py::arg("clear") = false);
}
