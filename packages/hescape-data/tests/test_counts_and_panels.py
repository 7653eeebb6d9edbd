"""Counts that are counts (fault 4) and panels matched by Ensembl id (fault 3)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from hescape.data import PairedSpotDataset, read_manifest
from hescape.data.cli import main
from hescape.data.errors import InputFormatError, PanelMismatchError
from hescape.data.ingest import build_xenium_dataset, harmonise_genes
from hescape.data.panels import load_panel
from hescape.data.readers.tenx import read_10x_h5, read_10x_mex
from hescape.data.readers.xenium import read_xenium


def _rewrite_h5(path, *, data=None, names=None, ids=None) -> None:
    with h5py.File(path, "r+") as f:
        for key, new in (("matrix/data", data), ("matrix/features/name", names), ("matrix/features/id", ids)):
            if new is not None:
                del f[key]
                f.create_dataset(key, data=new)


def test_log_normalised_h5_is_refused(visium_outs, tmp_path):
    outs = shutil.copytree(visium_outs, tmp_path / "outs")
    h5 = outs / "filtered_feature_bc_matrix.h5"
    raw = read_10x_h5(h5).counts
    with h5py.File(h5, "r") as f:
        logged = np.log1p(f["matrix/data"][:].astype(np.float64)).astype(np.float32)
    _rewrite_h5(h5, data=logged)
    with pytest.raises(InputFormatError, match="non-integer values"):
        read_10x_h5(h5)
    ok = read_10x_h5(h5, allow_non_integer=True)  # the user's explicit opt-out
    np.testing.assert_allclose(ok.counts.data, np.log1p(raw.data), rtol=1e-6)
    # the CLI: one line naming the matrix and how to pass raw counts; exit 2; nothing written
    out = tmp_path / "ds"
    argv = ["build", "visium", str(outs), "--image", "lowres", "--max-upsample", "40", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert not out.exists()
    assert main([*argv, "--allow-non-integer-counts", "--no-qc"]) == 0


def test_scaled_and_negative_mex_is_refused(xenium_bundle_variant, tmp_path):
    import gzip

    import scipy.io
    import scipy.sparse as sp

    mex = shutil.copytree(xenium_bundle_variant / "cell_feature_matrix", tmp_path / "mex")
    with gzip.open(mex / "matrix.mtx.gz", "rb") as fh:
        m = sp.coo_matrix(scipy.io.mmread(fh))
    for values, match in ((m.data / 3.0, "non-integer"), (m.data - 5.0, "negative")):
        with gzip.open(mex / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sp.coo_matrix((values, (m.row, m.col)), shape=m.shape), field="real")
        with pytest.raises(InputFormatError, match=match):
            read_10x_mex(mex)


def test_panel_matched_by_ensembl_id(bundle_copy):
    """Feature names written as Ensembl ids (with version suffixes): the panel still finds every gene by id,
    and the counts are the same as matching by symbol."""
    h5 = bundle_copy / "cell_feature_matrix.h5"
    by_symbol = read_xenium(bundle_copy)
    want, genes, _ = harmonise_genes(by_symbol, panel="human-breast-panel")
    by_symbol.close()
    with h5py.File(h5, "r") as f:
        ids = [v.decode() for v in f["matrix/features/id"][:]]
    versioned = [f"{i}.7" if i.startswith("ENS") else i for i in ids]
    _rewrite_h5(h5, names=np.array(versioned, dtype="S"), ids=np.array(versioned, dtype="S"))
    s = read_xenium(bundle_copy)
    assert s.genes[0].startswith("ENSG") and s.genes[0].endswith(".7")
    got, genes2, gene_ids = harmonise_genes(s, panel="human-breast-panel")
    s.close()
    assert genes2 == genes == list(load_panel("human-breast-panel").genes)
    assert gene_ids == list(load_panel("human-breast-panel").gene_ids)
    np.testing.assert_array_equal(got.toarray(), want.toarray())
    assert got.sum() > 0


def test_zero_fill_is_capped_and_zero_columns_are_recorded(bundle_copy, tmp_path):
    """Renaming 5 % of the genes to unknown symbols and ids: zero-filling them is allowed (and recorded);
    renaming all of them (the old 'every gene absent' trap) is refused even with --missing-genes zero."""
    h5 = bundle_copy / "cell_feature_matrix.h5"
    with h5py.File(h5, "r") as f:
        names = [v.decode() for v in f["matrix/features/name"][:]]
        ids = [v.decode() for v in f["matrix/features/id"][:]]
    panel = load_panel("human-breast-panel")
    lost = set(panel.genes[:14])  # 14 of 280 = 5 %
    new_names = [f"X{n}" if n in lost else n for n in names]
    new_ids = [f"UNKNOWN{k}" if n in lost else i for k, (n, i) in enumerate(zip(names, ids, strict=True))]
    _rewrite_h5(h5, names=np.array(new_names, dtype="S"), ids=np.array(new_ids, dtype="S"))
    s = read_xenium(bundle_copy)
    with pytest.raises(PanelMismatchError, match="14 of them absent"):
        harmonise_genes(s, panel="human-breast-panel")
    counts, genes, _ = harmonise_genes(s, panel="human-breast-panel", missing_genes="zero")
    assert sorted(s.metadata["zero_filled_genes"]) == sorted(lost)
    zero_cols = {genes[j] for j in np.flatnonzero(np.asarray(counts.sum(0)).ravel() == 0)}
    assert lost <= zero_cols
    s.close()
    out = tmp_path / "ds"
    built = build_xenium_dataset(bundle_copy, out, panel="human-breast-panel", missing_genes="zero", progress=False,
                                 qc=False)
    assert sorted(read_manifest(built)["ingest"]["metadata"]["zero_filled_genes"]) == sorted(lost)
    # every gene renamed: refused even when zero-filling is asked for
    _rewrite_h5(h5, names=np.array([f"X{n}" for n in names], dtype="S"),
                ids=np.array([f"UNKNOWN{k}" for k in range(len(ids))], dtype="S"))
    argv = ["build", "xenium", str(bundle_copy), "--out", str(tmp_path / "z"), "--quiet", "--panel",
            "human-breast-panel", "--missing-genes", "zero"]
    assert main(argv) == 2 and not (tmp_path / "z").exists()


def test_duplicate_sum_keeps_every_merged_id(bundle_copy, tmp_path):
    h5 = bundle_copy / "cell_feature_matrix.h5"
    with h5py.File(h5, "r") as f:
        names = [v.decode() for v in f["matrix/features/name"][:]]
        ids = [v.decode() for v in f["matrix/features/id"][:]]
    names[1] = names[0]  # two probes of one gene, two ids
    _rewrite_h5(h5, names=np.array(names, dtype="S"))
    out = build_xenium_dataset(bundle_copy, tmp_path / "ds", duplicate_genes="sum", progress=False, qc=False)
    merged = read_manifest(out)["ingest"]["metadata"]["merged_features"]
    assert merged == {names[0]: [ids[0], ids[1]]}
    assert len(PairedSpotDataset(out).genes) == load_panel("human-breast-panel").n_genes - 1  # two merged into one


def test_reference_sample_gets_its_patient_as_donor(xenium_bundle, tmp_path):
    out = build_xenium_dataset(xenium_bundle, tmp_path / "ds", sample="TENX95", progress=False, qc=False)
    assert read_manifest(out)["samples"][0]["donor"] == "FFPE Human Breast with Pre-designed Panel / patient 2"
    out = build_xenium_dataset(xenium_bundle, tmp_path / "ds2", sample="mine", progress=False, qc=False)
    assert read_manifest(out)["samples"][0]["donor"] == "mine"


def test_shared_symbol_is_not_merged_when_ids_differ(bundle_copy):
    """Two genes that share a symbol in the data (as ~20 pairs do in GRCh38) keep their own counts: the panel takes
    each by its Ensembl id; nothing is zero-filled and nothing summed."""
    h5 = bundle_copy / "cell_feature_matrix.h5"
    s = read_xenium(bundle_copy)
    want, genes, _ = harmonise_genes(s, panel="human-breast-panel")
    s.close()
    with h5py.File(h5, "r") as f:
        names = [v.decode() for v in f["matrix/features/name"][:]]
    a, b = names.index("ACTA2"), names.index("ABCC11")
    names[a] = "ABCC11"  # ACTA2's feature now carries ABCC11's symbol; its id is still ACTA2's
    _rewrite_h5(h5, names=np.array(names, dtype="S"))
    s = read_xenium(bundle_copy)
    with pytest.raises(InputFormatError, match="duplicated"):  # without a panel the names are ambiguous
        harmonise_genes(s)
    got, genes2, _ = harmonise_genes(s, panel="human-breast-panel")
    assert genes2 == genes and "zero_filled_genes" not in s.metadata and "merged_features" not in s.metadata
    np.testing.assert_array_equal(got.toarray(), want.toarray())
    assert got[:, genes.index("ACTA2")].sum() > 0 and b != a
    s.close()
