"""hescape.eval: honest evaluation of image–gene embeddings.

Exact Recall@k over the full gallery, mean/median rank, with chance levels.
"""

from .errors import HescapeEvalError
from .retrieval import RetrievalResult, chance_recall, match_ranks, recall_at_k, retrieval_metrics

__version__ = "0.1.0"

__all__ = ["HescapeEvalError", "RetrievalResult", "chance_recall", "match_ranks", "recall_at_k", "retrieval_metrics"]
