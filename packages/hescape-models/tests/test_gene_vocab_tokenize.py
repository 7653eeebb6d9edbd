"""Vocabulary mapping and the Nicheformer / scFoundation tokenisers (moved here from hescape-data).

Truth: hand-computed examples, and per-row loop references written from the authors' code
(theislab/nicheformer ``data/dataset.py``; biomap-research/scFoundation ``model/get_embedding.py`` and ``load.py``
``gatherData``), not from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hescape.models.errors import HescapeModelError
from hescape.models.gene.nicheformer import nicheformer_tokenize, technology_mean_tensor
from hescape.models.gene.scfoundation import scfoundation_tokenize
from hescape.models.gene.vocab import compact_counts, load_vocabulary, map_panel_to_vocab, read_vocabulary

CTX = [5, 9, 4]  # human, Xenium, spatial


def _toy(n_rows=37, n_panel=53, n_vocab=71, seed=0, density=0.3):
    """Counts with many ties and an empty row; a shuffled vocabulary holding most (not all) panel genes, some by
    Ensembl id (with a version suffix), some by symbol only."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, (n_rows, n_panel)) * (rng.random((n_rows, n_panel)) < density)
    counts[3] = 0
    panel = [f"G{i}" for i in range(n_panel)]
    ids = [f"ENSG{i:011d}" for i in range(n_panel)]
    vocab_ids = [f"ENSG{900000 + i:011d}" for i in range(n_vocab)]
    slots = rng.permutation(n_vocab)[: n_panel - 6]
    for k, slot in enumerate(slots[:-10]):
        vocab_ids[slot] = ids[k] + ".7"
    vocab_sym = [f"X{i}" for i in range(n_vocab)]
    for k, slot in zip(range(len(slots) - 10, len(slots)), slots[-10:], strict=True):
        vocab_sym[slot] = panel[k].lower()
    return counts.astype(np.float32), panel, ids, vocab_ids, vocab_sym


def _dense_vocab_row(row, index, n_vocab):
    v = np.zeros(n_vocab)
    for j, i in enumerate(index):
        if i >= 0:
            v[i] += row[j]
    return v


def _nicheformer_loop(counts, index, n_vocab, mean, L, prefix=(), aux=30, pad=1):
    """The authors' pipeline per cell: data restricted to the vocabulary, sf_normalize (10,000 over the vocabulary
    genes), division by the technology mean (NaN -> 0 -> 1), non-zero genes by decreasing value (ties: index)."""
    mean = np.nan_to_num(np.asarray(mean, dtype=np.float64), nan=0.0)
    mean[mean == 0] = 1.0
    out = []
    for row in counts.astype(np.float64):
        v = _dense_vocab_row(row, index, n_vocab)
        tot = v.sum()
        v = v * (1e4 / (tot if tot > 0 else 1.0)) / mean
        items = sorted((-v[i], i) for i in np.flatnonzero(v))
        toks = list(prefix) + [i + aux for _, i in items][: L - len(prefix)]
        out.append(toks + [pad] * (L - len(toks)))
    return np.array(out)


# ---------------------------------------------------------------- vocabulary


def test_map_panel_by_id_then_symbol():
    _, panel, ids, vocab_ids, vocab_sym = _toy()
    m = map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym)
    assert m.n_panel == 53 and m.n_mapped == 47 and m.n_vocab == 71
    assert sum(x == "ensembl" for x in m.matched_by) == 37 and sum(x == "symbol" for x in m.matched_by) == 10
    assert m.missing == tuple(panel[47:])
    for k in range(47):
        assert vocab_ids[m.index[k]].startswith(ids[k]) or vocab_sym[m.index[k]] == panel[k].lower()
    assert "47/53" in m.report() and "G52" in m.report()
    with pytest.raises(HescapeModelError, match="expected at least 95.0 %"):
        map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym, min_coverage=0.95)


def test_map_single_list_vocab_ids_beat_symbols():
    panel, ids = ["TP53", "EGFR", "KRT5"], ["ENSG00000141510", "ENSG00000146648.18", "ENSG00000186081"]
    # EGFR by id (version ignored) even though its symbol appears earlier; KRT5 by symbol (case-insensitive)
    m = map_panel_to_vocab(panel, ["egfr", "ENSG00000146648", "krt5", "ENSG99999999999"], panel_gene_ids=ids)
    assert m.index.tolist() == [-1, 1, 2] and m.matched_by == ("", "ensembl", "symbol")


def test_compact_sums_genes_on_one_entry():
    m = map_panel_to_vocab(["A", "B", "C"], vocab_ids=["ENSG1", "ENSG1", "ENSG2"],
                           panel_gene_ids=["ENSG1", "ENSG1.2", "ENSG2"])
    cols, slots, vocab_ids = (torch.from_numpy(a) for a in m.compact())
    assert vocab_ids.tolist() == [0, 2]
    x = compact_counts(torch.tensor([[1.0, 5.0, 2.0]]), cols, slots, len(vocab_ids))
    assert x.tolist() == [[6.0, 2.0]]


