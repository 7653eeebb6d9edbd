"""hescape.eval: honest evaluation of image–gene embeddings.

Exact Recall@k over the full gallery (one or several positives per query), mean/median rank, with
chance levels. Ranks come from a fused C++ (AVX2) or CUDA kernel when the compiled extension is
present, else from a blockwise torch fallback; :func:`compute_ranks` reports which ran.
:mod:`hescape.eval.baselines` has the colour-statistics probe to report beside a model (needs scikit-learn).
Protocols (:mod:`hescape.eval.protocol`): the full gallery, or ranks within test batches as the HESCAPE paper
did; :mod:`hescape.eval.io` saves and loads a run's embeddings; the ``hescape-eval`` command is
:mod:`hescape.eval.cli`. :mod:`hescape.eval.expression` is the HEST expression probe (paper Table 6),
:mod:`hescape.eval.batch_effects` silhouette-batch (section 8.3; ``pip install 'hescape-eval[batch]'``), and
:mod:`hescape.eval.export` writes embeddings to AnnData (``[export]``). :mod:`hescape.eval.report` aggregates runs
over seeds into the paper's Table 2 layout (``hescape-eval report``).
"""

from ._backend import (
    BACKENDS,
    RankResult,
    available_backends,
    compute_ranks,
    compute_ranks_both,
    has_cpp_ext,
    has_cuda_ext,
)
from .batch_effects import batch_silhouette, plot_silhouette_vs_recall, silhouette_batch
from .errors import HescapeEvalError, HescapeEvalWarning
from .export import export_anndata, read_params
from .expression import ExpressionProbeResult, expression_probe, select_variable_genes
from .io import load_embeddings, save_embeddings
from .protocol import PAPER_PROTOCOL, RetrievalProtocol
from .report import ReportTable, RunRecord, build_table, load_run, load_runs, plot_recall, write_report
from .retrieval import (
    RetrievalReport,
    RetrievalResult,
    chance_recall,
    match_ranks,
    recall_at_k,
    retrieval_metrics,
    retrieval_reports,
)

__version__ = "0.1.0"

__all__ = [
    # metrics
    "RetrievalResult", "chance_recall", "match_ranks", "recall_at_k", "retrieval_metrics",
    # ranks and backends
    "BACKENDS", "RankResult", "available_backends", "compute_ranks", "has_cpp_ext", "has_cuda_ext",
    # errors
    "HescapeEvalError", "HescapeEvalWarning",
    # protocols, both directions in one pass, saved embeddings
    "PAPER_PROTOCOL", "RetrievalProtocol", "RetrievalReport", "retrieval_reports", "compute_ranks_both",
    "load_embeddings", "save_embeddings",
    # expression prediction (HEST protocol), batch effects, AnnData export
    "expression_probe", "ExpressionProbeResult", "select_variable_genes",
    "batch_silhouette", "silhouette_batch", "plot_silhouette_vs_recall", "export_anndata", "read_params",
    # multi-run tables
    "ReportTable", "RunRecord", "build_table", "load_run", "load_runs", "plot_recall", "write_report",
]
