// CUDA recall kernel: the same two-pass rule as the CPU kernel (see recall_cpu.h).
//
// Canonical score on the GPU: acc = 0; for k = 0 .. d-1 in order: acc = fmaf(q[k], g[k], acc), in fp32
// (bf16 inputs widened exactly). The tiled kernel keeps one accumulator per pair and walks k in the
// same order through its shared-memory chunks, and the diagonal kernel is the literal loop, so a
// threshold and the score it is compared with are bit-identical; __fmaf_rn pins the fused op so nvcc's
// contraction choices cannot differ between the two kernels.
//
// Tiled kernel: a block owns BM = 64 query rows and a slice of the gallery; 256 threads each hold a
// 4x4 register tile (rows ty + 16r, columns tx + 16c); Q and G chunks of BK = 16 features are staged in
// shared memory (transposed, padded against bank conflicts). The epilogue compares and counts (MODE 0)
// or tracks the best positive as a packed 64-bit key (MODE 1); scores never leave registers.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "recall_cuda.h"

namespace hescape {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4, THREADS = 256;
using ull = unsigned long long;

template <bool BF16>
__device__ __forceinline__ float load_elem(const void* p, int64_t idx) {
  if constexpr (BF16) {
    return __uint_as_float(static_cast<unsigned>(static_cast<const unsigned short*>(p)[idx]) << 16);
  } else {
    return static_cast<const float*>(p)[idx];
  }
}

// Orderable key: higher score first, then lower index. -0 is folded into +0 (they compare equal).
__device__ __forceinline__ ull make_key(float s, int64_t j) {
  unsigned u = s == 0.0f ? 0u : __float_as_uint(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<ull>(u) << 32) | static_cast<ull>(0xFFFFFFFFu - static_cast<unsigned>(j));
}

template <bool BF16>
__global__ void diag_kernel(const void* q, const void* g, int64_t n, int64_t d, float* best_score,
                            int64_t* best_index) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float acc = 0.0f;
  for (int64_t k = 0; k < d; ++k) acc = __fmaf_rn(load_elem<BF16>(q, i * d + k), load_elem<BF16>(g, i * d + k), acc);
  best_score[i] = acc;
  best_index[i] = i;
}

__global__ void decode_kernel(int64_t n, float* best_score, int64_t* best_index) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const ull key = reinterpret_cast<ull*>(best_index)[i];
  if (key == 0) {
    best_score[i] = 0.0f;
    best_index[i] = -1;
    return;
  }
  unsigned u = static_cast<unsigned>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  best_score[i] = __uint_as_float(u);
  best_index[i] = static_cast<int64_t>(0xFFFFFFFFu - static_cast<unsigned>(key & 0xFFFFFFFFull));
}

// MODE 0: out[i] += #{j in slice : s_ij > thr_i or (s_ij == thr_i and j < pidx_i)}.
// MODE 1: out[i] = max key over positives j in slice (glab[j] == qlab[i]).
template <bool BF16, int MODE>
__global__ void __launch_bounds__(THREADS) tile_kernel(const void* q, const void* g, int64_t nq, int64_t ng,
                                                       int64_t d, int64_t cols_per_split, const float* thr,
                                                       const int64_t* pidx, const int64_t* qlab,
                                                       const int64_t* glab, ull* out) {
  __shared__ float qs[BK][BM + 1];
  __shared__ float gs[BK][BN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i_base = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t j_end = min(ng, j_begin + cols_per_split);

  float t[TM];
  int64_t p[TM], ql[TM];
  ull acc_out[TM];
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    const int64_t i = i_base + ty + 16 * r;
    const bool ok = i < nq;
    t[r] = (MODE == 0 && ok) ? thr[i] : 0.0f;
    p[r] = (MODE == 0 && ok) ? pidx[i] : 0;
    ql[r] = (MODE == 1 && ok) ? qlab[i] : 0;
    acc_out[r] = 0;
  }

  for (int64_t j_base = j_begin; j_base < j_end; j_base += BN) {
    float acc[TM][TN];
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) acc[r][c] = 0.0f;

    for (int64_t k0 = 0; k0 < d; k0 += BK) {
#pragma unroll
      for (int l = 0; l < (BM * BK) / THREADS; ++l) {
        const int e = threadIdx.x + THREADS * l, row = e / BK, kk = e % BK;
        const int64_t k = k0 + kk, i = i_base + row, j = j_base + row;
        qs[kk][row] = (i < nq && k < d) ? load_elem<BF16>(q, i * d + k) : 0.0f;
        gs[kk][row] = (j < j_end && k < d) ? load_elem<BF16>(g, j * d + k) : 0.0f;
      }
      __syncthreads();
      const int kend = static_cast<int>(min(static_cast<int64_t>(BK), d - k0));
      auto step = [&](int kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int r = 0; r < TM; ++r) a[r] = qs[kk][ty + 16 * r];
#pragma unroll
        for (int c = 0; c < TN; ++c) b[c] = gs[kk][tx + 16 * c];
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
          for (int c = 0; c < TN; ++c) acc[r][c] = __fmaf_rn(a[r], b[c], acc[r][c]);
      };
      if (kend == BK) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) step(kk);
      } else {
        for (int kk = 0; kk < kend; ++kk) step(kk);
      }
      __syncthreads();
    }

