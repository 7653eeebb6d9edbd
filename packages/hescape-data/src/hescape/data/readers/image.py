"""Lazy access to RGB slide images: tiled/pyramidal (OME-)TIFF read by region, and small in-memory images.

Pixel coordinates follow one convention everywhere in hescape-data: continuous ``(x, y)`` = (column, row),
pixel ``(r, c)`` covers ``[c, c+1) × [r, r+1)`` and has its centre at ``(c + 0.5, r + 0.5)``. A pyramid level
with downsample ``(fx, fy)`` therefore has coordinates ``(x / fx, y / fy)`` of the level-0 ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import InputFormatError, brief

__all__ = ["SlideImage", "ArrayImage", "TiffImage", "TileCache", "open_image", "check_not_blank", "over_white",
           "MAX_ARRAY_IMAGE_PIXELS", "TILE_CACHE_BYTES"]

#: Largest PNG/JPEG (or other non-TIFF) image read into memory, in pixels: 1 gigapixel (3 GB as RGB), larger than
#: any Visium full-resolution scan saved as PNG/JPEG. PIL's decompression-bomb check stays on; images above this
#: are refused with a message (convert them to a tiled TIFF, which is read lazily tile by tile and has no limit).
MAX_ARRAY_IMAGE_PIXELS = 1_000_000_000

#: Default ceiling of a :class:`TileCache`, in bytes of decoded pixels (1 GiB). Patch extraction in spatial order
#: (:func:`hescape.data.patches.iter_patches`) keeps about one band of tiles as wide as the image and as high as a
#: block of patches: ~0.3 GB for a 56,000 px wide Xenium H&E at level 0. Only wider images reach the ceiling; the
#: least recently used tiles are then dropped and decoded again when needed (same pixels, more time).
TILE_CACHE_BYTES = 1 << 30


class TileCache:
    """Decoded tiles (or strips) of a TIFF kept for reuse, so each is decoded once while it is kept; thread-safe.

    Keys are ``(level, page, segment index)``. Two threads asking for the same tile at once decode it once (the
    second waits for the first). Tiles are dropped by :meth:`release` (tiles above a row of a level, which the
    caller will not read again) or, least recently used first, when the decoded bytes exceed ``max_bytes``.
    ``decoded`` counts decodes, ``hits`` reuses and ``redecoded`` decodes of a tile decoded before (after it
    was dropped).
    """

    def __init__(self, max_bytes: int = TILE_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.decoded = self.hits = self.redecoded = 0
        self._lock = threading.Lock()
        self._tiles: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (value, bottom row, nbytes)
        self._pending: dict[tuple, threading.Event] = {}
        self._seen: set[tuple] = set()

    def get(self, key: tuple, load: Callable[[], tuple | None]) -> tuple | None:
        """The cached value of ``key``, or ``load()`` (called once, outside the lock) stored under it.

        ``load`` returns ``(array, y, x)`` (the decoded segment and its top-left level pixel) or None.
        """
        while True:
            with self._lock:
                hit = self._tiles.get(key)
                if hit is not None:
                    self._tiles.move_to_end(key)
                    self.hits += 1
                    return hit[0]
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    break
            event.wait()  # another thread is decoding this tile; then look again
        try:
            value = load()
        except BaseException:
            with self._lock:
                self._pending.pop(key)
                event.set()
            raise
        with self._lock:  # stored before the waiters wake, so none of them decodes it again
            if value is not None:
                self.decoded += 1
                self.redecoded += key in self._seen
                self._seen.add(key)
                arr, y, _x = value
                self._tiles[key] = (value, y + arr.shape[0], arr.nbytes)
                self.nbytes += arr.nbytes
                while self.nbytes > self.max_bytes and len(self._tiles) > 1:
                    _, (_v, _b, nb) = self._tiles.popitem(last=False)
                    self.nbytes -= nb
            self._pending.pop(key)
            event.set()
        return value

    def release(self, level: int, row: int) -> None:
        """Drop the tiles of ``level`` that end at or above ``row`` (level pixels): no later read needs them."""
        with self._lock:
            for key in [k for k, (_v, bottom, _nb) in self._tiles.items() if k[0] == level and bottom <= row]:
                self.nbytes -= self._tiles.pop(key)[2]


class SlideImage:
    """Interface: ``levels`` (shapes ``(H, W)``, level 0 first), ``read_region`` and ``thumbnail``."""

    name: str
    level_shapes: list[tuple[int, int]]

    @property
    def shape(self) -> tuple[int, int]:
        return self.level_shapes[0]

    def downsample(self, level: int) -> tuple[float, float]:
        """``(fx, fy)``: level-0 pixels per pixel of ``level``."""
        h0, w0 = self.level_shapes[0]
        h, w = self.level_shapes[level]
        return w0 / w, h0 / h

    def _read(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:  # in-bounds only
        raise NotImplementedError

    def read_region(self, level: int, r0: int, c0: int, h: int, w: int, fill: int = 255) -> np.ndarray:
        """Pixels ``[r0, r0+h) × [c0, c0+w)`` of ``level`` as ``(h, w, 3)`` uint8; outside the image is ``fill``."""
        H, W = self.level_shapes[level]
        out = np.full((h, w, 3), fill, dtype=np.uint8)
        rs, re = max(r0, 0), min(r0 + h, H)
        cs, ce = max(c0, 0), min(c0 + w, W)
        if re > rs and ce > cs:
            out[rs - r0 : re - r0, cs - c0 : ce - c0] = self._read(level, rs, re, cs, ce)
        return out

    def thumbnail(self, max_side: int = 1600) -> tuple[np.ndarray, tuple[float, float]]:
        """The smallest level with a side ≥ ``max_side`` (or level 0), strided down to ≤ ``max_side``.

        Returns the RGB array and ``(fx, fy)``, the level-0 pixels per thumbnail pixel.
        """
        level = 0
        for i, (h, w) in enumerate(self.level_shapes):
            if max(h, w) >= max_side:
                level = i
        h, w = self.level_shapes[level]
        step = max(1, int(np.ceil(max(h, w) / max_side)))
        arr = self._read(level, 0, h, 0, w)[::step, ::step]
        fx, fy = self.downsample(level)
        return arr, (fx * step, fy * step)

    @contextlib.contextmanager
    def tile_cache(self, max_bytes: int = TILE_CACHE_BYTES) -> Iterator[TileCache | None]:
        """Within the ``with`` block, decoded tiles are kept in a :class:`TileCache` (None: nothing to decode)."""
        yield None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def over_white(arr: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB from ``(..., 3|4)`` uint8: an alpha channel is composited over white.

    A transparent pixel shows no tissue; its stored colour is often black (0, 0, 0), which, with the alpha
    channel simply dropped, would read as dark tissue (and count towards ``--min-tissue-fraction``). Over white it
    reads as glass, the same white that pads a patch beyond the image edge. Opaque pixels (alpha 255) keep their
    values exactly: ``rgb·a/255 + 255·(1 − a/255)``, rounded to the nearest integer.
    """
    if arr.shape[-1] == 3:
        return arr
    rgb, a = arr[..., :3], arr[..., 3:4]
    if (a == 255).all():
        return rgb
    a16 = a.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a16 + 255 * (255 - a16) + 127) // 255).astype(np.uint8)


