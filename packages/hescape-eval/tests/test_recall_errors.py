"""Input validation of the recall API: HescapeEvalError naming what was expected, found, and the fix."""

from __future__ import annotations

import warnings

import hescape.eval as E
import numpy as np
import pytest
import torch
from hescape.eval import _backend

X = torch.randn(20, 8)


def test_k_larger_than_gallery(refuses):
    refuses(lambda: E.retrieval_metrics(X, X, ks=(1, 21)), "Recall@21", "20")
    refuses(lambda: E.recall_at_k(torch.zeros(5, dtype=torch.int64), [6]), "Recall@6")
    refuses(lambda: E.retrieval_metrics(X, X, ks=(0,)), "positive integer")


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (8,)])
def test_empty_or_bad_rank(shape, refuses):
    refuses(lambda: E.match_ranks(torch.zeros(shape), torch.zeros(shape)), "non-empty")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad, refuses):
    y = X.clone()
    y[3, 2] = bad
    refuses(lambda: E.match_ranks(X, y), "NaN or inf")


def test_mismatched_shapes(refuses):
    refuses(lambda: E.match_ranks(X, torch.randn(20, 9)), "same embedding width")
    refuses(lambda: E.match_ranks(X, torch.randn(21, 8)), "paired rows")
    refuses(lambda: E.match_ranks(X, X, positives=np.zeros(19, dtype=int)), "one label per row")
    refuses(lambda: E.match_ranks(X[:5], X, positives=np.zeros(20, dtype=int)), "pair")


def test_wrong_dtypes(refuses):
    refuses(lambda: E.match_ranks(X.long(), X.long()), "float32")
    refuses(lambda: E.match_ranks(np.ones((4, 2), dtype=np.int32), np.ones((4, 2), dtype=np.int32)), "floating")
    refuses(lambda: E.match_ranks(X, X, positives=np.linspace(0, 1, 20)), "integer or string labels")
    refuses(lambda: E.match_ranks([[1.0]], [[1.0]]), "torch.Tensor or numpy array")


def test_query_without_positive(refuses):
    refuses(lambda: E.match_ranks(X[:3], X, positives=(np.array([0, 1, 7]), np.zeros(20, dtype=int))),
            "query 1")


def test_bad_backend_choices(refuses):
    refuses(lambda: E.match_ranks(X, X, backend="gpu"), "'auto'")
    if not (_backend.has_cuda_ext() and torch.cuda.is_available()):
        refuses(lambda: E.match_ranks(X, X, backend="cuda"), "HESCAPE_CUDA=ON")
    if _backend.has_cpp_ext():
        refuses(lambda: E.match_ranks(X.double(), X.double(), backend="cpp"), "float64")


def test_score_overflow_is_refused(refuses):
    big = torch.full((4, 4), 1e20)
    refuses(lambda: E.match_ranks(big, big), "normalise")


def test_missing_extension_falls_back_to_torch_and_warns_once(monkeypatch, refuses):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_IMPORT_ERROR", "simulated")
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    with pytest.warns(E.HescapeEvalWarning, match="torch fallback"):
        assert E.compute_ranks(X, X).backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert E.compute_ranks(X, X).backend == "torch"
    assert E.available_backends() == ["torch"]
    refuses(lambda: E.match_ranks(X, X, backend="cpp"), "simulated")


def test_extension_rejects_bad_direct_calls():
    if not _backend.has_cpp_ext():
        pytest.skip("extension not built")
    C = _backend._C
    a = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError):
        C.rank_cpu(a.astype(np.float64), a.astype(np.float64))
    with pytest.raises(ValueError, match="differ in d"):
        C.rank_cpu(a, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="nq == ng"):
        C.rank_cpu(a, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="isa"):
        C.rank_cpu(a, a, isa="sse9")
