// Small batches (n <= kSmallPlanMax ids): the plan in one block instead of a chain of launches.
// Part of the CUDA kernels' one translation unit (included by tt_kernels.cu): internal, not an API.
//
// Why: for the batch sizes one table sees per GPU step (thousands of ids), the step is bound by the
// host issuing launches, not by the GPU. The general plan is 13 GPU operations (key kernel, CUB's
// 8-operation radix sort, a 2-kernel CUB scan, scatter, node info) and backward's digit grouping 10
// more; each costs the host a launch. Here one block of 1024 threads holds the whole batch in
// registers: small_plan_kernel validates, sorts (cub::BlockRadixSort on 32-bit keys), scans the
// per-level new-node flags (warp ballots, one scan of the per-warp counts) and writes the same plan arrays as the general path;
// small_group_kernel (one block per level) does backward's (level, digit) grouping. Same results as
// the general path, bit for bit (both sorts are stable).
// All of a batch's memory traffic goes through one SM here, so every global access is striped
// (entry x = row * kSmallBlock + thread: coalesced); the sort takes its input blocked (exchanged in
// shared memory) and hands its output back striped.
#pragma once

#include <cub/block/block_exchange.cuh>
#include <cub/block/block_radix_sort.cuh>

#include "tt_plan_kernels.cuh"
#include "tt_workspace.cuh"

namespace torchrec_tt::cuda {
namespace {

constexpr int kSmallBlock = 1024;
constexpr int kSmallItems = 11;  // rows per thread: the exchange of 11 x 1024 keys fills 44 KiB of static shared memory
constexpr int64_t kSmallPlanMax = int64_t(kSmallBlock) * kSmallItems;  // 11,264 ids

using SmallSort = cub::BlockRadixSort<unsigned int, kSmallBlock, kSmallItems, int, 4, false>;
using SmallExchange = cub::BlockExchange<unsigned int, kSmallBlock, kSmallItems>;
union SmallTemp {
  typename SmallSort::TempStorage sort;
  typename SmallExchange::TempStorage exchange;
  struct Numbering {  // small_plan_kernel's node counts: per level (+ valid ids), per (row, warp)
    int counts[kMaxCores + 1][kSmallItems * (kSmallBlock / kWarp)];
    int totals[kMaxCores + 1];
  } numbering;
};
static_assert(sizeof(SmallTemp) <= 46 * 1024, "one-block plan: shared memory over the static limit");

// Stable sort of (key, value) pairs held striped (entry x = i * kSmallBlock + threadIdx.x, in
// entry order): the sorted pairs come back striped. Values ride along as their bit patterns.
__device__ __forceinline__ void small_sort_striped(SmallTemp& temp, unsigned int (&key)[kSmallItems],
                                                   int (&val)[kSmallItems], int end_bit) {
  unsigned int bits[kSmallItems];
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) bits[i] = static_cast<unsigned int>(val[i]);
  SmallExchange(temp.exchange).StripedToBlocked(key);
  __syncthreads();
  SmallExchange(temp.exchange).StripedToBlocked(bits);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) val[i] = static_cast<int>(bits[i]);
  SmallSort(temp.sort).SortBlockedToStriped(key, val, 0, end_bit);
  __syncthreads();  // temp is reused by the caller
}

// Validation to fold in (rec == nullptr: none).
struct SmallCheck {
  ErrorRecord* rec;
  bool record_ids;
  bool include_last;
};

