// Portable path of the CPU recall kernel: the same tile loop as the AVX2 path with eight plain float
// lanes and an unfused multiply-then-add (this TU is built with -ffp-contract=off).
#include "recall_cpu.h"

namespace hescape {
namespace generic {
namespace {

struct V {
  struct vec {
    float v[8];
  };
  static inline vec zero() { return vec{{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}}; }
  static inline vec load(const float* p) {
    vec r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static inline vec bcast(float x) { return vec{{x, x, x, x, x, x, x, x}}; }
  static inline float fmadd1(float a, float b, float acc) {
    const float prod = a * b;
    return acc + prod;
  }
  static inline vec madd(const vec& a, const vec& b, const vec& acc) {
    vec r;
    for (int l = 0; l < 8; ++l) r.v[l] = fmadd1(a.v[l], b.v[l], acc.v[l]);
    return r;
  }

  struct Row {
    float t;
    int32_t p;
    int64_t cnt = 0;
    Row(float thr, int32_t pidx) : t(thr), p(pidx) {}
    inline void add(const vec& s, int32_t j0, int32_t ng) {
      for (int l = 0; l < 8; ++l) {
        const int32_t j = j0 + l;
        cnt += j < ng && ((s.v[l] > t) || (s.v[l] == t && j < p));
      }
    }
    inline int64_t total() const { return cnt; }
  };

  // Reverse-direction state of 8 gallery rows: hits of query row i against each row's threshold.
  struct Col {
    float u[8];
    int32_t r[8];
    int32_t c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    Col(const float* thr, const int32_t* pidx) {
      for (int l = 0; l < 8; ++l) {
        u[l] = thr[l];
        r[l] = pidx[l];
      }
    }
    inline void add(const vec& s, int32_t i) {
      for (int l = 0; l < 8; ++l) c[l] += static_cast<int32_t>((s.v[l] > u[l]) | ((s.v[l] == u[l]) & (i < r[l])));
    }
    inline void flush(int32_t* dst) const {
      for (int l = 0; l < 8; ++l) dst[l] += c[l];
    }
  };
};

}  // namespace

#include "recall_tile.inc"

}  // namespace generic
}  // namespace hescape
