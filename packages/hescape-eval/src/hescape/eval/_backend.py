"""Backend choice for exact match ranks: CUDA kernel, C++ kernel, or the pure-torch fallback.

Ranking rule with several positives per query
---------------------------------------------
Let ``P_i`` be the positives of query ``i`` (by default ``{i}``; with labels, the gallery rows that
share the query's label). Its best positive ``p_i`` is the positive with the highest score, the
lowest gallery index among equal scores, and ``t_i = s(i, p_i)``. The 0-based rank counts negatives only:

    rank_i = #{j ∉ P_i : s_ij > t_i} + #{j ∉ P_i, j < p_i : s_ij == t_i}

which is the position of the first positive in a stable descending sort of row ``i`` (no positive can
precede ``p_i``). With ``P_i = {i}`` it is the documented single-positive rule of
:mod:`hescape.eval.retrieval`. ``Recall@k`` = fraction of queries with ``rank < k`` (some positive in the
top ``k``).

Backends
--------
``"cuda"`` (CUDA kernel; inputs on a GPU), ``"cpp"`` (C++ kernel; ``"cpp-avx512"``/``"cpp-avx2"``/``"cpp-generic"`` pin
the instruction set), ``"torch"`` (blockwise matmul, any device, also float64), ``"auto"``: CUDA for
GPU inputs when built with CUDA, else C++ for float32/float16/bfloat16 CPU inputs, else torch. When
the compiled extension is missing, ``"auto"`` falls back to torch and warns once. All backends score
in float32 (float64 inputs: torch only, in float64); each is tie-exact against its own scores, while
scores of different backends may differ in the last bit.

Both directions in one pass
---------------------------
Image→gene counts, in row ``i`` of the score matrix, the entries above ``t_i``; gene→image counts, in column
``j`` of the *same* matrix, the entries above ``u_j`` (the best image positive of gene ``j``; ``s_jj`` for
paired data). :func:`compute_ranks_both` therefore scores every pair once and counts both ways:

* ``"cpp*"``: one sweep of the register tiles; each tile's accumulators are compared with the row thresholds
  (as before) and with the column thresholds, column hits summed per thread (``_C.rank_cpu_both``). The
  canonical dot is symmetric (``fma(a, b, c) == fma(b, a, c)``), so every score is bit-identical to the one
  the two separate calls compute: the ranks are equal integer for integer, ties included (tested on Gaussian
  data with duplicated rows). About half the time of two calls.
* ``"torch"`` (diagonal positives): square tiles of one shape; diagonal tiles first (they hold every
  threshold), then each other tile once (see :func:`_torch_ranks_both`). Exact wherever the BLAS gives a pair
  the same bits in any tile position (the assumption the one-direction torch path makes for its columns);
  tested equal to two separate calls on data whose products are exact. With labels: row blocks, one product each
  for both directions' thresholds and one for both directions' counts (see :func:`_torch_ranks_both_labels`).
* ``"cuda"``: the same fusion in the CUDA kernel (``_C.rank_cuda_both``): the counting pass compares each tile's
  register scores with the row and the column thresholds (column partials combined by warp shuffle and shared
  memory, one atomic per column and tile); with labels, the threshold pass tracks both directions' best
  positives in one sweep too. Same bit-identity argument as the C++ kernel (``__fmaf_rn`` in a fixed order).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._reference import torch_ranks
from .errors import HescapeEvalError, HescapeEvalWarning

try:
    from . import _C
except ImportError as exc:  # pure-Python install or a failed build: torch fallback
    _C = None
    _built = any(p.name.startswith("_C.") and p.suffix in (".so", ".pyd") for p in Path(__file__).parent.iterdir())
    _C_IMPORT_ERROR: str | None = str(exc) if _built else "the extension was not built (no C++ compiler at install)"
else:
    _C_IMPORT_ERROR = None

__all__ = ["BACKENDS", "RankResult", "available_backends", "batched_ranks_both", "compute_ranks", "compute_ranks_both",
           "has_cpp_ext", "has_cuda_ext"]

BACKENDS = ("auto", "cuda", "cpp", "cpp-avx512", "cpp-avx2", "cpp-generic", "torch")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned_fallback = False


@dataclass(frozen=True)
class RankResult:
    """Output of :func:`compute_ranks`.

    Attributes
    ----------
    ranks
        0-based rank of each query's best positive among the negatives (int64, input device).
    best_score
        Score ``t_i`` of the best positive (float32, or float64 on the float64 torch path).
    best_index
        Gallery index ``p_i`` of the best positive (int64).
    backend
        What ran: ``"cuda"``, ``"cpp-avx512"``, ``"cpp-avx2"``, ``"cpp-generic"`` or ``"torch"``.
    fused
        Whether this direction came out of one pass that scored both directions (:func:`compute_ranks_both`).
    """

    ranks: torch.Tensor
    best_score: torch.Tensor
    best_index: torch.Tensor
    backend: str
    fused: bool = False


def has_cpp_ext() -> bool:
    """Whether the compiled extension ``hescape.eval._C`` imported."""
    return _C is not None


def has_cuda_ext() -> bool:
    """Whether the extension was built with the CUDA kernel (``HESCAPE_CUDA=ON``)."""
    return _C is not None and bool(_C.has_cuda())


def available_backends() -> list[str]:
    """Concrete backends usable here (``"cuda"`` also needs a visible GPU)."""
    out = []
    if has_cuda_ext() and torch.cuda.is_available():
        out.append("cuda")
    if has_cpp_ext():
        if _C.cpu_has_avx512():
            out.append("cpp-avx512")
        if _C.cpu_has_avx2():
            out.append("cpp-avx2")
        out.append("cpp-generic")
    out.append("torch")
    return out


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise HescapeEvalError.build(name, expected="a floating-point (N, d) array", found=f"dtype {x.dtype}",
                                         fix="cast the embeddings with .astype(np.float32)")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise HescapeEvalError.build(name, expected="a torch.Tensor or numpy array", found=type(x).__name__,
                                     fix="pass the embedding matrix as a tensor or array")
    x = x.detach()
    if x.dtype not in _FLOATS:
        raise HescapeEvalError.build(name, expected="float32, float64, float16 or bfloat16", found=f"dtype {x.dtype}",
                                     fix="cast the embeddings with .float()")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise HescapeEvalError.build(name, expected="a non-empty (N, d) matrix", found=f"shape {tuple(x.shape)}",
                                     fix="pass one embedding row per sample (reshape 1-D input to (N, 1))")
    if not bool(torch.isfinite(x).all()):
        raise HescapeEvalError.build(name, expected="finite values", found="NaN or inf",
                                     fix="check the encoder outputs (e.g. torch.nan_to_num or a lower learning rate)")
    return x


def _as_labels(x, name: str, n: int, device: torch.device) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise HescapeEvalError.build(name, expected=f"one label per row, shape ({n},)", found=f"shape {arr.shape}",
                                     fix="pass a 1-D label vector aligned with the embedding rows")
    if arr.dtype.kind not in "iubUSO":
        raise HescapeEvalError.build(name, expected="integer or string labels", found=f"dtype {arr.dtype}",
                                     fix="encode the labels as integers (e.g. pandas.factorize)")
    return arr


def _positives(positives, nq: int, ng: int, device: torch.device):
    if positives is None:
        if nq != ng:
            raise HescapeEvalError.build(what="queries and gallery", expected="paired rows (equal N) when positives=None",
                                         found=f"{nq} queries and {ng} gallery rows",
                                         fix="pass positives=(query_labels, gallery_labels)")
        return None, None
    if isinstance(positives, tuple | list) and len(positives) == 2:
        ql = _as_labels(positives[0], "positives[0] (query labels)", nq, device)
        gl = _as_labels(positives[1], "positives[1] (gallery labels)", ng, device)
    else:
        if nq != ng:
            raise HescapeEvalError.build(what="positives", expected="a (query_labels, gallery_labels) pair when N differ",
                                         found=f"one label vector for {nq} queries and {ng} gallery rows",
                                         fix="pass positives=(query_labels, gallery_labels)")
        ql = gl = _as_labels(positives, "positives", nq, device)
    if ql.dtype.kind not in "iu" or gl.dtype.kind not in "iu":  # strings/objects: factorise jointly
        _, codes = np.unique(np.concatenate([ql.astype(object), gl.astype(object)]), return_inverse=True)
        ql, gl = codes[:nq], codes[nq:]
    ql, gl = ql.astype(np.int64), gl.astype(np.int64)
    missing = ~np.isin(ql, gl)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise HescapeEvalError.build(what="positives", expected="at least one gallery positive per query",
                                     found=f"{int(missing.sum())} queries without one (first: query {first}, "
                                           f"label {ql[first]})",
                                     fix="drop those queries or add their matches to the gallery")
    return torch.from_numpy(ql).to(device), torch.from_numpy(gl).to(device)


def _resolve(backend: str, q: torch.Tensor) -> str:
    global _warned_fallback
    if backend not in BACKENDS:
        raise HescapeEvalError.build(what="backend", expected=f"one of {BACKENDS}", found=repr(backend),
                                     fix="use backend='auto'")
    on_gpu = q.device.type == "cuda"
    if backend == "auto":
        if on_gpu:
            backend = "cuda" if has_cuda_ext() else "torch"
        elif q.dtype == torch.float64 or q.device.type != "cpu":
            backend = "torch"
        elif has_cpp_ext():
            backend = "cpp"
        else:
            backend = "torch"
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(f"hescape.eval._C is unavailable ({_C_IMPORT_ERROR}); exact ranks use the slower "
                              "torch fallback. Reinstall hescape-eval with a C++17 compiler and CMake to build it.",
                              HescapeEvalWarning, stacklevel=4)
        return backend
    if backend == "cuda" and not (has_cuda_ext() and on_gpu):
        found = "inputs on the CPU" if not on_gpu else "an extension built without CUDA"
        raise HescapeEvalError.build(what="backend='cuda'", expected="CUDA tensors and an extension built with CUDA",
                                     found=found, fix="move inputs with .cuda() and rebuild with HESCAPE_CUDA=ON, "
                                                      "or use backend='auto'")
    if backend.startswith("cpp"):
        if not has_cpp_ext():
            raise HescapeEvalError.build(what=f"backend={backend!r}", expected="the compiled extension hescape.eval._C",
                                         found=f"import failure ({_C_IMPORT_ERROR})",
                                         fix="reinstall hescape-eval with a C++17 compiler, or use backend='torch'")
        if q.device.type != "cpu" or q.dtype == torch.float64:
            raise HescapeEvalError.build(what=f"backend={backend!r}", expected="float32/float16/bfloat16 CPU tensors",
                                         found=f"{q.dtype} on {q.device}",
                                         fix="use backend='torch' for float64, or .cpu().float()")
        if backend == "cpp-avx2" and not _C.cpu_has_avx2():
            raise HescapeEvalError.build(what="backend='cpp-avx2'", expected="a CPU with AVX2 and FMA", found="neither",
                                         fix="use backend='cpp'")
        if backend == "cpp-avx512" and not _C.cpu_has_avx512():
            raise HescapeEvalError.build(what="backend='cpp-avx512'", expected="a CPU with AVX-512F and FMA",
                                         found="neither", fix="use backend='cpp'")
    return backend


#: Below this bound on every score (largest query norm × largest gallery norm) float32 products underflow toward 0
#: (smallest normal float32: 1.2e-38) and scores tie by accident: refused on the float32 paths.
MIN_SCORE_BOUND = 1e-30
#: Row norms farther than this from 1 make :func:`warn_if_not_unit` warn.
UNIT_TOLERANCE = 1e-3


def warn_if_not_unit(image: torch.Tensor, gene: torch.Tensor) -> None:
    """Warn (:class:`HescapeEvalWarning`) when rows of either set are not unit vectors.

    Every backend ranks by inner product, which equals the cosine similarity of CLIP/SigLIP retrieval only for
    L2-normalised rows; un-normalised rows give other ranks (a new user's trial: R@5 0.18 by inner product vs 0.46
    by cosine on the same embeddings). All-zero rows (a sample-centred row equal to its sample's mean) are allowed.
    """
    for name, x in (("image", image), ("gene", gene)):
        norms = x.detach().double().norm(dim=1)
        norms = norms[norms > 0]
        if norms.numel() and bool(((norms - 1).abs() > UNIT_TOLERANCE).any()):
            warnings.warn(f"{name} embeddings: row norms {float(norms.min()):.3g} to {float(norms.max()):.3g}, not 1: "
                          "Recall@k ranks by inner product, which is the cosine only for unit rows; L2-normalise both "
                          "sets (torch.nn.functional.normalize) for CLIP/SigLIP retrieval", HescapeEvalWarning,
                          stacklevel=3)
            return


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """float32 or bfloat16, contiguous (float16 widens exactly to float32)."""
    return (x if x.dtype == torch.bfloat16 else x.float()).contiguous()



def _prepare(queries, gallery, positives, backend: str):
    """Validated ``(q, g, query_labels, gallery_labels, backend_to_run)`` (labels int64 tensors or ``None``)."""
    q, g = _as_tensor(queries, "queries"), _as_tensor(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise HescapeEvalError.build(what="queries and gallery", expected="the same embedding width d",
                                     found=f"shapes {tuple(q.shape)} and {tuple(g.shape)}",
                                     fix="project both modalities into the shared space before evaluating")
    if q.device != g.device:
        raise HescapeEvalError.build(what="queries and gallery", expected="one device",
                                     found=f"{q.device} and {g.device}", fix="move both to the same device")
    if q.dtype != g.dtype:
        common = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
        q, g = q.to(common), g.to(common)
    # Cauchy-Schwarz bound on every partial sum: float32 scores cannot overflow below it.
    bound = float(q.double().norm(dim=1).max()) * float(g.double().norm(dim=1).max())
    if q.dtype != torch.float64 and bound >= 1e38:
        raise HescapeEvalError.build(what="queries and gallery", expected="scores within float32 range",
                                     found=f"norm product up to {bound:.3g}",
                                     fix="L2-normalise the embeddings (torch.nn.functional.normalize)")
    if q.dtype != torch.float64 and 0 < bound < MIN_SCORE_BOUND:  # products underflow: every score a tie at 0
        raise HescapeEvalError.build(what="queries and gallery", expected=f"scores within float32 range (norm "
                                     f"product at least {MIN_SCORE_BOUND:g})", found=f"norm product at most {bound:.3g}",
                                     fix="L2-normalise the embeddings (torch.nn.functional.normalize)")
    ql, gl = _positives(positives, q.shape[0], g.shape[0], q.device)
    return q, g, ql, gl, _resolve(backend, q)


def _run(q: torch.Tensor, g: torch.Tensor, ql, gl, used: str, block_size: int, num_threads: int | None) -> RankResult:
    """One direction on validated inputs."""
    if used == "torch":
        work = q.dtype if q.dtype == torch.float64 else torch.float32
        ranks, best, idx = torch_ranks(q.to(work), g.to(work), ql, gl, block_size=block_size)
        return RankResult(ranks, best, idx, "torch")

    qk, gk = _kernel_input(q), _kernel_input(g)
    bf16 = qk.dtype == torch.bfloat16
    if used == "cuda":
        n = qk.shape[0]
        ranks = torch.empty(n, dtype=torch.int64, device=qk.device)
        best = torch.empty(n, dtype=torch.float32, device=qk.device)
        idx = torch.empty(n, dtype=torch.int64, device=qk.device)
        with torch.cuda.device(qk.device):
            stream = torch.cuda.current_stream(qk.device).cuda_stream
            _C.rank_cuda(qk.data_ptr(), gk.data_ptr(), bf16, n, gk.shape[0], qk.shape[1],
                         0 if ql is None else ql.data_ptr(), 0 if gl is None else gl.data_ptr(),
                         ranks.data_ptr(), best.data_ptr(), idx.data_ptr(), qk.device.index or 0, stream)
        return RankResult(ranks, best, idx, "cuda")

    r, b, i, isa_used = _C.rank_cpu(_np_view(qk), _np_view(gk), None if ql is None else ql.numpy(),
                                    None if gl is None else gl.numpy(), _threads(num_threads), _isa(used))
    return RankResult(torch.from_numpy(r), torch.from_numpy(b), torch.from_numpy(i), f"cpp-{isa_used}")


def _np_view(x: torch.Tensor) -> np.ndarray:
    """A float32 tensor as float32 numpy, a bfloat16 tensor as its uint16 bit patterns (no copy)."""
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _isa(used: str) -> str:
    return {"cpp": "auto", "cpp-avx512": "avx512", "cpp-avx2": "avx2", "cpp-generic": "generic"}[used]


def _threads(num_threads: int | None) -> int:
    return torch.get_num_threads() if num_threads is None else int(num_threads)


def compute_ranks(queries, gallery, *, positives=None, backend: str = "auto", block_size: int = 1024,
                  num_threads: int | None = None) -> RankResult:
    """Exact rank of each query's best positive in the gallery, by the rule in the module docstring.

    Parameters
    ----------
    queries, gallery
        ``(N_q, d)`` and ``(N_g, d)`` float embeddings (tensors or arrays) on one device.
    positives
        ``None``: gallery row ``i`` is the only positive of query ``i`` (paired data). A label vector of
        length ``N``: the gallery rows sharing the query's label. A pair ``(query_labels, gallery_labels)``
        for unpaired sets.
    backend
        One of :data:`BACKENDS`; see the module docstring.
    block_size
        Query rows per block of the torch backend.
    num_threads
        CPU threads of the C++ backend (default ``torch.get_num_threads()``).
    """
    q, g, ql, gl, used = _prepare(queries, gallery, positives, backend)
    return _run(q, g, ql, gl, used, block_size, num_threads)


def compute_ranks_both(image, gene, *, positives=None, backend: str = "auto", block_size: int = 1024,
                       num_threads: int | None = None) -> tuple[RankResult, RankResult]:
    """Image→gene and gene→image ranks, both from one pass over the similarity tiles where the backend allows.

    ``(i2g, g2i)`` equal, integer for integer, ``compute_ranks(image, gene)`` and ``compute_ranks(gene, image)``
    (positives swapped) on the same backend; see "Both directions in one pass" in the module docstring for
    which backends fuse (``RankResult.fused``) and why the scores, and so the ties, are the same.

    Parameters
    ----------
    image, gene
        ``(N_i, d)`` and ``(N_g, d)`` float embeddings on one device (``N_i == N_g`` unless ``positives`` is a
        pair of label vectors).
    positives, backend, block_size, num_threads
        As in :func:`compute_ranks`; ``positives`` is given image→gene (a pair is ``(image_labels,
        gene_labels)``) and swapped for gene→image. ``block_size`` is the tile side of the torch backend.

    Raises
    ------
    HescapeEvalError
        As :func:`compute_ranks`, for either direction (e.g. a gene label that no image carries).
    """
    q, g, ql, gl, used = _prepare(image, gene, positives, backend)
    if ql is not None:
        missing = ~torch.isin(gl, ql)
        if bool(missing.any()):
            first = int(torch.nonzero(missing)[0, 0])
            raise HescapeEvalError.build(what="positives (gene→image)", expected="at least one image positive per gene",
                                         found=f"{int(missing.sum())} genes without one (first: gene row {first})",
                                         fix="drop those rows or pass matching (image_labels, gene_labels)")
    if used == "torch":
        work = q.dtype if q.dtype == torch.float64 else torch.float32
        if ql is None:
            return _torch_ranks_both(q.to(work), g.to(work), block_size)
        return _torch_ranks_both_labels(q.to(work), g.to(work), ql, gl, block_size)
    qk, gk = _kernel_input(q), _kernel_input(g)
    if used == "cuda":
        return _cuda_both(qk, gk, ql, gl)
    if not hasattr(_C, "rank_cpu_both"):  # an extension built before the fused pass: two passes
        return (_run(q, g, ql, gl, used, block_size, num_threads),
                _run(g, q, gl, ql, used, block_size, num_threads))
    out = _C.rank_cpu_both(_np_view(qk), _np_view(gk), None if ql is None else ql.numpy(),
                           None if gl is None else gl.numpy(), _threads(num_threads), _isa(used))
    isa_used = f"cpp-{out[6]}"
    fwd = RankResult(*(torch.from_numpy(a) for a in out[0:3]), isa_used, True)
    rev = RankResult(*(torch.from_numpy(a) for a in out[3:6]), isa_used, True)
    return fwd, rev


def _cuda_both(qk: torch.Tensor, gk: torch.Tensor, ql, gl) -> tuple[RankResult, RankResult]:
    """Both directions on the GPU: ``_C.rank_cuda_both`` (one counting pass), or two passes on an older build."""
    if not hasattr(_C, "rank_cuda_both"):
        return _run(qk, gk, ql, gl, "cuda", 0, None), _run(gk, qk, gl, ql, "cuda", 0, None)
    dev = qk.device

    def buffers(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.float32, device=dev),
                torch.empty(n, dtype=torch.int64, device=dev))

    fwd, rev = buffers(qk.shape[0]), buffers(gk.shape[0])
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C.rank_cuda_both(qk.data_ptr(), gk.data_ptr(), qk.dtype == torch.bfloat16, qk.shape[0], gk.shape[0],
                          qk.shape[1], 0 if ql is None else ql.data_ptr(), 0 if gl is None else gl.data_ptr(),
                          *(t.data_ptr() for t in fwd), *(t.data_ptr() for t in rev), dev.index or 0, stream)
    return RankResult(*fwd, "cuda", True), RankResult(*rev, "cuda", True)


def _torch_ranks_both(q: torch.Tensor, g: torch.Tensor, block_size: int) -> tuple[RankResult, RankResult]:
    """Both directions of the diagonal-positive rule from one product per tile (torch backend).

    The ``N × N`` score matrix is cut into square ``b × b`` tiles (inputs zero-padded so that every product has
    one shape, ``b`` a multiple of 16 so that every row block starts equally aligned). Pass 1 computes the
    diagonal tiles: their diagonals are the thresholds ``t_i = s_ii`` of both directions, and their own counts
    use the triangular tie masks. Pass 2 computes every other tile once: for tile ``(I, J)`` with ``J < I`` every
    column index is below every row index, so image→gene counts ``s >= t_row`` and gene→image ``s > t_col``;
    for ``J > I`` the other way round. Each score is computed once, so the pass costs one ``N²d`` product.
    """
    n, d = q.shape
    dev = q.device
    nb = max(1, -(-n // max(1, int(block_size))))
    b = -(-n // nb)
    b = -(-b // 16) * 16
    nb = -(-n // b)
    pad = nb * b - n
    if pad:
        q = torch.cat([q, q.new_zeros(pad, d)])
        g = torch.cat([g, g.new_zeros(pad, d)])
    q, g = q.contiguous(), g.contiguous()
    t = torch.empty(n, dtype=q.dtype, device=dev)
    r_ig = torch.zeros(n, dtype=torch.int64, device=dev)
    r_gi = torch.zeros(n, dtype=torch.int64, device=dev)
    ar = torch.arange(b, device=dev)
    below = ar.unsqueeze(0) < ar.unsqueeze(1)  # [i, j]: j < i
    spans = [(lo, min(b, n - lo)) for lo in range(0, n, b)]
    for lo, m in spans:  # pass 1: diagonal tiles
        s = (q[lo:lo + b] @ g[lo:lo + b].T)[:m, :m]
        ti = s.diagonal()
        t[lo:lo + m] = ti
        r_ig[lo:lo + m] += ((s > ti.unsqueeze(1)) | ((s == ti.unsqueeze(1)) & below[:m, :m])).sum(1)
        r_gi[lo:lo + m] += ((s > ti.unsqueeze(0)) | ((s == ti.unsqueeze(0)) & below[:m, :m].T)).sum(0)
    for bi, (lo_i, m_i) in enumerate(spans):  # pass 2: every other tile, once
        t_row = t[lo_i:lo_i + m_i].unsqueeze(1)
        for bj, (lo_j, m_j) in enumerate(spans):
            if bi == bj:
                continue
            s = (q[lo_i:lo_i + b] @ g[lo_j:lo_j + b].T)[:m_i, :m_j]
            t_col = t[lo_j:lo_j + m_j].unsqueeze(0)
            if bj < bi:
                r_ig[lo_i:lo_i + m_i] += (s >= t_row).sum(1)
                r_gi[lo_j:lo_j + m_j] += (s > t_col).sum(0)
            else:
                r_ig[lo_i:lo_i + m_i] += (s > t_row).sum(1)
                r_gi[lo_j:lo_j + m_j] += (s >= t_col).sum(0)
    idx = torch.arange(n, device=dev)
    return (RankResult(r_ig, t, idx, "torch", True), RankResult(r_gi, t.clone(), idx.clone(), "torch", True))


def _torch_ranks_both_labels(q: torch.Tensor, g: torch.Tensor, ql: torch.Tensor, gl: torch.Tensor,
                             block_size: int) -> tuple[RankResult, RankResult]:
    """Both directions with label positives from two products per row block (torch backend), not four.

    Pass 1 computes each row block ``s = q[I] @ g.T`` once: the row thresholds (best positive, lowest gallery index
    among equal scores) and each column's best positive within the block, merged over blocks in index order (a later
    block replaces a column's best only with a strictly higher score, so the lowest query index wins ties). Pass 2
    recomputes the same products and counts rows as :func:`~hescape.eval._reference.torch_ranks` does and columns by
    the same rule. Every threshold is compared with the bits of the product it came from (same call, same shape).
    """
    nq, ng = q.shape[0], g.shape[0]
    dev, b = q.device, max(1, int(block_size))
    cols, neg_inf = torch.arange(ng, device=dev), float("-inf")
    t = torch.empty(nq, dtype=q.dtype, device=dev)
    p = torch.empty(nq, dtype=torch.int64, device=dev)
    u = torch.full((ng,), neg_inf, dtype=q.dtype, device=dev)
    cp = torch.zeros(ng, dtype=torch.int64, device=dev)
    for lo in range(0, nq, b):  # pass 1: thresholds of both directions
        hi = min(lo + b, nq)
        s = q[lo:hi] @ g.T
        pos = ql[lo:hi].unsqueeze(1) == gl.unsqueeze(0)
        masked = s.masked_fill(~pos, neg_inf)
        t[lo:hi] = masked.amax(dim=1)
        p[lo:hi] = (pos & (s == t[lo:hi].unsqueeze(1))).to(torch.int8).argmax(dim=1)
        cmax = masked.amax(dim=0)
        cfirst = (pos & (s == cmax.unsqueeze(0))).to(torch.int8).argmax(dim=0) + lo
        better = cmax > u
        u = torch.where(better, cmax, u)
        cp = torch.where(better, cfirst, cp)
    r_ig = torch.empty(nq, dtype=torch.int64, device=dev)
    r_gi = torch.zeros(ng, dtype=torch.int64, device=dev)
    for lo in range(0, nq, b):  # pass 2: counts of both directions
        hi = min(lo + b, nq)
        s = q[lo:hi] @ g.T
        ti = t[lo:hi].unsqueeze(1)
        r_ig[lo:hi] = ((s > ti) | ((s == ti) & (cols.unsqueeze(0) < p[lo:hi].unsqueeze(1)))).sum(dim=1)
        rows = torch.arange(lo, hi, device=dev).unsqueeze(1)
        r_gi += ((s > u.unsqueeze(0)) | ((s == u.unsqueeze(0)) & (rows < cp.unsqueeze(0)))).sum(dim=0)
    return RankResult(r_ig, t, p, "torch", True), RankResult(r_gi, u, cp, "torch", True)


@dataclass(frozen=True)
class BatchedRanks:
    """Ranks of every query inside its own gallery (:func:`batched_ranks_both`), one entry per evaluated query.

    Attributes
    ----------
    rows
        Row of the evaluated set that each query is (int64; a row repeats when a protocol pads).
    pool
        Size of the gallery the query was ranked in.
    i2g, g2i
        0-based ranks (int64), by the rule of the module docstring applied inside the gallery (ties broken by
        position in the gallery).
    n_pos_i2g, n_pos_g2i
        Positives of the query inside its gallery (1 without labels).
    backend
        What ranked: ``"torch"`` (vectorised over galleries of equal size) or a :func:`compute_ranks_both` backend.
    """

    rows: np.ndarray
    pool: np.ndarray
    i2g: np.ndarray
    g2i: np.ndarray
    n_pos_i2g: np.ndarray
    n_pos_g2i: np.ndarray
    backend: str


def batched_ranks_both(image, gene, galleries: list[np.ndarray], *, positives=None, backend: str = "auto",
                       num_threads: int | None = None, max_elements: int = 1 << 22) -> BatchedRanks:
    """Both directions' ranks with each query ranked only inside its own gallery (e.g. a test batch).

    Parameters
    ----------
    image, gene
        Paired ``(N, d)`` embeddings (row ``i`` of one matches row ``i`` of the other).
    galleries
        Row-index arrays (see :meth:`hescape.eval.protocol.RetrievalProtocol.galleries`); each gallery is ranked
        on its own, its rows in the given order (a row may appear in several galleries).
    positives
        ``None`` or one label vector of length ``N`` (same-label rows of the gallery are positives).
    backend
        ``"auto"`` or ``"torch"``: batched matrix products, galleries of equal size stacked, at most
        ``max_elements`` scores at a time; any other :data:`BACKENDS` entry: one :func:`compute_ranks_both` call
        per gallery on that backend.
    """
    if isinstance(positives, tuple | list) and len(positives) == 2:
        raise HescapeEvalError.build(what="positives of batched galleries", expected="None or one label vector",
                                     found="a (query_labels, gallery_labels) pair",
                                     fix="galleries hold paired rows: pass one label vector")
    q, g, ql, _, used = _prepare(image, gene, positives, "torch" if backend == "auto" else backend)
    if q.shape[0] != g.shape[0]:
        raise HescapeEvalError.build(what="image and gene embeddings", expected="paired rows (equal N)",
                                     found=f"{q.shape[0]} and {g.shape[0]} rows", fix="pass one row per spot in both")
    n = q.shape[0]
    bad = [k for k, rows in enumerate(galleries) if len(rows) == 0 or np.min(rows) < 0 or np.max(rows) >= n]
    if not galleries or bad:
        raise HescapeEvalError.build(what="galleries", expected=f"non-empty row-index arrays within 0..{n - 1}",
                                     found=f"{len(galleries)} galleries, invalid: {bad[:5]}",
                                     fix="build them with RetrievalProtocol.galleries(N)")
    sizes = np.array([len(rows) for rows in galleries])
    out_rows = np.concatenate(galleries).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = int(sizes.sum())
    r_ig, r_gi = np.empty(total, np.int64), np.empty(total, np.int64)
    p_ig, p_gi = np.ones(total, np.int64), np.ones(total, np.int64)
    if used == "torch":
        work = q.dtype if q.dtype == torch.float64 else torch.float32
        qw, gw = q.to(work), g.to(work)
        for size in np.unique(sizes):
            which = np.flatnonzero(sizes == size)
            per = max(1, int(max_elements) // int(size * size))
            for c in range(0, len(which), per):
                sel = which[c:c + per]
                idx = torch.from_numpy(np.stack([galleries[k] for k in sel]).astype(np.int64)).to(q.device)
                lab = None if ql is None else ql[idx]
                a, bq, pa, pb = _batched_torch(qw[idx], gw[idx], lab)
                dst = (starts[sel][:, None] + np.arange(size)[None, :]).ravel()
                r_ig[dst], r_gi[dst] = a.cpu().numpy().ravel(), bq.cpu().numpy().ravel()
                p_ig[dst], p_gi[dst] = pa.cpu().numpy().ravel(), pb.cpu().numpy().ravel()
        ran = "torch"
    else:
        ran = used
        for k, rows in enumerate(galleries):
            sl = slice(starts[k], starts[k] + sizes[k])
            t_rows = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(q.device)
            lab = None if ql is None else ql[t_rows]
            fwd, rev = compute_ranks_both(q[t_rows], g[t_rows], positives=lab, backend=backend, num_threads=num_threads)
            ran = fwd.backend
            r_ig[sl], r_gi[sl] = fwd.ranks.cpu().numpy(), rev.ranks.cpu().numpy()
            if lab is not None:
                eq = (lab.unsqueeze(0) == lab.unsqueeze(1)).sum(1).cpu().numpy()
                p_ig[sl], p_gi[sl] = eq, eq
    pool = np.repeat(sizes, sizes).astype(np.int64)
    return BatchedRanks(out_rows, pool, r_ig, r_gi, p_ig, p_gi, ran)


def _batched_torch(qb: torch.Tensor, gb: torch.Tensor, lab: torch.Tensor | None):
    """Ranks of ``m`` stacked galleries ``(m, B, d)``: both directions from one ``(m, B, B)`` product."""
    m, size, _ = qb.shape
    s = torch.bmm(qb, gb.transpose(1, 2))  # s[:, i, j] = image_i . gene_j
    dev = s.device
    ar = torch.arange(size, device=dev)
    if lab is None:  # the diagonal is every threshold; ties count below it (rows) or above it (columns)
        t = s.diagonal(dim1=1, dim2=2)
        below = (ar.view(1, -1) < ar.view(-1, 1)).unsqueeze(0)  # [i, j]: j < i
        r_ig = ((s > t.unsqueeze(2)) | ((s == t.unsqueeze(2)) & below)).sum(2)
        r_gi = ((s > t.unsqueeze(1)) | ((s == t.unsqueeze(1)) & below.transpose(1, 2))).sum(1)
        ones = torch.ones_like(r_ig)
        return r_ig, r_gi, ones, ones
    pos = lab.unsqueeze(2) == lab.unsqueeze(1)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=dev)
    masked = torch.where(pos, s, neg_inf)
    # image -> gene: along rows; best positive = highest score, then lowest column (argmax returns the first)
    t = masked.amax(2, keepdim=True)
    p = (pos & (s == t)).to(torch.int8).argmax(2, keepdim=True)
    r_ig = (s > t).sum(2) + ((s == t) & (ar.view(1, 1, -1) < p)).sum(2)
    # gene -> image: along columns; best positive = highest score, then lowest row
    u = masked.amax(1, keepdim=True)
    pr = (pos & (s == u)).to(torch.int8).argmax(1, keepdim=True)
    r_gi = (s > u).sum(1) + ((s == u) & (ar.view(1, -1, 1) < pr)).sum(1)
    return r_ig, r_gi, pos.sum(2), pos.sum(1)
