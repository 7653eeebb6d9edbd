"""Type stub of the compiled extension hescape.eval._C (private: use hescape.eval._backend)."""

import numpy as np
import numpy.typing as npt

def rank_cpu(
    queries: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    gallery: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    query_labels: npt.NDArray[np.int64] | None = None,
    gallery_labels: npt.NDArray[np.int64] | None = None,
    num_threads: int = 0,
    isa: str = "auto",
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64], str]:
    """Ranks, best-positive scores, best-positive indices and the ISA used ('avx512', 'avx2' or 'generic').

    uint16 inputs are bfloat16 bit patterns. Labels: both or neither (None: positive of query i is row i).
    """

def rank_cpu_both(
    queries: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    gallery: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    query_labels: npt.NDArray[np.int64] | None = None,
    gallery_labels: npt.NDArray[np.int64] | None = None,
    num_threads: int = 0,
    isa: str = "auto",
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64],
    npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64], str,
]:
    """Both directions from one counting pass: the rank_cpu outputs for the queries, the same for the gallery rows
    as queries (ranked among the queries, labels swapped), and the ISA used."""

def cpu_has_avx2() -> bool:
    """Whether the AVX2+FMA path can run on this CPU."""

def cpu_has_avx512() -> bool:
    """Whether the AVX-512F+FMA path can run on this CPU (and build)."""

def has_cuda() -> bool:
    """Whether this build contains the CUDA kernel."""

def rank_cuda(
    q: int,
    g: int,
    bf16: bool,
    nq: int,
    ng: int,
    d: int,
    query_labels: int,
    gallery_labels: int,
    ranks: int,
    best_score: int,
    best_index: int,
    device: int,
    stream: int,
) -> None:
    """Enqueue both passes on `stream`; all arrays are device pointers (0 for absent labels). CUDA builds only."""

def rank_cuda_both(
    q: int,
    g: int,
    bf16: bool,
    nq: int,
    ng: int,
    d: int,
    query_labels: int,
    gallery_labels: int,
    f_ranks: int,
    f_score: int,
    f_index: int,
    r_ranks: int,
    r_score: int,
    r_index: int,
    device: int,
    stream: int,
) -> None:
    """Enqueue both directions on `stream` from one counting pass: forward outputs (length nq), reverse outputs
    (length ng, gallery rows ranked among the queries); device pointers, 0 for absent labels. CUDA builds only."""
