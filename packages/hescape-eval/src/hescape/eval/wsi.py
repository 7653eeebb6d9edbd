"""Whole-slide tiling and tile features for slide-level mutation prediction (HESCAPE paper §3.4.1, §8.4).

Protocol
--------
The paper (§8.4) extracts "embeddings from patches of size 256×256 pixels at 20× magnification" with TRIDENT
(mahmoodlab/TRIDENT, default parameters). Here, for one slide:

1. **Resolution** (:func:`read_slide_info`). Level-0 µm/px from the Aperio ``ImageDescription`` field
   ``MPP = …`` (SVS) or the OME-XML ``Pixels/@PhysicalSizeX`` (with ``PhysicalSizeXUnit``, default µm; OME-TIFF).
   A slide without either is refused unless ``um_per_px=`` is given. Level ``k``'s µm/px is level 0's times
   ``width_0 / width_k``.
2. **Level** (:func:`choose_level`). 20× is taken as 0.5 µm/px. The level used for tiles is the coarsest one that
   is not coarser than 0.5 µm/px (``um_per_px <= 0.5 · (1 + rel_tol)``, ``rel_tol = 0.02`` so that scanners'
   0.5040 µm/px still counts as 20×). A slide whose finest level is coarser is refused (upsampling would invent
   resolution).
3. **Tissue mask** (:func:`tissue_mask`). As CLAM's ``WholeSlideImage.segmentTissue`` (mahmoodlab/CLAM,
   ``wsi_core/WholeSlideImage.py``, ``use_otsu=True``): the HSV saturation ``S = 255 · (max − min) / max`` of an
   RGB image at low resolution, a 7-pixel median filter (``mthresh=7``), Otsu's threshold (OpenCV convention:
   tissue where ``S > t``). The low-resolution image is the coarsest level not coarser than ``mask_um_per_px``
   (default 8 µm/px; else the finest level), block-averaged by an integer factor to about ``mask_um_per_px``.
   Otsu uses scikit-image's ``threshold_otsu`` when installed, else :func:`otsu_threshold` (NumPy, 256 bins).
4. **Tiles**. A grid of non-overlapping ``tile_px × tile_px`` tiles at ``target_um_per_px`` (256 px at 0.5 µm/px =
   128 µm) anchored at the slide's top-left corner, with every tile whose top-left corner lies inside the slide:
   ``ceil(width / tile)`` columns and ``ceil(height / tile)`` rows, so the last column and row may reach past the
   slide's right and bottom edges (*edge tiles*). This is what the field's tools do: TRIDENT
   (``trident/wsi_objects/WSIPatcher.py``, ``_compute_cols_rows`` adds columns while ``x < width``), HEST
   (``src/hest/wsi.py``, ``ceil`` of width over patch size) and CLAM (``WholeSlideImage.process_contour``, default
   ``use_padding=True``: candidates up to the tissue's bounding box, not only whole patches). A tile is kept when
   its tissue fraction is at least ``min_tissue`` (0.5): tissue mask pixels whose centres fall inside the tile over
   *all* mask-pixel positions inside it, the mask grid continued past the slide, so the part of an edge tile beyond
   the slide counts as background (TRIDENT's rule: tissue area ≥ threshold · the whole patch's area). The mask
   covers whole mask pixels only; a strip narrower than one mask pixel at the right/bottom edge also counts as
   background. Pixels are read from the chosen level (window ``round(tile_um / level_um_per_px)`` px) and
   resampled to ``tile_px`` by area averaging (``torch.nn.functional.interpolate(mode="area")``); when the level is
   exactly 0.5 µm/px the tile is the level's pixels unchanged. The part of an edge tile beyond the slide is filled
   with :data:`EDGE_FILL` = 255 (white, a brightfield slide's background) before resampling. (TRIDENT and CLAM read
   it through OpenSlide, which returns transparent ``(0, 0, 0, 0)`` pixels outside the slide that
   ``.convert("RGB")`` makes black; white is used here so the padding looks like glass, not like dark tissue.)

Positions are ``(x, y)`` of each tile's top-left corner in µm from the slide's top-left corner (level-0 frame);
:attr:`SlideTiles.positions_px0` gives the same in level-0 pixels (TRIDENT/CLAM's coordinate convention).

Reading uses tifffile (with ``zarr`` for windowed reads when installed; otherwise a level is decoded whole) and
imagecodecs for JPEG tiles. openslide is not used. Install: ``pip install tifffile imagecodecs`` (both come with
hescape-data in the workspace).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError

__all__ = [
    "TARGET_UM_PER_PX", "EDGE_FILL", "SlideInfo", "SlideTiles", "read_slide_info", "choose_level", "otsu_threshold",
    "tissue_mask", "tile_slide", "plot_tiles", "slide_features", "extract_features",
]

#: 20× magnification as µm per pixel (paper §8.4 "256×256 pixels at 20× magnification"; TRIDENT's 20× = 0.5 µm/px).
TARGET_UM_PER_PX = 0.5
#: Value (``uint8``, every channel) of the pixels of an edge tile that lie beyond the slide: white background.
EDGE_FILL = 255
#: Tolerance in µm when comparing tile edges with the slide's edges (floating-point products of µm/px and pixels).
_EDGE_TOL_UM = 1e-6

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _tifffile():
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "whole-slide reading"
        raise HescapeEvalError.build(
            msg, expected="the tifffile package", found="it is not installed",
            fix="pip install tifffile imagecodecs") from exc
    return tifffile


@dataclass(frozen=True)
class SlideInfo:
    """Geometry of one slide.

    Attributes
    ----------
    path : str
    format : str
        ``"svs"``, ``"ome"`` or ``"tiff"``.
    um_per_px : float
        Level-0 µm per pixel.
    mpp_source : str
        Where ``um_per_px`` came from (``"svs MPP"``, ``"ome PhysicalSizeX"``, ``"argument"``).
    level_shapes : tuple of (int, int)
        ``(height, width)`` in pixels of each pyramid level, finest first.
    level_um_per_px : tuple of float
        µm per pixel of each level.
    axes : str
        tifffile axes of the image series (``"YXS"`` or ``"CYX"`` after dropping singleton axes).
    """

    path: str
    format: str
    um_per_px: float
    mpp_source: str
    level_shapes: tuple[tuple[int, int], ...]
    level_um_per_px: tuple[float, ...]
    axes: str

    @property
    def shape_um(self) -> tuple[float, float]:
        """``(height, width)`` of the slide in µm."""
        h, w = self.level_shapes[0]
        return h * self.um_per_px, w * self.um_per_px


def _svs_mpp(description: str) -> float | None:
    m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return float(m.group(1)) if m else None


def _ome_mpp(ome_xml: str) -> float | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and el.get("PhysicalSizeX") is not None:
            unit = el.get("PhysicalSizeXUnit", "µm")
            if unit not in _UNIT_TO_UM:
                return None
            return float(el.get("PhysicalSizeX")) * _UNIT_TO_UM[unit]
    return None


def _series_axes(series) -> tuple[str, tuple[int, ...]]:
    axes, shape = series.axes, series.shape
    keep = [i for i, a in enumerate(axes) if a in "YXSC" or shape[i] != 1]
    return "".join(axes[i] for i in keep), tuple(shape[i] for i in keep)


def _check_file(path: str) -> None:
    """Refuse, naming the cause, a path that is no file, a folder, an unreadable or an empty file."""
    what = f"slide {path!r}"
    if not os.path.exists(path):
        found = "a broken symbolic link" if os.path.islink(path) else "no such file"
        raise HescapeEvalError.build(what, expected="an existing Aperio SVS or OME-TIFF file", found=found,
                                     fix="correct the path (relative paths in a slide table start from the table's "
                                         "folder) or remove the slide")
    if os.path.isdir(path):
        raise HescapeEvalError.build(what, expected="a slide file (.svs, .ome.tif)", found="a folder",
                                     fix="give the slide file inside it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise HescapeEvalError.build(what, expected="a readable file", found=f"{type(exc).__name__}: {exc.strerror}",
                                     fix="check the file's permissions") from None
    if not head:
        raise HescapeEvalError.build(what, expected="an Aperio SVS or OME-TIFF file", found="an empty file (0 bytes)",
                                     fix="copy or download the slide again")


def _data_end(series) -> int:
    """Largest ``offset + bytecount`` of the image data of every level of ``series`` (bytes)."""
    end = 0
    for lvl in series.levels:
        for page in lvl.pages:
            if page is not None and len(page.dataoffsets):
                end = max(end, int(np.max(np.add(page.dataoffsets, page.databytecounts, dtype=np.int64))))
    return end


def read_slide_info(path: str | os.PathLike, *, um_per_px: float | None = None) -> SlideInfo:
    """Open a slide and read its pyramid geometry and µm/px (the header only; no image data is decoded).

    Parameters
    ----------
    path : path of an Aperio SVS or OME-TIFF (any tiled RGB TIFF with ``um_per_px=``).
    um_per_px : optional level-0 µm/px; overrides the file's value, required when the file has none.

    Raises
    ------
    HescapeEvalError
        No such file, a folder, an unreadable or empty file; a file that cannot be opened as a TIFF or whose image
        data end beyond the end of the file (truncated: an interrupted copy or download); no µm/px and none given;
        an image that is not RGB.
    """
    tifffile = _tifffile()
    path = str(path)
    _check_file(path)
    what = f"slide {path!r}"
    # tifffile logs what it skips in a damaged file; the problem is reported below as one error instead.
    with _quiet_tifffile():
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise HescapeEvalError.build(
                what, expected="a readable Aperio SVS or OME-TIFF file", found=f"{type(exc).__name__}: {exc}",
                fix="check the path and that the file is a complete TIFF") from exc
        return _read_info(tif, path, what, um_per_px)


@contextlib.contextmanager
def _quiet_tifffile():
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _read_info(tif, path: str, what: str, um_per_px: float | None) -> SlideInfo:
    with tif:
        try:
            series = tif.series[0]
            fmt = "svs" if tif.is_svs else "ome" if tif.is_ome else "tiff"
            file_mpp = None
            if tif.is_svs:
                file_mpp = _svs_mpp(tif.pages[0].description)
            elif tif.is_ome:
                file_mpp = _ome_mpp(tif.ome_metadata or "")
            axes, _ = _series_axes(series)
            end, size = _data_end(series), tif.filehandle.size
        except Exception as exc:  # a damaged header: tifffile fails on its tags or pages
            raise HescapeEvalError.build(
                what, expected="a readable Aperio SVS or OME-TIFF file",
                found=f"a damaged TIFF ({type(exc).__name__}: {exc})",
                fix="copy or download the slide again (it may be truncated)") from exc
        if end > size:
            raise HescapeEvalError.build(
                what, expected="a complete TIFF file",
                found=f"a truncated file: its image data end at byte {end:,} but it has {size:,} bytes",
                fix="copy or download the slide again (compare its size with the source)")
        if axes not in ("YXS", "CYX"):
            raise HescapeEvalError.build(
                what, expected="an RGB image (axes YXS or CYX)", found=f"axes {series.axes!r} "
                f"shape {series.shape}", fix="convert the slide to RGB OME-TIFF")
        shapes = []
        for lvl in series.levels:
            ax, shp = _series_axes(lvl)
            shapes.append((shp[ax.index("Y")], shp[ax.index("X")]))
    if um_per_px is not None:
        if not (np.isfinite(um_per_px) and um_per_px > 0):
            msg = "um_per_px"
            raise HescapeEvalError.build(msg, expected="a positive number", found=repr(um_per_px),
                                         fix="pass the level-0 µm/px, e.g. um_per_px=0.25")
        mpp, source = float(um_per_px), "argument"
    elif file_mpp is not None and file_mpp > 0:
        mpp, source = file_mpp, ("svs MPP" if fmt == "svs" else "ome PhysicalSizeX")
    else:
        raise HescapeEvalError.build(
            what, expected="a µm/px in the file (SVS 'MPP = …' or OME PhysicalSizeX)",
            found=f"none in this {fmt.upper()} file", fix="pass um_per_px=<level-0 µm per pixel> if you know it")
    w0 = shapes[0][1]
    level_mpp = tuple(mpp * w0 / w for _, w in shapes)
    return SlideInfo(path, fmt, mpp, source, tuple(shapes), level_mpp, axes)


def choose_level(level_um_per_px: Sequence[float], target: float = TARGET_UM_PER_PX, rel_tol: float = 0.02) -> int:
    """Index of the coarsest level whose µm/px is not coarser than ``target`` (within ``rel_tol``).

    Raises
    ------
    HescapeEvalError
        Every level is coarser than ``target``.
    """
    ok = [i for i, m in enumerate(level_um_per_px) if m <= target * (1 + rel_tol)]
    if not ok:
        msg = "pyramid level"
        raise HescapeEvalError.build(
            msg, expected=f"a level at or finer than {target} µm/px (20×)",
            found=f"levels at {[round(m, 4) for m in level_um_per_px]} µm/px",
            fix="use a slide scanned at 20× or 40×, or pass a larger target_um_per_px")
    return max(ok, key=lambda i: level_um_per_px[i])


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of ``uint8`` values: the ``t`` maximising the between-class variance of ``≤ t`` / ``> t``.

    Same convention as OpenCV's ``THRESH_OTSU`` with ``THRESH_BINARY`` (foreground ``> t``).
    """
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = np.where(denom > 0, (mu_t * omega - mu) ** 2 / denom, -1.0)
    return int(np.argmax(sigma_b))


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(mx > 0, 255.0 * (mx - mn) / mx, 0.0)
    return np.clip(np.round(s), 0, 255).astype(np.uint8)


