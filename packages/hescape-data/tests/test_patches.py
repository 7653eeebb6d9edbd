"""µm-exact patches through rotated + scaled (+ mirrored) alignments."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hescape.data.errors import AlignmentError
from hescape.data.patches import extract_patch
from hescape.data.readers import ArrayImage
from hescape.data.readers.xenium import read_xenium
from hescape.data.synthetic import generate_sample


def _affine(deg, scale, tx, ty, flip=False):
    t = np.deg2rad(deg)
    lin = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if flip:
        lin = lin @ np.diag([-1.0, 1.0])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = lin, (tx, ty)
    return m


def _draw(img, um_to_px, xy_um, colour, radius_px):
    x, y, _ = um_to_px @ [xy_um[0], xy_um[1], 1.0]
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 < radius_px**2] = colour


def _centroid(mask):
    return np.argwhere(mask).mean(0)  # (row, col)


@pytest.mark.parametrize(("deg", "um_per_px", "flip"), [(30.0, 0.37, False), (-118.0, 0.26, True), (0.0, 1.3, False)])
def test_marker_lands_at_patch_centre(deg, um_per_px, flip):
    """A black dot drawn at (100, 80) µm is at the patch centre; a red dot 20 µm to its right is 40 px right."""
    um_to_px = _affine(deg, 1 / um_per_px, 600.0, 600.0, flip)
    img = np.full((1200, 1200, 3), 235, np.uint8)
    _draw(img, um_to_px, (100.0, 80.0), (0, 0, 0), 3.0 / um_per_px)
    _draw(img, um_to_px, (120.0, 80.0), (255, 0, 0), 3.0 / um_per_px)
    _draw(img, um_to_px, (100.0, 95.0), (0, 0, 255), 3.0 / um_per_px)
    p = extract_patch(ArrayImage(img), um_to_px, (100.0, 80.0), fov_um=112.0, target_um_per_px=0.5)
    assert p.shape == (224, 224, 3)
    tol = max(0.5, um_per_px)  # half a source pixel, in output pixels, bounds the rasterisation error of the dots
    np.testing.assert_allclose(_centroid(p.sum(-1) < 150), [111.5, 111.5], atol=tol)
    np.testing.assert_allclose(_centroid((p[..., 0] > 180) & (p[..., 1] < 90)), [111.5, 151.5], atol=tol)
    np.testing.assert_allclose(_centroid((p[..., 2] > 180) & (p[..., 1] < 90)), [141.5, 111.5], atol=tol)


def test_patch_outside_image_is_white():
    img = np.zeros((100, 100, 3), np.uint8)
    p = extract_patch(ArrayImage(img), np.eye(3), (0.0, 0.0), fov_um=40.0, target_um_per_px=1.0)
    assert (p[:18, :18] == 255).all() and (p[22:, 22:] == 0).all()


def test_singular_transform_refused():
    with pytest.raises(AlignmentError, match="singular"):
        extract_patch(ArrayImage(np.zeros((10, 10, 3), np.uint8)), np.diag([1.0, 0.0, 1.0]), (0, 0))


def test_marker_through_bundle_alignment(bundle_copy):
    """Through the real reader: an OME-TIFF + alignment CSV (H&E px -> morphology px, rotated and scaled)."""
    he_to_morph = _affine(37.0, 0.33 / 0.2125, 250.0, -120.0)  # H&E at 0.33 µm/px
    um_to_he = np.linalg.inv(he_to_morph) @ np.diag([1 / 0.2125, 1 / 0.2125, 1.0])
    img = np.full((1000, 1000, 3), 240, np.uint8)
    _draw(img, um_to_he, (150.0, 140.0), (0, 0, 0), 3.0 / 0.33)
    _draw(img, um_to_he, (150.0, 160.0), (0, 0, 255), 3.0 / 0.33)
    he = next(bundle_copy.glob("*he_image.ome.tif"))
    with tifffile.TiffWriter(he, ome=True) as tw:
        tw.write(img, tile=(128, 128), compression="zlib", photometric="rgb", subifds=1, metadata={"axes": "YXS"})
        tw.write(np.ascontiguousarray(img[::2, ::2]), tile=(128, 128), compression="zlib", photometric="rgb",
                 subfiletype=1, metadata=None)
    np.savetxt(next(bundle_copy.glob("*imagealignment.csv")), he_to_morph, delimiter=",")
    s = read_xenium(bundle_copy)
    p = extract_patch(s.image, s.um_to_px, (150.0, 140.0))
    np.testing.assert_allclose(_centroid(p.sum(-1) < 150), [111.5, 111.5], atol=0.3)
    np.testing.assert_allclose(_centroid((p[..., 2] > 180) & (p[..., 1] < 90)), [151.5, 111.5], atol=0.5)
    coarse = extract_patch(s.image, s.um_to_px, (150.0, 140.0), target_um_per_px=1.0)  # reads pyramid level 1
    np.testing.assert_allclose(_centroid(coarse.sum(-1) < 200), [55.5, 55.5], atol=0.4)
    s.close()


@pytest.mark.parametrize("which", ["xenium_bundle", "xenium_bundle_variant"])
def test_bundle_patch_matches_generator_image(request, small_cfg, which):
    """The patch read through OME-TIFF + inverted alignment equals the generator's own µm-frame pixels."""
    bundle = request.getfixturevalue(which)
    s = read_xenium(bundle)
    truth = generate_sample(small_cfg, 0, 0).image  # pixel (r, c) centre = ((c + .5), (r + .5)) * 0.5 µm
    assert small_cfg.pixel_size_um == 0.5

    def corr(centre, shift=(0.0, 0.0)):
        p = extract_patch(s.image, s.um_to_px, (centre[0] + shift[0], centre[1] + shift[1]))
        r0, c0 = int((centre[1] - 56) / 0.5), int((centre[0] - 56) / 0.5)
        ref = truth[r0 : r0 + 224, c0 : c0 + 224]
        a, b = p.astype(float).mean(-1).ravel(), ref.astype(float).mean(-1).ravel()
        return np.corrcoef(a, b)[0, 1]

    good = corr((150.0, 140.0))
    assert good > 0.99  # two bilinear resamplings (generator -> H&E frame -> patch) lose very little
    assert corr((150.0, 140.0), shift=(1.0, 0.0)) < good - 0.03  # a 1 µm error is clearly detected
    s.close()
