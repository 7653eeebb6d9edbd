"""Whole-slide tiling (hescape.eval.wsi): real Aperio SVS fixture, synthetic OME-TIFF pyramids, refusals, feature cache.

Truth comes from the file header read by hand (MPP = 0.4990 in the fixture's ImageDescription), from synthetic slides
whose tissue rectangle and pixels are known, and from brute-force loops over mask pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile", reason="wsi tiling needs tifffile (pip install tifffile imagecodecs)")

from hescape.eval.errors import HescapeEvalError  # noqa: E402
from hescape.eval.wsi import (  # noqa: E402
    _saturation,
    choose_level,
    extract_features,
    otsu_threshold,
    plot_tiles,
    read_slide_info,
    slide_features,
    tile_slide,
)

SVS = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "wsi" / "cmu_small_region.svs"
needs_svs = pytest.mark.skipif(not SVS.exists(), reason=f"fixture {SVS} absent")


@pytest.fixture(scope="module")
def svs_tiles():
    pytest.importorskip("imagecodecs", reason="JPEG tiles need imagecodecs")
    return tile_slide(SVS)


@needs_svs
def test_svs_mpp_level_and_grid(svs_tiles):
    t = svs_tiles
    # ImageDescription says "MPP = 0.4990" and "[42673,5576 2220x2967]": one level of 2220 x 2967 px.
    assert t.info.format == "svs" and t.info.um_per_px == pytest.approx(0.499)
    assert t.info.level_shapes == ((2967, 2220),)
    assert t.level == 0 and t.tile_um == 128.0
    assert len(t) > 10
    pos = t.positions_um
    assert np.allclose(pos % 128.0, 0)  # grid of 256 px at 0.5 µm/px anchored at the corner
    assert (pos[:, 0] + 128 <= 2220 * 0.499).all() and (pos[:, 1] + 128 <= 2967 * 0.499).all()
    assert np.array_equal(t.positions_px0, np.round(pos / 0.499).astype(int))
    # Brute force: tissue fraction of each kept tile = share of mask pixel centres inside it that are tissue.
    s = t.mask_um_per_px
    cy, cx = (np.arange(t.mask.shape[0]) + 0.5) * s, (np.arange(t.mask.shape[1]) + 0.5) * s
    covered = np.zeros_like(t.mask)
    for (x, y), f in zip(pos, t.tissue_fraction, strict=True):
        sel = np.ix_((cy >= y) & (cy < y + 128), (cx >= x) & (cx < x + 128))
        assert t.mask[sel].mean() == pytest.approx(f) and f >= 0.5
        covered[sel] = True
    # Tiles cover most of the tissue (partial tiles at the tissue border are dropped by the 50 % rule).
    cover = (covered & t.mask).sum() / t.mask.sum()
    print(f"tissue covered by kept tiles: {cover:.3f}; tiles {len(t)}; Otsu {t.otsu}")
    assert cover > 0.7
    assert 0.1 < t.mask.mean() < 0.9


@needs_svs
def test_svs_tile_pixels_are_tissue(svs_tiles, tmp_path):
    px = svs_tiles.read()
    assert px.shape == (len(svs_tiles), 256, 256, 3) and px.dtype == np.uint8
    # Independent of the mask: at full resolution, at least 40 % of every kept tile's pixels exceed the Otsu cut.
    frac = (_saturation(px) > svs_tiles.otsu).mean(axis=(1, 2))
    assert frac.min() > 0.4, frac
    out = plot_tiles(svs_tiles, "/tmp/hescape_wsi_overlay.png") if _has_mpl() else None
    assert out is None or Path(out).stat().st_size > 0


def _has_mpl() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _tissue_level1(seed=0):
    """1024x1024 px at 0.5 µm/px (512 µm): pink textured tissue in x ∈ [128, 384) µm, y ∈ [0, 256) µm on white."""
    rng = np.random.default_rng(seed)
    img = np.clip(240 + rng.normal(0, 3, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    tissue = np.stack([rng.integers(150, 230, (512, 512)), rng.integers(50, 120, (512, 512)),
                       rng.integers(120, 200, (512, 512))], axis=-1).astype(np.uint8)
    img[0:512, 256:768] = tissue
    return img


def _write_ome(path, levels_mpp, level1):
    """OME-TIFF pyramid with the given µm/px (subset of 0.25, 0.5, 1.0) built from the 0.5 µm/px image."""
    imgs = {0.25: level1.repeat(2, 0).repeat(2, 1),
            0.5: level1,
            1.0: level1.reshape(512, 2, 512, 2, 3).astype(np.float32).mean((1, 3)).round().astype(np.uint8)}
    lv = [imgs[m] for m in levels_mpp]
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(lv[0], subifds=len(lv) - 1, tile=(256, 256), photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": levels_mpp[0], "PhysicalSizeY": levels_mpp[0]})
        for a in lv[1:]:
            tw.write(a, subfiletype=1, tile=(256, 256), photometric="rgb")


@pytest.mark.parametrize("levels", [(0.25, 0.5, 1.0), (0.25, 1.0)])
def test_ome_pyramid_known_tissue_and_pixels(tmp_path, levels):
    lvl1 = _tissue_level1()
    p = tmp_path / "s.ome.tif"
    _write_ome(p, levels, lvl1)
    t = tile_slide(p)
    assert t.info.format == "ome" and t.info.um_per_px == pytest.approx(levels[0])
    assert t.info.level_um_per_px == pytest.approx(levels)
    assert t.level_um_per_px == (0.5 if 0.5 in levels else 0.25)
    # Tissue occupies exactly grid cells (rows 0-1, cols 1-2) of the 4x4 grid of 128 µm.
    expect = {(128.0, 0.0), (256.0, 0.0), (128.0, 128.0), (256.0, 128.0)}
    assert {tuple(p) for p in t.positions_um} == expect
    px = t.read()
    for (x, y), tile in zip(t.positions_um, px, strict=True):
        r, c = int(y / 0.5), int(x / 0.5)
        # At 0.5 µm/px the tile is the level's pixels; from 0.25 µm/px it is the 2x2 block mean (= level1 here).
        assert np.array_equal(tile, lvl1[r:r + 256, c:c + 256])


def test_choose_level_rules():
    assert choose_level([0.25, 0.5, 1.0]) == 1
    assert choose_level([0.25, 1.0]) == 0
    assert choose_level([0.504, 2.0]) == 0  # within the 2 % tolerance: 20×
    with pytest.raises(HescapeEvalError, match="20×"):
        choose_level([1.0, 4.0])


def test_otsu_matches_brute_force():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(40, 12, 3000), rng.normal(170, 25, 1500)]).clip(0, 255).astype(np.uint8)
    x = v.astype(np.float64)
    best, best_t = np.inf, None
    for t in range(255):  # minimise the within-class variance of {<= t}, {> t}
        a, b = x[x <= t], x[x > t]
        if len(a) == 0 or len(b) == 0:
            continue
        w = len(a) * a.var() + len(b) * b.var()
        if w < best - 1e-9:
            best, best_t = w, t
    assert otsu_threshold(v) == best_t


def test_refusals(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(HescapeEvalError, match="readable Aperio SVS or OME-TIFF"):
        read_slide_info(bad)
    with pytest.raises(HescapeEvalError, match="readable"):
        read_slide_info(tmp_path / "missing.svs")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _tissue_level1(), tile=(256, 256), photometric="rgb")
    with pytest.raises(HescapeEvalError, match="um_per_px="):
        tile_slide(plain)
    t = tile_slide(plain, um_per_px=0.5)  # accepted when the resolution is given
    assert t.info.mpp_source == "argument" and len(t) == 4


class _MeanColour:
    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        import torch
        self.calls += 1
        return torch.cat([x.float().mean((2, 3)), x.float().std((2, 3))], dim=1)


def test_feature_cache_resumable(tmp_path):
    p = tmp_path / "s.ome.tif"
    lvl1 = _tissue_level1()
    _write_ome(p, (0.5, 1.0), lvl1)
    t = tile_slide(p)
    enc = _MeanColour()
    f = slide_features(t, enc, batch_size=3, cache_dir=tmp_path / "c", progress=False)
    assert f.shape == (4, 6) and enc.calls == 2
    ref = np.array([lvl1[int(y / .5):int(y / .5) + 256, int(x / .5):int(x / .5) + 256].reshape(-1, 3).mean(0)
                    for x, y in t.positions_um])
    np.testing.assert_allclose(f[:, :3], ref, rtol=1e-5)
    files = sorted(q.name for q in (tmp_path / "c").iterdir())
    assert files == ["s.ome.npz"]  # atomic write leaves no temporary file

    def boom(x):
        raise AssertionError("cached slide must not be encoded again")

    np.testing.assert_array_equal(slide_features(t, boom, cache_dir=tmp_path / "c", encoder_name="_MeanColour",
                                                 progress=False), f)
    with pytest.raises(HescapeEvalError, match="encoder"):
        slide_features(t, boom, cache_dir=tmp_path / "c", encoder_name="other", progress=False)
    out = extract_features([p], boom, tmp_path / "c", encoder_name="_MeanColour", progress=False)
    assert out == [tmp_path / "c" / "s.ome.npz"]  # finished slide skipped
