// The CUB and Thrust pieces csrc/cuda uses, for the CPU emulator (emu.h): the same contracts
// (stable radix sorts on a bit range, block exchange, device scan over iterators), computed plainly.
// Block collectives meet at the emulator's block barrier, as CUB's do.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace cub {

struct NullType {};
enum BlockScanAlgorithm { BLOCK_SCAN_RAKING, BLOCK_SCAN_RAKING_MEMOIZE, BLOCK_SCAN_WARP_SCANS };

namespace emu_detail {
template <typename Key>
inline uint64_t digit_bits(Key k, int begin_bit, int end_bit) {
  const uint64_t u = static_cast<uint64_t>(k) >> begin_bit;
  const int w = end_bit - begin_bit;
  return w >= 64 ? u : (u & ((uint64_t(1) << w) - 1));
}
inline void require_block(int threads) {
  if (static_cast<int>(blockDim.x) != threads) {
    std::fprintf(stderr, "emu: CUB block collective for %d threads called by a block of %u\n", threads, blockDim.x);
    std::abort();
  }
}
}  // namespace emu_detail

// Block collectives work in the caller's TempStorage (CUB's sizes: what the kernels' static_asserts
// check) and end without a barrier, as CUB's do: a caller that reuses the storage without one first
// reads what another thread is still writing.
template <typename Key, int kBlock, int kItems, typename Value = NullType, int kRadixBits = 4, bool kMemoize = true,
          BlockScanAlgorithm = BLOCK_SCAN_WARP_SCANS>
class BlockRadixSort {
  static_assert(std::is_unsigned<Key>::value, "the stand-in sorts unsigned keys only (CUB flips signed / float keys)");
  static constexpr int kN = kBlock * kItems;

 public:
  struct TempStorage {
    union {
      Key keys[kN];
      Value values[kN];
    };
  };
  explicit BlockRadixSort(TempStorage& s) : s_(s) {}

  // Input blocked (thread t holds entries t * kItems + i), output striped (entry i * kBlock + t);
  // stable. Keys, then values, pass through the storage; thread 0 sorts (its registers: `rank`).
  void SortBlockedToStriped(Key (&keys)[kItems], Value (&values)[kItems], int begin_bit = 0,
                            int end_bit = sizeof(Key) * 8) {
    emu_detail::require_block(kBlock);
    static std::vector<Key> k(kN);
    static std::vector<Value> v(kN);
    static std::vector<int> rank(kN);
    const int t = threadIdx.x;
    for (int i = 0; i < kItems; ++i) s_.keys[t * kItems + i] = keys[i];
    __syncthreads();
    if (t == 0) std::copy(s_.keys, s_.keys + kN, k.begin());
    __syncthreads();
    for (int i = 0; i < kItems; ++i) s_.values[t * kItems + i] = values[i];
    __syncthreads();
    if (t == 0) {
      std::copy(s_.values, s_.values + kN, v.begin());
      std::iota(rank.begin(), rank.end(), 0);
      std::stable_sort(rank.begin(), rank.end(), [&](int a, int b) {
        return emu_detail::digit_bits(k[a], begin_bit, end_bit) < emu_detail::digit_bits(k[b], begin_bit, end_bit);
      });
      for (int i = 0; i < kN; ++i) s_.keys[i] = k[rank[i]];
    }
    __syncthreads();
    for (int i = 0; i < kItems; ++i) keys[i] = s_.keys[i * kBlock + t];
    __syncthreads();
    if (t == 0)
      for (int i = 0; i < kN; ++i) s_.values[i] = v[rank[i]];
    __syncthreads();
    for (int i = 0; i < kItems; ++i) values[i] = s_.values[i * kBlock + t];
  }

 private:
  TempStorage& s_;
};

template <typename T, int kBlock, int kItems, bool kWarpTimeSlicing = false>
class BlockExchange {
 public:
  struct TempStorage {
    T items[kBlock * kItems];
  };
  explicit BlockExchange(TempStorage& s) : s_(s) {}

  void StripedToBlocked(T (&items)[kItems]) {
    emu_detail::require_block(kBlock);
    const int t = threadIdx.x;
    for (int i = 0; i < kItems; ++i) s_.items[i * kBlock + t] = items[i];
    __syncthreads();
    for (int i = 0; i < kItems; ++i) items[i] = s_.items[t * kItems + i];
  }

 private:
  TempStorage& s_;
};

struct DeviceRadixSort {
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const Key* keys_in, Key* keys_out,
                               const Value* values_in, Value* values_out, NumItems n, int begin_bit = 0,
                               int end_bit = sizeof(Key) * 8, cudaStream_t = nullptr) {
    static_assert(std::is_unsigned<Key>::value, "the stand-in sorts unsigned keys only");
    if (temp == nullptr) {
      temp_bytes = 64;
      return cudaSuccess;
    }
    std::vector<int64_t> idx(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
      return emu_detail::digit_bits(keys_in[a], begin_bit, end_bit) < emu_detail::digit_bits(keys_in[b], begin_bit, end_bit);
    });
    std::vector<Key> k(idx.size());
    std::vector<Value> v(idx.size());
    for (size_t i = 0; i < idx.size(); ++i) {
      k[i] = keys_in[idx[i]];
      v[i] = values_in[idx[i]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), values_out);
    return cudaSuccess;
  }
};

struct DeviceScan {
  template <typename In, typename Out, typename Op, typename NumItems>
  static cudaError_t InclusiveScan(void* temp, size_t& temp_bytes, In in, Out out, Op op, NumItems n,
                                   cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 64;
      return cudaSuccess;
    }
    if (n <= 0) return cudaSuccess;
    auto acc = in[0];
    out[0] = acc;
    for (NumItems i = 1; i < n; ++i) {
      acc = op(acc, in[i]);
      out[i] = acc;
    }
    return cudaSuccess;
  }
};

}  // namespace cub

namespace thrust {

template <typename I>
struct counting_iterator {
  I base;
  explicit counting_iterator(I b) : base(b) {}
  I operator[](int64_t i) const { return base + static_cast<I>(i); }
};

template <typename It, typename F>
struct transform_iterator {
  It it;
  F f;
  auto operator[](int64_t i) const { return f(it[i]); }
};
template <typename It, typename F>
transform_iterator<It, F> make_transform_iterator(It it, F f) {
  return {it, f};
}

template <typename F>
struct tabulate_output_iterator {
  F f;
  struct Ref {
    const F& f;
    int64_t i;
    template <typename V>
    void operator=(const V& v) const {
      f(static_cast<int>(i), v);
    }
  };
  Ref operator[](int64_t i) const { return Ref{f, i}; }
};
template <typename F>
tabulate_output_iterator<F> make_tabulate_output_iterator(F f) {
  return {f};
}

}  // namespace thrust
