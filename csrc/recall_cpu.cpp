// CPU driver of the recall kernel: input packing, run-time ISA dispatch, threads, the two passes.
#include "recall_cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace hescape {

bool cpu_has_avx2() {
#if defined(HESCAPE_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(HESCAPE_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

namespace {

// Runs fn(begin, end) over [0, n) split into num_threads contiguous parts whose boundaries are
// multiples of `grain`.
template <class Fn>
void parallel_for(int64_t n, int num_threads, int64_t grain, Fn fn) {
  const int64_t blocks = (n + grain - 1) / grain;
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks));
  if (t == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(t - 1));
  auto part = [&](int64_t k) {
    const int64_t b = std::min(n, (blocks * k / t) * grain), e = std::min(n, (blocks * (k + 1) / t) * grain);
    if (b < e) fn(b, e);
  };
  for (int64_t k = 1; k < t; ++k) pool.emplace_back(part, k);
  part(0);
  for (auto& th : pool) th.join();
}

// As parallel_for, and fn also receives the index of its part, k in [0, parts); returns the number of parts.
template <class Fn>
int64_t parallel_for_parts(int64_t n, int num_threads, int64_t grain, Fn fn) {
  const int64_t blocks = (n + grain - 1) / grain;
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks));
  auto part = [&](int64_t k) {
    const int64_t b = std::min(n, (blocks * k / t) * grain), e = std::min(n, (blocks * (k + 1) / t) * grain);
    if (b < e) fn(k, b, e);
  };
  if (t == 1) {
    part(0);
    return 1;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(t - 1));
  for (int64_t k = 1; k < t; ++k) pool.emplace_back(part, k);
  part(0);
  for (auto& th : pool) th.join();
  return t;
}

// Number of parts parallel_for_parts will use.
inline int64_t num_parts(int64_t n, int num_threads, int64_t grain) {
  const int64_t blocks = (n + grain - 1) / grain;
  return std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks));
}

inline float load_elem(const void* src, ElemType dtype, int64_t idx) {
  if (dtype == ElemType::f32) return static_cast<const float*>(src)[idx];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(src)[idx]) << 16;  // exact widening
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}

// Queries as row-major fp32: a view of fp32 input, a widened copy of bf16 input.
std::vector<float> widen(const void* src, ElemType dtype, int64_t n, int64_t d, int num_threads) {
  std::vector<float> out;
  if (dtype == ElemType::f32) return out;
  out.resize(static_cast<size_t>(n * d));
  parallel_for(n * d, num_threads, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) out[static_cast<size_t>(k)] = load_elem(src, dtype, k);
  });
  return out;
}

// Gallery packed into panels of kNR rows, k-major: panel p, feature k, lane l = row 16p + l (0 past ng).
std::vector<float> pack_panels(const void* src, ElemType dtype, int64_t n, int64_t d, int num_threads) {
  const int64_t panels = (n + kNR - 1) / kNR;
  std::vector<float> out(static_cast<size_t>(panels * d * kNR), 0.0f);
  parallel_for(panels, num_threads, 16, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (int64_t l = 0; l < kNR && p * kNR + l < n; ++l) {
        const int64_t row = p * kNR + l;
        float* dst = out.data() + p * d * kNR + l;
        for (int64_t k = 0; k < d; ++k) dst[k * kNR] = load_elem(src, dtype, row * d + k);
      }
  });
  return out;
}

enum class Isa { generic, avx2, avx512 };

struct Kernels {
  Isa isa;
  CountFn count_rows;
  CountBothFn count_both;
  DotFn dot;
  const char* name() const { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "generic"; }
};

Kernels select_kernels(const char* isa) {
  const std::string want(isa);
  Isa use = Isa::generic;
  if (want == "auto") {
    use = cpu_has_avx512() ? Isa::avx512 : cpu_has_avx2() ? Isa::avx2 : Isa::generic;
  } else if (want == "avx512") {
    if (!cpu_has_avx512())
      throw std::invalid_argument("isa='avx512' requested but this CPU (or build) lacks AVX-512F+FMA");
    use = Isa::avx512;
  } else if (want == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("isa='avx2' requested but this CPU (or build) lacks AVX2+FMA");
    use = Isa::avx2;
  } else if (want != "generic") {
    throw std::invalid_argument("isa must be 'auto', 'avx512', 'avx2' or 'generic', found '" + want + "'");
  }
  Kernels k{Isa::generic, generic::count_rows, generic::count_both, generic::dot};
#ifdef HESCAPE_HAVE_AVX2
  if (use == Isa::avx2) k = Kernels{Isa::avx2, avx2::count_rows, avx2::count_both, avx2::dot};
#endif
#ifdef HESCAPE_HAVE_AVX512
  if (use == Isa::avx512) k = Kernels{Isa::avx512, avx512::count_rows, avx512::count_both, avx512::dot};
#endif
  return k;
}

