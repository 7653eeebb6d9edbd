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
    EDGE_FILL,
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
    # 2220 x 0.499 = 1107.78 µm -> ceil(8.65) = 9 columns; 2967 x 0.499 = 1480.53 µm -> ceil(11.57) = 12 rows.
    assert t.grid_fraction.shape == (12, 9)
    pos = t.positions_um
    assert np.allclose(pos % 128.0, 0)  # grid of 256 px at 0.5 µm/px anchored at the corner
    assert (pos[:, 0] < 2220 * 0.499).all() and (pos[:, 1] < 2967 * 0.499).all()  # top-left corner on the slide
    assert np.array_equal(t.edge, (pos[:, 0] == 8 * 128) | (pos[:, 1] == 11 * 128))
    assert np.array_equal(t.positions_px0, np.round(pos / 0.499).astype(int))
    # Brute force: tissue fraction of each kept tile = tissue mask pixels whose centres fall inside it over every
    # mask-pixel position inside it, the mask's pixel grid continued past the slide (there: background).
    s = t.mask_um_per_px
    ny, nx = int(12 * 128 / s) + 2, int(9 * 128 / s) + 2
    cy, cx = (np.arange(ny) + 0.5) * s, (np.arange(nx) + 0.5) * s
    padded = np.zeros((ny, nx), dtype=bool)
    padded[:t.mask.shape[0], :t.mask.shape[1]] = t.mask
    covered = np.zeros_like(padded)
    for (x, y), f in zip(pos, t.tissue_fraction, strict=True):
        sel = np.ix_((cy >= y) & (cy < y + 128), (cx >= x) & (cx < x + 128))
        assert padded[sel].mean() == pytest.approx(f) and f >= 0.5
        covered[sel] = True
    covered = covered[:t.mask.shape[0], :t.mask.shape[1]]
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
    # Edge tiles (bottom row at y = 11 x 128 µm = 1408 µm = level-0 px round(1408 / 0.499) = 2822): the 2967 - 2822 =
    # 145 rows on the slide are slide pixels, the 111 rows below it are white.
    k = np.flatnonzero(svs_tiles.edge)
    assert len(k) > 0 and np.all(svs_tiles.positions_um[k, 1] == 1408.0)
    assert (px[k, 145:] == 255).all() and (px[k, :145] != 255).any(axis=(1, 2, 3)).all()
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


def _edge_slide_05():
    """480 x 336 µm at 0.5 µm/px (960 x 672 px; 128 µm tiles: 3.75 columns, 2.625 rows) with tissue rectangles (µm):
    A x [0, 128) y [0, 128); B x [384, 480) y [0, 200) (the partial last column, rows 0-1); D x [0, 128) y [256, 336)
    (the partial last row); E x [384, 480) y [256, 336) (the partial corner). Returns (image, {name: (x0, x1, y0, y1)})."""
    rng = np.random.default_rng(3)
    img = np.clip(240 + rng.normal(0, 3, (672, 960, 3)), 0, 255).astype(np.uint8)
    rects = {"A": (0, 128, 0, 128), "B": (384, 480, 0, 200), "D": (0, 128, 256, 336), "E": (384, 480, 256, 336)}
    for x0, x1, y0, y1 in rects.values():
        h, w = 2 * (y1 - y0), 2 * (x1 - x0)
        img[2 * y0:2 * y1, 2 * x0:2 * x1] = np.stack([rng.integers(150, 230, (h, w)), rng.integers(50, 120, (h, w)),
                                                      rng.integers(120, 200, (h, w))], axis=-1)
    return img, rects