// The plan of a batch of n <= kSmallPlanMax ids with N < 2^32, written into the workspace arrays the
// general path fills (keys_out, pos_out, incl, first, digit, parent, slot, bag_of); optionally the
// validation record too.
// With one block, every dependent load is latency the block cannot hide: after the sort, the only
// global reads are the bag offsets; neighbours' keys come by shuffle, node digits and parents are
// written where the node starts.
template <typename T, typename Id>
__global__ void __launch_bounds__(kSmallBlock)
    small_plan_kernel(Geo g, Bags bg, const Id* __restrict__ ids, const T* __restrict__ psw, int key_bits,
                      SmallCheck check, PlanWorkspace pw) {
  constexpr int kWarps = kSmallBlock / kWarp;
  constexpr int kLongBag = 64;  // longer bags are filled by the whole block
  __shared__ SmallTemp temp;
  __shared__ unsigned int warp_last[kSmallItems][kWarps];  // per row: each warp's last sorted key
  constexpr int kMaxLongBags = kSmallPlanMax / (kLongBag + 1) + 1;
  __shared__ int long_bags[kMaxLongBags];
  __shared__ int long_count;
  const int n = bg.n;
  const int t = threadIdx.x, lane = t % kWarp, w = t / kWarp;
  if (t == 0) long_count = 0;  // read after the sort's barriers
  if (check.rec != nullptr) {
    validate_in_block<T, Id>(ids, n, bg.off, bg.count, check.include_last, psw, g.N, check.record_ids, check.rec);
  }
  const auto sentinel = static_cast<unsigned int>(g.N);  // invalid ids; padding (0xffffffff) sorts after it
  unsigned int key[kSmallItems];
  int val[kSmallItems];
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    const int x = i * kSmallBlock + t;
    key[i] = 0xffffffffu;
    val[i] = x;
    if (x < n) {
      const long long id = static_cast<long long>(ids[x]);
      key[i] = (id >= 0 && static_cast<unsigned long long>(id) < g.N) ? static_cast<unsigned int>(id) : sentinel;
      pw.bag_of[x] = -1;  // in no bag, unless a bag below covers it (after the sort's barriers)
    }
  }
  small_sort_striped(temp, key, val, key_bits);
  // Each position's bag, bag by bag (no binary search per position): for valid offsets, the same as
  // bag_of_position. Malformed offsets (rejected by validation, so backward writes nothing) may
  // leave either of two overlapping bags.
  for (int64_t b = t; b < bg.num_bags; b += kSmallBlock) {
    int s, e;
    bag_range(bg, b, s, e);
    if (e - s > kLongBag) {  // valid offsets have at most kMaxLongBags of these (disjoint: any order)
      const int q = atomicAdd(&long_count, 1);
      if (q < kMaxLongBags) {
        long_bags[q] = static_cast<int>(b);
        continue;
      }
    }
    for (int p = s; p < e; ++p) pw.bag_of[p] = static_cast<int>(b);
  }
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    const int x = i * kSmallBlock + t;
    if (x < n) {
      pw.keys_out[x] = key[i];
      pw.pos_out[x] = val[i];
    }
    if (lane == kWarp - 1) warp_last[i][w] = key[i];
  }
  __syncthreads();
  for (int q = 0; q < long_count && q < kMaxLongBags; ++q) {
    int s, e;
    bag_range(bg, long_bags[q], s, e);
    for (int p = s + t; p < e; p += kSmallBlock) pw.bag_of[p] = long_bags[q];
  }

  // Node numbering without a block scan per row. Pass 1, row by row: bit k of fresh[i] says the
  // entry starts a new prefix of length k + 1 (a new node of level k; then of every deeper level
  // too), bit kValidBit that it is a valid id; each warp's counts go to shared memory (in temp: the
  // sort is done). Keys are below 2^32: 32-bit divisions.
  constexpr int kValidBit = kMaxCores;
  constexpr int kSlots = kSmallItems * kWarps;  // (row, warp) pairs, in entry order
  const int d = g.d;
  unsigned short fresh[kSmallItems];
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    fresh[i] = 0;
    if (i * kSmallBlock >= n) {  // a row past the batch (uniform over the block): counts 0
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k <= kMaxCores; ++k) temp.numbering.counts[k][i * kWarps + w] = 0;
      }
      continue;
    }
    const int x = i * kSmallBlock + t;
    unsigned int before = __shfl_up_sync(0xffffffffu, key[i], 1);  // entry x - 1
    if (lane == 0) before = w > 0 ? warp_last[i][w - 1] : (i > 0 ? warp_last[i - 1][kWarps - 1] : 0u);
    if (x < n && key[i] < sentinel) {
      unsigned int bits = 1u << kValidBit;
      bool differs = x == 0;
#pragma unroll
      for (int k = 0; k < kMaxCores; ++k) {
        if (k >= d) break;
        if (!differs) {
          const auto div = static_cast<unsigned int>(g.div[k]);
          differs = key[i] / div != before / div;
        }
        if (differs) bits |= 1u << k;
      }
      fresh[i] = static_cast<unsigned short>(bits);
    }