def tissue_mask(rgb: np.ndarray, *, median: int = 7) -> tuple[np.ndarray, int]:
    """Tissue mask of a low-resolution ``(H, W, 3)`` ``uint8`` RGB image: Otsu on the median-filtered saturation.

    Returns ``(mask (H, W) bool, threshold)``. Source: CLAM ``segmentTissue`` (see module docstring).
    """
    from scipy.ndimage import median_filter

    s = _saturation(rgb)
    if median > 1:
        s = median_filter(s, size=median, mode="reflect")
    try:
        from skimage.filters import threshold_otsu
        t = int(threshold_otsu(s))
    except ImportError:
        t = otsu_threshold(s)
    return s > t, t


class _LevelReader:
    """Windowed reads of one pyramid level (zarr when installed, else the level decoded once)."""

    def __init__(self, tif, info: SlideInfo, level: int):
        self.info, self._tif = info, tif
        series = tif.series[0]
        self._z = None
        try:
            import zarr
            self._z = zarr.open(series.aszarr(level=level), mode="r")
        except Exception:  # zarr absent or incompatible: decode the level once
            self._arr = series.levels[level].asarray()
        self._cyx = info.axes == "CYX"

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        src = self._z if self._z is not None else self._arr
        if self._cyx:
            out = np.asarray(src[..., :, y0:y0 + h, x0:x0 + w]).reshape(-1, h, w)[:3].transpose(1, 2, 0)
        else:
            out = np.asarray(src[..., y0:y0 + h, x0:x0 + w, :]).reshape(h, w, -1)[..., :3]
        return np.ascontiguousarray(out, dtype=np.uint8)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    a = a[:h, :w].astype(np.float32)
    return np.round(a.reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3))).astype(np.uint8)


