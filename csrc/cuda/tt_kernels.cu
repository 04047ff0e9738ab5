// CUDA kernels of the torchrec_tt ops: the launchers (plan, forward, backward walk); the kernels and
// workspace layouts are in the tt_*_kernels.cuh / tt_workspace.cuh parts of this translation unit.
// See tt_kernels.cuh for the algorithm. No torch headers.
//
// Conventions: positions, node numbers and counts are int (the glue rejects n >= (2^31 - 1) / d);
// element offsets are computed in int64. Products are accumulated in fp32 for every core dtype.
// Half/bfloat16 values are converted only through the explicit intrinsics, so this file builds
// under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <cstdlib>
#include <cstring>

#include "tt_grad_kernels.cuh"
#include "tt_kernels.cuh"
#include "tt_plan_kernels.cuh"
#include "tt_small_plan_kernels.cuh"
#include "tt_workspace.cuh"

namespace torchrec_tt::cuda {
namespace {

#define TT_CUDA_TRY(expr)                 \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)
#define TT_LAUNCHED() TT_CUDA_TRY(cudaGetLastError())

// Dynamic shared memory for staging (below the 48 KiB a block may use without opting in, leaving
// room for the kernels' static arrays).
constexpr int64_t kStageBytes = 40 * 1024;

// Nodes per staged chunk: as many as fit next to what is staged once (0: no staging).
int chunk_for(int64_t fixed_bytes, int64_t per_node_bytes) {
  const int64_t c = per_node_bytes > 0 ? (kStageBytes - fixed_bytes) / per_node_bytes : 0;
  return static_cast<int>(c <= 0 ? 0 : (c > kNodeChunk ? kNodeChunk : c));
}

// The one-block kernels (tt_small_plan_kernels.cuh) take batches of up to kSmallPlanMax ids, the
// plan kernel only tables of N < 2^32 rows (32-bit sort keys). TORCHREC_TT_CUDA_SMALL_PLAN=0 turns
// them off (read at each call: the tests run both paths in one process).
bool small_plans_enabled() {
  const char* v = std::getenv("TORCHREC_TT_CUDA_SMALL_PLAN");
  return v == nullptr || std::strcmp(v, "0") != 0;
}
bool small_batch(const Sizes& sz) { return sz.n <= kSmallPlanMax && small_plans_enabled(); }
bool small_plan(const TTDims& t, const Sizes& sz) {
  return small_batch(sz) && static_cast<unsigned long long>(t.num_embeddings) <= 0xffffffffull;
}

// Level k of a training plan: its nodes grouped by digit (dp is set by backward).
LevelArgs group_level_args(const Sizes& sz, int k, int m_prev, int rk, int nk, const PlanWorkspace& w) {
  LevelArgs a{};
  a.k = k;
  a.m_prev = m_prev;
  a.rk = rk;
  a.nk = nk;
  a.seg_start = w.seg + sz.group.seg_off[k];
  a.seg_end = w.seg + sz.group_segs() + sz.group.seg_off[k];
  a.order = w.order;
  a.p_prev = k == 0 ? nullptr : w.P[k - 1];
  return a;
}

// Backward's view of the plan: every level's nodes grouped by (level, digit) in one radix sort, into
// the plan workspace's group arrays (what forward left there is otherwise only read).
cudaError_t group_nodes_by_digit(const Sizes& sz, const Plan& pl, const PlanWorkspace& w, cudaStream_t stream) {
  if (small_batch(sz)) {  // every level has <= n <= kSmallPlanMax nodes: one block per level
    small_group_kernel<<<sz.d, kSmallBlock, 0, stream>>>(pl, sz.group, w.gkeys_out, w.order, w.seg,
                                                           w.seg + sz.group_segs());
    TT_LAUNCHED();
    return cudaSuccess;
  }
  const int64_t nodes = sz.group_nodes();
  const int64_t items = nodes > 2 * sz.group_segs() ? nodes : 2 * sz.group_segs();
  group_keys_kernel<<<grid_for(items, kFlatBlock), kFlatBlock, 0, stream>>>(pl, sz.group, w.gkeys_in, w.gvals_in,
                                                                              w.seg);
  TT_LAUNCHED();
  size_t tb = w.temp_bytes;
  TT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(w.temp, tb, static_cast<const unsigned int*>(w.gkeys_in), w.gkeys_out,
                                              static_cast<const int*>(w.gvals_in), w.order, static_cast<int>(nodes), 0,
                                              sz.group_bits, stream));
  group_segments_kernel<<<grid_for(nodes, kFlatBlock), kFlatBlock, 0, stream>>>(sz.group, w.gkeys_out, w.seg,
                                                                                 w.seg + sz.group_segs());
  TT_LAUNCHED();
  return cudaSuccess;
}

// The plan's device pointers inside its workspace (no launch).
Plan plan_view(const Sizes& sz, const PlanWorkspace& w) {
  Plan pl{};
  pl.n = sz.n;
  pl.keys = w.keys_out;
  pl.pos = w.pos_out;
  pl.slot = w.slot;
  for (int k = 0; k < sz.d; ++k) {
    pl.incl[k] = w.incl[k];
    pl.first[k] = w.first[k];
    pl.digit[k] = w.digit[k];
    pl.parent[k] = w.parent[k];
  }
  return pl;
}

// The general path of build_plan's sort and prefix tree (steps 1-2; any batch size).
template <typename Id>
cudaError_t build_tree(const Geo& g, const Sizes& sz, const Bags& bg, const Id* ids, const PlanWorkspace& w,
                       cudaStream_t stream) {
  const int n = sz.n;
  make_keys_kernel<Id><<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(ids, n, g.N, bg, w.keys_in, w.pos_in,
                                                                          w.bag_of);
  TT_LAUNCHED();
  size_t tb = w.temp_bytes;
  TT_CUDA_TRY(cub::DeviceRadixSort::SortPairs(w.temp, tb, static_cast<const unsigned long long*>(w.keys_in), w.keys_out,
                                              static_cast<const int*>(w.pos_in), w.pos_out, n, 0, sz.id_bits,
                                              stream));
  tb = w.temp_bytes;
  TT_CUDA_TRY(scan_levels(w.temp, tb, g, w.keys_out, w.incl, n, stream));
  const Plan pl = plan_view(sz, w);
  PlanOut po{};
  NodeOut no{};
  for (int k = 0; k < sz.d; ++k) {
    po.first[k] = w.first[k];
    no.digit[k] = w.digit[k];
    no.parent[k] = w.parent[k];
  }
  po.slot = w.slot;
  scatter_kernel<<<grid_for(n, kFlatBlock), kFlatBlock, 0, stream>>>(g, pl, po);
  TT_LAUNCHED();
  node_info_kernel<<<grid_for(sz.max_bound, kFlatBlock), kFlatBlock, 0, stream>>>(g, pl, no, sz.max_bound);
  TT_LAUNCHED();
  return cudaSuccess;
}

// Step 3 of the plan: the partial products P_0..P_last_level of every node.
template <typename T>
cudaError_t chain_products(const TTDims& t, const Sizes& sz, CorePtrs<const T> cores, int last_level,
                           const PlanWorkspace& w, cudaStream_t stream) {
  const Plan pl = plan_view(sz, w);
  for (int k = 0; k <= last_level; ++k) {
    const int m_prev = k == 0 ? 1 : static_cast<int>(sz.m[k - 1]);
    const int rk = static_cast<int>(t.r[k]);
    const int nk = static_cast<int>(t.q[k] * t.r[k + 1]);
    if (nk >= 32 && m_prev >= 2) {  // wide slices: 4 rows per thread
      const int groups = (m_prev + 3) / 4;
      chain_kernel<T, 4><<<grid_for(sz.bound[k], 1), threads_for(int64_t(groups) * nk), 0, stream>>>(
          pl, k, cores.ptr[k], k == 0 ? nullptr : w.P[k - 1], w.P[k], m_prev, rk, nk);
    } else {
      chain_kernel<T, 1><<<grid_for(sz.bound[k], 1), threads_for(int64_t(m_prev) * nk), 0, stream>>>(
          pl, k, cores.ptr[k], k == 0 ? nullptr : w.P[k - 1], w.P[k], m_prev, rk, nk);
    }
    TT_LAUNCHED();
  }
  return cudaSuccess;
}

// Sorts the ids and builds the prefix tree (steps 1-2), then P_0..P_last_level (bag sizes: pool_kernel, or
// bag_count_kernel in a backward without forward's plan).
template <typename T, typename Id>
cudaError_t build_plan(const TTDims& t, const Sizes& sz, const Bags& bg, const Id* ids, const T* psw,
                       const SmallCheck& check, CorePtrs<const T> cores, int last_level, const PlanWorkspace& w,
                       cudaStream_t stream) {
  const Geo g = make_geo(t);
  if (small_plan(t, sz)) {  // one launch: validation (if asked), sort, prefix tree
    small_plan_kernel<T, Id><<<1, kSmallBlock, 0, stream>>>(g, bg, ids, psw, sz.id_bits, check, w);
    TT_LAUNCHED();
  } else {
    TT_CUDA_TRY((build_tree<Id>(g, sz, bg, ids, w, stream)));
  }
  return chain_products<T>(t, sz, cores, last_level, w, stream);
}

Bags make_bags(const BatchDesc& b) {
  Bags bg{};
  bg.off = b.offsets;
  bg.count = b.num_offsets;
  bg.num_bags = b.num_bags;
  bg.n = static_cast<int>(b.n);
  return bg;
}

// One level of the backward walk (k = d-1 .. 0): groups the level's nodes by digit, computes dP_{k-1}
// (from core k, before it changes) and then the slice gradients / updates of core k.
template <typename T>
cudaError_t backward_level(const TTDims& t, const Sizes& sz, int k, const Plan& pl, const PlanWorkspace& pw,
                           const GradWorkspace& gw, const float* d_cur, float* d_prev, T* core, T* core_grad,
                           const UpdateArgs& update, const ErrorRecord* guard, cudaStream_t stream) {
  const int m_prev = k == 0 ? 1 : static_cast<int>(sz.m[k - 1]);
  const int rk = static_cast<int>(t.r[k]);
  const int nk = static_cast<int>(t.q[k] * t.r[k + 1]);
  LevelArgs a = group_level_args(sz, k, m_prev, rk, nk, pw);
  a.dp = d_cur;
  const unsigned digits = static_cast<unsigned>(t.p[k]);
  if (k > 0 && fused_parent_grad(t, sz, k)) {  // dP_{k-1} in one pass (reads core k before its update below)
    const int64_t threads = sz.bound[k - 1] * parent_grad_threads(m_prev, rk);
    parent_grad_kernel<T><<<grid_for(threads, kFlatBlock), kFlatBlock, 0, stream>>>(pl, k, m_prev, rk, nk, core, d_cur,
                                                                                  d_prev, sz.bound[k - 1]);
    TT_LAUNCHED();
  } else if (k > 0) {  // dP_{k-1} by digit, then reduced: the last read of core k, before its update below
    const int64_t transposed_bytes = int64_t(sizeof(float)) * nk * odd_stride(rk);
    if (nk >= 32 && rk >= 16 && transposed_bytes <= kStageBytes) {  // long reductions, wide ranks
      const unsigned splits = child_splits(sz.bound[k], digits);
      child_grad_warp_kernel<T><<<digits * splits, kWarpBlock, static_cast<size_t>(transposed_bytes), stream>>>(
          pl, a, static_cast<int>(splits), core, gw.dchild);
    } else {
      const int64_t slice_bytes = int64_t(sizeof(float)) * rk * odd_stride(nk);
      const int chunk = chunk_for(slice_bytes, int64_t(sizeof(float)) * m_prev * nk);
      const size_t smem =
          chunk > 0 ? static_cast<size_t>(slice_bytes + int64_t(sizeof(float)) * chunk * m_prev * nk) : 0;
      child_grad_kernel<T><<<digits, kWarpBlock, smem, stream>>>(pl, a, chunk, core, gw.dchild);
    }
    TT_LAUNCHED();
    const int per_node = m_prev * rk;
    dprev_reduce_kernel<<<grid_for(sz.bound[k - 1] * per_node, kFlatBlock), kFlatBlock, 0, stream>>>(
        pl, k, gw.dchild, d_prev, per_node, sz.bound[k - 1]);
    TT_LAUNCHED();
  }
  UpdateSlice u{};
  u.opt = update.opt;
  u.lr = update.lr;
  u.eps = update.eps;
  u.state = update.state[k];
  u.scratch = gw.scratch;
  u.guard = guard;
  // Slice tiling (see SliceTiling): rows per thread E in {16, 4, 1}, then as many node splits as
  // the block has thread groups left.
  constexpr int kSliceThreads = 256;
  const int E = rk >= 16 ? 16 : (rk >= 4 ? 4 : 1);
  SliceTiling st{};
  st.cols = nk < kSliceThreads ? nk : kSliceThreads;
  const int groups = kSliceThreads / st.cols;
  const int rows_needed = (rk + E - 1) / E;
  st.row_groups = groups < rows_needed ? groups : rows_needed;
  st.splits = groups / st.row_groups;
  const int64_t row_bytes =
      int64_t(sizeof(float)) * slice_row_stride(m_prev * ((k > 0 ? rk : 0) + nk), slice_reads_quads(E, rk));
  const int chunk = chunk_for(0, row_bytes);
  const int64_t part_bytes = st.splits > 1 ? int64_t(sizeof(float)) * st.splits * st.row_groups * E * st.cols : 0;
  const size_t smem = static_cast<size_t>(chunk * row_bytes > part_bytes ? chunk * row_bytes : part_bytes);
  switch (E) {
    case 16:
      slice_grad_kernel<T, 16><<<digits, kSliceThreads, smem, stream>>>(pl, a, u, st, chunk, core, core_grad);
      break;
    case 4:
      slice_grad_kernel<T, 4><<<digits, kSliceThreads, smem, stream>>>(pl, a, u, st, chunk, core, core_grad);
      break;
    default:
      slice_grad_kernel<T, 1><<<digits, kSliceThreads, smem, stream>>>(pl, a, u, st, chunk, core, core_grad);
  }
  TT_LAUNCHED();
  return cudaSuccess;
}

}  // namespace

