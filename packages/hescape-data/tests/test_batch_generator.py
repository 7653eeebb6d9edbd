"""The batch-effect dials of the synthetic generator (hescape.data.batch_effects).

Each effect is measured from the generated data by a computation of its own (ratios of counts between a dial-0 and
a dial-s build of one seed, optical density by Beer–Lambert, blur sigma from the Fourier transfer function) and
compared with the dial and with the effects the generator records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from hescape.data import SyntheticConfig, generate_sample, load_panel, read_manifest
from hescape.data.batch_effects import DROPOUT_RESIDUAL, REFERENCE, BatchEffects, donor_batch_effects
from hescape.data.build import GENERATOR_VERSION, build_synthetic_dataset, default_dataset_path
from hescape.data.cli import main
from hescape.data.errors import HescapeDataError
from scipy import ndimage

SIZE = 300.0
N_DONORS = 3
PANEL = load_panel("human-breast-panel")


def _cfg(**dials) -> SyntheticConfig:
    return SyntheticConfig(sample_size_um=SIZE, n_donors=N_DONORS, batch=BatchEffects(**dials))


@pytest.fixture(scope="module")
def counts():
    """Cell counts ``(n_cells, n_genes)`` of each donor, without added effects and with one expression dial on at
    a time (no image: the expression does not depend on it)."""
    out = {}
    for tag, dials in {"none": {}, "library_size": {"library_size": 0.3}, "gene_scale": {"gene_scale": 0.5},
                       "gene_shift": {"gene_shift": 0.2}, "dropout": {"dropout": 0.1}}.items():
        smps = [generate_sample(_cfg(**dials), d, 0, PANEL, render=False) for d in range(N_DONORS)]
        out[tag] = ([s.cell_counts.toarray() for s in smps], [s.extra.get("batch") for s in smps], smps)
    return out


def test_dials_validate_and_scale_from_the_reference():
    assert BatchEffects.at(0) == BatchEffects() and not BatchEffects.at(0).active
    assert BatchEffects.at(1) == REFERENCE
    half = BatchEffects.at(0.5)
    for k in BatchEffects.DIALS:
        assert getattr(half, k) == pytest.approx(0.5 * getattr(REFERENCE, k))
    assert BatchEffects.at(20).dropout == 1.0  # a fraction of the panel: capped
    assert BatchEffects(blur=1) == BatchEffects(blur=1.0) and isinstance(BatchEffects(blur=1).blur, float)
    assert BatchEffects(stain=0.1).image_active and not BatchEffects(stain=0.1).expression_active
    for bad in ({"gene_scale": -0.1}, {"blur": float("nan")}, {"dropout": 1.5}, {"stain": "strong"}):
        with pytest.raises(HescapeDataError, match="expected"):
            BatchEffects(**bad)
    for bad in (-1, float("inf"), "x"):
        with pytest.raises(HescapeDataError, match="strength"):
            BatchEffects.at(bad)
    with pytest.raises(HescapeDataError, match="BatchEffects"):
        SyntheticConfig(batch={"stain": 0.2})


def test_strength_zero_is_the_default_generator(tmp_path):
    """Same rows (counts and PNG bytes), same manifest record and the same cache key as the default config."""
    plain = SyntheticConfig(sample_size_um=200.0, n_donors=N_DONORS)
    zero = dataclasses.replace(plain, batch=BatchEffects.at(0.0))
    a = build_synthetic_dataset(tmp_path / "plain", plain, via_bundle=False, progress=False)
    b = build_synthetic_dataset(tmp_path / "zero", zero, via_bundle=False, progress=False)
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["generator"] == mb["generator"] and "batch" not in ma["generator"]["config"]
    shards = sorted(p.name for p in a.glob("shard-*"))
    assert shards and all((a / s).read_bytes() == (b / s).read_bytes() for s in shards)
    assert not (a / "truth").exists()  # no side files unless asked for (or a dial is on)
    # the cache key: the generator version and the config as it was before SyntheticConfig.batch existed
    legacy = {k: v for k, v in dataclasses.asdict(plain).items() if k != "batch"}
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, legacy], sort_keys=True).encode()).hexdigest()[:12]
    assert default_dataset_path(zero).name == default_dataset_path(plain).name == f"synthetic-{key}"
    assert default_dataset_path(dataclasses.replace(plain, batch=BatchEffects.at(0.5))) != default_dataset_path(plain)


def test_biology_is_the_same_at_every_strength():
    smps = [generate_sample(SyntheticConfig(sample_size_um=SIZE, batch=BatchEffects.at(s)), 1, 0) for s in (0, 0.5, 1)]
    ref = smps[0]
    assert (ref.extra["spot_type_counts"].sum(1) == ref.spot_n_cells).all() and ref.spot_n_cells.sum() > 100
    for smp in smps[1:]:
        np.testing.assert_array_equal(smp.cell_xy, ref.cell_xy)
        np.testing.assert_array_equal(smp.cell_type, ref.cell_type)
        np.testing.assert_array_equal(smp.extra["cell_state"], ref.extra["cell_state"])
        np.testing.assert_array_equal(smp.extra["spot_type_counts"], ref.extra["spot_type_counts"])
        np.testing.assert_array_equal(smp.extra["spot_state"], ref.extra["spot_state"])
        np.testing.assert_array_equal(smp.spot_niche, ref.spot_niche)
        assert not np.array_equal(smp.spot_counts, ref.spot_counts)
        assert not np.array_equal(smp.image, ref.image)
    # the stronger, the further from the dial-0 expression (the same draws, scaled)
    lib = [np.log(s.spot_counts.sum() / ref.spot_counts.sum()) for s in smps]
    dist = [np.abs(np.log1p(s.spot_counts) - np.log1p(ref.spot_counts)).mean() for s in smps]
    assert dist[0] == 0 < dist[1] < dist[2], (dist, lib)


def test_library_size(counts):
    base, _, _ = counts["none"]
    got, batch, _ = counts["library_size"]
    for d in range(N_DONORS):
        ratio = got[d].sum() / base[d].sum()  # ~1e5 counts: Poisson noise well under 1 %
        assert ratio == pytest.approx(batch[d].library_factor, rel=0.01)
        assert (batch[d].gene_factor == 1).all() and not batch[d].dropped.any()
    # the drawn factors: log-normal with sd = the dial, over many donors (sd of a 400-donor sd: 3.5 %)
    logs = [np.log(donor_batch_effects(BatchEffects(library_size=0.3), 0, d, 10).library_factor) for d in range(400)]
    assert np.std(logs, ddof=1) == pytest.approx(0.3, rel=0.12)
    assert abs(np.mean(logs)) < 4 * 0.3 / np.sqrt(400)


def test_gene_scale(counts):
    base, _, _ = counts["none"]
    got, batch, _ = counts["gene_scale"]
    measured, drawn = [], []
    for d in range(N_DONORS):
        n0, n1, s = base[d].sum(0), got[d].sum(0), batch[d].gene_factor
        ok = n0 >= 30
        # thinning (s < 1): n1 ~ Binomial(n0, s); addition (s > 1): n1 - n0 ~ Poisson((s - 1) n0), given the rates
        sd = np.sqrt(np.where(s < 1, n0 * s * np.abs(1 - s), np.abs(s - 1) * n0))
        z = (n1 - s * n0)[ok] / np.maximum(sd[ok], 1.0)
        assert np.abs(z).max() < 5, np.abs(z).max()
        high = n0 >= 200
        measured.append(np.log(n1[high] / n0[high]))
        drawn.append(np.log(s[high]))
    measured, drawn = np.concatenate(measured), np.concatenate(drawn)
    # the measured per-gene log shift: sd = the dial (sd of a 250-value sd: 4.5 %), and it is the recorded one
    assert len(measured) > 250 and np.std(measured, ddof=1) == pytest.approx(0.5, rel=0.15)
    assert np.corrcoef(measured, drawn)[0, 1] > 0.99
    assert not np.allclose(batch[0].gene_factor, batch[1].gene_factor)  # each donor its own


def test_gene_shift_adds_background(counts):
    base, _, smps = counts["none"]
    got, batch, shifted = counts["gene_shift"]
    for d in range(N_DONORS):
        assert (got[d] >= base[d]).all()  # a background only adds counts
        n_cells = len(base[d])
        added = (got[d] - base[d]).sum(0)
        expected = n_cells * batch[d].gene_background * shifted[d].extra["gene_mean_per_cell"]
        z = (added - expected) / np.sqrt(np.maximum(expected, 1.0))  # Poisson(expected), given the rates
        assert np.abs(z).max() < 5
        assert added.sum() / base[d].sum() == pytest.approx(0.2, abs=0.08)  # mean Exp(1) × 0.2 of each gene's mean


def test_dropout_hits_that_donor_only(counts):
    base, _, _ = counts["none"]
    got, batch, _ = counts["dropout"]
    dropped = [b.dropped for b in batch]
    assert all(m.sum() == round(0.1 * PANEL.n_genes) for m in dropped)
    assert not np.array_equal(dropped[0], dropped[1])
    for d in range(N_DONORS):
        m = dropped[d]
        np.testing.assert_array_equal(got[d][:, ~m], base[d][:, ~m])  # the rest untouched, count for count
        n0, n1 = base[d][:, m].sum(), got[d][:, m].sum()
        assert abs(n1 - DROPOUT_RESIDUAL * n0) < 5 * np.sqrt(n0 * DROPOUT_RESIDUAL)
        # near zero in this donor, while the other donors keep these genes (where their chemistry does)
        for o in range(N_DONORS):
            keep = m & ~dropped[o]
            if o != d and keep.any():
                assert got[d][:, keep].mean() < 0.1 * got[o][:, keep].mean()


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density, log10(255 / I) (Beer–Lambert, base 10 as in densitometry)."""
    return np.log10(255.0 / np.maximum(rgb.astype(np.float64), 1.0))


