// Plans built by a forward call, handed to the matching backward call, for every device: the CPU
// op stores its host plan and partial products, the CUDA op its plan workspace (device memory).
//
// A plan depends only on the ids, offsets, per-sample weights, the table's shapes and (with a
// hot-row cache) the cache's id -> slot map. Autograd hands backward the very tensors forward saw,
// so a training step can sort and dedupe its ids once instead of twice. Entries hold references
// to the tensors of their key, so their memory cannot be reused by another tensor while the entry
// lives, and a key matches only if each tensor still has the same data pointer, shape and version
// counter (an in-place change in between means a rebuild). Entries are consumed by backward;
// forward calls without a backward (eval with grad enabled) age out of a small LRU list, with
// separate byte bounds for host and device memory.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <vector>

namespace torchrec_tt {

namespace cpu {
struct TTPlan;  // cpu/tt_plan.h
}  // namespace cpu

struct PlanKey {
  std::vector<at::Tensor> tensors;  // ids, offsets, weights, cores[0] (the table), cache map
  std::vector<int64_t> versions;
  int64_t num_embeddings = 0;
  bool include_last_offset = false;

  PlanKey(const at::Tensor& indices, const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
          const at::Tensor& core0, const at::Tensor* cache_map, int64_t num_embeddings, bool include_last_offset);
  bool operator==(const PlanKey& other) const;
};

// What a forward call leaves for its backward: the plan and the partial products it computed
// (levels k >= 1, index k; backward would otherwise recompute them from the same cores).
// The CUDA op keeps its whole plan workspace instead (device memory, see cuda/tt_kernels.cuh).
struct SavedBatch {
  std::shared_ptr<const cpu::TTPlan> plan;
  std::vector<at::Tensor> partials;
  // float16 / bfloat16 cores on CPU: forward's fp32 copies of the cores, which its backward reuses
  std::vector<at::Tensor> fp32_cores;
  at::Tensor device_workspace;
  // The CUDA forward's validation record of this batch (error / warn mode, or folded into the
  // small-batch plan kernel; else undefined): backward takes it as its guard instead of validating again.
  at::Tensor device_record;
};

// Whether forward should store its plan: only when a backward can follow.
bool plan_wanted_by_backward(const at::Tensor& core0);

// Set by the ops' autograd kernels when grad mode is off (evaluation under torch.no_grad): the
// forwards in scope then keep no plan, which no backward would take.
class NoBackwardGuard {
 public:
  explicit NoBackwardGuard(bool no_backward);
  ~NoBackwardGuard();
  NoBackwardGuard(const NoBackwardGuard&) = delete;
  NoBackwardGuard& operator=(const NoBackwardGuard&) = delete;

 private:
  bool previous_;
};

void put_plan(PlanKey key, std::shared_ptr<SavedBatch> saved);

// What forward stored for `key` (removed from the store), or nullptr.
std::shared_ptr<SavedBatch> take_plan(const PlanKey& key);

}  // namespace torchrec_tt
