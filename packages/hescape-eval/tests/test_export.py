"""AnnData export (hescape.eval.export): write, read back with anndata, compare with what was passed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse
from hescape.eval.errors import HescapeEvalError
from hescape.eval.export import GEX_KEY, IMG_KEY, SCHEMA, SPATIAL_KEY, export_anndata, read_params

needs_anndata = pytest.mark.skipif(importlib.util.find_spec("anndata") is None,
                                   reason="anndata not installed (pip install 'hescape-eval[export]')")


def _run(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "row_ids": np.arange(100, 100 + n),
        "image_embeddings": rng.normal(size=(n, 8)).astype(np.float32),
        "gene_embeddings": rng.normal(size=(n, 8)).astype(np.float32),
        "coords_um": rng.uniform(0, 5000, size=(n, 2)),
        "obs": {"sample": np.repeat(["TENX1", "TENX2", "NCBI9"], n // 3),
                "donor": np.repeat(["d1", "d1", "d2"], n // 3),
                "split": np.repeat(["train", "train", "test"], n // 3), "n_cells": np.arange(n)},
        "params": {"model": "gigapath-drvi", "temperature": 0.07, "ks": [1, 5, 10], "nested": {"a": None},
                   "frozen": True},
    }


@needs_anndata
def test_round_trip(tmp_path):
    import anndata

    run = _run()
    counts = scipy.sparse.random(12, 5, density=0.4, random_state=1, format="csr") * 10
    out = export_anndata(tmp_path / "run.h5ad", counts=counts, gene_names=list("ABCDE"), **run)
    ad = anndata.read_h5ad(out)
    assert ad.n_obs == 12 and list(ad.obs_names) == [str(i) for i in range(100, 112)]
    np.testing.assert_array_equal(ad.obs["row"].to_numpy(), run["row_ids"])
    np.testing.assert_array_equal(ad.obsm[IMG_KEY], run["image_embeddings"])
    np.testing.assert_array_equal(ad.obsm[GEX_KEY], run["gene_embeddings"])
    np.testing.assert_array_equal(ad.obsm[SPATIAL_KEY], run["coords_um"])
    assert ad.obsm[SPATIAL_KEY].dtype == np.float64 and ad.obsm[IMG_KEY].dtype == np.float32
    for k in ("sample", "donor", "split"):
        assert list(ad.obs[k].astype(str)) == list(run["obs"][k])
        assert ad.obs[k].dtype == "category"
    np.testing.assert_array_equal(ad.obs["n_cells"].to_numpy(), np.arange(12))
    assert list(ad.var_names) == list("ABCDE")
    np.testing.assert_allclose(ad.X.toarray(), counts.toarray().astype(np.float32))
    meta = ad.uns["hescape"]
    assert meta["schema"] == SCHEMA and meta["spatial_unit"] == "um"
    assert read_params(ad) == run["params"]  # exact, nested and None included
    assert meta["params"]["temperature"] == 0.07 and meta["params"]["model"] == "gigapath-drvi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5ad"]  # no temporary file left


@needs_anndata
def test_overwrite_and_minimal(tmp_path):
    import anndata

    run = _run()
    target = tmp_path / "run.h5ad"
    export_anndata(target, row_ids=run["row_ids"], obs=run["obs"], gene_embeddings=run["gene_embeddings"])
    with pytest.raises(HescapeEvalError, match="overwrite=True"):
        export_anndata(target, row_ids=run["row_ids"], obs=run["obs"], gene_embeddings=run["gene_embeddings"])
    export_anndata(target, row_ids=run["row_ids"], obs=run["obs"], image_embeddings=run["image_embeddings"],
                   overwrite=True)
    ad = anndata.read_h5ad(target)
    assert IMG_KEY in ad.obsm and GEX_KEY not in ad.obsm and ad.X is None and read_params(ad) == {}


def test_refusals(tmp_path):
    run = _run()
    base = {k: run[k] for k in ("row_ids", "obs", "image_embeddings")}

    def bad(**kw):
        return lambda: export_anndata(tmp_path / "x.h5ad", **{**base, **kw})

    cases = [
        (bad(image_embeddings=run["image_embeddings"][:-1]), "12 rows"),
        (bad(coords_um=np.zeros((12, 3))), "(N, 2)"),
        (bad(row_ids=np.zeros(12, dtype=int)), "unique"),
        (bad(obs={"sample": run["obs"]["sample"], "split": run["obs"]["split"]}), "missing ['donor']"),
        (bad(obs={**run["obs"], "split": ["train"] * 5}), "12 values"),
        (bad(params={"path": tmp_path}), "JSON"),
        (bad(image_embeddings=np.full((12, 4), np.nan)), "finite"),
        (bad(image_embeddings=None), "neither"),
        (lambda: export_anndata(tmp_path / "nope" / "x.h5ad", **base), "existing folder"),
    ]
    for fn, word in cases:
        with pytest.raises(HescapeEvalError) as info:
            fn()
        assert word in str(info.value) and "fix" in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []
