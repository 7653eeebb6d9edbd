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
over seeds into the paper's Table 2 layout (``hescape-eval report``). :mod:`hescape.eval.wsi` tiles whole slides
and :mod:`hescape.eval.mil` predicts slide-level mutations (paper Tables 3–5; ``[wsi]``).
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
from .mil import (
    MILFoldResult,
    MILResult,
    TransformerMIL,
    check_folds,
    cross_validate_mil,
    load_bags_csv,
    mil_from_csv,
    site_folds,
)
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
from .wsi import (
    TARGET_UM_PER_PX,
    SlideInfo,
    SlideTiles,
    choose_level,
    extract_features,
    otsu_threshold,
    plot_tiles,
    read_slide_info,
    slide_features,
    tile_slide,
    tissue_mask,
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
    # slide-level mutation prediction: tiling, tile features, transformer MIL with site-preserving folds
    "tile_slide", "SlideTiles", "SlideInfo", "read_slide_info", "choose_level", "otsu_threshold", "tissue_mask",
    "plot_tiles", "slide_features", "extract_features", "TARGET_UM_PER_PX",
    "TransformerMIL", "cross_validate_mil", "mil_from_csv", "load_bags_csv", "site_folds", "check_folds",
    "MILResult", "MILFoldResult",
]
