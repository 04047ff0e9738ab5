// The CUB and Thrust pieces csrc/cuda uses, for the CPU emulator (emu.h): the same contracts
// (stable radix sorts on a bit range, block exchanges and scans, device scans over iterators),
// computed plainly. Block collectives meet at the emulator's block barrier, as CUB's do.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
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

template <typename Key, int kBlock, int kItems, typename Value = NullType, int kRadixBits = 4, bool kMemoize = true,
          BlockScanAlgorithm = BLOCK_SCAN_WARP_SCANS>
class BlockRadixSort {
 public:
  struct TempStorage {
    unsigned char unused;
  };
  explicit BlockRadixSort(TempStorage&) {}

  // Input blocked (thread t holds entries t * kItems + i), output striped (entry i * kBlock + t).
  void SortBlockedToStriped(Key (&keys)[kItems], Value (&values)[kItems], int begin_bit = 0,
                            int end_bit = sizeof(Key) * 8) {
    emu_detail::require_block(kBlock);
    static std::vector<std::pair<Key, Value>> buf(kBlock * kItems);
    const int t = threadIdx.x;
    for (int i = 0; i < kItems; ++i) buf[t * kItems + i] = {keys[i], values[i]};
    __syncthreads();
    if (t == 0) {
      std::stable_sort(buf.begin(), buf.end(), [&](const auto& a, const auto& b) {
        return emu_detail::digit_bits(a.first, begin_bit, end_bit) < emu_detail::digit_bits(b.first, begin_bit, end_bit);
      });
    }
    __syncthreads();
    for (int i = 0; i < kItems; ++i) {
      keys[i] = buf[i * kBlock + t].first;
      values[i] = buf[i * kBlock + t].second;
    }
    __syncthreads();
  }
};

template <typename T, int kBlock, int kItems, bool kWarpTimeSlicing = false>
class BlockExchange {
 public:
  struct TempStorage {
    unsigned char unused;
  };
  explicit BlockExchange(TempStorage&) {}

  template <typename U>
  void StripedToBlocked(U (&items)[kItems]) {
    emu_detail::require_block(kBlock);
    static std::vector<U> buf(kBlock * kItems);
    const int t = threadIdx.x;
    for (int i = 0; i < kItems; ++i) buf[i * kBlock + t] = items[i];
    __syncthreads();
    for (int i = 0; i < kItems; ++i) items[i] = buf[t * kItems + i];
    __syncthreads();
  }
};

template <typename T, int kBlock, BlockScanAlgorithm = BLOCK_SCAN_RAKING>
class BlockScan {
 public:
  struct TempStorage {
    unsigned char unused;
  };
  explicit BlockScan(TempStorage&) {}

  template <typename Op>
  void ExclusiveScan(T input, T& output, T initial, Op op, T& block_aggregate) {
    emu_detail::require_block(kBlock);
    static std::vector<T> in(kBlock), out(kBlock);
    static T total;
    const int t = threadIdx.x;
    in[t] = input;
    __syncthreads();
    if (t == 0) {
      T acc = initial;
      for (int i = 0; i < kBlock; ++i) {
        out[i] = acc;
        acc = op(acc, in[i]);
      }
      T agg = in[0];
      for (int i = 1; i < kBlock; ++i) agg = op(agg, in[i]);
      total = agg;
    }
    __syncthreads();
    output = out[t];
    block_aggregate = total;
    __syncthreads();
  }
};

struct DeviceRadixSort {
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const Key* keys_in, Key* keys_out,
                               const Value* values_in, Value* values_out, NumItems n, int begin_bit = 0,
                               int end_bit = sizeof(Key) * 8, cudaStream_t = nullptr) {
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