def test_stain_moves_mean_optical_density_per_donor():
    shifts = []
    for d in range(N_DONORS):
        base = generate_sample(_cfg(), d, 0, PANEL).image
        expr_only = generate_sample(_cfg(gene_scale=0.5, dropout=0.1), d, 0, PANEL).image
        stained = generate_sample(_cfg(stain=0.2), d, 0, PANEL)
        assert np.array_equal(expr_only, base)  # stain 0: the image is byte for byte the same
        od0, od1 = _od(base).reshape(-1, 3).mean(0), _od(stained.image).reshape(-1, 3).mean(0)
        shifts.append(od1 - od0)
        assert np.abs(od1 - od0).max() > 0.01, (od0, od1)
        # Beer–Lambert: a stain change is linear in OD, so the mean OD moves by the recorded matrix
        np.testing.assert_allclose(od1, od0 @ stained.extra["batch"].stain_matrix, rtol=0.03, atol=0.004)
    assert np.abs(shifts[0] - shifts[1]).max() > 0.01  # donors differ: a batch effect


def _blur_sigma_px(sharp: np.ndarray, blurred: np.ndarray) -> float:
    """Gaussian sigma (px) fitted to the transfer function ``G(f) = exp(-2π²σ²f²)`` between two images: the
    cross-spectrum over the power spectrum of the sharp one, per radial frequency band (Hann-windowed)."""
    w = np.outer(np.hanning(sharp.shape[0]), np.hanning(sharp.shape[1]))
    f0, f1 = np.fft.fft2(w * (sharp - sharp.mean())), np.fft.fft2(w * (blurred - blurred.mean()))
    fy, fx = np.meshgrid(np.fft.fftfreq(sharp.shape[0]), np.fft.fftfreq(sharp.shape[1]), indexing="ij")
    f = np.hypot(fy, fx).ravel()
    cross, power = (f1 * f0.conj()).real.ravel(), (np.abs(f0) ** 2).ravel()
    band = np.digitize(f, np.linspace(0.02, 0.5, 25))
    fs = np.array([f[band == i].mean() for i in range(1, 25)])
    gain = np.array([cross[band == i].sum() / power[band == i].sum() for i in range(1, 25)])
    ok = (gain > 0.1) & (gain < 0.97)
    x, y = 2 * np.pi**2 * fs[ok] ** 2, -np.log(gain[ok])
    return float(np.sqrt(x @ y / (x @ x)))


