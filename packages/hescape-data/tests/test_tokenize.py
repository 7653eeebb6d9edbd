"""Encoder inputs (Nicheformer rank tokens, scFoundation values) against plain per-row loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hescape.data import HescapeDataError, load_panel
from hescape.data.tokenize import (
    map_panel_to_vocab,
    nicheformer_tokenize,
    read_vocabulary,
    reindex_to_vocab,
    scfoundation_gather,
    scfoundation_input,
)


def _toy(n_rows=37, n_panel=53, n_vocab=71, seed=0, density=0.3):
    """Counts with many ties and zero rows; a vocabulary holding most (not all) panel genes, shuffled."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, (n_rows, n_panel)) * (rng.random((n_rows, n_panel)) < density)
    counts[3] = 0  # an empty spot
    panel = [f"G{i}" for i in range(n_panel)]
    ids = [f"ENSG{i:011d}" for i in range(n_panel)]
    vocab_ids = [f"ENSG{900000 + i:011d}" for i in range(n_vocab)]
    slots = rng.permutation(n_vocab)[: n_panel - 6]
    for k, slot in enumerate(slots[:-10]):  # matched by Ensembl id, with a version suffix in the vocabulary
        vocab_ids[slot] = ids[k] + ".7"
    vocab_sym = [f"X{i}" for i in range(n_vocab)]
    for k, slot in zip(range(len(slots) - 10, len(slots)), slots[-10:], strict=True):  # matched by symbol only
        vocab_sym[slot] = panel[k].lower()
    return counts.astype(np.float32), panel, ids, vocab_ids, vocab_sym


def _nicheformer_loop(counts, index, mean, L, aux=30, pad=1, prefix=()):
    mean = np.nan_to_num(np.asarray(mean, dtype=np.float64), nan=0.0)
    mean[mean == 0] = 1.0
    out = []
    for row in counts.astype(np.float64):
        tot = row.sum()
        scaled = row / tot * 1e4 if tot > 0 else row * 0
        items = [(scaled[j] / mean[index[j]], index[j]) for j in range(len(row)) if index[j] >= 0 and scaled[j] > 0]
        items.sort(key=lambda t: (-t[0], t[1]))
        toks = list(prefix) + [v + aux for _, v in items][: L - len(prefix)]
        out.append(toks + [pad] * (L - len(toks)))
    return np.array(out)


def test_map_panel_by_id_then_symbol():
    _, panel, ids, vocab_ids, vocab_sym = _toy()
    m = map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym)
    assert m.n_panel == 53 and m.n_mapped == 47 and m.n_vocab == 71
    assert sum(x == "ensembl" for x in m.matched_by) == 37 and sum(x == "symbol" for x in m.matched_by) == 10
    assert m.missing == tuple(panel[47:])
    for k in range(47):
        assert vocab_ids[m.index[k]].startswith(ids[k]) or vocab_sym[m.index[k]] == panel[k].lower()
    assert "47/53" in m.report() and "G52" in m.report()
    with pytest.raises(HescapeDataError, match="expected at least 95.0 %"):
        map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym, min_coverage=0.95)


def test_map_real_panel_single_list_vocab():
    panel = load_panel("human-breast-panel")
    vocab = ["TP53", panel.gene_ids[5], panel.genes[0].lower(), "ENSG99999999999"]
    m = map_panel_to_vocab(panel.genes, vocab, panel_gene_ids=panel.gene_ids)
    assert m.index[5] == 1 and m.matched_by[5] == "ensembl"
    assert m.index[0] == 2 and m.matched_by[0] == "symbol"
    assert m.n_mapped == 2 + ("TP53" in panel.genes)


def test_read_vocabulary(tmp_path):
    (tmp_path / "v.tsv").write_text("index\tgene_name\n0\tA1BG\n1\tTP53\n")
    assert read_vocabulary(tmp_path / "v.tsv") == (None, ["A1BG", "TP53"])
    (tmp_path / "v.txt").write_text("ENSG00000121270\nENSG00000107796\n")
    assert read_vocabulary(tmp_path / "v.txt") == (["ENSG00000121270", "ENSG00000107796"], None)
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(HescapeDataError, match="expected a column among"):
        read_vocabulary(tmp_path / "bad.csv")


