"""Block-wise patch cutting (``iter_patches``, issue 9): the same bytes as one patch at a time, each tile read once.

The reference is the one-patch-at-a-time path that builds used before issue 9, transcribed below as
:func:`_reference_patch` (every patch reads its own interleaved region, low-passes it and resamples it channel by
channel). Both :func:`extract_patches` and the block-wise :func:`iter_patches` must give the same uint8 arrays,
byte for byte, whatever the number of threads or the block size, and the new path must read each image tile from
the file at most once (counted at the file handle, below the cache under test).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import tifffile
from hescape.data.arrow import encode_png
from hescape.data.patches import extract_patches, iter_patches
from hescape.data.readers import ArrayImage
from hescape.data.readers.image import TiffImage
from hescape.data.readers.xenium import read_xenium
from scipy import ndimage


def _reference_patch(image, um_to_px, center_um, fov_um=112.0, target_um_per_px=0.5, fill=255) -> np.ndarray:
    """The patch sampling of hescape-data before issue 9, kept verbatim as the truth for the new paths."""
    def mpp(m):
        return float(1.0 / np.sqrt(abs(np.linalg.det(np.asarray(m)[:2, :2]))))

    base, level, best = mpp(um_to_px), 0, mpp(um_to_px)
    for lvl in range(1, len(image.level_shapes)):
        m = base * float(np.sqrt(np.prod(image.downsample(lvl))))
        if best < m <= target_um_per_px * 1.0001:
            level, best = lvl, m
    n = int(round(fov_um / target_um_per_px))
    fx, fy = image.downsample(level)
    st = fov_um / n
    grid = np.array([[st, 0.0, center_um[0] - fov_um / 2], [0.0, st, center_um[1] - fov_um / 2], [0.0, 0.0, 1.0]])
    to_level = np.diag([1 / fx, 1 / fy, 1.0]) @ um_to_px @ grid
    corners = to_level @ np.array([[0, n, 0, n], [0, 0, n, n], [1, 1, 1, 1]], dtype=np.float64)
    ratio = target_um_per_px / (base * np.sqrt(fx * fy))
    sigma = max(0.0, (ratio - 1.0) / 2.0) if ratio > 1.25 else 0.0
    margin = int(np.ceil(3 * sigma)) + 2
    c0, r0 = int(np.floor(corners[0].min())) - margin, int(np.floor(corners[1].min())) - margin
    c1, r1 = int(np.ceil(corners[0].max())) + margin, int(np.ceil(corners[1].max())) + margin
    region = image.read_region(level, r0, c0, r1 - r0, c1 - c0, fill=fill).astype(np.float32)
    if sigma > 0:
        region = ndimage.gaussian_filter(region, sigma=(sigma, sigma, 0), mode="nearest")
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    to_region = np.array([[1.0, 0.0, -c0 - 0.5], [0.0, 1.0, -r0 - 0.5], [0.0, 0.0, 1.0]]) @ to_level @ half
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = np.empty((n, n, 3), dtype=np.uint8)
    for ch in range(3):
        res = ndimage.affine_transform(region[..., ch], swap @ to_region @ swap, output_shape=(n, n), order=1,
                                       mode="constant", cval=float(fill), prefilter=False)
        out[..., ch] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
    return out


def _centres(s, n_inside: int, seed: int = 0) -> np.ndarray:
    """Random spot centres over the section, plus a few whose patches run off the image (white fill)."""
    lo, hi = s.xy_um.min(0), s.xy_um.max(0)
    rng = np.random.default_rng(seed)
    inner = rng.uniform(lo, hi, (n_inside, 2))
    edge = np.array([[lo[0] - 30.0, lo[1]], [hi[0] + 20.0, hi[1] + 20.0], [lo[0], hi[1] + 45.0]])
    return np.concatenate([inner, edge])


def _same(a: list[np.ndarray], b: dict[int, np.ndarray]) -> bool:
    return sorted(b) == list(range(len(a))) and all(
        x.dtype == b[i].dtype and x.shape == b[i].shape and x.tobytes() == b[i].tobytes() for i, x in enumerate(a))


@pytest.mark.parametrize(("which", "target"), [("xenium_bundle_variant", 0.5), ("xenium_bundle", 0.5),
                                               ("xenium_bundle", 1.0)])
def test_blocks_equal_one_patch_at_a_time(request, which, target):
    """JPEG planar mirrored pyramid (low-passed once per block) and zlib interleaved (levels 0 and 1)."""
    s = read_xenium(request.getfixturevalue(which))
    try:
        c = _centres(s, 18)
        ref = [_reference_patch(s.image, s.um_to_px, x, target_um_per_px=target) for x in c]
        assert len({p.tobytes() for p in ref}) == len(ref)  # distinct patches: a mix-up would show
        assert _same(ref, dict(enumerate(extract_patches(s.image, s.um_to_px, c, target_um_per_px=target))))
        for workers, block_px in ((1, None), (3, 200)):
            got = dict(iter_patches(s.image, s.um_to_px, c, fov_um=112.0, target_um_per_px=target, workers=workers,
                                    block_px=block_px))
            assert _same(ref, got), (workers, block_px)
        pngs = dict(iter_patches(s.image, s.um_to_px, c[:6], target_um_per_px=target, transform=encode_png,
                                 workers=2))
        assert [pngs[i] for i in range(6)] == [encode_png(p) for p in ref[:6]]
    finally:
        s.close()


def test_strong_low_pass_falls_back_to_each_patch():
    """A single-level image 10× finer than the patches: the Gaussian's radius exceeds the region's margin, so each
    patch is low-passed on its own; still byte-identical."""
    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.uniform(0, 255, (900, 1100, 3)), (2, 2, 0)).astype(np.uint8)
    um_to_px = np.array([[9.0, 2.0, 30.0], [-2.0, 9.0, 80.0], [0.0, 0.0, 1.0]])  # ~0.11 µm/px, rotated
    centres = rng.uniform(5, 95, (12, 2))
    image = ArrayImage(img)
    ref = [_reference_patch(image, um_to_px, x, fov_um=20.0, target_um_per_px=1.0) for x in centres]
    got = dict(iter_patches(image, um_to_px, centres, fov_um=20.0, target_um_per_px=1.0, workers=2, block_px=300))
    assert _same(ref, got)


def test_each_tile_is_read_once(xenium_bundle_variant, monkeypatch):
    """Tile reads counted at the file handle: the old path reads shared tiles again and again, the new one once."""
    s = read_xenium(xenium_bundle_variant)
    assert isinstance(s.image, TiffImage)
    tiles = {int(o) for lvl in s.image._levels for pg in lvl for o in pg.dataoffsets}
    seeks: Counter = Counter()
    real_seek = tifffile.FileHandle.seek

    def counting_seek(self, offset, whence=0):
        if whence == 0 and int(offset) in tiles:
            seeks[int(offset)] += 1
        return real_seek(self, offset, whence)

    monkeypatch.setattr(tifffile.FileHandle, "seek", counting_seek)
    try:
        lo, hi = s.xy_um.min(0), s.xy_um.max(0)
        g = np.stack(np.meshgrid(np.arange(lo[0], hi[0], 40.0), np.arange(lo[1], hi[1], 40.0)), -1).reshape(-1, 2)
        list(extract_patches(s.image, s.um_to_px, g))
        assert max(seeks.values()) > 3  # neighbouring patches share tiles: read several times before
        seeks.clear()
        with s.image.tile_cache() as outer:  # an enclosing cache is restored afterwards
            n = sum(1 for _ in iter_patches(s.image, s.um_to_px, g, workers=3, block_px=256))
            assert s.image._cache is outer
        assert n == len(g) and max(seeks.values()) == 1
    finally:
        s.close()


def test_tile_cache_decodes_once_drops_and_bounds():
    import threading
    import time

    from hescape.data.readers.image import TileCache

    cache, calls, b_started = TileCache(max_bytes=3 * 16), Counter(), threading.Event()

    def tile(key, y):
        def load():
            calls[key] += 1
            if key == "slow":
                b_started.wait(1.0)
                time.sleep(0.05)  # the other thread is now waiting for this tile (or finds it cached)
            return np.zeros((4, 4), np.uint8), y, 0
        return load

    got = []
    t = threading.Thread(target=lambda: got.append(cache.get((0, 0, "slow"), tile("slow", 0))))
    t.start()
    b_started.set()
    got.append(cache.get((0, 0, "slow"), tile("slow", 0)))
    t.join()
    assert calls["slow"] == 1 and got[0] is got[1]  # two threads, one decode
    for k, y in (("a", 4), ("b", 8)):
        cache.get((0, 0, k), tile(k, y))
    assert cache.nbytes == 48 and cache.decoded == 3 and cache.redecoded == 0
    cache.get((0, 0, "c"), tile("c", 12))  # a fourth 16-byte tile: the least recently used ("slow") goes
    assert cache.nbytes == 48
    cache.get((0, 0, "slow"), tile("slow", 0))
    assert calls["slow"] == 2 and cache.redecoded == 1
    cache.release(0, 12)  # tiles ending at or above row 12 ("a": rows 4-8, "b": 8-12, "slow": 0-4) go
    cache.get((0, 0, "c"), tile("c", 12))
    cache.get((0, 0, "b"), tile("b", 8))
    assert calls["c"] == 1 and calls["b"] == 2