def test_blur_in_micrometres():
    """At 0.5 µm/px, the blur fitted from the images equals the recorded sigma in µm; Laplacian energy falls."""
    cfg0 = SyntheticConfig(sample_size_um=SIZE, pixel_size_um=0.5)
    for d in range(2):
        sharp = generate_sample(cfg0, d, 0, PANEL)
        blurred = generate_sample(dataclasses.replace(cfg0, batch=BatchEffects(blur=1.0)), d, 0, PANEL)
        sigma_um = blurred.extra["batch"].blur_um
        assert 0.5 <= sigma_um <= 1.5
        g0, g1 = sharp.image.astype(float).mean(-1), blurred.image.astype(float).mean(-1)
        assert _blur_sigma_px(g0, g1) * 0.5 == pytest.approx(sigma_um, rel=0.05)
        assert abs(g1.mean() - g0.mean()) < 0.5  # a blur moves no light
        for x, y in sharp.spot_xy[:4]:  # that donor's patches (64 µm around each spot centre)
            r, c = int(y / 0.5), int(x / 0.5)
            lap0 = ndimage.laplace(g0[r - 64 : r + 64, c - 64 : c + 64]).var()
            lap1 = ndimage.laplace(g1[r - 64 : r + 64, c - 64 : c + 64]).var()
            assert lap1 < 0.5 * lap0