#pragma unroll
    for (int k = 0; k <= kMaxCores; ++k) {
      if (k < d || k == kValidBit) {
        const unsigned int m = __ballot_sync(0xffffffffu, (fresh[i] >> k) & 1u);
        if (lane == 0) temp.numbering.counts[k][i * kWarps + w] = __popc(m);
      }
    }
  }
  __syncthreads();
  // Exclusive scan of each level's (row, warp) counts: warp k takes level k (warp kValidBit: the
  // valid ids), each lane kSlots / kWarp consecutive slots.
  if (w < d || w == kValidBit) {
    constexpr int kPerLane = kSlots / kWarp;
    int* c = temp.numbering.counts[w] + lane * kPerLane;
    int sum = 0;
#pragma unroll
    for (int q = 0; q < kPerLane; ++q) sum += c[q];
    int before_lane = sum;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, before_lane, o);
      if (lane >= o) before_lane += v;
    }
    if (lane == kWarp - 1) temp.numbering.totals[w] = before_lane;
    before_lane -= sum;
#pragma unroll
    for (int q = 0; q < kPerLane; ++q) {
      const int v = c[q];
      c[q] = before_lane;
      before_lane += v;
    }
  }
  __syncthreads();
  // Pass 2: an entry's node number at level k = the nodes before its warp's row slot + those started
  // by lanes up to it. Nodes are written where they start: first entry, digit, parent.
  const unsigned int upto_lane = 0xffffffffu >> (kWarp - 1 - lane);
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    if (i * kSmallBlock >= n) continue;
    const int x = i * kSmallBlock + t;
    int incl_prev = 0;
#pragma unroll
    for (int k = 0; k < kMaxCores; ++k) {
      if (k >= d) break;
      const unsigned int m = __ballot_sync(0xffffffffu, (fresh[i] >> k) & 1u);
      const int incl = temp.numbering.counts[k][i * kWarps + w] + __popc(m & upto_lane);
      if (x < n) {
        pw.incl[k][x] = incl;
        if ((fresh[i] >> k) & 1u) {
          const int node = incl - 1;
          pw.first[k][node] = x;
          pw.digit[k][node] = static_cast<int>(key[i] / static_cast<unsigned int>(g.div[k]) %
                                                static_cast<unsigned int>(g.p[k]));
          if (k > 0) pw.parent[k][node] = incl_prev - 1;
        }
      }
      incl_prev = incl;
    }
    if (x < n) pw.slot[val[i]] = (fresh[i] >> kValidBit) & 1u ? incl_prev - 1 : -1;
  }
  if (t < d) pw.first[t][temp.numbering.totals[t]] = temp.numbering.totals[kValidBit];  // CSR ends after the last valid id
}

// Backward's grouping of every level's nodes by digit when each level has <= kSmallPlanMax nodes:
// block k sorts level k's nodes by digit (stable: node order within a digit) into order[node_off[k]..]
// and writes the digit segments of level k (group_keys_kernel + CUB sort + group_segments_kernel of
// the general path). keys: scratch of node_off[d] entries.
__global__ void __launch_bounds__(kSmallBlock)
    small_group_kernel(Plan pl, GroupLayout gl, unsigned int* __restrict__ keys, int* __restrict__ order,
                       int* __restrict__ seg_start, int* __restrict__ seg_end) {
  __shared__ SmallTemp temp;
  const int k = blockIdx.x;
  const int t = threadIdx.x;
  const int begin = static_cast<int>(gl.node_off[k]);
  const int len = static_cast<int>(gl.node_off[k + 1] - gl.node_off[k]);
  for (int64_t s = gl.seg_off[k] + t; s < gl.seg_off[k + 1]; s += kSmallBlock) {
    seg_start[s] = 0;  // an absent digit stays an empty segment
    seg_end[s] = 0;
  }
  const int cnt = level_count(pl, k);
  const unsigned int unused = (1u << gl.digit_bits) - 1u;  // above every digit: sorts last
  unsigned int key[kSmallItems];
  int val[kSmallItems];
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    const int j = i * kSmallBlock + t;
    key[i] = j < cnt ? static_cast<unsigned int>(pl.digit[k][j]) : unused;
    val[i] = j;
  }
  small_sort_striped(temp, key, val, gl.digit_bits);
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    const int x = i * kSmallBlock + t;
    if (x < len) {
      keys[begin + x] = key[i];
      order[begin + x] = val[i];
    }
  }
  __syncthreads();  // sorted keys and the zeroed segments visible to the block
#pragma unroll
  for (int i = 0; i < kSmallItems; ++i) {
    const int x = i * kSmallBlock + t;
    if (x >= len || key[i] == unused) continue;
    const int64_t sg = gl.seg_off[k] + key[i];
    if (x == 0 || keys[begin + x - 1] != key[i]) seg_start[sg] = begin + x;
    if (x + 1 == len || keys[begin + x + 1] != key[i]) seg_end[sg] = begin + x + 1;
  }
}

}  // namespace
}  // namespace torchrec_tt::cuda
