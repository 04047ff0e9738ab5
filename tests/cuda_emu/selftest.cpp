// Kernels that check the emulator itself (tests/test_cuda_emulated.py): that it reproduces CUDA's
// warp intrinsics and barrier reductions, and that a missing barrier, a deadlock, a misused warp
// intrinsic or more shared memory than a block may have shows instead of passing silently.
#include "emu.h"

#include <map>
#include <string>
#include <tuple>
#include <vector>

namespace {

// out[t] = in[blockDim - 1 - t] through shared memory; without the barrier a thread reads its
// partner's slot before the partner wrote it.
template <bool kBarrier>
__global__ void reverse_kernel(const int* in, int* out) {
  __shared__ int s[1024];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = in[t];
  if (kBarrier) __syncthreads();
  out[t] = s[n - 1 - t];
}

// Per thread: shfl (lane 5's 2t), shfl_up by 3, shfl_xor 1, ballot of t % 3 == 0, syncthreads_count.
__global__ void intrinsics_kernel(int* out) {
  const int t = threadIdx.x;
  int* o = out + 5 * t;
  o[0] = __shfl_sync(0xffffffffu, 2 * t, 5);
  o[1] = __shfl_up_sync(0xffffffffu, t, 3);
  o[2] = __shfl_xor_sync(0xffffffffu, t, 1);
  o[3] = static_cast<int>(__ballot_sync(0xffffffffu, t % 3 == 0));
  o[4] = __syncthreads_count(t % 4 == 0);
}

// Half of warp 0 waits at the block barrier, the other half at a warp shuffle that needs all 32.
__global__ void deadlock_kernel(int* out) {
  const int t = threadIdx.x;
  if (t < 16) {
    __syncthreads();
  } else {
    out[t] = __shfl_sync(0xffffffffu, t, 0);
  }
}

// __syncthreads_and over the threads that reach the barrier (the last warp exits first).
__global__ void and_kernel(int* out) {
  const int t = threadIdx.x;
  if (t >= static_cast<int>(blockDim.x) - 32) return;
  out[t] = __syncthreads_and(1) + 2 * __syncthreads_and(t != 5);
}

// Misuse the emulator must report (undefined on a GPU): lanes of one warp at different intrinsics,
// and a mask that leaves out lanes of the warp.
__global__ void mixed_kernel(int* out) {
  const int t = threadIdx.x;
  if (t % 32 < 16) {
    out[t] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
  } else {
    out[t] = __shfl_sync(0xffffffffu, t, 0);
  }
}
__global__ void partial_mask_kernel(int* out) {
  const int t = threadIdx.x;
  out[t] = __shfl_sync(t % 32 < 16 ? 0x0000ffffu : 0xffff0000u, t, 3);
}

// A float4 load one float past an aligned address: a GPU faults (misaligned address); the emulator,
// built with -fsanitize=alignment, must abort rather than read it as x86 would.
__global__ void misaligned_kernel(const int* in, int* out) {
  __shared__ float4 buf[2];
  const int t = threadIdx.x;
  if (t < 8) reinterpret_cast<float*>(buf)[t] = static_cast<float>(in[t]);
  __syncthreads();
  const float4 v = *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(buf) + 1);
  out[t] = static_cast<int>(v.x);
}

}  // namespace

// Runs one self-test kernel on `threads` threads (one block), input seed * 10000 + t; returns its
// output and the launch's error.
std::pair<std::vector<int>, int> emu_selftest(const std::string& name, int threads, int seed) {
  std::vector<int> in(threads), out(static_cast<size_t>(threads) * 5, -1);
  for (int i = 0; i < threads; ++i) in[i] = seed * 10000 + i;
  if (name == "reverse") {
    reverse_kernel<true><<<1, threads>>>(in.data(), out.data());
  } else if (name == "reverse_without_barrier") {
    reverse_kernel<false><<<1, threads>>>(in.data(), out.data());
  } else if (name == "intrinsics") {
    intrinsics_kernel<<<1, threads>>>(out.data());
  } else if (name == "and") {
    and_kernel<<<1, threads>>>(out.data());
  } else if (name == "mixed") {
    mixed_kernel<<<1, threads>>>(out.data());
  } else if (name == "partial_mask") {
    partial_mask_kernel<<<1, threads>>>(out.data());
  } else if (name == "misaligned") {
    misaligned_kernel<<<1, threads>>>(in.data(), out.data());
  } else if (name == "smem_fits" || name == "smem_over") {  // 4 KiB static + 44 KiB (+ 4 bytes) dynamic
    const size_t dynamic = 44 * 1024 + (name == "smem_over" ? sizeof(int) : 0);
    reverse_kernel<true><<<1, threads, dynamic>>>(in.data(), out.data());
  } else if (name == "deadlock") {
    deadlock_kernel<<<1, threads>>>(out.data());
  }
  return {out, static_cast<int>(cudaGetLastError())};
}

// Every kernel launched since the last call with clear = true: name -> (launches, most threads per
// block, most dynamic and static shared memory bytes), for the resource check in the tests.
std::map<std::string, std::tuple<uint64_t, unsigned, size_t, size_t>> emu_launch_log(bool clear) {
  std::map<std::string, std::tuple<uint64_t, unsigned, size_t, size_t>> out;
  for (const auto& [name, r] : ::emu::rt().launches)
    out[name] = {r.launches, r.max_threads, r.max_dynamic_smem, r.max_static_smem};
  if (clear) ::emu::rt().launches.clear();
  return out;
}
