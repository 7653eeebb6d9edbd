// AVX-512F path of the CPU recall kernel. Compiled with -mavx512f -mfma -ffp-contract=off; only called after
// a run-time __builtin_cpu_supports("avx512f") check (see recall_cpu.cpp). Nothing from the C++ standard
// library is used here (see recall_tile.inc for why).
//
// Same scores, bit for bit, as the AVX2 path: every lane of every accumulator runs the canonical dot
// s = fma(q[k], g[k], s) for k = 0 .. d-1 in order (one rounding per step), and so does `dot` below, which
// pass 1 uses. Only the register tile differs: 6 query rows x 2 panels (32 gallery rows, one zmm per panel
// and query), 12 zmm accumulators, twice the lanes of the AVX2 tile per instruction; on cores with full-width
// 512-bit FMA units (AMD Zen 5, Intel server parts) that doubles the counting pass's throughput.
#include <immintrin.h>

#include "recall_cpu.h"

namespace hescape {
namespace avx512 {
namespace {

// Lanes l of a 16-row panel starting at gallery row j0 with j0 + l < lim (lim may be outside [j0, j0+16]).
inline __mmask16 lanes_below(int64_t lim, int64_t j0) {
  const int64_t n = lim - j0;
  if (n <= 0) return 0;
  if (n >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << n) - 1u);
}

struct Row {
  __m512 t;
  int64_t p;
  int64_t cnt = 0;
  Row(float thr, int32_t pidx) : t(_mm512_set1_ps(thr)), p(pidx) {}
  // s holds the scores of gallery rows j0 .. j0+15; rows >= ng are padding and never count.
  inline void add(__m512 s, int64_t j0, int64_t ng) {
    const __mmask16 gt = _mm512_cmp_ps_mask(s, t, _CMP_GT_OQ);
    const __mmask16 eq = _mm512_cmp_ps_mask(s, t, _CMP_EQ_OQ);
    const unsigned hit = static_cast<unsigned>(lanes_below(ng, j0) & (gt | (eq & lanes_below(p, j0))));
    cnt += __builtin_popcount(hit);
  }
};

// Reverse-direction state of 16 gallery rows (lanes): hits of query row i against each lane's threshold.
struct Col {
  __m512 u;
  __m512i r, c;
  Col(const float* thr, const int32_t* pidx)
      : u(_mm512_loadu_ps(thr)), r(_mm512_loadu_si512(pidx)), c(_mm512_setzero_si512()) {}
  inline void add(__m512 s, int32_t i) {
    const __mmask16 gt = _mm512_cmp_ps_mask(s, u, _CMP_GT_OQ);
    const __mmask16 eq = _mm512_cmp_ps_mask(s, u, _CMP_EQ_OQ);
    const __mmask16 before = _mm512_cmpgt_epi32_mask(r, _mm512_set1_epi32(i));  // i < r
    c = _mm512_mask_add_epi32(c, static_cast<__mmask16>(gt | (eq & before)), c, _mm512_set1_epi32(1));
  }
  inline void flush(int32_t* dst) const { _mm512_storeu_si512(dst, _mm512_add_epi32(_mm512_loadu_si512(dst), c)); }
};

// Column counts of one 16-row panel at gallery row j0 from the six accumulators of that panel (rows past
// nrows repeat row i0 and are skipped).
inline void add_cols(const float* cthr, const int32_t* cpidx, int32_t* ccounts, int64_t j0, int64_t i0, int nrows,
                     __m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4, __m512 a5) {
  Col col(cthr + j0, cpidx + j0);
  const int32_t ib = static_cast<int32_t>(i0);
  col.add(a0, ib);
  if (nrows > 1) col.add(a1, ib + 1);
  if (nrows > 2) col.add(a2, ib + 2);
  if (nrows > 3) col.add(a3, ib + 3);
  if (nrows > 4) col.add(a4, ib + 4);
  if (nrows > 5) col.add(a5, ib + 5);
  col.flush(ccounts + j0);
}

}  // namespace

float dot(const float* q, const float* g, int64_t d, int64_t gstride) {
  float s = 0.0f;
  for (int64_t k = 0; k < d; ++k)
    s = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(q[k]), _mm_set_ss(g[k * gstride]), _mm_set_ss(s)));
  return s;
}