@pytest.mark.parametrize("levels", [(0.5, 1.0), (0.25, 1.0)])
def test_edge_tiles_kept_padded_white_and_counted_as_background(tmp_path, levels):
    img, rects = _edge_slide_05()
    half = img.reshape(336, 2, 480, 2, 3).astype(np.float32).mean((1, 3)).round().astype(np.uint8)
    lv = [img.repeat(2, 0).repeat(2, 1) if levels[0] == 0.25 else img, half]
    p = tmp_path / "edge.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:  # 256 px TIFF tiles: neither level is a multiple of them
        tw.write(lv[0], subifds=1, tile=(256, 256), photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": levels[0], "PhysicalSizeY": levels[0]})
        tw.write(lv[1], subfiletype=1, tile=(256, 256), photometric="rgb")
    t = tile_slide(p)
    assert t.info.shape_um == pytest.approx((336.0, 480.0))
    assert t.mask_um_per_px == 8.0 and t.mask.shape == (42, 60)  # level 1 (1 µm/px) block-averaged by 8
    # Hand truth. Grid: ceil(480 / 128) = 4 columns, ceil(336 / 128) = 3 rows; the last column (x from 384 µm, 96 µm
    # on the slide) and the last row (y from 256 µm, 80 µm on the slide) are edge cells: 3 + 4 - 1 = 6.
    assert t.grid_fraction.shape == (3, 4) and int(t.edge_cells.sum()) == 6
    # Tissue area in each tile over the whole tile's 128 x 128 µm (the part beyond the slide is background):
    truth = np.zeros((3, 4))
    for x0, x1, y0, y1 in rects.values():
        for r in range(3):
            for c in range(4):
                ox = max(0, min(x1, 128 * c + 128) - max(x0, 128 * c))
                oy = max(0, min(y1, 128 * r + 128) - max(y0, 128 * r))
                truth[r, c] += ox * oy / 128**2
    # A 1.0; B in column 3: row 0 96*128/128² = 0.75 (kept), row 1 96*72/128² = 0.42 (dropped; 0.56 of its on-slide
    # part); D 128*80/128² = 0.625 (kept); E 96*80/128² = 0.47 (dropped, though all of its on-slide part is tissue).
    assert truth[0, 0] == 1 and truth[0, 3] == 0.75 and truth[1, 3] == 0.421875
    assert truth[2, 0] == 0.625 and truth[2, 3] == 0.46875
    # The 7-px median filter rounds the inner corners of each rectangle (at most 5 mask pixels of 256 per tile).
    np.testing.assert_allclose(t.grid_fraction, truth, atol=5 / 256 + 1e-9)
    # Brute force from the mask: 8 µm mask pixels, 16 x 16 of them per tile, those beyond the mask are background.
    padded = np.zeros((48, 64), dtype=bool)
    padded[:42, :60] = t.mask
    np.testing.assert_array_equal(t.grid_fraction, padded.reshape(3, 16, 4, 16).mean(axis=(1, 3)))
    assert sorted(map(tuple, t.positions_um.tolist())) == [(0.0, 0.0), (0.0, 256.0), (384.0, 0.0)]
    assert sorted(map(tuple, t.positions_um[t.edge].tolist())) == [(0.0, 256.0), (384.0, 0.0)]
    assert "3 of 12 tiles" in t.summary() and "2 kept (padded with white), 4 dropped (< 50% tissue)" in t.summary()
    # Pixels: the slide's pixels where the tile lies on the slide, EDGE_FILL (255) beyond it.
    px = {tuple(xy): tile for xy, tile in zip(t.positions_um.tolist(), t.read(), strict=True)}
    expect_b = np.full((256, 256, 3), 255, np.uint8)
    expect_b[:, :192] = img[0:256, 768:960]  # x 384-480 µm = px 768-960 at 0.5 µm/px
    expect_d = np.full((256, 256, 3), 255, np.uint8)
    expect_d[:160] = img[512:672, 0:256]  # y 256-336 µm = px 512-672
    assert EDGE_FILL == 255
    np.testing.assert_array_equal(px[(384.0, 0.0)], expect_b)
    np.testing.assert_array_equal(px[(0.0, 256.0)], expect_d)
    np.testing.assert_array_equal(px[(0.0, 0.0)], img[:256, :256])


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
    with pytest.raises(HescapeEvalError, match="missing.svs': expected an existing .* found no such file"):
        read_slide_info(tmp_path / "missing.svs")
    with pytest.raises(HescapeEvalError, match="found a folder"):
        read_slide_info(tmp_path)
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(HescapeEvalError, match=r"found an empty file \(0 bytes\)"):
        read_slide_info(tmp_path / "empty.svs")
    # A copy cut short (an interrupted download): the header opens, the image data end past the end of the file.
    whole = tmp_path / "whole.ome.tif"
    _write_ome(whole, (0.5, 1.0), _tissue_level1())
    data = whole.read_bytes()
    with tifffile.TiffFile(whole) as tif:  # truth: the end of the last tile of every level, from the tags
        end = max(int(np.max(np.add(pg.dataoffsets, pg.databytecounts))) for lvl in tif.series[0].levels
                  for pg in lvl.pages)
    assert end <= len(data)
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[:end - 1000])
    with pytest.raises(HescapeEvalError, match=f"found a truncated file: its image data end at byte {end:,} but it "
                                               f"has {end - 1000:,} bytes"):
        read_slide_info(cut)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _tissue_level1(), tile=(256, 256), photometric="rgb")
    with pytest.raises(HescapeEvalError, match="um_per_px="):
        tile_slide(plain)
    t = tile_slide(plain, um_per_px=0.5)  # accepted when the resolution is given
    assert t.info.mpp_source == "argument" and len(t) == 4


@needs_svs
def test_damaged_header_is_one_error(tmp_path):
    half = tmp_path / "half.svs"  # the first half of a real SVS: tifffile fails on its pages, not on opening it
    data = SVS.read_bytes()
    half.write_bytes(data[:len(data) // 2])
    with pytest.raises(HescapeEvalError, match="half.svs': expected a readable .* found a damaged TIFF"):
        read_slide_info(half)


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
