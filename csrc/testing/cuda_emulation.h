// A small CPU stand-in for the CUDA features recall_cuda.cu uses, so that its kernels run, unchanged, as plain
// C++ on a machine without a GPU (the CI machines have none). Test code only; never part of the built extension.
//
// Semantics kept: a launch runs its blocks one after another; the threads of a block run concurrently (one OS
// thread each, reused from block to block), so __syncthreads() is a real barrier of the block and __shfl_xor_sync a real exchange inside a
// warp of 32 consecutive threads. __shared__ arrays are function-local statics, one copy per kernel
// instantiation, shared by the block that runs (blocks never overlap). Global atomics are GCC __atomic builtins.
// Device memory is host memory; streams are ignored (launches complete before they return). __fmaf_rn is
// std::fma (one rounding, as the GPU's FFMA). Not emulated: memory-model races the GPU could show and a CPU
// schedule hides, and any feature recall_cuda.cu does not use.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx(0, 0, 0), blockIdx(0, 0, 0), blockDim(1, 1, 1), gridDim(1, 1, 1);

using std::max;
using std::min;

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice };

namespace hescape_emu {

// The emulated device: this many SMs (a small number splits the gallery across blocks, as a big GPU does when
// there are few query blocks, so the column-split path is exercised).
inline int sm_count = 4;

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned long gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  unsigned long gen_ = 0;
};

struct BlockState {
  explicit BlockState(int threads) : block(threads), slots(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(std::min(32, threads - 32 * w));
  }
  Barrier block;
  std::deque<Barrier> warps;  // deque: Barrier is not movable
  std::vector<unsigned long long> slots;  // shuffle exchange, one 64-bit slot per thread
};

inline thread_local BlockState* current = nullptr;

template <class... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;

  template <class... Args>
  void operator()(Args&&... args) const {
    // One OS thread per CUDA thread of a block, reused for every block; a block barrier separates the blocks
    // (they share the __shared__ statics, as consecutive blocks on one SM share its shared memory).
    const int threads = static_cast<int>(block.x);
    BlockState state(threads);
    std::vector<std::thread> pool;
    std::exception_ptr error;
    std::mutex error_lock;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = dim3(static_cast<unsigned>(t), 0, 0);
        blockDim = block;
        gridDim = grid;
        current = &state;
        for (unsigned by = 0; by < grid.y; ++by) {
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3(bx, by, 0);
            try {
              kernel(static_cast<Params>(args)...);
            } catch (...) {  // recall_cuda.cu's kernels do not throw; kept so a fault cannot vanish
              std::lock_guard<std::mutex> g(error_lock);
              error = std::current_exception();
            }
            state.block.wait();
          }
        }
      });
    }
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
  }
};

template <class... Params>
Launcher<Params...> launch(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return Launcher<Params...>{kernel, grid, block};
}

}  // namespace hescape_emu

#define HESCAPE_LAUNCH(grid, block, stream, ...) \
  ((void)(stream), ::hescape_emu::launch(dim3(grid), dim3(block), &__VA_ARGS__))

inline void __syncthreads() { hescape_emu::current->block.wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of at most 64 bits");
  auto* st = hescape_emu::current;
  const int t = static_cast<int>(threadIdx.x);
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  st->slots[t] = bits;
  st->warps[t / 32].wait();
  const unsigned long long other = st->slots[(t & ~31) | ((t & 31) ^ lane_mask)];
  st->warps[t / 32].wait();  // nobody overwrites a slot before every lane has read it
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = hescape_emu::sm_count;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
