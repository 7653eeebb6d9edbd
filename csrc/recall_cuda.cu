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
//
// Both directions (rank_cuda_both): MODE 2 counts each score against its row's threshold t_i (image->gene)
// and its column's threshold u_j (gene->image) and MODE 3 tracks both best positives, so every score s_ij is
// computed once. The canonical dot is symmetric (fmaf(a, b, c) == fmaf(b, a, c)), so s_ij has the bits the
// separate gene->image call computes for (j, i): the ranks equal the two separate calls integer for integer.
// Column partials: the two lanes of a warp sharing a column combine by shuffle, the 8 warps through shared
// memory, then one global atomic per column and tile.
#ifdef HESCAPE_CUDA_EMULATION  // compiled as plain C++ by the CPU test of this kernel (csrc/testing/)
#include "testing/cuda_emulation.h"
#else
#include <cuda_runtime.h>
// HESCAPE_LAUNCH(grid, block, stream, kernel)(args) is kernel<<<grid, block, 0, stream>>>(args); the kernel comes
// last so that the commas of its template arguments need no parentheses.
#define HESCAPE_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

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
// MODE 2: MODE 0, and cout[j] += #{i in block : s_ij > cthr_j or (s_ij == cthr_j and i < cpidx_j)}.
// MODE 3: MODE 1, and cout[j] = max key (s_ij, i) over positives i in block (qlab[i] == glab[j]).
template <bool BF16, int MODE>
__global__ void __launch_bounds__(THREADS) tile_kernel(const void* q, const void* g, int64_t nq, int64_t ng,
                                                       int64_t d, int64_t cols_per_split, const float* thr,
                                                       const int64_t* pidx, const int64_t* qlab,
                                                       const int64_t* glab, ull* out, const float* cthr,
                                                       const int64_t* cpidx, ull* cout) {
  constexpr bool COUNT = MODE == 0 || MODE == 2;
  constexpr bool COLS = MODE >= 2;
  __shared__ float qs[BK][BM + 1];
  __shared__ float gs[BK][BN + 1];
  __shared__ ull colred[COLS ? THREADS / 32 : 1][BN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i_base = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t j_end = min(ng, j_begin + cols_per_split);

  float t[TM];
  int64_t p[TM], ql[TM];
  bool row_ok[TM];
  ull acc_out[TM];
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    const int64_t i = i_base + ty + 16 * r;
    row_ok[r] = i < nq;
    t[r] = (COUNT && row_ok[r]) ? thr[i] : 0.0f;
    p[r] = (COUNT && row_ok[r]) ? pidx[i] : 0;
    ql[r] = (!COUNT && row_ok[r]) ? qlab[i] : 0;
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
      const bool col_ok = j < j_end;
      const int64_t gl = (!COUNT && col_ok) ? glab[j] : 0;
      const float u = (MODE == 2 && col_ok) ? cthr[j] : 0.0f;
      const int64_t cp = (MODE == 2 && col_ok) ? cpidx[j] : 0;
      ull col = 0;
#pragma unroll
      for (int r = 0; r < TM; ++r) {
        if (!col_ok) continue;
        const float s = acc[r][c];
        if (COUNT) {
          acc_out[r] += (s > t[r]) || (s == t[r] && j < p[r]);
          if (MODE == 2 && row_ok[r]) {
            const int64_t i = i_base + ty + 16 * r;
            col += (s > u) || (s == u && i < cp);
          }
        } else if (row_ok[r] && gl == ql[r]) {
          const ull key = make_key(s, j);
          acc_out[r] = key > acc_out[r] ? key : acc_out[r];
          if (MODE == 3) {
            const ull ckey = make_key(s, i_base + ty + 16 * r);
            col = ckey > col ? ckey : col;
          }
        }
      }
      if (COLS) {
        // Lanes tx and tx + 16 of a warp hold rows ty (even) and ty + 1 of the same column.
        const ull o = __shfl_xor_sync(0xFFFFFFFFu, col, 16);
        col = COUNT ? col + o : (o > col ? o : col);
        if ((threadIdx.x & 31) < 16) colred[COLS ? threadIdx.x / 32 : 0][tx + 16 * c] = col;
      }
    }
    if (COLS) {
      __syncthreads();
      if (threadIdx.x < BN) {
        const int64_t j = j_base + threadIdx.x;
        ull v = 0;
#pragma unroll
        for (int w = 0; w < THREADS / 32; ++w) {
          const ull o = colred[w][threadIdx.x];
          v = COUNT ? v + o : (o > v ? o : v);
        }
        if (j < j_end && v != 0) {
          if (COUNT) atomicAdd(cout + j, v);
          else atomicMax(cout + j, v);
        }
      }
      // colred is rewritten only after the next tile's k loop, whose __syncthreads() this reader must pass.
    }
  }

  // The 16 threads sharing a row (same ty) are 16 consecutive lanes of one warp.
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    ull v = acc_out[r];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const ull o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
      v = COUNT ? v + o : (o > v ? o : v);
    }
    const int64_t i = i_base + ty + 16 * r;
    if (tx == 0 && i < nq && (COUNT || v != 0)) {
      if (COUNT) atomicAdd(out + i, v);
      else atomicMax(out + i, v);
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("hescape CUDA kernel: ") + what + ": " + cudaGetErrorString(err));
}

