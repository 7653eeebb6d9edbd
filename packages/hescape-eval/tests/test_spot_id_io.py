"""Spot ids travel with saved embeddings and AnnData exports, so a row joins back to its source by id (issue 9)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hescape.eval.errors import HescapeEvalError
from hescape.eval.export import export_anndata
from hescape.eval.io import load_embeddings, save_embeddings


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_embeddings_keep_spot_ids(tmp_path):
    n = 6
    kw = {"image": _unit(n, 4, 0), "gene": _unit(n, 4, 1), "index": np.arange(n), "sample": ["A"] * 3 + ["B"] * 3,
          "donor": ["d1"] * 3 + ["d2"] * 3}
    ids = ["AAACAAGTATCTCCCA-1", "AAACACCAATAACTGC-1", "AAACAGAGCGACTCCT-1", "hex_r0000_c0001", "hex_r0000_c0002",
           "hex_r0001_c0001"]
    emb = load_embeddings(save_embeddings(tmp_path / "with.npz", spot_id=ids, **kw))
    assert emb.spot_id.tolist() == ids and emb.spot_id.dtype.kind == "U"
    assert load_embeddings(save_embeddings(tmp_path / "without.npz", **kw)).spot_id is None  # older files load
    with pytest.raises(HescapeEvalError, match="spot_id"):
        save_embeddings(tmp_path / "bad.npz", spot_id=ids[:-1], **kw)


@pytest.mark.skipif(importlib.util.find_spec("anndata") is None, reason="anndata not installed")
def test_export_has_a_spot_id_column(tmp_path):
    import anndata

    n = 4
    obs = {"sample": ["A", "A", "B", "B"], "donor": ["d1", "d1", "d2", "d2"], "split": ["test"] * n}
    ids = ["AAAC-1", "AAAG-1", "hex_r0000_c0000", "hex_r0000_c0001"]
    out = export_anndata(tmp_path / "r.h5ad", obs=obs, row_ids=np.arange(n), image_embeddings=_unit(n, 3, 0),
                         spot_ids=ids)
    ad = anndata.read_h5ad(out)
    assert ad.obs["spot_id"].tolist() == ids and ad.obs["row"].tolist() == [0, 1, 2, 3]
    assert list(ad.obs_names) == ["A:AAAC-1", "A:AAAG-1", "B:hex_r0000_c0000", "B:hex_r0000_c0001"]
    assert list(zip(ad.obs["sample"], ad.obs["spot_id"], strict=True))[2] == ("B", "hex_r0000_c0000")
    with pytest.raises(HescapeEvalError, match="spot_ids"):
        export_anndata(tmp_path / "x.h5ad", obs=obs, row_ids=np.arange(n), image_embeddings=_unit(n, 3, 0),
                       spot_ids=ids[:2])