size_t forward_workspace_bytes(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0) return 0;
  const Sizes sz(dims, batch);
  return carve_plan(batch, sz, nullptr, nullptr);
}

size_t backward_workspace_bytes(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0) return 0;
  const Sizes sz(dims, batch);
  return carve_grad(dims, sz, nullptr, nullptr);
}

template <typename T, typename Id>
cudaError_t launch_validate(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            bool record_id_errors, ErrorRecord* record, cudaStream_t stream) {
  const int64_t total = batch.n > batch.num_offsets ? batch.n : batch.num_offsets;
  const auto N = static_cast<unsigned long long>(dims.num_embeddings);
  if (total <= kValidateOneBlockMax) {
    validate_block_kernel<T, Id><<<1, kValidateBlock, 0, stream>>>(
        ids, batch.n, batch.offsets, batch.num_offsets, batch.include_last_offset, psw, N, record_id_errors, record);
    TT_LAUNCHED();
    return cudaSuccess;
  }
  init_record_kernel<<<1, 1, 0, stream>>>(record);
  TT_LAUNCHED();
  validate_kernel<T, Id><<<grid_for(total, kFlatBlock), kFlatBlock, 0, stream>>>(
      ids, batch.n, batch.offsets, batch.num_offsets, batch.include_last_offset, psw, N, record_id_errors, record);
  TT_LAUNCHED();
  finalize_record_kernel<Id><<<1, 1, 0, stream>>>(ids, batch.offsets, record);
  TT_LAUNCHED();
  return cudaSuccess;
}

