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

}  // namespace

const char* rank_cpu(const RankInput& in, const RankOutput& out, int num_threads, const char* isa) {
  const std::string want(isa);
  enum class Isa { generic, avx2, avx512 } use = Isa::generic;
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
  if (in.nq < 1 || in.ng < 1 || in.d < 1) throw std::invalid_argument("empty input");
  if (in.ng >= std::numeric_limits<int32_t>::max()) throw std::invalid_argument("gallery larger than 2^31 - 2 rows");
  if (in.q_labels == nullptr && in.nq != in.ng) throw std::invalid_argument("diagonal positives need nq == ng");
  if (num_threads < 1) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  CountFn count_rows = generic::count_rows;
  DotFn dot = generic::dot;
#ifdef HESCAPE_HAVE_AVX2
  if (use == Isa::avx2) {
    count_rows = avx2::count_rows;
    dot = avx2::dot;
  }
#endif
#ifdef HESCAPE_HAVE_AVX512
  if (use == Isa::avx512) {
    count_rows = avx512::count_rows;
    dot = avx512::dot;
  }
#endif

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
        out.best_score[i] = dot(q + i * d, g_row(i), d, kNR);
        out.best_index[i] = i;
        pidx[i] = static_cast<int32_t>(i);
      }
    });
  } else {
    // Gallery rows grouped by label, ascending row index within a group (stable sort).
    std::vector<int64_t> order(static_cast<size_t>(ng));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return in.g_labels[a] < in.g_labels[b]; });
    std::vector<int64_t> sorted(static_cast<size_t>(ng));
    for (int64_t k = 0; k < ng; ++k) sorted[k] = in.g_labels[order[k]];
    parallel_for(nq, num_threads, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const auto range = std::equal_range(sorted.begin(), sorted.end(), in.q_labels[i]);
        float best = 0.0f;
        int64_t arg = -1;
        for (auto it = range.first; it != range.second; ++it) {
          const int64_t j = order[static_cast<size_t>(it - sorted.begin())];
          const float s = dot(q + i * d, g_row(j), d, kNR);
          if (arg < 0 || s > best) {  // ascending j: the first of equal maxima is kept
            best = s;
            arg = j;
          }
        }
        out.best_score[i] = best;
        out.best_index[i] = arg;
        pidx[i] = static_cast<int32_t>(arg);
      }
    });
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
        count_rows(q, gp.data(), d, i, std::min(e, i + kMR), p0, p1, ng, out.best_score, pidx.data(), out.ranks + i);
    }
  });
  // A query without any positive has no rank: report the gallery size (never < k for a valid k).
  for (int64_t i = 0; i < nq; ++i)
    if (out.best_index[i] < 0) out.ranks[i] = ng;
  return use == Isa::avx512 ? "avx512" : use == Isa::avx2 ? "avx2" : "generic";
}

}  // namespace hescape