#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int64_t j = j_base + tx + 16 * c;
      if (j >= j_end) continue;
      const int64_t gl = MODE == 1 ? glab[j] : 0;
#pragma unroll
      for (int r = 0; r < TM; ++r) {
        const float s = acc[r][c];
        if (MODE == 0) {
          acc_out[r] += (s > t[r]) || (s == t[r] && j < p[r]);
        } else if (gl == ql[r]) {
          const ull key = make_key(s, j);
          acc_out[r] = key > acc_out[r] ? key : acc_out[r];
        }
      }
    }
  }

  // The 16 threads sharing a row (same ty) are 16 consecutive lanes of one warp.
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    ull v = acc_out[r];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const ull o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
      v = MODE == 0 ? v + o : (o > v ? o : v);
    }
    const int64_t i = i_base + ty + 16 * r;
    if (tx == 0 && i < nq && (MODE == 0 || v != 0)) {
      if (MODE == 0) atomicAdd(out + i, v);
      else atomicMax(out + i, v);
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("hescape CUDA kernel: ") + what + ": " + cudaGetErrorString(err));
}

template <bool BF16>
void run(const void* q, const void* g, int64_t nq, int64_t ng, int64_t d, const int64_t* qlab, const int64_t* glab,
         int64_t* ranks, float* best_score, int64_t* best_index, cudaStream_t stream) {
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  // Enough blocks to fill the GPU: split the gallery when there are few query blocks.
  const int64_t row_blocks = (nq + BM - 1) / BM, col_tiles = (ng + BN - 1) / BN;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(col_tiles, (8LL * sms + row_blocks - 1) / row_blocks));
  const int64_t cols_per_split = (col_tiles + splits - 1) / splits * BN;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>((ng + cols_per_split - 1) / cols_per_split));
  const unsigned lin = static_cast<unsigned>((nq + 255) / 256);

  if (qlab == nullptr) {
    diag_kernel<BF16><<<lin, 256, 0, stream>>>(q, g, nq, d, best_score, best_index);
  } else {
    check(cudaMemsetAsync(best_index, 0, sizeof(int64_t) * nq, stream), "cudaMemsetAsync");
    tile_kernel<BF16, 1><<<grid, THREADS, 0, stream>>>(q, g, nq, ng, d, cols_per_split, nullptr, nullptr, qlab, glab,
                                                      reinterpret_cast<ull*>(best_index));
    decode_kernel<<<lin, 256, 0, stream>>>(nq, best_score, best_index);
  }
  check(cudaGetLastError(), "pass 1 launch");
  check(cudaMemsetAsync(ranks, 0, sizeof(int64_t) * nq, stream), "cudaMemsetAsync");
  tile_kernel<BF16, 0><<<grid, THREADS, 0, stream>>>(q, g, nq, ng, d, cols_per_split, best_score, best_index, nullptr,
                                                    nullptr, reinterpret_cast<ull*>(ranks));
  check(cudaGetLastError(), "pass 2 launch");
}

}  // namespace

void rank_cuda(uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t q_labels,
               uintptr_t g_labels, uintptr_t ranks, uintptr_t best_score, uintptr_t best_index, int device,
               uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  if (nq < 1 || ng < 1 || d < 1) throw std::invalid_argument("rank_cuda: empty input");
  if (ng >= 0xFFFFFFFFLL) throw std::invalid_argument("rank_cuda: gallery larger than 2^32 - 2 rows");
  if ((q_labels == 0) != (g_labels == 0)) throw std::invalid_argument("rank_cuda: pass both label arrays or neither");
  if (q_labels == 0 && nq != ng) throw std::invalid_argument("rank_cuda: diagonal positives need nq == ng");
  auto* ql = reinterpret_cast<const int64_t*>(q_labels);
  auto* gl = reinterpret_cast<const int64_t*>(g_labels);
  auto* r = reinterpret_cast<int64_t*>(ranks);
  auto* bs = reinterpret_cast<float*>(best_score);
  auto* bi = reinterpret_cast<int64_t*>(best_index);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (bf16) run<true>(reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(g), nq, ng, d, ql, gl, r, bs, bi, st);
  else run<false>(reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(g), nq, ng, d, ql, gl, r, bs, bi, st);
}

}  // namespace hescape