bool forward_validates(const TTDims& dims, const BatchDesc& batch) {
  if (batch.n <= 0 || batch.num_bags <= 0) return false;
  return small_plan(dims, Sizes(dims, batch));
}

template <typename T, typename Id>
cudaError_t launch_forward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                           CorePtrs<const T> cores, T* out, ErrorRecord* record, bool record_id_errors,
                           void* plan_workspace, size_t plan_bytes, cudaStream_t stream) {
  if (batch.n <= 0 || batch.num_bags <= 0) return cudaSuccess;  // caller returns zeros
  const Sizes sz(dims, batch);
  if (carve_plan(batch, sz, nullptr, nullptr) > plan_bytes) return cudaErrorInvalidValue;
  PlanWorkspace w{};
  carve_plan(batch, sz, align_up(plan_workspace), &w);
  const Bags bg = make_bags(batch);
  const SmallCheck check{record, record_id_errors, batch.include_last_offset};
  TT_CUDA_TRY((build_plan<T, Id>(dims, sz, bg, ids, psw, check, cores, sz.d - 1, w, stream)));
  pool_kernel<T><<<grid_for(batch.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
      bg, w.slot, w.bag_count, psw, w.P[sz.d - 1], static_cast<int>(sz.D), batch.mean, out);
  TT_LAUNCHED();
  return cudaSuccess;
}

