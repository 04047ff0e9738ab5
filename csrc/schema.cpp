// Operator schemas of the torchrec_tt library: one block, implementations live per device
// (cpu/*.cpp, cuda/*.cu). Python binds them in torchrec_tt/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import torchrec_tt._C` loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torchrec_tt, m) {
  // Pooled TT lookup. Cores: d >= 2 tensors [p_k, r_{k-1}, q_k, r_k] (r_0 = r_d = 1).
  // pooling_mode: 0 sum, 1 mean. bounds_check_mode: 0 error, 1 warn and drop, 2 drop silently.
  m.def(
      "tt_embedding_bag(Tensor[] cores, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "int num_embeddings, int pooling_mode, bool include_last_offset, int bounds_check_mode, "
      "str table_name) -> Tensor");
  // Dense gradients of the cores (and of per_sample_weights when asked) for torch.optim users.
  m.def(
      "tt_embedding_bag_backward(Tensor grad_output, Tensor[] cores, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int num_embeddings, int pooling_mode, bool include_last_offset, "
      "bool per_sample_weights_grad, str table_name) -> (Tensor[], Tensor)");
  // Same forward as tt_embedding_bag; its autograd formula updates the cores in place (fused optimizer).
  m.def(
      "tt_embedding_bag_fused(Tensor[] cores, Tensor[] optimizer_state, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int num_embeddings, int pooling_mode, bool include_last_offset, "
      "int bounds_check_mode, str optimizer, float learning_rate, float eps, str table_name) -> Tensor");
  // Backward with the optimizer step fused in: only the touched core slices are read and written.
  // optimizer: "sgd" (no state), "adagrad" (state shaped like each core), "rowwise_adagrad" ([p_k] per core).
  m.def(
      "tt_embedding_bag_backward_fused_(Tensor grad_output, Tensor(a!)[] cores, Tensor(b!)[] optimizer_state, "
      "Tensor indices, Tensor offsets, Tensor? per_sample_weights, int num_embeddings, int pooling_mode, "
      "bool include_last_offset, str optimizer, float learning_rate, float eps, str table_name) -> ()");
  // Hot-row cache (CPU): ids held in the cache (map: TTRowCache's id -> slot buckets) read their
  // uncompressed row instead of the TT chain; the second output gives each id's cache slot
  // (-1: rebuilt from the cores, -2: dropped by the bounds check).
  m.def(
      "tt_cached_embedding_bag_fused(Tensor[] cores, Tensor[] optimizer_state, Tensor cache_weight, "
      "Tensor cache_state, Tensor cache_map, Tensor cache_trained, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int num_embeddings, int pooling_mode, bool include_last_offset, "
      "int bounds_check_mode, str optimizer, float learning_rate, float eps, str table_name) -> (Tensor, Tensor)");
  // Its backward: the fused step on the touched core slices and cached rows; flags the trained rows.
  m.def(
      "tt_cached_embedding_bag_backward_fused_(Tensor grad_output, Tensor(a!)[] cores, "
      "Tensor(b!)[] optimizer_state, Tensor(c!) cache_weight, Tensor(d!) cache_state, Tensor cache_map, "
      "Tensor(e!) cache_trained, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "int num_embeddings, int pooling_mode, bool include_last_offset, str optimizer, float learning_rate, "
      "float eps, str table_name) -> ()");
  // The cache's per-lookup bookkeeping (CPU): hits/misses into hit_stats, `weight` added to the
  // counter of each hit's slot (where: slot, -1 rebuilt, -2 dropped), and, in training, missed ids
  // appended to pending_ids/pending_steps at `fill`. Returns how many ids were appended.
  m.def(
      "tt_cache_count_(Tensor where, Tensor indices, Tensor(a!) slot_counts, Tensor(b!) hit_stats, "
      "Tensor(c!) pending_ids, Tensor(d!) pending_steps, int fill, float weight, int step, bool training, "
      "str table_name) -> Tensor");
}
