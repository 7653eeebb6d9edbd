// CUDA recall kernel: host entry point. Built only with HESCAPE_CUDA=ON.
#pragma once

#include <cstdint>

namespace hescape {

// Both passes on the GPU, all pointers are device addresses passed as integers (no libtorch link):
//   q (nq, d), g (ng, d): row-major fp32, or bf16 stored as uint16 when bf16 is true;
//   q_labels (nq), g_labels (ng): int64 labels, or 0 for diagonal positives (nq == ng);
//   ranks (nq, int64), best_score (nq, fp32), best_index (nq, int64, -1 when no positive): outputs.
// device is the CUDA ordinal holding the data (made current for the launch: this module links its own
// static CUDA runtime, whose current device is not torch's); stream is a cudaStream_t (e.g. torch.cuda.current_stream().cuda_stream); work is enqueued on it and
// the call returns without synchronising. Throws std::runtime_error on a CUDA error.
void rank_cuda(uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t q_labels,
               uintptr_t g_labels, uintptr_t ranks, uintptr_t best_score, uintptr_t best_index, int device,
               uintptr_t stream);

// Device outputs of one direction: ranks (int64), best_score (fp32), best_index (int64, -1 when no positive).
struct RankBuffers {
  uintptr_t ranks, best_score, best_index;
};

// Both directions from one counting pass (and, with labels, one threshold pass): fwd ranks g for every row of q
// (length nq), rev ranks q for every row of g (length ng), equal integer for integer to rank_cuda(q, g, ...) and
// rank_cuda(g, q, ...) with the labels swapped (every score has the same bits: the canonical dot is symmetric).
// Needs nq, ng < 2^32 - 1. Same device, stream and error contract as rank_cuda.
void rank_cuda_both(uintptr_t q, uintptr_t g, bool bf16, int64_t nq, int64_t ng, int64_t d, uintptr_t q_labels,
                    uintptr_t g_labels, const RankBuffers& fwd, const RankBuffers& rev, int device, uintptr_t stream);

}  // namespace hescape
