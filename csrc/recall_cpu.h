// Exact blockwise match ranks on the CPU: shared declarations.
//
// Ranking rule (0-based), for query i with threshold t_i = s(i, p_i), where p_i is its best positive
// (highest score, lowest gallery index among equal scores):
//
//     rank_i = #{j : s_ij > t_i} + #{j < p_i : s_ij == t_i}
//
// Positives never satisfy this condition (none scores above t_i, and those tying with t_i have
// j > p_i by the choice of p_i), so the count runs over all j without a label mask and equals the
// position of the first positive in a stable descending sort of row i.
//
// Exactness hinges on one thing: t_i must be the bit-identical float that the counting pass computes
// for the pair (i, p_i). Every score, in either pass, is therefore computed by one canonical
// procedure per ISA path ("the canonical dot"):
//     s = 0; for k = 0 .. d-1 in order: s = s + q[k] * g[k]
// in fp32 (bf16 widened exactly), with the multiply-add fused on the AVX2 and AVX-512 paths and unfused (two
// roundings, never contracted: -ffp-contract=off) on the generic path. The register-blocked kernel
// keeps one accumulator lane per (query, gallery) pair and walks k in the same order, and pass 1 runs
// the literal scalar loop, so both produce the same bits for a pair wherever it falls in a tile. The
// ISA path is chosen once per call, so both passes always run on the same path. (This is also the
// order of the CUDA kernel.)
//
// Pass 2 layout: the gallery is packed into panels of kNR = 16 rows stored k-major ([d][16]); a
// 6 x 16 register tile (12 AVX2 accumulators) multiplies broadcast query values with panel rows, and
// the compare-and-count runs on the accumulators, so no score is ever stored. The AVX-512 path uses the
// same panels with a 6 x 32 tile (two panels, 12 zmm accumulators).
#pragma once

#include <cstdint>

namespace hescape {

// Register tile: kMR query rows x kNR gallery rows (kNR / 8 vectors per row).
constexpr int kMR = 6;
constexpr int kNR = 16;

// Counting pass for query rows [i0, i1) (at most kMR; a tail block repeats row i0 and drops its counts)
// against gallery panels [p0, p1). q: row-major fp32 (stride d); gp: packed panels (panel p holds rows
// 16p .. 16p+15 as [d][16], zero beyond ng); thr/pidx: per-query threshold and best-positive index.
// counts[i - i0] is incremented.
using CountFn = void (*)(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0,
                         int64_t p1, int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts);
// Both directions from the same tiles (rank_cpu_both): the row counts of CountFn, plus, for every gallery row j
// of the panels, the number of query rows i in [i0, i1) with s_ij > cthr[j] or (s_ij == cthr[j] and i < cpidx[j])
// added to ccounts[j] (int32). cthr/cpidx/ccounts are indexed by gallery row and padded to whole panels; padded
// entries hold cthr = +inf, so they never count. A tail block's repeated rows are not counted for columns.
using CountBothFn = void (*)(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0,
                             int64_t p1, int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts,
                             const float* cthr, const int32_t* cpidx, int32_t* ccounts);
// The canonical dot; g is read with stride gstride (kNR inside a panel).
using DotFn = float (*)(const float* q, const float* g, int64_t d, int64_t gstride);

#define HESCAPE_DECLARE_ISA(ns)                                                                              \
  namespace ns {                                                                                            \
  void count_rows(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0, int64_t p1, \
                  int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts);                      \
  void count_both(const float* q, const float* gp, int64_t d, int64_t i0, int64_t i1, int64_t p0, int64_t p1, \
                  int64_t ng, const float* thr, const int32_t* pidx, int64_t* counts, const float* cthr,    \
                  const int32_t* cpidx, int32_t* ccounts);                                                  \
  float dot(const float* q, const float* g, int64_t d, int64_t gstride);                                    \
  }
HESCAPE_DECLARE_ISA(generic)
#ifdef HESCAPE_HAVE_AVX2
HESCAPE_DECLARE_ISA(avx2)
#endif
#ifdef HESCAPE_HAVE_AVX512
HESCAPE_DECLARE_ISA(avx512)
#endif
#undef HESCAPE_DECLARE_ISA

// Whether this CPU (and build) can run the AVX2+FMA / AVX-512F+FMA path (checked at run time).
bool cpu_has_avx2();
bool cpu_has_avx512();

// Input element type of a (n, d) row-major matrix.
enum class ElemType { f32, bf16 };

struct RankInput {
  const void* q;
  const void* g;
  ElemType dtype;
  int64_t nq, ng, d;
  const int64_t* q_labels;  // nullptr: positive of query i is gallery row i (nq == ng)
  const int64_t* g_labels;
};

struct RankOutput {
  int64_t* ranks;       // nq
  float* best_score;    // nq: the threshold t_i
  int64_t* best_index;  // nq: p_i, or -1 when query i has no positive
};

// Runs both passes. isa: "auto" (avx512, else avx2, else generic), "avx512", "avx2" or "generic".
// Returns the ISA used. The avx512 and avx2 paths compute bit-identical scores (both fused, same order).
const char* rank_cpu(const RankInput& in, const RankOutput& out, int num_threads, const char* isa);

// Both directions at once: fwd ranks the gallery for every query (as rank_cpu), rev ranks the queries for every
// gallery row (as rank_cpu with the two sets and the two label arrays swapped), from one counting pass: each
// score s_ij is computed once, in a tile, and compared with the row's threshold t_i and the column's threshold
// u_j. Because the canonical dot is symmetric (fma(a, b, c) == fma(b, a, c), a * b == b * a), every score, and
// so every tie, is bit-identical to the one the two separate rank_cpu calls compute on the same ISA path: the
// ranks are equal integer for integer. Needs nq < 2^31 - 1 (column counts and indices are int32).
const char* rank_cpu_both(const RankInput& in, const RankOutput& fwd, const RankOutput& rev, int num_threads,
                          const char* isa);

}  // namespace hescape
