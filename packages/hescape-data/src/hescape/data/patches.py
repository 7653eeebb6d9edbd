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

Many patches at once (:func:`iter_patches`, what the dataset builders use): neighbouring patches overlap (55 µm
pseudo-spots 47.6 µm apart with 112 µm patches: every image pixel lies in ~10 patches), so reading and low-passing
every patch's region on its own decodes each JPEG tile ~10 times and filters each pixel ~10 times. Instead the
spots are grouped in square blocks of the level's pixel grid, visited row by row; each block's region (the union
of its patches' regions) is read once through a :class:`~hescape.data.readers.image.TileCache` (every tile decoded
once: tiles shared with the next block row stay cached until no later block needs them) and low-passed once, and
each patch is resampled from its own window of the block: the same window, with the same values at every pixel
the resampling reads, as :func:`extract_patch` would read, so the patches are bit-identical to it. (A low-pass on
the block differs from one on the patch's own region only within the filter radius of that region's edge, where
``mode="nearest"`` pads; the region's margin keeps the resampling at least ``margin - 1`` pixels from the edge,
so when ``margin - 1 >= radius`` none of those pixels is read. Otherwise each patch is low-passed on its own.)
Blocks and patches are processed by a pool of threads (the decoders, scipy's filters and the PNG encoder release
the GIL); the result does not depend on the number of threads.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .errors import AlignmentError, HescapeDataError

if TYPE_CHECKING:
    from .readers.image import SlideImage

__all__ = ["check_affine", "scale_matrix", "um_per_px", "patch_grid_matrix", "extract_patch", "extract_patches",
           "iter_patches", "default_workers"]

#: ``truncate`` of the anti-aliasing Gaussian (scipy's default, passed explicitly so that the filter radius
#: ``int(truncate · sigma + 0.5)`` used to decide on block-wise filtering is the one applied).
_TRUNCATE = 4.0
#: Most threads :func:`default_workers` picks.
MAX_WORKERS = 8

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


@dataclass(frozen=True)
class _Sampling:
    """How one patch is sampled: its level, the level-pixel region read (``r0:r1``, ``c0:c1``), the low-pass
    ``sigma`` (level px), the region's ``margin`` and the (row, col) affine from patch to region indices."""

    n: int
    level: int
    r0: int
    c0: int
    r1: int
    c1: int
    sigma: float
    margin: int
    matrix: np.ndarray


def _sampling(image: SlideImage, um_to_px: np.ndarray, center_um, fov_um: float, target_um_per_px: float,
              level: int) -> _Sampling:
    n = int(round(fov_um / target_um_per_px))
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
    # Output index (row, col) -> region index (row, col). Centres: index i <-> coordinate i + 0.5.
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    to_region = np.array([[1.0, 0.0, -c0 - 0.5], [0.0, 1.0, -r0 - 0.5], [0.0, 0.0, 1.0]]) @ to_level @ half
    return _Sampling(n, level, r0, c0, r1, c1, float(sigma), margin, _SWAP @ to_region @ _SWAP)