struct Launch {
  dim3 grid;
  int64_t cols_per_split;
};

// Enough blocks to fill the GPU: split the gallery when there are few query blocks.
Launch plan(int64_t nq, int64_t ng) {
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  const int64_t row_blocks = (nq + BM - 1) / BM, col_tiles = (ng + BN - 1) / BN;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(col_tiles, (8LL * sms + row_blocks - 1) / row_blocks));
  const int64_t cols_per_split = (col_tiles + splits - 1) / splits * BN;
  return {dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>((ng + cols_per_split - 1) / cols_per_split)),
          cols_per_split};
}

unsigned lin_blocks(int64_t n) { return static_cast<unsigned>((n + 255) / 256); }

template <bool BF16>
void run(const void* q, const void* g, int64_t nq, int64_t ng, int64_t d, const int64_t* qlab, const int64_t* glab,
         int64_t* ranks, float* best_score, int64_t* best_index, cudaStream_t stream) {
  const Launch l = plan(nq, ng);
  if (qlab == nullptr) {
    HESCAPE_LAUNCH(lin_blocks(nq), 256, stream, diag_kernel<BF16>)(q, g, nq, d, best_score, best_index);
  } else {
    check(cudaMemsetAsync(best_index, 0, sizeof(int64_t) * nq, stream), "cudaMemsetAsync");
    HESCAPE_LAUNCH(l.grid, THREADS, stream, tile_kernel<BF16, 1>)
    (q, g, nq, ng, d, l.cols_per_split, nullptr, nullptr, qlab, glab, reinterpret_cast<ull*>(best_index), nullptr,
     nullptr, nullptr);
    HESCAPE_LAUNCH(lin_blocks(nq), 256, stream, decode_kernel)(nq, best_score, best_index);
  }
  check(cudaGetLastError(), "pass 1 launch");
  check(cudaMemsetAsync(ranks, 0, sizeof(int64_t) * nq, stream), "cudaMemsetAsync");
  HESCAPE_LAUNCH(l.grid, THREADS, stream, tile_kernel<BF16, 0>)
  (q, g, nq, ng, d, l.cols_per_split, best_score, best_index, nullptr, nullptr, reinterpret_cast<ull*>(ranks), nullptr,
   nullptr, nullptr);
  check(cudaGetLastError(), "pass 2 launch");
}

