"""Transformer MIL and site-preserving cross-validation (hescape.eval.mil).

A planted signal must be learned (AUROC > 0.9) and shuffled labels must stay in the chance band (Mann–Whitney
null s.d.); architecture sizes are counted by hand from the paper's numbers; refusals for bad inputs.
Tests use a smaller transformer (4 heads of 16) and lr 3e-4 so the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hescape.eval.errors import HescapeEvalError
from hescape.eval.mil import TransformerMIL, check_folds, cross_validate_mil, load_bags_csv, site_folds

SMALL = dict(heads=4, dim_head=16, mlp_dim=64)
FAST = dict(epochs=10, lr=3e-4, model_kwargs=SMALL, seed=0)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_paper_architecture_size():
    d = 32
    m = TransformerMIL(d)
    dim = 8 * 64  # 8 heads of 64 = latent 512
    block = 2 * 2 * dim + dim * 3 * dim + (dim * dim + dim) + 2 * (dim * dim + dim)  # 2 LN, qkv, out, FF 512->512->512
    expect = (d * dim + dim) + dim + 2 * block + 2 * dim + (2 * dim + dim + 1)  # proj, CLS, blocks, norm, head
    assert sum(p.numel() for p in m.parameters()) == expect
    assert m(torch.randn(7, d)).shape == (1, 1) and m(torch.randn(2, 7, d)).shape == (2, 1)
    mean = TransformerMIL(d, pool="mean")
    assert not hasattr(mean, "cls") and mean(torch.randn(5, d)).shape == (1, 1)


def test_planted_signal_is_learned(mil_bags):
    bags, y, sites = mil_bags()
    r = cross_validate_mil(bags, y, sites, verbose=True, **FAST)
    print(r.summary())
    assert r.auroc[0] > 0.9
    assert len(r.folds) == 5 and sum(f.n_test for f in r.folds) == 40
    # rotation: each fold tested once, validated on the previous one
    assert sorted(f.test_fold for f in r.folds) == [0, 1, 2, 3, 4]
    assert all(f.val_fold == (f.test_fold - 1) % 5 for f in r.folds)


def test_shuffled_labels_stay_at_chance(mil_bags):
    bags, y, sites = mil_bags()
    ys = np.random.default_rng(3).permutation(y)
    r = cross_validate_mil(bags, ys, sites, **FAST)
    band = 3 * r.chance_auroc_sd / math.sqrt(len(r.folds))  # 3 null s.d. of a mean over 5 folds
    print(r.summary(), f"band 0.5 ± {band:.3f}")
    assert abs(r.auroc[0] - 0.5) < band and r.auroc[0] < 0.8


def test_validation_schedule_and_determinism(mil_bags):
    bags, y, sites = mil_bags(n=30)
    sites = np.repeat(np.arange(5), 6)
    kw = dict(epochs=2, lr=3e-4, model_kwargs=SMALL, seed=1, val_every=7)
    a = cross_validate_mil(bags, y, sites, **kw)
    b = cross_validate_mil(bags, y, sites, **kw)
    for fa, fb in zip(a.folds, b.folds, strict=True):
        np.testing.assert_array_equal(fa.probs, fb.probs)
        n_train = 30 - 6 - 6
        assert fa.best_step % 7 == 0 or fa.best_step % n_train == 0  # every 7 iterations or at an epoch end


def test_site_folds_keep_sites_together(mil_bags):
    _, y, sites = mil_bags()
    f = site_folds(y, sites, 5, seed=0)
    for s in np.unique(sites):
        assert len(np.unique(f[sites == s])) == 1
    assert sorted(np.unique(f)) == [0, 1, 2, 3, 4]


def test_refusals(tmp_path, mil_bags):
    bags, y, sites = mil_bags()
    # a CSV missing a column
    p = tmp_path / "slides.csv"
    p.write_text("path,patient,label\na.npz,p1,1\n")
    with pytest.raises(HescapeEvalError, match=r"missing \['site'\]"):
        load_bags_csv(p)
    # one class in a fold
    folds = np.repeat(np.arange(5), 8)
    y1 = y.copy()
    y1[folds == 2] = 0
    with pytest.raises(HescapeEvalError, match="fold 2: expected both classes"):
        cross_validate_mil(bags, y1, sites, folds=folds, **FAST)
    # a site spanning two folds
    f2 = site_folds(y, sites, 5, seed=0)
    f2[np.flatnonzero(sites == 0)[0]] = (f2[sites == 0][0] + 1) % 5
    with pytest.raises(HescapeEvalError, match="site 0: expected all slides of a site in one fold"):
        check_folds(f2, y, sites, np.arange(40))
    # a patient in two sites
    patients = np.arange(40)
    patients[4] = 0  # slide 4 is in site 1, slide 0 in site 0
    with pytest.raises(HescapeEvalError, match="patient 0"):
        check_folds(f2 * 0, y, sites, patients)
    with pytest.raises(HescapeEvalError, match="at least 5 sites"):
        site_folds(y, np.repeat([0, 1], 20), 5)


def test_csv_roundtrip(tmp_path, mil_bags):
    bags, y, sites = mil_bags(n=10)
    rows = ["path,patient,site,label"]
    for i, b in enumerate(bags):
        np.savez(tmp_path / f"s{i}.npz", features=b)
        rows.append(f"s{i}.npz,P{i},TSS{sites[i]},{y[i]}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    b2, y2, s2, p2 = load_bags_csv(tmp_path / "t.csv")
    assert all(np.array_equal(a, b) for a, b in zip(bags, b2, strict=True))
    assert y2.tolist() == y.tolist() and s2[0] == "TSS0" and p2[3] == "P3"


def test_too_few_slides_of_a_class_for_the_folds_is_one_message():
    """6 sites, 3 positive and 3 negative slides cannot fill 5 stratified folds: one message, not sklearn's."""
    with pytest.raises(HescapeEvalError, match="at least 5 slides of one class"):
        site_folds([1, 1, 1, 0, 0, 0], ["a", "b", "c", "d", "e", "f"], n_folds=5)


def test_one_class_labels_are_one_message(mil_bags):
    """All slides negative: said as such, not as a fold without both classes."""
    with pytest.raises(HescapeEvalError, match=r"slide labels: expected both classes.*only label \[0\] in all 10"):
        site_folds([0] * 10, [f"s{i}" for i in range(10)], n_folds=5)
    bags, _, sites = mil_bags(n=10)
    with pytest.raises(HescapeEvalError, match="only label \\[1\\]"):
        cross_validate_mil(bags, np.ones(10, dtype=int), sites, **FAST)
