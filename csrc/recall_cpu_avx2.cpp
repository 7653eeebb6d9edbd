// AVX2 + FMA path of the CPU recall kernel. Compiled with -mavx2 -mfma -ffp-contract=off; it is only
// called after a run-time __builtin_cpu_supports check (see recall_cpu.cpp). Nothing from the C++
// standard library is used here (see recall_tile.inc for why).
#include <immintrin.h>

#include "recall_cpu.h"

namespace hescape {
namespace avx2 {
namespace {

struct V {
  using vec = __m256;
  static inline vec zero() { return _mm256_setzero_ps(); }
  static inline vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline vec bcast(float x) { return _mm256_set1_ps(x); }
  static inline vec madd(vec a, vec b, vec acc) { return _mm256_fmadd_ps(a, b, acc); }
  // The same single-rounding fused op as one lane of madd.
  static inline float fmadd1(float a, float b, float acc) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(acc)));
  }

  // Compare-and-count state of one query row: lanes count hits, -1 per hit.
  struct Row {
    __m256 t;
    __m256i p, cnt;
    Row(float thr, int32_t pidx) : t(_mm256_set1_ps(thr)), p(_mm256_set1_epi32(pidx)), cnt(_mm256_setzero_si256()) {}
    // s holds the scores of gallery rows j0 .. j0+7 (rows >= ng are padding and never count).
    inline void add(__m256 s, int32_t j0, int32_t ng) {
      const __m256i j = _mm256_add_epi32(_mm256_set1_epi32(j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 gt = _mm256_cmp_ps(s, t, _CMP_GT_OQ);
      const __m256 eq = _mm256_cmp_ps(s, t, _CMP_EQ_OQ);
      const __m256 before = _mm256_castsi256_ps(_mm256_cmpgt_epi32(p, j));                   // j < p
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(ng), j));  // j < ng
      const __m256 hit = _mm256_and_ps(valid, _mm256_or_ps(gt, _mm256_and_ps(eq, before)));
      cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(hit));
    }
    inline int64_t total() const {
      alignas(32) int32_t c[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(c), cnt);
      int64_t s = 0;
      for (int l = 0; l < 8; ++l) s += c[l];
      return s;
    }
  };

  // Reverse-direction state of 8 gallery rows (lanes): hits of query row i against each lane's threshold.
  struct Col {
    __m256 u;
    __m256i r, c;
    Col(const float* thr, const int32_t* pidx)
        : u(_mm256_loadu_ps(thr)),
          r(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pidx))),
          c(_mm256_setzero_si256()) {}
    inline void add(__m256 s, int32_t i) {
      const __m256 gt = _mm256_cmp_ps(s, u, _CMP_GT_OQ);
      const __m256 eq = _mm256_cmp_ps(s, u, _CMP_EQ_OQ);
      const __m256 before = _mm256_castsi256_ps(_mm256_cmpgt_epi32(r, _mm256_set1_epi32(i)));  // i < r
      c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_or_ps(gt, _mm256_and_ps(eq, before))));
    }
    inline void flush(int32_t* dst) const {
      __m256i* p = reinterpret_cast<__m256i*>(dst);
      _mm256_storeu_si256(p, _mm256_add_epi32(_mm256_loadu_si256(p), c));
    }
  };
};

}  // namespace

#include "recall_tile.inc"

}  // namespace avx2
}  // namespace hescape
