"""The colour-statistics probe (hescape.eval.baselines) against truth known without the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hescape.eval import HescapeEvalError, chance_recall
from hescape.eval.baselines import (
    DEFAULT_RADII,
    colour_probe,
    colour_statistics,
    feature_names,
    optical_density,
    region_masks,
    ridge_probe,
)


def _od(i: int) -> float:
    """Optical density of one uint8 intensity, by the definition -ln((I + 1) / 256)."""
    return -math.log((i + 1) / 256)


def test_optical_density_known_values():
    x = np.array([[255, 0, 127]], dtype=np.uint8)
    np.testing.assert_allclose(optical_density(x), [[0.0, math.log(256), math.log(2)]], rtol=0, atol=1e-12)
    with pytest.raises(HescapeEvalError, match="expected uint8"):
        optical_density(x.astype(np.float32))


def test_constant_patch_features_equal_its_od():
    """A constant-colour patch: every region's mean is the OD of that colour, every std is 0."""
    rgb = (200, 90, 30)
    patch = np.empty((1, 40, 40, 3), dtype=np.uint8)
    patch[...] = rgb
    f = colour_statistics(patch)
    names = feature_names()
    assert f.shape == (1, len(names)) == (1, 6 * (1 + len(DEFAULT_RADII)))
    for j, name in enumerate(names):
        _region, stat, ch = name.split("/")
        want = _od(rgb["RGB".index(ch)]) if stat == "mean" else 0.0
        assert f[0, j] == pytest.approx(want, abs=1e-9), name


def test_disc_and_ring_see_their_own_pixels():
    """A dark centre square inside a white patch: the centre disc sees only dark, the outer ring only white,
    and the whole-patch mean is the area-weighted mean of the two colours (counted by hand)."""
    n = 20
    patch = np.full((1, n, n, 3), 255, dtype=np.uint8)
    patch[0, 8:12, 8:12] = 0  # 4×4 centre block; pixel centres at 8.5..11.5, r <= 2.12/10 from the centre
    f = dict(zip(feature_names(radii=(0.3, 1.0)), colour_statistics(patch, radii=(0.3, 1.0))[0], strict=True))
    # disc r <= 0.3 (3 px): the 16 dark pixels plus the white pixels whose centres lie within 3 px
    yy, xx = np.mgrid[0:n, 0:n] + 0.5 - n / 2
    disc = np.sqrt(yy**2 + xx**2) <= 3.0
    dark = np.zeros((n, n), bool)
    dark[8:12, 8:12] = True
    frac = (disc & dark).sum() / disc.sum()
    assert f["disc<=0.3/mean/G"] == pytest.approx(frac * math.log(256), rel=1e-12)
    assert f["ring(0.3,1]/mean/G"] == pytest.approx(0.0, abs=1e-12)  # no dark pixel outside 3 px
    assert f["patch/mean/R"] == pytest.approx(16 / 400 * math.log(256), rel=1e-12)
    p = 16 / 400  # a two-valued population: std = |a - b| sqrt(p (1 - p))
    assert f["patch/std/B"] == pytest.approx(math.log(256) * math.sqrt(p * (1 - p)), rel=1e-9)


def test_region_masks_partition_the_inscribed_disc():
    m = region_masks(64, 64)
    assert m.shape == (1 + len(DEFAULT_RADII), 64, 64)
    assert m[0].all()
    rings = m[1:].sum(0)
    assert rings.max() == 1  # disc and rings do not overlap
    yy, xx = np.mgrid[0:64, 0:64] + 0.5 - 32
    np.testing.assert_array_equal(rings == 1, np.sqrt(yy**2 + xx**2) <= 32)
    with pytest.raises(HescapeEvalError, match="increasing"):
        region_masks(10, 10, radii=(0.5, 0.4))


def _colour_world(n: int, seed: int, *, linked: bool):
    """Patches of one random colour each and counts whose log-rate is a linear function of that colour's OD
    (``linked``) or of an independent random vector (not ``linked``)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(30, 250, size=(n, 3))
    patches = np.broadcast_to(rgb[:, None, None, :], (n, 8, 8, 3)).astype(np.uint8)
    od = -np.log((rgb + 1.0) / 256.0)
    driver = od if linked else rng.normal(size=(n, 3))
    w = np.random.default_rng(99).normal(size=(3, 40)) * 2.0
    rate = np.exp(1.5 + (driver - driver.mean(0)) / driver.std(0) @ w / 3)
    counts = rng.poisson(rate * 50).astype(np.float32)
    return patches, counts


def test_probe_retrieves_when_expression_is_a_function_of_colour():
    tr_x, tr_y = _colour_world(600, 0, linked=True)
    te_x, te_y = _colour_world(200, 1, linked=True)
    res = colour_probe(tr_x, tr_y, te_x, te_y, ks=(1, 5))
    for d in ("i2g", "g2i"):
        assert res[d].n == 200
        assert res[d].recall[5] > 0.8, (d, res[d].recall)  # chance is 0.025


def test_probe_is_near_chance_when_colour_carries_no_signal():
    tr_x, tr_y = _colour_world(600, 0, linked=False)
    te_x, te_y = _colour_world(200, 1, linked=False)
    res = colour_probe(tr_x, tr_y, te_x, te_y, ks=(10,))
    chance = chance_recall(200, 10)  # 0.05; with 200 queries the sd of a random recall is about 0.015
    for d in ("i2g", "g2i"):
        assert res[d].recall[10] < chance + 0.06, (d, res[d].recall)


def test_probe_is_deterministic_and_checks_inputs():
    tr_x, tr_y = _colour_world(100, 0, linked=True)
    te_x, te_y = _colour_world(50, 1, linked=True)
    f_tr, f_te = colour_statistics(tr_x), colour_statistics(te_x)
    a = ridge_probe(f_tr, tr_y, f_te, te_y, ks=(1, 5), alphas=1.0)
    b = ridge_probe(f_tr, tr_y, f_te, te_y, ks=(1, 5), alphas=1.0)
    assert a["i2g"].recall == b["i2g"].recall and a["g2i"].mean_rank == b["g2i"].mean_rank
    with pytest.raises(HescapeEvalError, match="one row per spot"):
        ridge_probe(f_tr, tr_y[:-1], f_te, te_y)
    with pytest.raises(HescapeEvalError, match="non-negative"):
        ridge_probe(f_tr, -tr_y, f_te, te_y)
    with pytest.raises(HescapeEvalError, match="same F"):
        ridge_probe(f_tr, tr_y, f_te[:, :3], te_y)