namespace {

// The 6x32 tile loop; kBoth adds the column (reverse-direction) counts of count_both.
template <bool kBoth>
inline void tile_rows(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0, int64_t p1,
                      int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts, const float* cthr,
                      const int32_t* cpidx, int32_t* ccounts) {
  const int nrows = static_cast<int>(i1 - i0);
  const float* q0 = q + i0 * d;
  const float* q1 = q + (nrows > 1 ? i0 + 1 : i0) * d;
  const float* q2 = q + (nrows > 2 ? i0 + 2 : i0) * d;
  const float* q3 = q + (nrows > 3 ? i0 + 3 : i0) * d;
  const float* q4 = q + (nrows > 4 ? i0 + 4 : i0) * d;
  const float* q5 = q + (nrows > 5 ? i0 + 5 : i0) * d;
  Row rows[kMR] = {
      {thr[i0], pidx[i0]},
      {thr[nrows > 1 ? i0 + 1 : i0], pidx[nrows > 1 ? i0 + 1 : i0]},
      {thr[nrows > 2 ? i0 + 2 : i0], pidx[nrows > 2 ? i0 + 2 : i0]},
      {thr[nrows > 3 ? i0 + 3 : i0], pidx[nrows > 3 ? i0 + 3 : i0]},
      {thr[nrows > 4 ? i0 + 4 : i0], pidx[nrows > 4 ? i0 + 4 : i0]},
      {thr[nrows > 5 ? i0 + 5 : i0], pidx[nrows > 5 ? i0 + 5 : i0]},
  };
  const int64_t pstride = d * kNR;
  int64_t p = p0;
  for (; p + 1 < p1; p += 2) {  // two panels (32 gallery rows) per step
    const float* ga = gp + p * pstride;
    const float* gb = ga + pstride;
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps(), c10 = _mm512_setzero_ps();
    __m512 c11 = _mm512_setzero_ps(), c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps(), c40 = _mm512_setzero_ps();
    __m512 c41 = _mm512_setzero_ps(), c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; ++k) {
      const __m512 b0 = _mm512_loadu_ps(ga + k * kNR), b1 = _mm512_loadu_ps(gb + k * kNR);
      __m512 a = _mm512_set1_ps(q0[k]);
      c00 = _mm512_fmadd_ps(a, b0, c00);
      c01 = _mm512_fmadd_ps(a, b1, c01);
      a = _mm512_set1_ps(q1[k]);
      c10 = _mm512_fmadd_ps(a, b0, c10);
      c11 = _mm512_fmadd_ps(a, b1, c11);
      a = _mm512_set1_ps(q2[k]);
      c20 = _mm512_fmadd_ps(a, b0, c20);
      c21 = _mm512_fmadd_ps(a, b1, c21);
      a = _mm512_set1_ps(q3[k]);
      c30 = _mm512_fmadd_ps(a, b0, c30);
      c31 = _mm512_fmadd_ps(a, b1, c31);
      a = _mm512_set1_ps(q4[k]);
      c40 = _mm512_fmadd_ps(a, b0, c40);
      c41 = _mm512_fmadd_ps(a, b1, c41);
      a = _mm512_set1_ps(q5[k]);
      c50 = _mm512_fmadd_ps(a, b0, c50);
      c51 = _mm512_fmadd_ps(a, b1, c51);
    }
    const int64_t j0 = p * kNR, j1 = j0 + kNR;
    rows[0].add(c00, j0, ng);
    rows[0].add(c01, j1, ng);
    rows[1].add(c10, j0, ng);
    rows[1].add(c11, j1, ng);
    rows[2].add(c20, j0, ng);
    rows[2].add(c21, j1, ng);
    rows[3].add(c30, j0, ng);
    rows[3].add(c31, j1, ng);
    rows[4].add(c40, j0, ng);
    rows[4].add(c41, j1, ng);
    rows[5].add(c50, j0, ng);
    rows[5].add(c51, j1, ng);
    if constexpr (kBoth) {
      add_cols(cthr, cpidx, ccounts, j0, i0, nrows, c00, c10, c20, c30, c40, c50);
      add_cols(cthr, cpidx, ccounts, j1, i0, nrows, c01, c11, c21, c31, c41, c51);
    }
  }
  if (p < p1) {  // a last single panel
    const float* ga = gp + p * pstride;
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps();
    __m512 c3 = _mm512_setzero_ps(), c4 = _mm512_setzero_ps(), c5 = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; ++k) {
      const __m512 b0 = _mm512_loadu_ps(ga + k * kNR);
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[k]), b0, c0);
      c1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[k]), b0, c1);
      c2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[k]), b0, c2);
      c3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[k]), b0, c3);
      c4 = _mm512_fmadd_ps(_mm512_set1_ps(q4[k]), b0, c4);
      c5 = _mm512_fmadd_ps(_mm512_set1_ps(q5[k]), b0, c5);
    }
    const int64_t j0 = p * kNR;
    rows[0].add(c0, j0, ng);
    rows[1].add(c1, j0, ng);
    rows[2].add(c2, j0, ng);
    rows[3].add(c3, j0, ng);
    rows[4].add(c4, j0, ng);
    rows[5].add(c5, j0, ng);
    if constexpr (kBoth) add_cols(cthr, cpidx, ccounts, j0, i0, nrows, c0, c1, c2, c3, c4, c5);
  }
  for (int r = 0; r < nrows; ++r) counts[r] += rows[r].cnt;
}

}  // namespace

void count_rows(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0, int64_t p1,
                int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts) {
  tile_rows<false>(q, gp, d, i0, i1, p0, p1, ng, thr, pidx, counts, nullptr, nullptr, nullptr);
}

void count_both(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0, int64_t p1,
                int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts, const float* cthr,
                const int32_t* cpidx, int32_t* ccounts) {
  tile_rows<true>(q, gp, d, i0, i1, p0, p1, ng, thr, pidx, counts, cthr, cpidx, ccounts);
}

}  // namespace avx512
}  // namespace hescape