def test_read_vocabulary_text_and_tsv(tmp_path):
    (tmp_path / "v.tsv").write_text("gene_name\tindex\nA1BG\t0\nTP53\t1\n")  # scFoundation's layout
    assert read_vocabulary(tmp_path / "v.tsv") == (None, ["A1BG", "TP53"])
    (tmp_path / "v.txt").write_text("ENSG00000121270\nENSG00000107796\n")
    assert read_vocabulary(tmp_path / "v.txt") == (["ENSG00000121270", "ENSG00000107796"], None)
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(HescapeModelError, match="expected a column among"):
        read_vocabulary(tmp_path / "bad.csv")
    with pytest.raises(HescapeModelError, match="needs its vocabulary"):
        load_vocabulary(None, name="x", where="")


def test_read_vocabulary_h5ad(tmp_path):
    h5py = pytest.importorskip("h5py")
    genes = ["ENSG00000000003", "ENSG00000000005", "ENSMUSG00000115965"]  # model.h5ad's layout: var index only
    with h5py.File(tmp_path / "model.h5ad", "w") as f:
        var = f.create_group("var")
        var.attrs.update({"_index": "_index", "encoding-type": "dataframe", "encoding-version": "0.2.0"})
        var.create_dataset("_index", data=np.array(genes, dtype=object), dtype=h5py.string_dtype())
    assert read_vocabulary(tmp_path / "model.h5ad") == (genes, None)
    ids, syms, label = load_vocabulary(str(tmp_path / "model.h5ad"), name="x", where="")
    assert ids == genes and syms is None and label == "model.h5ad"


# ---------------------------------------------------------------- Nicheformer


def test_nicheformer_hand_computed():
    # vocabulary C, B, A, D (indices 0..3); panel A, B, C, X (X outside: its counts do not enter the total)
    m = map_panel_to_vocab(["A", "B", "C", "X"], ["C", "B", "A", "D"])
    counts = np.array([[2.0, 2.0, 1.0, 5.0], [0, 0, 0, 7.0], [0, 0, 0, 0]])
    got = nicheformer_tokenize(counts, m, np.ones(4), context_length=8)
    # row 0: A = B = 4000 (tie: B, index 1, first), C = 2000 -> tokens 31, 32, 30; rows 1-2: nothing in the vocabulary
    assert got.dtype == torch.long and got.tolist() == [CTX + [31, 32, 30, 1, 1], CTX + [1] * 5, CTX + [1] * 5]
    # technology mean: A / 4 = 1000 drops to the end
    assert nicheformer_tokenize(counts[:1], m, [1, 1, 4, 1], context_length=8).tolist() == [CTX + [31, 30, 32, 1, 1]]
    # NaN -> 0 -> 1 and 0 -> 1: C = 2000 / 1 ties A = 4000 / 2; C (index 0) first
    assert nicheformer_tokenize(counts[:1], m, [np.nan, 0, 2, 1], context_length=8).tolist() == [CTX + [31, 30, 32,
                                                                                                    1, 1]]
    # cut to the context length; other context names; genes only
    assert nicheformer_tokenize(counts[:1], m, None, context_length=5).tolist() == [CTX + [31, 32]]
    assert nicheformer_tokenize(counts[:1], m, None, context=("mouse", "CosMx", "dissociated"),
                                context_length=6).tolist() == [[6, 8, 3, 31, 32, 30]]
    assert nicheformer_tokenize(counts[:1], m, None, context=None, context_length=4).tolist() == [[31, 32, 30, 1]]


def test_nicheformer_rounded_means_as_the_notebooks():
    m = map_panel_to_vocab(["A", "B", "C"], ["C", "B", "A"])
    counts = np.array([[3.0, 3.0, 0.0]])
    mean = [1.0, 2.4, 2.3]  # B / 2.4 < A / 2.3; rounded both are 2: a tie, B (index 1) first
    assert nicheformer_tokenize(counts, m, mean, context_length=5).tolist() == [CTX + [32, 31]]
    assert nicheformer_tokenize(counts, m, mean, context_length=5,
                                round_technology_mean=True).tolist() == [CTX + [31, 32]]
    assert technology_mean_tensor([0.4, 0.5, 2.5, np.nan], 4, round_half_up=True).tolist() == [1.0, 1.0, 3.0, 1.0]


@pytest.mark.parametrize("L,context", [(11, ("human", "xenium", "spatial")), (1500, ("human", "xenium", "spatial")),
                                       (9, None)])
def test_nicheformer_matches_loop(L, context):
    counts, panel, ids, vocab_ids, vocab_sym = _toy()
    rng = np.random.default_rng(1)
    mean = rng.uniform(0.1, 5, len(vocab_ids))
    mean[rng.random(len(mean)) < 0.2] = np.nan
    mean[rng.random(len(mean)) < 0.1] = 0.0
    mean[:20] = 1.0  # many genes share a mean (as the ~18k NaN genes of the Xenium file do): ties
    m = map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym)
    got = nicheformer_tokenize(counts, m, mean, context_length=L, context=context)
    prefix = CTX if context else []
    np.testing.assert_array_equal(got.numpy(), _nicheformer_loop(counts, m.index, 71, mean, L, prefix=prefix))
    assert (got[3, len(prefix):] == 1).all()
    one = nicheformer_tokenize(torch.from_numpy(counts[7]), m, mean, context_length=L, context=context)
    np.testing.assert_array_equal(one.numpy(), got[7:8].numpy())