def _planar(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 as a C-contiguous ``(3, H, W)`` float32 (each channel one contiguous plane)."""
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32)


def _low_pass(planes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass of ``(3, H, W)`` float32 planes along rows, then columns (as the patch sampling needs)."""
    return ndimage.gaussian_filter(planes, sigma=(0, sigma, sigma), mode="nearest", truncate=_TRUNCATE)


def _resample(planes: np.ndarray, s: _Sampling, fill: int) -> np.ndarray:
    """The ``(n, n, 3)`` uint8 patch from its (already low-passed) float32 region planes ``(3, r1-r0, c1-c0)``.

    Each channel is resampled from its own plane: the values are those of resampling an interleaved
    ``(H, W, 3)`` region channel by channel (the arithmetic per output pixel is the same), in ~2/3 of the time
    (a contiguous plane is read with fewer cache misses than every third float of an interleaved one).
    """
    out = np.empty((s.n, s.n, 3), dtype=np.uint8)
    for ch in range(3):
        res = ndimage.affine_transform(planes[ch], s.matrix, output_shape=(s.n, s.n), order=1, mode="constant",
                                       cval=float(fill), prefilter=False)
        out[..., ch] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return out


def _check_patch_size(fov_um: float, target_um_per_px: float) -> None:
    if fov_um <= 0 or target_um_per_px <= 0:
        msg = f"patch field of view and pixel size must be > 0, found {fov_um} µm and {target_um_per_px} µm/px"
        raise HescapeDataError(msg)


def extract_patch(image: SlideImage, um_to_px: np.ndarray, center_um, *, fov_um: float = 112.0,
                  target_um_per_px: float = 0.5, fill: int = 255, level: int | None = None) -> np.ndarray:
    """One ``(n, n, 3)`` uint8 patch, ``n = round(fov_um / target_um_per_px)``, centred on ``center_um``.

    See the module docstring for the sampling procedure; outside the image is padded with ``fill`` (white).
    """
    _check_patch_size(fov_um, target_um_per_px)
    um_to_px = check_affine(um_to_px, "µm → image pixel transform")
    if level is None:
        level = _pick_level(image, um_to_px, target_um_per_px)
    s = _sampling(image, um_to_px, center_um, fov_um, target_um_per_px, level)
    region = _planar(image.read_region(level, s.r0, s.c0, s.r1 - s.r0, s.c1 - s.c0, fill=fill))
    if s.sigma > 0:
        region = _low_pass(region, s.sigma)
    return _resample(region, s, fill)


def extract_patches(image: SlideImage, um_to_px: np.ndarray, centers_um, *, fov_um: float = 112.0,
                    target_um_per_px: float = 0.5, fill: int = 255):
    """Iterate :func:`extract_patch` over ``centers_um`` (shape ``(n, 2)``, x and y in µm), in that order.

    One patch at a time, each read on its own (tiles shared by neighbouring patches are decoded again): for
    a few patches, or a stream in input order. Many patches are faster with :func:`iter_patches` (same pixels).
    """
    um_to_px = check_affine(um_to_px, "µm → image pixel transform")
    level = _pick_level(image, um_to_px, target_um_per_px)
    for c in np.asarray(centers_um, dtype=np.float64):
        yield extract_patch(image, um_to_px, c, fov_um=fov_um, target_um_per_px=target_um_per_px, fill=fill,
                            level=level)


def default_workers() -> int:
    """Threads for :func:`iter_patches`: the CPUs this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


class _Inline:
    """An executor that runs each task at once in the calling thread (one worker: no thread)."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _blocks(samplings: list[_Sampling], block_px: int) -> list[np.ndarray]:
    """Spot indices grouped by the ``block_px`` square of level pixels holding their region's centre, blocks in
    row-major order (top to bottom, left to right), spots in input order within a block."""
    cy = np.array([(s.r0 + s.r1) / 2 for s in samplings])
    cx = np.array([(s.c0 + s.c1) / 2 for s in samplings])
    by, bx = np.floor(cy / block_px).astype(np.int64), np.floor(cx / block_px).astype(np.int64)
    order = np.lexsort((np.arange(len(samplings)), bx, by))
    keys = np.column_stack([by[order], bx[order]])
    cuts = np.flatnonzero((np.diff(keys, axis=0) != 0).any(1)) + 1
    return np.split(order, cuts)


def iter_patches(image: SlideImage, um_to_px: np.ndarray, centers_um, *, fov_um: float = 112.0,
                 target_um_per_px: float = 0.5, fill: int = 255, workers: int | None = None,
                 block_px: int | None = None, transform: Callable[[np.ndarray], object] | None = None,
                 cache_bytes: int | None = None) -> Iterator[tuple[int, object]]:
    """Patches of many spots, read block by block (each tile decoded once) on a pool of threads.

    Yields ``(i, patch)`` for every row ``i`` of ``centers_um`` (``(n, 2)``, x and y in µm), in spatial order
    (blocks row by row, not input order); ``patch`` is the ``(n_px, n_px, 3)`` uint8 array :func:`extract_patch`
    returns for that centre, bit for bit, or ``transform(patch)`` (run in the worker thread, e.g. a PNG encoder).

    Parameters
    ----------
    image, um_to_px, fov_um, target_um_per_px, fill
        As :func:`extract_patch`.
    workers
        Threads (default :func:`default_workers`); 1 runs everything in the calling thread.
    block_px
        Side of a block, in level pixels (default: twice a patch's region, at least 256). Larger blocks low-pass
        fewer pixels twice and hold more memory (a block's float32 planes: ``12 · (block + region)²`` bytes).
    transform
        Applied to each patch in the worker thread; its result is yielded instead of the patch.
    cache_bytes
        Ceiling of the tile cache (default :data:`~hescape.data.readers.image.TILE_CACHE_BYTES`).

    Raises
    ------
    AlignmentError, HescapeDataError, InputFormatError
        A bad transform or patch size; a damaged tile (raised when that block is read).
    """
    from .readers.image import TILE_CACHE_BYTES

    _check_patch_size(fov_um, target_um_per_px)
    um_to_px = check_affine(um_to_px, "µm → image pixel transform")
    centers = np.asarray(centers_um, dtype=np.float64).reshape(-1, 2)
    if len(centers) == 0:
        return
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        msg = f"workers: expected a whole number >= 1, found {workers}"
        raise HescapeDataError(msg)
    level = _pick_level(image, um_to_px, target_um_per_px)
    samplings = [_sampling(image, um_to_px, c, fov_um, target_um_per_px, level) for c in centers]
    side = max(max(s.r1 - s.r0, s.c1 - s.c0) for s in samplings)
    blocks = _blocks(samplings, int(block_px) if block_px else max(256, 2 * side))
    boxes = [(min(samplings[i].r0 for i in b), min(samplings[i].c0 for i in b),
              max(samplings[i].r1 for i in b), max(samplings[i].c1 for i in b)) for b in blocks]
    # rows above the top of every block from k on are read by no block from k on: their tiles can go
    later_top = np.minimum.accumulate(np.array([b[0] for b in boxes] + [np.iinfo(np.int64).max])[::-1])[::-1]

    def prepare(k: int):
        r0, c0, r1, c1 = boxes[k]
        block = _planar(image.read_region(level, r0, c0, r1 - r0, c1 - c0, fill=fill))
        sigma, margin = samplings[blocks[k][0]].sigma, samplings[blocks[k][0]].margin
        whole = sigma > 0 and margin - 1 >= int(_TRUNCATE * sigma + 0.5)  # see the module docstring
        return (_low_pass(block, sigma) if whole else block), whole

    def cut(k: int, prepared, i: int):
        (block, filtered), (r0, c0, _r1, _c1), s = prepared, boxes[k], samplings[i]
        region = block[:, s.r0 - r0 : s.r1 - r0, s.c0 - c0 : s.c1 - c0]
        if s.sigma > 0 and not filtered:
            region = _low_pass(region, s.sigma)
        patch = _resample(region, s, fill)
        return patch if transform is None else transform(patch)

    ex = _Inline() if workers == 1 else ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hescape-patch")
    with image.tile_cache(TILE_CACHE_BYTES if cache_bytes is None else cache_bytes) as cache:
        try:
            preps: deque = deque()
            spots: deque = deque()
            nxt = 0
            for k in range(len(blocks)):
                while nxt < len(blocks) and nxt <= k + 1:  # read one block ahead of the one being cut
                    preps.append(ex.submit(prepare, nxt))
                    nxt += 1
                prepared = preps.popleft().result()
                if cache is not None:
                    cache.release(level, int(later_top[k + 1]))
                for i in blocks[k]:
                    spots.append((int(i), ex.submit(cut, k, prepared, int(i))))
                while len(spots) > len(blocks[k]):  # yield the previous blocks' patches; keep the pool busy
                    i, fut = spots.popleft()
                    yield i, fut.result()
            while spots:
                i, fut = spots.popleft()
                yield i, fut.result()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
