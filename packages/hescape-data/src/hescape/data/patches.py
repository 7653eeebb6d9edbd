"""µm-exact H&E patches through a full affine (rotation, anisotropic scale, shear, translation).

A reader gives ``um_to_px``, a 3×3 affine taking tissue coordinates in µm ``(x, y, 1)`` to level-0 image pixel
coordinates ``(x, y, 1)`` (column, row; pixel ``(r, c)`` covers ``[c, c+1) × [r, r+1)``). A patch of
``fov_um × fov_um`` centred on a spot is sampled on an axis-aligned µm grid of ``target_um_per_px`` spacing,
so the patch is upright in tissue (µm) space whatever the slide's rotation, and its pixel size is exact.

Procedure per patch: pick the coarsest pyramid level whose pixels are still no larger than the target
(less reading, no aliasing), map the patch corners to that level, read only the bounding region (lazy tile
reads), low-pass it when it is still finer than the target by more than 25 %, and resample it bilinearly
with :func:`scipy.ndimage.affine_transform`.

Edge handling: every part of a patch that falls outside the image is padded white (255, 255, 255), the
colour of an empty glass slide; patches are never shifted to stay inside the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .errors import AlignmentError, HescapeDataError

if TYPE_CHECKING:
    from .readers.image import SlideImage

__all__ = ["check_affine", "scale_matrix", "um_per_px", "patch_grid_matrix", "extract_patch", "extract_patches"]

# (x, y) <-> (row, col) permutation of homogeneous 2-D coordinates.
_SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def check_affine(m, what: str = "alignment matrix") -> np.ndarray:
    """``m`` as a float 3×3 affine matrix; :class:`AlignmentError` if it is not finite, not affine or singular."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (3, 3):
        msg = f"{what}: expected a 3×3 matrix, found shape {m.shape}"
        raise AlignmentError(msg)
    if not np.isfinite(m).all():
        msg = f"{what}: expected finite values, found NaN/inf in {m.tolist()}"
        raise AlignmentError(msg)
    if not np.allclose(m[2], [0.0, 0.0, 1.0], atol=1e-6 * max(1.0, abs(m[2, 2]))):
        msg = (f"{what}: expected an affine matrix with last row [0, 0, 1], found {m[2].tolist()} (a projective "
               "transform); re-export the alignment from Xenium Explorer as an affine transform")
        raise AlignmentError(msg)
    a = m[:2, :2]
    sv = np.linalg.svd(a, compute_uv=False)
    if sv[-1] <= 1e-9 * max(sv[0], 1e-300) or sv[0] == 0:
        msg = (f"{what}: expected an invertible transform, found a singular 2×2 part {a.tolist()} "
               f"(singular values {sv.tolist()}); the alignment file is broken: re-export it")
        raise AlignmentError(msg)
    return m


def scale_matrix(sx: float, sy: float | None = None) -> np.ndarray:
    """Homogeneous scaling ``diag(sx, sy, 1)``."""
    return np.diag([float(sx), float(sx if sy is None else sy), 1.0])


def um_per_px(um_to_px: np.ndarray) -> float:
    """Mean µm per level-0 pixel of an affine µm → px map (geometric mean of the two axes)."""
    return float(1.0 / np.sqrt(abs(np.linalg.det(np.asarray(um_to_px)[:2, :2]))))


def patch_grid_matrix(center_um, fov_um: float, n_px: int) -> np.ndarray:
    """Affine from patch pixel ``(x, y)`` (corner convention) to tissue µm: pixel centres are ``fov/n`` apart."""
    s = fov_um / n_px
    cx, cy = (float(v) for v in center_um)
    return np.array([[s, 0.0, cx - fov_um / 2], [0.0, s, cy - fov_um / 2], [0.0, 0.0, 1.0]])


def _pick_level(image: SlideImage, um_to_px: np.ndarray, target_um_per_px: float) -> int:
    """The coarsest level whose pixels are no larger than the target pixel size (level 0 if none is)."""
    base = um_per_px(um_to_px)
    best, best_mpp = 0, base
    for lvl in range(1, len(image.level_shapes)):
        mpp = base * float(np.sqrt(np.prod(image.downsample(lvl))))
        if best_mpp < mpp <= target_um_per_px * 1.0001:
            best, best_mpp = lvl, mpp
    return best


def extract_patch(image: SlideImage, um_to_px: np.ndarray, center_um, *, fov_um: float = 112.0,
                  target_um_per_px: float = 0.5, fill: int = 255, level: int | None = None) -> np.ndarray:
    """One ``(n, n, 3)`` uint8 patch, ``n = round(fov_um / target_um_per_px)``, centred on ``center_um``.

    See the module docstring for the sampling procedure; outside the image is padded with ``fill`` (white).
    """
    if fov_um <= 0 or target_um_per_px <= 0:
        msg = f"patch field of view and pixel size must be > 0, found {fov_um} µm and {target_um_per_px} µm/px"
        raise HescapeDataError(msg)
    n = int(round(fov_um / target_um_per_px))
    um_to_px = check_affine(um_to_px, "µm → image pixel transform")
    if level is None:
        level = _pick_level(image, um_to_px, target_um_per_px)
    fx, fy = image.downsample(level)
    # patch px (x, y) -> level px (x, y)
    to_level = scale_matrix(1 / fx, 1 / fy) @ um_to_px @ patch_grid_matrix(center_um, fov_um, n)
    corners = to_level @ np.array([[0, n, 0, n], [0, 0, n, n], [1, 1, 1, 1]], dtype=np.float64)
    ratio = target_um_per_px / (um_per_px(um_to_px) * np.sqrt(fx * fy))  # level px per output px
    sigma = max(0.0, (ratio - 1.0) / 2.0) if ratio > 1.25 else 0.0
    margin = int(np.ceil(3 * sigma)) + 2
    c0 = int(np.floor(corners[0].min())) - margin
    r0 = int(np.floor(corners[1].min())) - margin
    c1 = int(np.ceil(corners[0].max())) + margin
    r1 = int(np.ceil(corners[1].max())) + margin
    region = image.read_region(level, r0, c0, r1 - r0, c1 - c0, fill=fill).astype(np.float32)
    if sigma > 0:
        region = ndimage.gaussian_filter(region, sigma=(sigma, sigma, 0), mode="nearest")
    # Output index (row, col) -> region index (row, col). Centres: index i <-> coordinate i + 0.5.
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    to_region = np.array([[1.0, 0.0, -c0 - 0.5], [0.0, 1.0, -r0 - 0.5], [0.0, 0.0, 1.0]]) @ to_level @ half
    m = _SWAP @ to_region @ _SWAP
    out = np.empty((n, n, 3), dtype=np.uint8)
    for ch in range(3):
        res = ndimage.affine_transform(region[..., ch], m, output_shape=(n, n), order=1, mode="constant",
                                       cval=float(fill), prefilter=False)
        out[..., ch] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return out


def extract_patches(image: SlideImage, um_to_px: np.ndarray, centers_um, *, fov_um: float = 112.0,
                    target_um_per_px: float = 0.5, fill: int = 255):
    """Iterate :func:`extract_patch` over ``centers_um`` (shape ``(n, 2)``, x and y in µm)."""
    um_to_px = check_affine(um_to_px, "µm → image pixel transform")
    level = _pick_level(image, um_to_px, target_um_per_px)
    for c in np.asarray(centers_um, dtype=np.float64):
        yield extract_patch(image, um_to_px, c, fov_um=fov_um, target_um_per_px=target_um_per_px, fill=fill,
                            level=level)
