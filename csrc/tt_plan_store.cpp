#include "tt_plan_store.h"

#include <c10/core/InferenceMode.h>

#include <iterator>
#include <list>
#include <mutex>
#include <utility>

#include "cpu/tt_plan.h"

namespace torchrec_tt {
namespace {

// Enough for every TT table of a large model between its forward and backward; plans of forward
// calls that get no backward (evaluation) are dropped oldest first beyond these bounds.
constexpr size_t kMaxEntries = 64;
constexpr size_t kMaxBytes = size_t(64) << 20;         // host memory of CPU plans
constexpr size_t kMaxDeviceBytes = size_t(512) << 20;  // device memory of CUDA plan workspaces

struct Entry {
  PlanKey key;
  std::shared_ptr<SavedBatch> saved;
  size_t bytes, device_bytes;
};
std::mutex mutex;
std::list<Entry> entries;  // most recent first
size_t total_bytes = 0, total_device_bytes = 0;

size_t plan_bytes(const cpu::TTPlan& p) {
  size_t n = p.bag_start.size() + p.bag_of.size() + p.slot.size() + p.bag_valid.size() + p.occ_start.size() +
             p.occ.size() + p.cached_slot.size() + p.cached_occ_start.size() + p.cached_occ.size();
  for (const auto* level : {&p.digit, &p.parent, &p.first_child, &p.by_digit_start, &p.by_digit}) {
    for (const auto& v : *level) n += v.size();
  }
  return n * sizeof(int64_t);
}

bool same_tensor(const at::Tensor& a, int64_t version_a, const at::Tensor& b, int64_t version_b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type() && version_a == version_b;
}

}  // namespace

PlanKey::PlanKey(const at::Tensor& indices, const at::Tensor& offsets, const std::optional<at::Tensor>& psw,
                 const at::Tensor& core0, const at::Tensor* cache_map, int64_t num_embeddings_,
                 bool include_last_offset_)
    : tensors{indices, offsets, psw.value_or(at::Tensor()), core0, cache_map ? *cache_map : at::Tensor()},
      num_embeddings(num_embeddings_),
      include_last_offset(include_last_offset_) {
  for (const auto& t : tensors) {  // inference tensors have no version counter (and change only in inference mode)
    versions.push_back(t.defined() && !t.is_inference() ? static_cast<int64_t>(t._version()) : -1);
  }
  versions[3] = 0;  // the cores identify the table; their values (a fused backward updates them) do not matter
}

bool PlanKey::operator==(const PlanKey& other) const {
  if (num_embeddings != other.num_embeddings || include_last_offset != other.include_last_offset) return false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!same_tensor(tensors[i], versions[i], other.tensors[i], other.versions[i])) return false;
  }
  return true;
}

static thread_local bool no_backward_in_scope = false;

bool plan_wanted_by_backward(const at::Tensor& core0) {
  // Grad mode is off inside an autograd.Function's forward, so it cannot tell training from
  // evaluation here: the autograd kernels look before (NoBackwardGuard); beyond that, a table that
  // trains is the criterion (inference mode never trains).
  return core0.requires_grad() && !c10::InferenceMode::is_enabled() && !no_backward_in_scope;
}

NoBackwardGuard::NoBackwardGuard(bool no_backward) : previous_(no_backward_in_scope) {
  no_backward_in_scope = previous_ || no_backward;
}

NoBackwardGuard::~NoBackwardGuard() { no_backward_in_scope = previous_; }

void put_plan(PlanKey key, std::shared_ptr<SavedBatch> saved) {
  // the partial products are added after forward computed them: budget them from the plan's size
  const size_t bytes = saved->plan ? 2 * plan_bytes(*saved->plan) : 0;
  const size_t device_bytes = saved->device_workspace.defined() ? saved->device_workspace.nbytes() : 0;
  std::lock_guard<std::mutex> lock(mutex);
  entries.push_front(Entry{std::move(key), std::move(saved), bytes, device_bytes});
  total_bytes += bytes;
  total_device_bytes += device_bytes;
  while (entries.size() > 1 && (entries.size() > kMaxEntries || total_bytes > kMaxBytes ||
                                total_device_bytes > kMaxDeviceBytes)) {
    total_bytes -= entries.back().bytes;
    total_device_bytes -= entries.back().device_bytes;
    entries.pop_back();
  }
}

std::shared_ptr<SavedBatch> take_plan(const PlanKey& key) {
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = entries.begin(); it != entries.end(); ++it) {
    if (it->key == key) {
      auto saved = std::move(it->saved);
      total_bytes -= it->bytes;
      total_device_bytes -= it->device_bytes;
      entries.erase(it);
      return saved;
    }
  }
  return nullptr;
}

}  // namespace torchrec_tt