@pytest.mark.parametrize("L,context", [(11, None), (1500, None), (9, ("human", "xenium", "spatial"))])
def test_nicheformer_matches_loop(L, context):
    counts, panel, ids, vocab_ids, vocab_sym = _toy()
    rng = np.random.default_rng(1)
    mean = rng.uniform(0.1, 5, len(vocab_ids))
    mean[rng.random(len(mean)) < 0.2] = np.nan
    mean[rng.random(len(mean)) < 0.1] = 0.0
    m = map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym)
    got = nicheformer_tokenize(counts, m, mean, context_length=L, context=context, chunk_rows=5)
    prefix = (5, 9, 4) if context else ()
    np.testing.assert_array_equal(got, _nicheformer_loop(counts, m.index, mean, L, prefix=prefix))
    assert (got[3, len(prefix):] == 1).all()  # empty spot -> all padding
    # same result from sparse, torch and single-row inputs
    np.testing.assert_array_equal(nicheformer_tokenize(sp.csr_matrix(counts), m, mean, context_length=L,
                                                       context=context), got)
    np.testing.assert_array_equal(nicheformer_tokenize(torch.from_numpy(counts[7]), m, mean, context_length=L,
                                                       context=context), got[7:8])


def test_nicheformer_ties_by_vocab_index_and_errors():
    # two genes with equal values: the smaller vocabulary index comes first whatever the panel order
    m = map_panel_to_vocab(["A", "B", "C"], ["C", "B", "A"])
    toks = nicheformer_tokenize(np.array([[2.0, 2.0, 1.0]]), m, np.ones(3), context_length=4)
    np.testing.assert_array_equal(toks, [[31, 32, 30, 1]])
    with pytest.raises(HescapeDataError, match="technology mean has 2 entries"):
        nicheformer_tokenize(np.ones((1, 3)), m, np.ones(2))
    with pytest.raises(HescapeDataError, match="raw counts"):
        nicheformer_tokenize(-np.ones((1, 3)), m, np.ones(3))
    with pytest.raises(HescapeDataError, match="count matrix has 4 genes"):
        nicheformer_tokenize(np.ones((1, 4)), m, np.ones(3))
    with pytest.raises(HescapeDataError, match="context must be"):
        nicheformer_tokenize(np.ones((1, 3)), m, np.ones(3), context=("human", "visium-hd", "spatial"))


def _scf_loop(counts, index, n_vocab, mode):
    out = []
    for row in counts.astype(np.float64):
        v = np.zeros(n_vocab)
        for j, i in enumerate(index):
            if i >= 0:
                v[i] += row[j]
        tot = row.sum()
        v = np.log1p(v / tot * 1e4) if tot > 0 else v
        kind, n = mode[0], float(mode[1:])
        t = n if kind == "t" else math.log10(tot) + n if kind == "a" else math.log10(tot * n)
        out.append(list(v) + [t, math.log10(tot)])
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("mode", ["t4", "a5", "f1.5"])
def test_scfoundation_input_matches_loop(mode):
    counts, panel, ids, vocab_ids, vocab_sym = _toy(n_rows=29)
    counts[3, 0] = 1.0  # no empty rows here (log10(0) is -inf)
    m = map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym)
    got = scfoundation_input(counts, m, target_resolution=mode)
    assert got.shape == (29, 73)
    np.testing.assert_allclose(got, _scf_loop(counts, m.index, 71, mode), rtol=1e-6, atol=1e-6)
    with pytest.raises(HescapeDataError, match="target resolution"):
        scfoundation_input(counts, m, target_resolution="x4")


def test_scfoundation_gather_matches_loop():
    rng = np.random.default_rng(3)
    x = (rng.random((17, 23)) < 0.3) * rng.uniform(0.5, 3, (17, 23))
    x[5] = 0
    vals, pos, pad = scfoundation_gather(x.astype(np.float32))
    width = max(int((r > 0).sum()) for r in x)
    assert vals.shape == pos.shape == pad.shape == (17, width)
    for r in range(17):
        nz = [j for j in range(23) if x[r, j] > 0]
        np.testing.assert_array_equal(pos[r], nz + [103] * (width - len(nz)))
        np.testing.assert_allclose(vals[r], [x[r, j] for j in nz] + [103.0] * (width - len(nz)), rtol=1e-6)
        np.testing.assert_array_equal(pad[r], [False] * len(nz) + [True] * (width - len(nz)))


def test_reindex_sums_duplicate_targets():
    m = map_panel_to_vocab(["A", "a2", "B"], vocab_symbols=["B", "A"])
    m2 = map_panel_to_vocab(["A", "B", "C"], vocab_ids=["ENSG1", "ENSG1", "ENSG2"],
                            panel_gene_ids=["ENSG1", "ENSG1.2", "ENSG2"])
    np.testing.assert_array_equal(reindex_to_vocab(np.array([[1.0, 5.0, 2.0]]), m), [[2.0, 1.0]])
    np.testing.assert_array_equal(reindex_to_vocab(np.array([[1.0, 5.0, 2.0]]), m2), [[6.0, 0.0, 2.0]])
