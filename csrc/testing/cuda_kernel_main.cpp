// Runs the CUDA recall kernels of recall_cuda.cu on the CPU through testing/cuda_emulation.h (test code).
//
// Build (packages/hescape-eval/tests/test_cuda_kernel_emulated.py does this):
//   c++ -std=c++17 -O1 -pthread -ffp-contract=off -DHESCAPE_CUDA_EMULATION -I csrc
//       -x c++ csrc/recall_cuda.cu -x none csrc/testing/cuda_kernel_main.cpp -o cuda_kernel_emulated
// Use: cuda_kernel_emulated IN OUT
//   IN: int64 header [nq, ng, d, bf16, has_labels, sm_count], then q (nq x d) and g (ng x d) as float32, or as
//       uint16 bfloat16 bits when bf16 = 1, then (has_labels = 1) int64 query labels (nq) and gallery labels (ng).
//   OUT: four results, each ranks (int64), best_score (float32), best_index (int64):
//        rank_cuda(q, g) (nq rows), rank_cuda(g, q) with the labels swapped (ng rows),
//        rank_cuda_both(q, g): forward (nq rows), reverse (ng rows).
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "recall_cuda.h"
#include "testing/cuda_emulation.h"

namespace {

struct Result {
  explicit Result(int64_t n) : ranks(n), score(n), index(n) {}
  std::vector<int64_t> ranks;
  std::vector<float> score;
  std::vector<int64_t> index;
  hescape::RankBuffers buffers() {
    return {reinterpret_cast<uintptr_t>(ranks.data()), reinterpret_cast<uintptr_t>(score.data()),
            reinterpret_cast<uintptr_t>(index.data())};
  }
};

template <class T>
void read(std::FILE* f, T* dst, size_t n) {
  if (std::fread(dst, sizeof(T), n, f) != n) throw std::runtime_error("input file too short");
}

template <class T>
void write(std::FILE* f, const std::vector<T>& v) {
  if (std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) throw std::runtime_error("write failed");
}

uintptr_t ptr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    std::FILE* in = std::fopen(argv[1], "rb");
    if (in == nullptr) throw std::runtime_error(std::string("cannot open ") + argv[1]);
    int64_t h[6];
    read(in, h, 6);
    const int64_t nq = h[0], ng = h[1], d = h[2];
    const bool bf16 = h[3] != 0, labels = h[4] != 0;
    hescape_emu::sm_count = static_cast<int>(h[5]);
    const size_t elem = bf16 ? 2 : 4;
    std::vector<unsigned char> q(nq * d * elem), g(ng * d * elem);
    read(in, q.data(), q.size());
    read(in, g.data(), g.size());
    std::vector<int64_t> ql(labels ? nq : 0), gl(labels ? ng : 0);
    read(in, ql.data(), ql.size());
    read(in, gl.data(), gl.size());
    std::fclose(in);

    const uintptr_t qlp = labels ? ptr(ql.data()) : 0, glp = labels ? ptr(gl.data()) : 0;
    Result one_f(nq), one_r(ng), both_f(nq), both_r(ng);
    const auto one = [&](Result& r, const void* a, const void* b, int64_t na, int64_t nb, uintptr_t la,
                         uintptr_t lb) {
      const hescape::RankBuffers o = r.buffers();
      hescape::rank_cuda(ptr(a), ptr(b), bf16, na, nb, d, la, lb, o.ranks, o.best_score, o.best_index, 0, 0);
    };
    one(one_f, q.data(), g.data(), nq, ng, qlp, glp);
    one(one_r, g.data(), q.data(), ng, nq, glp, qlp);
    hescape::rank_cuda_both(ptr(q.data()), ptr(g.data()), bf16, nq, ng, d, qlp, glp, both_f.buffers(),
                            both_r.buffers(), 0, 0);

    std::FILE* out = std::fopen(argv[2], "wb");
    if (out == nullptr) throw std::runtime_error(std::string("cannot write ") + argv[2]);
    for (Result* r : {&one_f, &one_r, &both_f, &both_r}) {
      write(out, r->ranks);
      write(out, r->score);
      write(out, r->index);
    }
    std::fclose(out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
