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

__all__ = ["BACKENDS", "RankResult", "available_backends", "compute_ranks", "has_cpp_ext", "has_cuda_ext"]

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
    """

    ranks: torch.Tensor
    best_score: torch.Tensor
    best_index: torch.Tensor
    backend: str


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


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """float32 or bfloat16, contiguous (float16 widens exactly to float32)."""
    return (x if x.dtype == torch.bfloat16 else x.float()).contiguous()


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
    q, g = _as_tensor(queries, "queries"), _as_tensor(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise HescapeEvalError.build(what="queries and gallery", expected="the same embedding width d",
                                     found=f"shapes {tuple(q.shape)} and {tuple(g.shape)}",
                                     fix="project both modalities into the shared space before evaluating")
    if q.device != g.device:
        raise HescapeEvalError.build(what="queries and gallery", expected="one device", found=f"{q.device} and {g.device}",
                                     fix="move both to the same device")
    if q.dtype != g.dtype:
        common = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
        q, g = q.to(common), g.to(common)
    # Cauchy-Schwarz bound on every partial sum: float32 scores cannot overflow below it.
    bound = float(q.double().norm(dim=1).max()) * float(g.double().norm(dim=1).max())
    if q.dtype != torch.float64 and bound >= 1e38:
        raise HescapeEvalError.build(what="queries and gallery", expected="scores within float32 range",
                                     found=f"norm product up to {bound:.3g}",
                                     fix="L2-normalise the embeddings (torch.nn.functional.normalize)")
    ql, gl = _positives(positives, q.shape[0], g.shape[0], q.device)
    used = _resolve(backend, q)

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

    def to_np(x: torch.Tensor) -> np.ndarray:
        return x.view(torch.int16).numpy().view(np.uint16) if bf16 else x.numpy()

    isa = {"cpp": "auto", "cpp-avx512": "avx512", "cpp-avx2": "avx2", "cpp-generic": "generic"}[used]
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    r, b, i, isa_used = _C.rank_cpu(to_np(qk), to_np(gk), None if ql is None else ql.numpy(),
                                    None if gl is None else gl.numpy(), threads, isa)
    return RankResult(torch.from_numpy(r), torch.from_numpy(b), torch.from_numpy(i), f"cpp-{isa_used}")