@dataclass
class SlideTiles:
    """Tiles kept on one slide and the means to read them.

    Attributes
    ----------
    info : SlideInfo
    slide_id : str
        File stem unless given.
    level : int
        Pyramid level read for tiles; ``level_um_per_px`` its µm/px.
    tile_px, target_um_per_px : int, float
        Output tile size and resolution; ``tile_um = tile_px · target_um_per_px``.
    positions_um : (N, 2) float64
        ``(x, y)`` of each kept tile's top-left corner, µm from the slide's top-left corner.
    tissue_fraction : (N,) float64
        Tissue fraction of each kept tile (from the mask; the part beyond the slide counts as background).
    mask : (h, w) bool
        Tissue mask at ``mask_um_per_px``; ``thumbnail`` the RGB image it was computed on; ``otsu`` its threshold.
    grid_fraction : (rows, cols) float64
        Tissue fraction of every grid cell (kept or not), edge cells included: ``rows = ceil(height / tile_um)``,
        ``cols = ceil(width / tile_um)``.
    """

    info: SlideInfo
    slide_id: str
    level: int
    level_um_per_px: float
    tile_px: int
    target_um_per_px: float
    positions_um: np.ndarray
    tissue_fraction: np.ndarray
    mask: np.ndarray
    mask_um_per_px: float
    thumbnail: np.ndarray
    otsu: int
    grid_fraction: np.ndarray
    min_tissue: float = 0.5
    _reader: object = field(default=None, repr=False)

    @property
    def tile_um(self) -> float:
        """Tile side in µm."""
        return self.tile_px * self.target_um_per_px

    @property
    def positions_px0(self) -> np.ndarray:
        """``(N, 2)`` ``int64`` top-left corners in level-0 pixels (``round(µm / um_per_px)``)."""
        return np.round(self.positions_um / self.info.um_per_px).astype(np.int64)

    @property
    def edge(self) -> np.ndarray:
        """``(N,)`` bool: the kept tile reaches past the slide's right or bottom edge (padded with :data:`EDGE_FILL`)."""
        h_um, w_um = self.info.shape_um
        far = self.positions_um + self.tile_um
        return (far[:, 0] > w_um + _EDGE_TOL_UM) | (far[:, 1] > h_um + _EDGE_TOL_UM)

    @property
    def edge_cells(self) -> np.ndarray:
        """``(rows, cols)`` bool: grid cells that reach past the slide's right or bottom edge."""
        h_um, w_um = self.info.shape_um
        rows, cols = self.grid_fraction.shape
        right = np.arange(cols) * self.tile_um + self.tile_um > w_um + _EDGE_TOL_UM
        bottom = np.arange(rows) * self.tile_um + self.tile_um > h_um + _EDGE_TOL_UM
        return bottom[:, None] | right[None, :]

    def summary(self) -> str:
        """One line: tiles kept of the grid, and how many edge tiles were kept (padded) and dropped (< min_tissue)."""
        rows, cols = self.grid_fraction.shape
        edge = self.edge_cells
        kept_edge = int(self.edge.sum())
        return (f"{self.slide_id}: {len(self)} of {rows * cols} tiles ({rows} x {cols} grid of {self.tile_um:g} µm) "
                f"with >= {self.min_tissue:.0%} tissue; edge tiles: {kept_edge} kept (padded with white), "
                f"{int(edge.sum()) - kept_edge} dropped (< {self.min_tissue:.0%} tissue)")

    def __len__(self) -> int:
        return len(self.positions_um)

    def read(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Pixels of the tiles ``indices`` (all by default): ``(n, tile_px, tile_px, 3)`` ``uint8``.

        The part of an edge tile beyond the slide is :data:`EDGE_FILL` (white) in the level's pixels, then resampled
        with the rest.
        """
        import torch
        import torch.nn.functional as F

        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        win = int(round(self.tile_um / self.level_um_per_px))
        out = np.empty((len(idx), self.tile_px, self.tile_px, 3), dtype=np.uint8)
        edge = self.edge
        tifffile = _tifffile()
        with tifffile.TiffFile(self.info.path) as tif:
            reader = _LevelReader(tif, self.info, self.level)
            lh, lw = self.info.level_shapes[self.level]
            for n, i in enumerate(idx):
                x_um, y_um = self.positions_um[i]
                x0, y0 = int(round(x_um / self.level_um_per_px)), int(round(y_um / self.level_um_per_px))
                if not edge[i]:  # a whole tile: keep the window inside the level despite rounding
                    x0, y0 = min(x0, lw - win), min(y0, lh - win)
                h, w = max(0, min(win, lh - y0)), max(0, min(win, lw - x0))
                if (h, w) == (win, win):
                    patch = reader.read(y0, x0, win, win)
                else:
                    patch = np.full((win, win, 3), EDGE_FILL, dtype=np.uint8)
                    if h and w:
                        patch[:h, :w] = reader.read(y0, x0, h, w)
                if win != self.tile_px:
                    t = torch.from_numpy(patch).permute(2, 0, 1)[None].float()
                    t = F.interpolate(t, size=(self.tile_px, self.tile_px), mode="area")
                    patch = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
                out[n] = patch
        return out

    def iter_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, pixels)`` in batches of ``batch_size`` tiles."""
        for start in range(0, len(self), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self)))
            yield idx, self.read(idx)