def _to_rgb(arr: np.ndarray, where: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 from ``(H, W, 3|4)`` (alpha composited over white, :func:`over_white`); refuse anything
    else."""
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        msg = (f"{where}: expected an RGB image (H, W, 3) or RGBA (H, W, 4), found shape {arr.shape}; "
               "H&E patches need a colour image")
        raise InputFormatError(msg)
    if arr.dtype != np.uint8:
        msg = f"{where}: expected 8-bit RGB, found dtype {arr.dtype}; convert the image to 8-bit RGB"
        raise InputFormatError(msg)
    return over_white(arr)


class ArrayImage(SlideImage):
    """An image held in memory (PNG/JPEG, e.g. Visium ``tissue_hires_image.png``); one level."""

    def __init__(self, array: np.ndarray, name: str = "array"):
        self.name = name
        self.array = np.ascontiguousarray(_to_rgb(np.asarray(array), name))
        self.level_shapes = [self.array.shape[:2]]

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_pixels: int = MAX_ARRAY_IMAGE_PIXELS) -> ArrayImage:
        """Read a PNG/JPEG (any format PIL reads) into memory; refuse one of more than ``max_pixels`` pixels."""
        import warnings

        from PIL import Image

        path = Path(path)
        if not path.is_file():
            msg = f"expected an image file at {path}, found no such file"
            raise InputFormatError(msg)
        too_big = (f"{path}: expected an image of at most {max_pixels:,} pixels to read into memory, found a larger "
                   "one (or a file claiming to be); convert it to a tiled (pyramidal) TIFF, which is read lazily")
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's decompression-bomb check, at our documented limit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    mode = im.mode
                    if w * h <= max_pixels and mode in ("RGB", "RGBA"):
                        arr = np.asarray(im)
        except Image.DecompressionBombError:
            raise InputFormatError(too_big) from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
            msg = f"{path}: expected a PNG/JPEG/TIFF image, found a file PIL cannot read ({brief(e, 100)})"
            raise InputFormatError(msg) from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
        if w * h > max_pixels:
            raise InputFormatError(too_big)
        if mode not in ("RGB", "RGBA"):
            msg = (f"{path}: expected an RGB(A) image, found mode {mode!r} "
                   f"({'grayscale' if mode in ('L', 'I', 'I;16', 'F') else 'other'}); "
                   "H&E patches need a colour image")
            raise InputFormatError(msg)
        return cls(arr, name=str(path))

    def _read(self, level, r0, r1, c0, c1):
        return self.array[r0:r1, c0:c1]


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's log messages while a file is parsed (damage is reported by our own one-line errors)."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


class TiffImage(SlideImage):
    """A (pyramidal, tiled) TIFF / OME-TIFF read lazily: only the tiles or strips a region touches are decoded.

    Accepted layouts (after dropping singleton axes): ``YXS`` with S = 3 or 4 (interleaved RGB[A]) and
    ``CYX`` / ``SYX`` with 3 or 4 channels (planar, in one page or one page per channel); 8-bit only. An alpha
    channel is composited over white (:func:`over_white`).
    Uncompressed single-strip images are memory-mapped.
    """

    def __init__(self, path: str | os.PathLike):
        import tifffile

        self.name = str(path)
        self._cache: TileCache | None = None
        path = Path(path)
        if not path.is_file():
            msg = f"expected a TIFF image at {path}, found no such file"
            raise InputFormatError(msg)
        try:
            with _quiet_tifffile():  # its warnings about a damaged file would add lines to our one-line error
                self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, IndexError, ValueError, OSError, KeyError, TypeError) as e:
            msg = f"{path}: expected a TIFF/OME-TIFF image, found a file tifffile cannot read ({brief(e, 100)})"
            raise InputFormatError(msg) from None
        self._tif.filehandle.set_lock(True)  # tiles may be read from several threads (seek + read under the lock)
        try:
            with _quiet_tifffile():
                self._open(path)
        except InputFormatError:
            self._tif.close()
            raise
        except (tifffile.TiffFileError, IndexError, ValueError, OSError, KeyError, TypeError, AttributeError) as e:
            self._tif.close()
            msg = f"{path}: expected a TIFF/OME-TIFF image, found a file tifffile cannot read ({brief(e, 100)})"
            raise InputFormatError(msg) from None

    def _open(self, path: Path) -> None:
        series = self._tif.series[0]
        axes, shape = series.axes, series.shape
        kept = [(a, n) for a, n in zip(axes, shape, strict=True) if n != 1 or a in "YX"]
        k_axes = "".join(a for a, _ in kept)
        k_shape = tuple(n for _, n in kept)
        if k_axes == "YXS" and k_shape[2] in (3, 4):
            self._planar = False
        elif k_axes in ("CYX", "SYX") and k_shape[0] in (3, 4):
            self._planar = True
        else:
            msg = (f"{path}: expected an RGB H&E image with axes YXS (S=3|4) or CYX (C=3|4), found axes "
                   f"{axes!r} with shape {shape}; export the H&E image as 8-bit RGB")
            raise InputFormatError(msg)
        if series.dtype != np.uint8:
            msg = f"{path}: expected 8-bit RGB, found dtype {series.dtype}; export the H&E image as 8-bit RGB"
            raise InputFormatError(msg)
        self._levels = []
        self.level_shapes = []
        size = path.stat().st_size
        for lvl in series.levels:
            ax = lvl.axes
            shp = dict(zip(ax, lvl.shape, strict=True))
            pages = list(lvl.pages)
            if not pages or any(pg is None for pg in pages):
                msg = f"{path}: expected every pyramid level to have its image pages, found some missing; the file is truncated"
                raise InputFormatError(msg)
            for pg in pages:  # a truncated file: tiles/strips that end beyond the end of the file
                offs = np.asarray(pg.dataoffsets, dtype=np.int64)
                counts = np.asarray(pg.databytecounts, dtype=np.int64)
                if len(offs) != len(counts) or (len(offs) and int((offs + counts).max()) > size):
                    msg = (f"{path}: expected every image tile inside the file ({size:,} bytes), found tiles that end "
                           f"beyond it; the file is truncated (an interrupted copy or download?): copy it again")
                    raise InputFormatError(msg)
            self.level_shapes.append((int(shp["Y"]), int(shp["X"])))
            self._levels.append(pages)

    def close(self) -> None:
        self._tif.close()

    @contextlib.contextmanager
    def tile_cache(self, max_bytes: int = TILE_CACHE_BYTES) -> Iterator[TileCache]:
        """Keep decoded tiles in a :class:`TileCache` within the ``with`` block (reads give the same pixels)."""
        outer = self._cache
        self._cache = cache = TileCache(max_bytes)
        try:
            yield cache
        finally:
            self._cache = outer

    def _page_region(self, page, r0: int, r1: int, c0: int, c1: int, level: int = 0) -> np.ndarray:
        """Region of one page as ``(S_planar, r1-r0, c1-c0, S_contig)`` from the segments it touches.

        Inside :meth:`tile_cache`, every segment comes from the cache (decoded at most once while kept).
        """
        kf = page.keyframe
        sep, depth, length, width, contig = kf.shaped
        fh = self._tif.filehandle
        if kf.compression == 1 and kf.is_contiguous and len(page.dataoffsets) == 1 and page.databytecounts[0]:
            mm = np.memmap(fh.path, dtype=kf.dtype, mode="r", offset=page.dataoffsets[0],
                           shape=(sep, depth, length, width, contig))
            return np.asarray(mm[:, 0, r0:r1, c0:c1, :])
        out = np.full((sep, r1 - r0, c1 - c0, contig), 255, dtype=kf.dtype)
        if kf.is_tiled:
            th, tw = kf.tilelength, kf.tilewidth
            ny, nx = -(-length // th), -(-width // tw)
            per_plane = ny * nx
            segs = [(s, s * per_plane + ty * nx + tx)
                    for s in range(sep) for ty in range(r0 // th, -(-r1 // th)) for tx in range(c0 // tw, -(-c1 // tw))]
        else:
            rps = min(kf.rowsperstrip or length, length)
            per_plane = -(-length // rps)
            segs = [(s, s * per_plane + k) for s in range(sep) for k in range(r0 // rps, -(-r1 // rps))]
        decode = kf.decode
        kwargs = {"_fullsize": kf.is_tiled}
        if kf.compression in {6, 7, 34892, 33007}:
            kwargs.update(jpegtables=page.jpegtables, jpegheader=kf.jpegheader)

        def load(idx: int):
            offset, count = page.dataoffsets[idx], page.databytecounts[idx]
            if not count:
                return None
            with fh.lock:
                fh.seek(offset)
                data = fh.read(count)
            try:
                seg, (_s, _d, y, x, _c), shape = decode(data, idx, **kwargs)
                if seg is None:
                    return None
                return np.asarray(seg).reshape(shape)[0], y, x  # (rows, cols, contig)
            except Exception as e:  # noqa: BLE001 - codecs raise many types; each becomes one clear line
                msg = (f"{self.name}: expected decodable image tiles, found tile {idx} of a {length}×{width} level "
                       f"damaged ({type(e).__name__}: {brief(e, 80)}); the file is corrupt: copy or export it again")
                raise InputFormatError(msg) from None

        cache = self._cache
        for s, idx in segs:
            got = load(idx) if cache is None else cache.get((level, page.offset, idx), lambda idx=idx: load(idx))
            if got is None:
                continue
            seg, y, x = got
            ys, ye = max(y, r0), min(y + seg.shape[0], r1)
            xs, xe = max(x, c0), min(x + seg.shape[1], c1)
            if ye > ys and xe > xs:
                out[s, ys - r0 : ye - r0, xs - c0 : xe - c0] = seg[ys - y : ye - y, xs - x : xe - x]
        return out

    def _read(self, level, r0, r1, c0, c1):
        pages = self._levels[level]
        if not self._planar:
            reg = self._page_region(pages[0], r0, r1, c0, c1, level)[0]
        elif len(pages) == 1:
            reg = np.moveaxis(self._page_region(pages[0], r0, r1, c0, c1, level)[..., 0], 0, -1)
        else:
            reg = np.stack([self._page_region(p, r0, r1, c0, c1, level)[0, ..., 0] for p in pages[:4]], axis=-1)
        return over_white(reg[..., :4])


def check_not_blank(img: SlideImage, path: str | os.PathLike) -> None:
    """Refuse a uniform image (a placeholder, an all-white export, a failed scan): no tissue to cut patches from.

    Looks at a thumbnail of at most 256 px: fewer than 3 grey levels between its darkest and lightest pixel.
    The image is not closed here.
    """
    thumb, _ = img.thumbnail(256)
    if thumb.size and int(thumb.max()) - int(thumb.min()) < 3:
        msg = (f"{path}: expected a tissue image, found a uniform one (all pixels ≈ {int(thumb.mean())}); it is a "
               "placeholder or a failed export: pass the real H&E image")
        raise InputFormatError(msg)


def open_image(path: str | os.PathLike) -> SlideImage:
    """A :class:`TiffImage` for ``.tif``/``.tiff``/``.btf`` files, an :class:`ArrayImage` otherwise."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff", ".btf", ".svs"):
        return TiffImage(path)
    return ArrayImage.from_file(path)
