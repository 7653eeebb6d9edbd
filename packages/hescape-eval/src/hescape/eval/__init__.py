"""hescape.eval: honest evaluation of image–gene embeddings.

Exact Recall@k over the full gallery (one or several positives per query), mean/median rank, with
chance levels. Ranks come from a fused C++ (AVX2) or CUDA kernel when the compiled extension is
present, else from a blockwise torch fallback; :func:`compute_ranks` reports which ran.
:mod:`hescape.eval.baselines` has the colour-statistics probe to report beside a model (needs scikit-learn).
"""

from ._backend import BACKENDS, RankResult, available_backends, compute_ranks, has_cpp_ext, has_cuda_ext
from .errors import HescapeEvalError, HescapeEvalWarning
from .retrieval import RetrievalResult, chance_recall, match_ranks, recall_at_k, retrieval_metrics

__version__ = "0.1.0"

__all__ = [
    # metrics
    "RetrievalResult", "chance_recall", "match_ranks", "recall_at_k", "retrieval_metrics",
    # ranks and backends
    "BACKENDS", "RankResult", "available_backends", "compute_ranks", "has_cpp_ext", "has_cuda_ext",
    # errors
    "HescapeEvalError", "HescapeEvalWarning",
]