void check_input(const RankInput& in, int& num_threads) {
  if (in.nq < 1 || in.ng < 1 || in.d < 1) throw std::invalid_argument("empty input");
  if (in.ng >= std::numeric_limits<int32_t>::max()) throw std::invalid_argument("gallery larger than 2^31 - 2 rows");
  if (in.q_labels == nullptr && in.nq != in.ng) throw std::invalid_argument("diagonal positives need nq == ng");
  if (num_threads < 1) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Pass 1 of one direction: for each query a in [0, na), its best positive among the rows b of the other set with
// a's label (highest score, lowest b among equal maxima), or -1 without one. score(a, b) is the canonical dot.
template <class Score>
void best_positive(int64_t na, int64_t nb, const int64_t* a_labels, const int64_t* b_labels, int num_threads,
                   Score score, float* best_score, int64_t* best_index, int32_t* pidx) {
  // Rows of the other set grouped by label, ascending row index within a group (stable sort).
  std::vector<int64_t> order(static_cast<size_t>(nb));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return b_labels[x] < b_labels[y]; });
  std::vector<int64_t> sorted(static_cast<size_t>(nb));
  for (int64_t k = 0; k < nb; ++k) sorted[k] = b_labels[order[k]];
  parallel_for(na, num_threads, 64, [&](int64_t b, int64_t e) {
    for (int64_t a = b; a < e; ++a) {
      const auto range = std::equal_range(sorted.begin(), sorted.end(), a_labels[a]);
      float best = 0.0f;
      int64_t arg = -1;
      for (auto it = range.first; it != range.second; ++it) {
        const int64_t j = order[static_cast<size_t>(it - sorted.begin())];
        const float sc = score(a, j);
        if (arg < 0 || sc > best) {  // ascending j: the first of equal maxima is kept
          best = sc;
          arg = j;
        }
      }
      best_score[a] = best;
      best_index[a] = arg;
      pidx[a] = static_cast<int32_t>(arg);
    }
  });
}

}  // namespace

const char* rank_cpu(const RankInput& in, const RankOutput& out, int num_threads, const char* isa) {
  const Kernels kern = select_kernels(isa);
  check_input(in, num_threads);
  const int64_t nq = in.nq, ng = in.ng, d = in.d;
  const std::vector<float> q_buf = widen(in.q, in.dtype, nq, d, num_threads);
  const float* q = q_buf.empty() ? static_cast<const float*>(in.q) : q_buf.data();
  const std::vector<float> gp = pack_panels(in.g, in.dtype, ng, d, num_threads);
  auto g_row = [&](int64_t j) { return gp.data() + (j / kNR) * d * kNR + j % kNR; };  // stride kNR

  // Pass 1: threshold t_i and best positive p_i, scored by the canonical dot.
  std::vector<int32_t> pidx(static_cast<size_t>(nq));
  if (in.q_labels == nullptr) {
    parallel_for(nq, num_threads, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        out.best_score[i] = kern.dot(q + i * d, g_row(i), d, kNR);
        out.best_index[i] = i;
        pidx[i] = static_cast<int32_t>(i);
      }
    });
  } else {
    best_positive(nq, ng, in.q_labels, in.g_labels, num_threads,
                  [&](int64_t i, int64_t j) { return kern.dot(q + i * d, g_row(j), d, kNR); }, out.best_score,
                  out.best_index, pidx.data());
  }

  // Pass 2: fused score-and-count. Each thread owns a range of query rows and walks the gallery in
  // chunks of panels sized to stay in L2 (~256 KiB), sweeping its rows over each chunk in 6x16 tiles.
  std::fill(out.ranks, out.ranks + nq, int64_t{0});
  const int64_t panels = (ng + kNR - 1) / kNR;
  const int64_t chunk = std::max<int64_t>(1, int64_t{256} * 1024 / (d * kNR * 4));
  parallel_for(nq, num_threads, kMR, [&](int64_t b, int64_t e) {
    for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
      const int64_t p1 = std::min(panels, p0 + chunk);
      for (int64_t i = b; i < e; i += kMR)
        kern.count_rows(q, gp.data(), d, i, std::min(e, i + kMR), p0, p1, ng, out.best_score, pidx.data(),
                        out.ranks + i);
    }
  });
  // A query without any positive has no rank: report the gallery size (never < k for a valid k).
  for (int64_t i = 0; i < nq; ++i)
    if (out.best_index[i] < 0) out.ranks[i] = ng;
  return kern.name();
}

