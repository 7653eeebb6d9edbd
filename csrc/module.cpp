// pybind11 module hescape.eval._C: thin bindings over the CPU and (optional) CUDA recall kernels.
// Public callers go through hescape.eval._backend, which validates inputs; the checks here only keep a
// direct call from crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "recall_cpu.h"
#ifdef HESCAPE_WITH_CUDA
#include "recall_cuda.h"
#endif

namespace py = pybind11;

namespace {

using f32_array = py::array_t<float, py::array::c_style>;
using u16_array = py::array_t<uint16_t, py::array::c_style>;
using i64_array = py::array_t<int64_t, py::array::c_style>;

// Checks and wraps the arrays of a rank call; ql/gl keep the label arrays alive while `in` points into them.
hescape::RankInput make_input(const py::array& queries, const py::array& gallery, const py::object& query_labels,
                              const py::object& gallery_labels, i64_array& ql, i64_array& gl) {
  const bool bf16 = queries.dtype().is(py::dtype::of<uint16_t>());
  if (!bf16 && !queries.dtype().is(py::dtype::of<float>()))
    throw py::type_error("queries: expected float32 or uint16 (bfloat16 bits)");
  if (!gallery.dtype().is(queries.dtype())) throw py::type_error("queries and gallery must share one dtype");
  for (const py::array* a : {&queries, &gallery}) {
    if (a->ndim() != 2) throw std::invalid_argument("expected 2-D arrays (N, d)");
    if (!(a->flags() & py::array::c_style)) throw std::invalid_argument("expected C-contiguous arrays");
  }
  if (queries.shape(1) != gallery.shape(1)) throw std::invalid_argument("queries and gallery differ in d");
  if (query_labels.is_none() != gallery_labels.is_none())
    throw std::invalid_argument("pass both label arrays or neither");

  hescape::RankInput in{queries.data(), gallery.data(), bf16 ? hescape::ElemType::bf16 : hescape::ElemType::f32,
                        queries.shape(0), gallery.shape(0), queries.shape(1), nullptr, nullptr};
  if (!query_labels.is_none()) {
    ql = query_labels.cast<i64_array>();
    gl = gallery_labels.cast<i64_array>();
    if (ql.ndim() != 1 || ql.shape(0) != in.nq || gl.ndim() != 1 || gl.shape(0) != in.ng)
      throw std::invalid_argument("label arrays must be 1-D with one label per row");
    in.q_labels = ql.data();
    in.g_labels = gl.data();
  }
  return in;
}

py::tuple rank_cpu(const py::array& queries, const py::array& gallery, const py::object& query_labels,
                   const py::object& gallery_labels, int num_threads, const std::string& isa) {
  i64_array ql, gl;
  const hescape::RankInput in = make_input(queries, gallery, query_labels, gallery_labels, ql, gl);
  i64_array ranks(in.nq), best_index(in.nq);
  f32_array best_score(in.nq);
  const hescape::RankOutput out{ranks.mutable_data(), best_score.mutable_data(), best_index.mutable_data()};
  const char* used = nullptr;
  {
    py::gil_scoped_release release;
    used = hescape::rank_cpu(in, out, num_threads, isa.c_str());
  }
  return py::make_tuple(ranks, best_score, best_index, std::string(used));
}

py::tuple rank_cpu_both(const py::array& queries, const py::array& gallery, const py::object& query_labels,
                        const py::object& gallery_labels, int num_threads, const std::string& isa) {
  i64_array ql, gl;
  const hescape::RankInput in = make_input(queries, gallery, query_labels, gallery_labels, ql, gl);
  i64_array f_ranks(in.nq), f_index(in.nq), r_ranks(in.ng), r_index(in.ng);
  f32_array f_score(in.nq), r_score(in.ng);
  const hescape::RankOutput fwd{f_ranks.mutable_data(), f_score.mutable_data(), f_index.mutable_data()};
  const hescape::RankOutput rev{r_ranks.mutable_data(), r_score.mutable_data(), r_index.mutable_data()};
  const char* used = nullptr;
  {
    py::gil_scoped_release release;
    used = hescape::rank_cpu_both(in, fwd, rev, num_threads, isa.c_str());
  }
  return py::make_tuple(f_ranks, f_score, f_index, r_ranks, r_score, r_index, std::string(used));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Exact blockwise match-rank kernels of hescape.eval (private; use hescape.eval._backend).";
  m.def("rank_cpu", &rank_cpu, py::arg("queries"), py::arg("gallery"), py::arg("query_labels") = py::none(),
        py::arg("gallery_labels") = py::none(), py::arg("num_threads") = 0, py::arg("isa") = "auto",
        "Ranks, best-positive scores, best-positive indices and the ISA used ('avx512', 'avx2' or 'generic').");
  m.def("rank_cpu_both", &rank_cpu_both, py::arg("queries"), py::arg("gallery"),
        py::arg("query_labels") = py::none(), py::arg("gallery_labels") = py::none(), py::arg("num_threads") = 0,
        py::arg("isa") = "auto",
        "Both directions from one counting pass: forward ranks, scores, indices, then reverse ranks, scores, "
        "indices (queries ranked for each gallery row), and the ISA used.");
  m.def("cpu_has_avx2", &hescape::cpu_has_avx2, "Whether the AVX2+FMA path can run on this CPU.");
  m.def("cpu_has_avx512", &hescape::cpu_has_avx512, "Whether the AVX-512F+FMA path can run on this CPU (and build).");
#ifdef HESCAPE_WITH_CUDA
  m.def("has_cuda", [] { return true; });
  m.def("rank_cuda", [](uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t ql,
                        uintptr_t gl, uintptr_t ranks, uintptr_t best_score, uintptr_t best_index, int device,
                        uintptr_t stream) {
          py::gil_scoped_release release;
          hescape::rank_cuda(q, g, bf16, nq, ng, d, ql, gl, ranks, best_score, best_index, device, stream);
        },
        py::arg("q"), py::arg("g"), py::arg("bf16"), py::arg("nq"), py::arg("ng"), py::arg("d"),
        py::arg("query_labels"), py::arg("gallery_labels"), py::arg("ranks"), py::arg("best_score"),
        py::arg("best_index"), py::arg("device"), py::arg("stream"), "Enqueue both passes on `stream` (device pointers as ints).");
  m.def("rank_cuda_both", [](uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t ql,
                             uintptr_t gl, uintptr_t f_ranks, uintptr_t f_score, uintptr_t f_index, uintptr_t r_ranks,
                             uintptr_t r_score, uintptr_t r_index, int device, uintptr_t stream) {
          py::gil_scoped_release release;
          hescape::rank_cuda_both(q, g, bf16, nq, ng, d, ql, gl, {f_ranks, f_score, f_index},
                                  {r_ranks, r_score, r_index}, device, stream);
        },
        py::arg("q"), py::arg("g"), py::arg("bf16"), py::arg("nq"), py::arg("ng"), py::arg("d"),
        py::arg("query_labels"), py::arg("gallery_labels"), py::arg("f_ranks"), py::arg("f_score"),
        py::arg("f_index"), py::arg("r_ranks"), py::arg("r_score"), py::arg("r_index"), py::arg("device"),
        py::arg("stream"),
        "Enqueue both directions on `stream`: forward (queries ranked against the gallery, length nq) and reverse "
        "(gallery rows ranked against the queries, length ng) from one counting pass.");
#else
  m.def("has_cuda", [] { return false; });
#endif
}