// Both directions: pass 1 finds both thresholds (the diagonal, or MODE 3), pass 2 counts both (MODE 2).
template <bool BF16>
void run_both(const void* q, const void* g, int64_t nq, int64_t ng, int64_t d, const int64_t* qlab,
              const int64_t* glab, int64_t* f_ranks, float* f_score, int64_t* f_index, int64_t* r_ranks, float* r_score,
              int64_t* r_index, cudaStream_t stream) {
  const Launch l = plan(nq, ng);
  if (qlab == nullptr) {  // paired data: t_i = u_i = s_ii, the same float for both directions
    HESCAPE_LAUNCH(lin_blocks(nq), 256, stream, diag_kernel<BF16>)(q, g, nq, d, f_score, f_index);
    check(cudaGetLastError(), "pass 1 launch");
    check(cudaMemcpyAsync(r_score, f_score, sizeof(float) * nq, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
    check(cudaMemcpyAsync(r_index, f_index, sizeof(int64_t) * nq, cudaMemcpyDeviceToDevice, stream),
          "cudaMemcpyAsync");
  } else {
    check(cudaMemsetAsync(f_index, 0, sizeof(int64_t) * nq, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(r_index, 0, sizeof(int64_t) * ng, stream), "cudaMemsetAsync");
    HESCAPE_LAUNCH(l.grid, THREADS, stream, tile_kernel<BF16, 3>)
    (q, g, nq, ng, d, l.cols_per_split, nullptr, nullptr, qlab, glab, reinterpret_cast<ull*>(f_index), nullptr,
     nullptr, reinterpret_cast<ull*>(r_index));
    check(cudaGetLastError(), "pass 1 launch");
    HESCAPE_LAUNCH(lin_blocks(nq), 256, stream, decode_kernel)(nq, f_score, f_index);
    HESCAPE_LAUNCH(lin_blocks(ng), 256, stream, decode_kernel)(ng, r_score, r_index);
    check(cudaGetLastError(), "decode launch");
  }
  check(cudaMemsetAsync(f_ranks, 0, sizeof(int64_t) * nq, stream), "cudaMemsetAsync");
  check(cudaMemsetAsync(r_ranks, 0, sizeof(int64_t) * ng, stream), "cudaMemsetAsync");
  HESCAPE_LAUNCH(l.grid, THREADS, stream, tile_kernel<BF16, 2>)
  (q, g, nq, ng, d, l.cols_per_split, f_score, f_index, nullptr, nullptr, reinterpret_cast<ull*>(f_ranks), r_score,
   r_index, reinterpret_cast<ull*>(r_ranks));
  check(cudaGetLastError(), "pass 2 launch");
}

void check_args(const char* who, int64_t nq, int64_t ng, int64_t d, uintptr_t q_labels, uintptr_t g_labels) {
  const std::string w(who);
  if (nq < 1 || ng < 1 || d < 1) throw std::invalid_argument(w + ": empty input");
  if (ng >= 0xFFFFFFFFLL) throw std::invalid_argument(w + ": gallery larger than 2^32 - 2 rows");
  if ((q_labels == 0) != (g_labels == 0)) throw std::invalid_argument(w + ": pass both label arrays or neither");
  if (q_labels == 0 && nq != ng) throw std::invalid_argument(w + ": diagonal positives need nq == ng");
}

}  // namespace

void rank_cuda(uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t q_labels,
               uintptr_t g_labels, uintptr_t ranks, uintptr_t best_score, uintptr_t best_index, int device,
               uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  check_args("rank_cuda", nq, ng, d, q_labels, g_labels);
  auto* ql = reinterpret_cast<const int64_t*>(q_labels);
  auto* gl = reinterpret_cast<const int64_t*>(g_labels);
  auto* r = reinterpret_cast<int64_t*>(ranks);
  auto* bs = reinterpret_cast<float*>(best_score);
  auto* bi = reinterpret_cast<int64_t*>(best_index);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (bf16) run<true>(reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(g), nq, ng, d, ql, gl, r, bs, bi, st);
  else run<false>(reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(g), nq, ng, d, ql, gl, r, bs, bi, st);
}

void rank_cuda_both(uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t q_labels,
                    uintptr_t g_labels, const RankBuffers& fwd, const RankBuffers& rev, int device, uintptr_t stream) {
  check(cudaSetDevice(device), "cudaSetDevice");
  check_args("rank_cuda_both", nq, ng, d, q_labels, g_labels);
  if (nq >= 0xFFFFFFFFLL) throw std::invalid_argument("rank_cuda_both: more than 2^32 - 2 query rows");
  auto* ql = reinterpret_cast<const int64_t*>(q_labels);
  auto* gl = reinterpret_cast<const int64_t*>(g_labels);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto* fr = reinterpret_cast<int64_t*>(fwd.ranks);
  auto* fs = reinterpret_cast<float*>(fwd.best_score);
  auto* fi = reinterpret_cast<int64_t*>(fwd.best_index);
  auto* rr = reinterpret_cast<int64_t*>(rev.ranks);
  auto* rs = reinterpret_cast<float*>(rev.best_score);
  auto* ri = reinterpret_cast<int64_t*>(rev.best_index);
  const auto* qp = reinterpret_cast<const void*>(q);
  const auto* gp = reinterpret_cast<const void*>(g);
  if (bf16) run_both<true>(qp, gp, nq, ng, d, ql, gl, fr, fs, fi, rr, rs, ri, st);
  else run_both<false>(qp, gp, nq, ng, d, ql, gl, fr, fs, fi, rr, rs, ri, st);
}

}  // namespace hescape