def tile_slide(path: str | os.PathLike, *, um_per_px: float | None = None, tile_px: int = 256,
               target_um_per_px: float = TARGET_UM_PER_PX, min_tissue: float = 0.5, mask_um_per_px: float = 8.0,
               slide_id: str | None = None) -> SlideTiles:
    """Tissue mask and tile grid of one slide (protocol in the module docstring).

    Parameters
    ----------
    path : SVS or OME-TIFF.
    um_per_px : level-0 µm/px when the file has none (or to override it).
    tile_px : tile side in output pixels (256, paper §8.4).
    target_um_per_px : output resolution (0.5 µm/px = 20×).
    min_tissue : minimum tissue fraction of a kept tile (0.5), over the whole tile: the part of an edge tile beyond
        the slide counts as background.
    mask_um_per_px : resolution of the tissue mask (about 8 µm/px).

    Returns
    -------
    SlideTiles
        Its grid has ``ceil(height / tile_um)`` rows and ``ceil(width / tile_um)`` columns: tiles reaching past the
        right/bottom edge are kept when they hold enough tissue (:attr:`SlideTiles.edge`; counts in
        :meth:`SlideTiles.summary`).

    Raises
    ------
    HescapeEvalError
        Unreadable slide, no µm/px, no level at 20× or finer, bad parameters.
    """
    if not (0.0 <= min_tissue <= 1.0) or tile_px <= 0 or target_um_per_px <= 0 or mask_um_per_px <= 0:
        msg = "tiling parameters"
        raise HescapeEvalError.build(
            msg, expected="0 <= min_tissue <= 1 and positive tile_px, target_um_per_px, "
            "mask_um_per_px", found=f"min_tissue={min_tissue}, tile_px={tile_px}, "
            f"target_um_per_px={target_um_per_px}, mask_um_per_px={mask_um_per_px}", fix="pass valid values")
    info = read_slide_info(path, um_per_px=um_per_px)
    level = choose_level(info.level_um_per_px, target_um_per_px)
    finer = [i for i, m in enumerate(info.level_um_per_px) if m <= mask_um_per_px]
    mlevel = max(finer, key=lambda i: info.level_um_per_px[i]) if finer else 0
    mh, mw = info.level_shapes[mlevel]
    if mh * mw > 2e8:
        msg = f"slide {info.path!r}"
        raise HescapeEvalError.build(
            msg, expected="a pyramid level of at most 2e8 pixels for the tissue mask",
            found=f"coarsest usable level {mw}×{mh} px", fix="convert the slide to a pyramidal TIFF")
    tifffile = _tifffile()
    with tifffile.TiffFile(info.path) as tif:
        low = _LevelReader(tif, info, mlevel).read(0, 0, mh, mw)
    factor = max(1, int(mask_um_per_px // info.level_um_per_px[mlevel]))
    thumb = _block_mean(low, factor)
    mask_mpp = info.level_um_per_px[mlevel] * factor
    mask, t = tissue_mask(thumb)

    tile_um = tile_px * target_um_per_px
    h_um, w_um = info.shape_um
    # Every tile whose top-left corner is inside the slide (edge tiles included).
    rows = max(1, int(np.ceil((h_um - _EDGE_TOL_UM) / tile_um)))
    cols = max(1, int(np.ceil((w_um - _EDGE_TOL_UM) / tile_um)))
    # Tissue fraction of each grid cell: tissue mask pixels whose centres fall in the cell over all mask-pixel
    # positions in it, the mask grid continued (as background) past the mask to cover the whole grid.
    ny = max(mask.shape[0], int(np.ceil(rows * tile_um / mask_mpp)) + 1)
    nx = max(mask.shape[1], int(np.ceil(cols * tile_um / mask_mpp)) + 1)
    grid_mask = np.zeros((ny, nx), dtype=bool)
    grid_mask[:mask.shape[0], :mask.shape[1]] = mask
    cy = np.floor((np.arange(ny) + 0.5) * mask_mpp / tile_um).astype(np.int64)
    cx = np.floor((np.arange(nx) + 0.5) * mask_mpp / tile_um).astype(np.int64)
    inside = (cy[:, None] < rows) & (cx[None, :] < cols)
    cell = (cy[:, None] * cols + cx[None, :])[inside]
    tissue = np.bincount(cell, weights=grid_mask[inside].astype(np.float64), minlength=rows * cols)
    count = np.bincount(cell, minlength=rows * cols).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(count > 0, tissue / count, 0.0).reshape(rows, cols)
    r, c = np.nonzero(frac >= min_tissue)
    positions = np.stack([c * tile_um, r * tile_um], axis=1).astype(np.float64)
    return SlideTiles(info=info, slide_id=slide_id or Path(info.path).stem, level=level,
                      level_um_per_px=info.level_um_per_px[level], tile_px=tile_px,
                      target_um_per_px=target_um_per_px, positions_um=positions.reshape(-1, 2),
                      tissue_fraction=frac[r, c], mask=mask, mask_um_per_px=mask_mpp, thumbnail=thumb, otsu=t,
                      grid_fraction=frac, min_tissue=min_tissue)


def plot_tiles(tiles: SlideTiles, path: str | os.PathLike) -> str:
    """Save a PNG: the low-resolution slide, the tissue mask and the kept tiles (rectangles; edge tiles in orange).

    Needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    s = tiles.mask_um_per_px
    fig, axes = plt.subplots(1, 2, figsize=(10, 6))
    ext = (0, tiles.thumbnail.shape[1] * s, tiles.thumbnail.shape[0] * s, 0)
    axes[0].imshow(tiles.thumbnail, extent=ext)
    axes[0].set_title(f"{tiles.slide_id}: {len(tiles)} tiles of {tiles.tile_um:g} µm ({int(tiles.edge.sum())} edge)")
    axes[1].imshow(tiles.mask, extent=ext, cmap="gray")
    axes[1].set_title(f"mask (Otsu S>{tiles.otsu}), {s:.2f} µm/px")
    for ax in axes:
        for (x, y), e in zip(tiles.positions_um, tiles.edge, strict=True):
            ax.add_patch(Rectangle((x, y), tiles.tile_um, tiles.tile_um, fill=False,
                                   edgecolor="orange" if e else "lime", lw=0.8))
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        class _Bar:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr)

            def close(self):
                print(file=sys.stderr)
        return _Bar()


def _atomic_savez(path: Path, **arrays) -> None:
    from .io import atomic_write  # temporary file, fsync, rename: a kill never leaves a half-written cache file

    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_cache(path: Path, encoder_name: str) -> dict[str, np.ndarray]:
    from .io import read_npz

    what = f"feature cache {str(path)!r}"
    data = read_npz(path, what=what, fix="delete the file to recompute")
    missing = [k for k in ("features", "positions_um", "encoder") if k not in data]
    if missing:
        raise HescapeEvalError.build(what, expected="features, positions_um and encoder arrays",
                                     found=f"arrays {sorted(data)} (missing {missing})",
                                     fix="delete the file to recompute")
    if str(data.get("encoder", "")) != encoder_name:
        msg = f"feature cache {str(path)!r}"
        raise HescapeEvalError.build(
            msg, expected=f"features of encoder {encoder_name!r}",
            found=f"encoder {str(data.get('encoder', ''))!r}", fix="use another cache_dir or delete the file")
    return data


def slide_features(tiles: SlideTiles, encoder: Callable, batch_size: int = 64,
                   cache_dir: str | os.PathLike | None = None, *, encoder_name: str | None = None,
                   device: str = "cpu", progress: bool = True) -> np.ndarray:
    """Encode every kept tile of one slide, with an on-disk cache.

    Parameters
    ----------
    tiles : SlideTiles from :func:`tile_slide`.
    encoder : callable ``(B, 3, H, W) uint8 torch.Tensor -> (B, D)`` (tensor or array); e.g. a hescape.models
        image encoder with its preprocessing contract, which accepts ``uint8``. Called under ``torch.no_grad()``.
    batch_size : tiles per encoder call.
    cache_dir : when given, ``<cache_dir>/<slide_id>.npz`` holds ``features (N, D) float32``, ``positions_um
        (N, 2)``, ``um_per_px``, ``tile_um`` and ``encoder``; written atomically (temporary file then
        ``os.replace``) and reused when present.
    encoder_name : stored in the cache and checked on reuse (default: the encoder's class name).

    Returns
    -------
    (N, D) float32 array, rows in the order of ``tiles.positions_um``.

    Raises
    ------
    HescapeEvalError
        A cache from another encoder or another tiling, or damaged; an encoder returning the wrong number of rows or
        NaN/inf (nothing is cached then).
    """
    import torch

    name = encoder_name or type(encoder).__name__
    cache = Path(cache_dir) / f"{tiles.slide_id}.npz" if cache_dir is not None else None
    if cache is not None and cache.exists():
        data = _load_cache(cache, name)
        if data["positions_um"].shape != tiles.positions_um.shape or not np.allclose(
                data["positions_um"], tiles.positions_um):
            msg = f"feature cache {str(cache)!r}"
            raise HescapeEvalError.build(
                msg, expected=f"{len(tiles)} tiles at the same positions",
                found=f"{len(data['positions_um'])} tiles", fix="delete the file to recompute with this tiling")
        return data["features"]
    feats = []
    bar = _progress(len(tiles), tiles.slide_id, progress)
    with torch.no_grad():
        for idx, pix in tiles.iter_batches(batch_size):
            x = torch.from_numpy(pix).permute(0, 3, 1, 2).contiguous().to(device)
            out = encoder(x)
            out = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
            if out.ndim != 2 or out.shape[0] != len(idx):
                msg = "encoder output"
                raise HescapeEvalError.build(msg, expected=f"shape ({len(idx)}, D)",
                                             found=f"shape {out.shape}", fix="return one embedding per tile")
            bad = ~np.isfinite(out).all(axis=1)
            if bad.any():  # never cached: a rerun would reuse the NaN features without a word
                msg = f"encoder output on slide {tiles.slide_id!r}"
                raise HescapeEvalError.build(msg, expected="finite features",
                                             found=f"NaN or inf for {int(bad.sum())} of {len(idx)} tiles of a batch, "
                                                   f"first at tile {int(idx[int(np.argmax(bad))])}",
                                             fix="check the encoder's weights and precision (e.g. --device cpu for "
                                                 "fp32)")
            feats.append(out.astype(np.float32))
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    if cache is not None:
        _atomic_savez(cache, features=features, positions_um=tiles.positions_um, um_per_px=tiles.info.um_per_px,
                      tile_um=tiles.tile_um, encoder=np.str_(name))
    return features


def extract_features(paths: Sequence[str | os.PathLike], encoder: Callable, cache_dir: str | os.PathLike, *,
                     batch_size: int = 64, encoder_name: str | None = None, device: str = "cpu",
                     progress: bool = True, **tile_kwargs) -> list[Path]:
    """Tile and encode many slides into ``<cache_dir>/<stem>.npz``; slides whose file exists are skipped (resumable).

    Returns the cache paths in the order of ``paths``. ``tile_kwargs`` go to :func:`tile_slide`.
    """
    name = encoder_name or type(encoder).__name__
    out = []
    bar = _progress(len(paths), "slides", progress)
    for p in paths:
        cache = Path(cache_dir) / f"{tile_kwargs.get('slide_id') or Path(p).stem}.npz"
        if cache.exists():
            _load_cache(cache, name)  # refuses a cache from another encoder
        else:
            tiles = tile_slide(p, **tile_kwargs)
            slide_features(tiles, encoder, batch_size, cache_dir, encoder_name=name, device=device,
                           progress=progress)
        out.append(cache)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