def test_nicheformer_refusals():
    m = map_panel_to_vocab(["A", "B", "C"], ["C", "B", "A"])
    with pytest.raises(HescapeModelError, match="technology mean has 2 entries"):
        nicheformer_tokenize(np.ones((1, 3)), m, np.ones(2))
    with pytest.raises(HescapeModelError, match="raw counts"):
        nicheformer_tokenize(-np.ones((1, 3)), m, np.ones(3))
    with pytest.raises(HescapeModelError, match="count matrix has 4 genes"):
        nicheformer_tokenize(np.ones((1, 4)), m, np.ones(3))
    with pytest.raises(HescapeModelError, match="assay 'visium-hd' is unknown"):
        nicheformer_tokenize(np.ones((1, 3)), m, np.ones(3), context=("human", "visium-hd", "spatial"))


# ---------------------------------------------------------------- scFoundation


def _scf_loop(counts, index, n_vocab, mode):
    """get_embedding.py per cell (singlecell, pre_normalized F), then gatherData: values > 0 in index order."""
    rows = []
    for row in counts.astype(np.float64):
        v = _dense_vocab_row(row, index, n_vocab)
        tot = v.sum()
        x = list(np.log1p(v / tot * 1e4))
        kind, n = mode[0], float(mode[1:])
        t = n if kind == "t" else math.log10(tot) + n if kind == "a" else math.log10(tot * n)
        x += [t, math.log10(tot)]
        keep = [i for i, val in enumerate(x) if val > 0]
        rows.append(([x[i] for i in keep], keep))
    return rows


@pytest.mark.parametrize("mode", ["t4", "a5", "f1.5"])
def test_scfoundation_matches_loop(mode):
    counts, panel, ids, vocab_ids, vocab_sym = _toy(n_rows=29)
    m = map_panel_to_vocab(panel, panel_gene_ids=ids, vocab_ids=vocab_ids, vocab_symbols=vocab_sym)
    counts[:, np.flatnonzero(m.index >= 0)[:2]] += 1  # every row >= 2 counts in the vocabulary (S > 0, as the script)
    got = scfoundation_tokenize(counts, m, target_resolution=mode)
    ref = _scf_loop(counts, m.index, 71, mode)
    width = max(len(k) for _, k in ref)
    assert got["values"].shape == got["positions"].shape == got["padding"].shape == (29, width)
    assert got["values"].dtype == torch.float32 and got["positions"].dtype == torch.long
    for r, (vals, keep) in enumerate(ref):
        n = len(keep)
        np.testing.assert_allclose(got["values"][r, :n].numpy(), vals, rtol=1e-6)
        assert got["positions"][r, :n].tolist() == keep
        assert (got["values"][r, n:] == 103).all() and (got["positions"][r, n:] == 73).all()
        assert got["padding"][r].tolist() == [False] * n + [True] * (width - n)
    with pytest.raises(HescapeModelError, match="target resolution"):
        scfoundation_tokenize(counts, m, target_resolution="x4")


def test_scfoundation_hand_computed():
    # vocabulary G0..G4; panel G3, G1, X (X outside: its counts do not enter the total)
    m = map_panel_to_vocab(["G3", "G1", "X"], [f"G{i}" for i in range(5)])
    counts = np.array([[3.0, 1.0, 6.0], [0, 2, 0], [0, 0, 9], [1, 0, 0]])
    got = scfoundation_tokenize(counts, m)
    v = got["values"]
    # row 0: total 4 -> G1 log1p(2500), G3 log1p(7500), T 4, S log10(4)
    torch.testing.assert_close(v[0], torch.tensor([math.log1p(2500), math.log1p(7500), 4.0, math.log10(4)]))
    assert got["positions"][0].tolist() == [1, 3, 5, 6]
    torch.testing.assert_close(v[1], torch.tensor([math.log1p(1e4), 4.0, math.log10(2), 103.0]))
    assert got["positions"][1].tolist() == [1, 5, 6, 7] and got["padding"][1].tolist() == [False] * 3 + [True]
    # no count in the vocabulary: T and S (= log10(1) = 0, kept) only
    torch.testing.assert_close(v[2], torch.tensor([4.0, 0.0, 103.0, 103.0]))
    assert got["positions"][2].tolist() == [5, 6, 7, 7]
    # one count: S = 0 is kept (the script would drop it and misread a gene as S)
    torch.testing.assert_close(v[3], torch.tensor([math.log1p(1e4), 4.0, 0.0, 103.0]))
    assert got["positions"][3].tolist() == [3, 5, 6, 7]
    a5 = scfoundation_tokenize(counts[:1], m, target_resolution="a5")["values"][0]
    f2 = scfoundation_tokenize(counts[:1], m, target_resolution="f2")["values"][0]
    assert a5[2].item() == pytest.approx(math.log10(4) + 5) and f2[2].item() == pytest.approx(math.log10(8))