template <typename T, typename Id>
cudaError_t launch_backward(const TTDims& dims, const BatchDesc& batch, const Id* ids, const T* psw,
                            const T* grad_out, CorePtrs<T> cores, CorePtrs<T> core_grads,
                            const UpdateArgs& update, T* psw_grad, const ErrorRecord* guard, void* plan_workspace,
                            size_t plan_bytes, bool plan_ready, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (batch.n <= 0 || batch.num_bags <= 0) return cudaSuccess;  // no id is in a bag: nothing to do
  const Sizes sz(dims, batch);
  if (carve_plan(batch, sz, nullptr, nullptr) > plan_bytes) return cudaErrorInvalidValue;
  if (carve_grad(dims, sz, nullptr, nullptr) > workspace_bytes) return cudaErrorInvalidValue;
  PlanWorkspace pw{};
  GradWorkspace gw{};
  carve_plan(batch, sz, align_up(plan_workspace), &pw);
  carve_grad(dims, sz, align_up(workspace), &gw);
  const int d = sz.d;
  const int last = d - 1;
  const Bags bg = make_bags(batch);
  if (!plan_ready) {  // forward's plan holds every level and the bag sizes; a new one needs P_last only for psw_grad
    CorePtrs<const T> ccores{};
    for (int k = 0; k < d; ++k) ccores.ptr[k] = cores.ptr[k];
    const SmallCheck none{nullptr, false, false};  // the caller validated (guard)
    TT_CUDA_TRY((build_plan<T, Id>(dims, sz, bg, ids, psw, none, ccores, psw_grad != nullptr ? last : last - 1, pw,
                                   stream)));
    bag_count_kernel<<<grid_for(bg.num_bags * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(bg, pw.slot, pw.bag_count);
    TT_LAUNCHED();
  }
  const Plan pl = plan_view(sz, pw);
  TT_CUDA_TRY(group_nodes_by_digit(sz, pl, pw, stream));
  const int n = sz.n;
  const int D = static_cast<int>(sz.D);
  if (psw_grad != nullptr) {
    psw_grad_kernel<T><<<grid_for(int64_t(n) * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
        n, pw.slot, pw.bag_of, pw.bag_count, pw.P[last], grad_out, D, batch.mean, psw_grad);
    TT_LAUNCHED();
  }
  float* d_cur = gw.dA;
  float* d_other = gw.dB;
  row_grad_kernel<T><<<grid_for(sz.bound[last] * kWarp, kWarpBlock), kWarpBlock, 0, stream>>>(
      pl, last, pw.bag_of, pw.bag_count, psw, grad_out, D, batch.mean, d_cur);
  TT_LAUNCHED();
  for (int k = last; k >= 0; --k) {
    TT_CUDA_TRY(backward_level<T>(dims, sz, k, pl, pw, gw, d_cur, d_other, cores.ptr[k], core_grads.ptr[k], update,
                                  guard, stream));
    float* tmp = d_cur;
    d_cur = d_other;
    d_other = tmp;
  }
  return cudaSuccess;
}

#define TT_INSTANTIATE(T, Id)                                                                                   \
  template cudaError_t launch_validate<T, Id>(const TTDims&, const BatchDesc&, const Id*, const T*, bool,      \
                                              ErrorRecord*, cudaStream_t);                                      \
  template cudaError_t launch_forward<T, Id>(const TTDims&, const BatchDesc&, const Id*, const T*,             \
                                             CorePtrs<const T>, T*, ErrorRecord*, bool, void*, size_t,          \
                                             cudaStream_t);                                                     \
  template cudaError_t launch_backward<T, Id>(const TTDims&, const BatchDesc&, const Id*, const T*, const T*, \
                                              CorePtrs<T>, CorePtrs<T>, const UpdateArgs&, T*,                  \
                                              const ErrorRecord*, void*, size_t, bool, void*, size_t,           \
                                              cudaStream_t);
#define TT_INSTANTIATE_IDS(T) \
  TT_INSTANTIATE(T, int32_t)  \
  TT_INSTANTIATE(T, int64_t)
TT_INSTANTIATE_IDS(float)
TT_INSTANTIATE_IDS(__half)
TT_INSTANTIATE_IDS(__nv_bfloat16)
#undef TT_INSTANTIATE_IDS
#undef TT_INSTANTIATE

}  // namespace torchrec_tt::cuda