def test_cli_dataset_with_truth(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", "dataset", str(out), "--batch-strength", "0.5", "--n-donors", "3", "--size-um", "200"]) == 0
    m = read_manifest(out)
    assert m["generator"]["config"]["batch"] == BatchEffects.at(0.5).to_dict()
    assert m["generator"]["pipeline"] == "xenium-bundle"
    zero = build_synthetic_dataset(tmp_path / "zero", SyntheticConfig(sample_size_um=200.0, n_donors=3),
                                   via_bundle=False, progress=False, truth=True)
    for s in m["samples"]:
        t5, t0 = np.load(out / "truth" / f"{s['name']}.npz"), np.load(zero / "truth" / f"{s['name']}.npz")
        for k in t0.files:
            np.testing.assert_array_equal(t5[k], t0[k])  # the biology does not depend on the dials
        b5, b0 = np.load(out / "batch" / f"{s['name']}.npz"), np.load(zero / "batch" / f"{s['name']}.npz")
        assert b5["library_factor"] != 1.0 and b0["library_factor"] == 1.0 and str(b5["donor"]) == s["donor"]
        assert b5["dropped"].sum() == 14 and b5["blur_um"] > 0
    capsys.readouterr()
    for bad in (["--batch-strength", "-1"], ["--n-donors", "2"]):
        assert main(["synth", "dataset", str(tmp_path / "bad"), *bad]) == 2
        assert "error" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_silhouette_batch_of_expression_follows_strength():
    """HESCAPE §8.3's silhouette-batch (scib-metrics via hescape.eval): the donors separate as the strength rises.

    scib's score is 1 for batches mixed within expression clusters and falls as they separate; clusters holding a
    single donor are skipped by scib, so the fraction of spots it scores (coverage) falls too.
    """
    pytest.importorskip("scib_metrics")
    pytest.importorskip("leidenalg")
    batch_effects = pytest.importorskip("hescape.eval.batch_effects")
    scores, coverage = [], []
    for strength in (0.0, 0.5, 1.0):
        cfg = SyntheticConfig(sample_size_um=400.0, n_donors=6, batch=BatchEffects.at(strength))
        smps = [generate_sample(cfg, d, 0, PANEL, render=False) for d in range(6)]
        x = np.concatenate([s.spot_counts for s in smps])
        donor = np.concatenate([[s.donor] * len(s.spot_counts) for s in smps])
        keep = x.sum(1) > 0  # spots over lumens and fat hold no cells
        r = batch_effects.batch_silhouette(x[keep], donor[keep], batch_key="donor", max_spots=None)
        scores.append(r.scores["expression"])
        coverage.append(r.coverage)
    assert scores[0] > scores[1] + 0.05 > scores[2] + 0.1, scores
    assert coverage[0] > coverage[1] > coverage[2], coverage


def test_strength_beyond_the_model_range_is_refused():
    from hescape.data.batch_effects import MAX_STRENGTH, BatchEffects
    from hescape.data.errors import HescapeDataError

    assert BatchEffects.at(MAX_STRENGTH).library_size > 0
    for bad in (MAX_STRENGTH * 1.5, 1e9, -1, float("nan")):
        with pytest.raises(HescapeDataError, match="batch strength: expected a number from 0 to 20"):
            BatchEffects.at(bad)