const char* rank_cpu_both(const RankInput& in, const RankOutput& fwd, const RankOutput& rev, int num_threads,
                          const char* isa) {
  const Kernels kern = select_kernels(isa);
  check_input(in, num_threads);
  if (in.nq >= std::numeric_limits<int32_t>::max()) throw std::invalid_argument("queries larger than 2^31 - 2 rows");
  const int64_t nq = in.nq, ng = in.ng, d = in.d;
  const std::vector<float> q_buf = widen(in.q, in.dtype, nq, d, num_threads);
  const float* q = q_buf.empty() ? static_cast<const float*>(in.q) : q_buf.data();
  const std::vector<float> gp = pack_panels(in.g, in.dtype, ng, d, num_threads);
  auto g_row = [&](int64_t j) { return gp.data() + (j / kNR) * d * kNR + j % kNR; };  // stride kNR
  auto score = [&](int64_t i, int64_t j) { return kern.dot(q + i * d, g_row(j), d, kNR); };  // s_ij, canonical

  // Pass 1, both directions. Forward: t_i, p_i over gallery rows; reverse: u_j, r_j over query rows. Reverse
  // thresholds are padded to whole panels with +inf (a padded lane never counts).
  const int64_t panels = (ng + kNR - 1) / kNR;
  const int64_t ngp = panels * kNR;
  std::vector<int32_t> pidx(static_cast<size_t>(nq));
  std::vector<float> cthr(static_cast<size_t>(ngp), std::numeric_limits<float>::infinity());
  std::vector<int32_t> cpidx(static_cast<size_t>(ngp), 0);
  if (in.q_labels == nullptr) {  // diagonal: u_j = s_jj = t_j, computed once
    parallel_for(nq, num_threads, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float t = score(i, i);
        fwd.best_score[i] = rev.best_score[i] = cthr[i] = t;
        fwd.best_index[i] = rev.best_index[i] = i;
        pidx[i] = cpidx[i] = static_cast<int32_t>(i);
      }
    });
  } else {
    best_positive(nq, ng, in.q_labels, in.g_labels, num_threads, score, fwd.best_score, fwd.best_index,
                  pidx.data());
    best_positive(ng, nq, in.g_labels, in.q_labels, num_threads, [&](int64_t j, int64_t i) { return score(i, j); },
                  rev.best_score, rev.best_index, cpidx.data());
    for (int64_t j = 0; j < ng; ++j)
      if (rev.best_index[j] >= 0) cthr[j] = rev.best_score[j];
  }

  // Pass 2: one sweep of the tiles (as rank_cpu), rows counted into fwd.ranks, columns into one int32 array per
  // thread (part), summed at the end.
  std::fill(fwd.ranks, fwd.ranks + nq, int64_t{0});
  const int64_t chunk = std::max<int64_t>(1, int64_t{256} * 1024 / (d * kNR * 4));
  const int64_t parts = num_parts(nq, num_threads, kMR);
  std::vector<int32_t> ccounts(static_cast<size_t>(parts * ngp), 0);
  parallel_for_parts(nq, num_threads, kMR, [&](int64_t part, int64_t b, int64_t e) {
    int32_t* cc = ccounts.data() + part * ngp;
    for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
      const int64_t p1 = std::min(panels, p0 + chunk);
      for (int64_t i = b; i < e; i += kMR)
        kern.count_both(q, gp.data(), d, i, std::min(e, i + kMR), p0, p1, ng, fwd.best_score, pidx.data(),
                        fwd.ranks + i, cthr.data(), cpidx.data(), cc);
    }
  });
  parallel_for(ng, num_threads, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      int64_t s = 0;
      for (int64_t k = 0; k < parts; ++k) s += ccounts[static_cast<size_t>(k * ngp + j)];
      rev.ranks[j] = s;
    }
  });
  for (int64_t i = 0; i < nq; ++i)
    if (fwd.best_index[i] < 0) fwd.ranks[i] = ng;
  for (int64_t j = 0; j < ng; ++j)
    if (rev.best_index[j] < 0) rev.ranks[j] = nq;
  return kern.name();
}

}  // namespace hescape
