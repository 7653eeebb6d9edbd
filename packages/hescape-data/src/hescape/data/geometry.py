"""Spot geometry: the one recorded description of how spots and their H&E patches are laid out.

Every builder of a dataset (Xenium and Visium HD pooling, Visium spots, the synthetic generator) takes a
:class:`SpotGeometry` and writes it into ``manifest.json`` (key ``geometry``), so a dataset says exactly what
a pair is: which tissue area was pooled into the expression vector and which area the image patch shows.

Presets (:data:`GEOMETRY_PRESETS`, :func:`get_geometry`), each with its source:

``hescape``
    The geometry of the published HESCAPE dataset: 55 µm pseudo-spots tiling the tissue densely. The paper
    (section 7.1) says a 55 µm "pseudo-spot" simulating a Visium spot is formed by sum-pooling transcripts;
    the published breast set has about 25.6k pairs per section (127,960 / 5), which fits a dense 55 µm tiling
    and not a 100 µm lattice; the authors' preprocessing tool (peng-lab/spatialrefinery, ``hex_lattice_params``)
    tiles the tissue with pointy-top hexagons whose vertex-to-vertex diameter is the spot size, centres
    √3/2 · 55 = 47.63 µm apart, no overlap. That is this preset: ``hexagon`` spots, 55 µm, pitch 47.63 µm,
    ``hex`` grid. Patches: 112 µm at 0.5 µm/px (224 px), the HEST convention the paper's evaluation uses.
``hest``
    HEST-1k's Xenium pseudo-spots: transcripts pooled into 100 µm squares on a 100 µm square grid
    (HEST ``readers.py`` ``spot_size_um=100.``; HEST issues #46 and #79), 112 µm patches at 0.5 µm/px.
``visium``
    Visium's capture spots: 55 µm discs, 100 µm centre to centre on a hexagonal lattice (10x Visium spec;
    HEST ``spot_diameter=55., inter_spot_dist=100.``), 112 µm patches at 0.5 µm/px.

Grid convention (``grid="hex"``): rows ``pitch · √3/2`` apart, every other row shifted by half a pitch, so the
six neighbours of a spot are all ``pitch`` away; ``grid="square"``: rows and columns ``pitch`` apart.
Shapes: ``disc`` (``diameter_um`` across), ``square`` (axis-aligned, side ``diameter_um``), ``hexagon``
(pointy-top, vertex-to-vertex ``diameter_um``; with ``grid="hex"`` and ``pitch = diameter·√3/2`` they tile
the plane). A point belongs to a spot when it lies inside the shape (boundary included), so spots that
overlap share points.

Lattice ids (:meth:`SpotGeometry.lattice`, :meth:`SpotGeometry.grid_ids`, :func:`parse_grid_id`): a pseudo-spot
is named by its lattice position, ``<grid>_r<row>_c<col>`` (:data:`GRID_ID_FORMAT`; row and column zero-padded to
at least 4 digits, e.g. ``hex_r0012_c0034``). ``row`` counts lattice rows from the lattice origin ``(x0, y0)``
along +y, ``col`` counts spots within the row along +x, so the centre is
``x = x0 + col · pitch (+ pitch/2 on odd rows of a hex grid)``, ``y = y0 + row · row_step``
(:meth:`SpotGeometry.lattice_centres`). The id depends only on the geometry and the origin, never on which
spots a filter keeps, so a dropped spot leaves a gap and every kept spot keeps its name.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .errors import HescapeDataError

__all__ = ["SpotGeometry", "GEOMETRY_PRESETS", "get_geometry", "SHAPES", "GRIDS", "GRID_ID_FORMAT", "parse_grid_id"]

SHAPES = ("disc", "square", "hexagon")
#: Largest stored patch side (px): 1 mm at 0.5 µm/px; the paper's encoders take 224 px, HESCAPE stores >= 512 px.
MAX_PATCH_PX = 2048
#: Smallest spot pitch (µm): below the 2 µm Visium HD bin there is nothing to pool.
MIN_PITCH_UM = 1.0
#: Largest (spot diameter / pitch)²: how many spots one point may fall in (a Visium spot: 0.3; dense tiling: ~1.3).
MAX_OVERLAP = 100.0
GRIDS = ("hex", "square")
#: Id of a pseudo-spot: its lattice position (see the module docstring), e.g. ``hex_r0012_c0034``.
GRID_ID_FORMAT = "{grid}_r{row:04d}_c{col:04d}"
_GRID_ID = re.compile(r"^(hex|square)_r(\d+)_c(\d+)$")


@dataclass(frozen=True)
class SpotGeometry:
    """Shape, size and layout of spots, and the H&E patch cut around each (all lengths in µm).

    Parameters
    ----------
    shape
        ``"disc"``, ``"square"`` or ``"hexagon"`` (pointy-top): the tissue area pooled into one spot.
    diameter_um
        Disc diameter, square side, or hexagon vertex-to-vertex diameter, in µm.
    pitch_um
        Centre-to-centre distance of neighbouring spots, in µm.
    grid
        ``"hex"`` or ``"square"`` lattice of spot centres.
    fov_um
        Side of the square H&E patch centred on each spot, in µm.
    um_per_px
        Pixel size of the stored patches, in µm/px (patch side ``round(fov_um / um_per_px)`` px).
    name
        The preset this geometry came from, or ``"custom"``.

    Raises
    ------
    HescapeDataError
        On a non-positive or non-finite length, an unknown shape or grid, or a patch larger than 8192 px.
    """

    shape: str = "hexagon"
    diameter_um: float = 55.0
    pitch_um: float = 55.0 * math.sqrt(3) / 2
    grid: str = "hex"
    fov_um: float = 112.0
    um_per_px: float = 0.5
    name: str = "hescape"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            msg = f"spot shape: expected one of {list(SHAPES)}, found {self.shape!r}"
            raise HescapeDataError(msg)
        if self.grid not in GRIDS:
            msg = f"spot grid: expected one of {list(GRIDS)}, found {self.grid!r}"
            raise HescapeDataError(msg)
        for f in ("diameter_um", "pitch_um", "fov_um", "um_per_px"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                msg = f"spot geometry {f}: expected a positive finite number of µm, found {v!r}"
                raise HescapeDataError(msg)
        n = self.fov_um / self.um_per_px
        if round(n) < 8 or round(n) > MAX_PATCH_PX:
            msg = (f"patch size: expected 8 to {MAX_PATCH_PX} px per side, found {self.fov_um} µm / {self.um_per_px} "
                   f"µm/px = {n:.0f} px; choose another --fov-um or --um-per-px (HEST: 112 µm at 0.5 µm/px)")
            raise HescapeDataError(msg)
        if self.pitch_um < MIN_PITCH_UM:
            msg = (f"spot pitch: expected at least {MIN_PITCH_UM} µm (a Visium HD bin is 2 µm), found "
                   f"{self.pitch_um} µm; check --pitch-um")
            raise HescapeDataError(msg)
        overlap = (2 * self.circumradius_um / self.pitch_um) ** 2
        if overlap > MAX_OVERLAP:
            msg = (f"spot geometry: expected spots that overlap a few neighbours at most, found a {self.diameter_um} "
                   f"µm spot every {self.pitch_um} µm (each point would be pooled into ~{overlap:.0f} spots); "
                   "check --spot-diameter-um and --pitch-um")
            raise HescapeDataError(msg)

    # ------------------------------------------------------------------ layout
    @property
    def patch_px(self) -> int:
        """Side of a stored patch in pixels, ``round(fov_um / um_per_px)``."""
        return int(round(self.fov_um / self.um_per_px))

    @property
    def area_um2(self) -> float:
        """Area of one spot in µm²."""
        d = self.diameter_um
        if self.shape == "disc":
            return math.pi * d * d / 4
        if self.shape == "square":
            return d * d
        return 3 * math.sqrt(3) / 8 * d * d  # regular hexagon of circumradius d/2

    @property
    def circumradius_um(self) -> float:
        """Distance from a spot centre to the farthest point of its shape, in µm."""
        return self.diameter_um / 2 * (math.sqrt(2) if self.shape == "square" else 1.0)

    @property
    def row_step_um(self) -> float:
        """Distance between neighbouring lattice rows, in µm: ``pitch · √3/2`` (hex) or ``pitch`` (square)."""
        return self.pitch_um * math.sqrt(3) / 2 if self.grid == "hex" else self.pitch_um

    def centres(self, extent_um: tuple[float, float, float, float], *, margin_um: float = 0.0) -> np.ndarray:
        """Spot centres ``(n, 2)`` (x, y in µm) on this geometry's lattice over ``(x0, y0, x1, y1)``.

        The lattice starts at ``(x0 + margin, y0 + margin)``; centres closer than ``margin_um`` to the extent's
        edge are left out. Same centres, in the same order, as :meth:`lattice`.
        """
        return self.lattice(extent_um, margin_um=margin_um)[0]

    def lattice(self, extent_um: tuple[float, float, float, float], *,
                margin_um: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spot centres ``(n, 2)`` µm with their lattice ``row`` and ``col`` ``(n,)`` int64 over ``(x0, y0, x1, y1)``.

        Rows run along +y from the lattice origin ``(x0 + margin, y0 + margin)``, columns along +x within a row
        (see the module docstring); centres come row by row, left to right. :meth:`grid_ids` names them.
        """
        x0, y0, x1, y1 = (float(v) for v in extent_um)
        x0, y0, x1, y1 = x0 + margin_um, y0 + margin_um, x1 - margin_um, y1 - margin_um
        empty = (np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64))
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
            return empty
        n_rows = (y1 - y0) / (self.pitch_um * (math.sqrt(3) / 2 if self.grid == "hex" else 1.0))
        n_cols = (x1 - x0) / self.pitch_um
        if (n_rows + 1) * (n_cols + 1) > 50_000_000:
            msg = (f"spot lattice: expected at most 50 million spots, found an extent of {x1 - x0:.0f} × "
                   f"{y1 - y0:.0f} µm at pitch {self.pitch_um} µm; check the coordinates' units (µm expected)")
            raise HescapeDataError(msg)
        ys = np.arange(y0, y1 + 1e-9, self.row_step_um)
        pts, rows, cols = [], [], []
        for i, y in enumerate(ys):
            shift = self.pitch_um / 2 if (self.grid == "hex" and i % 2) else 0.0
            xs = np.arange(x0 + shift, x1 + 1e-9, self.pitch_um)
            pts.append(np.column_stack([xs, np.full_like(xs, y)]))
            rows.append(np.full(len(xs), i, np.int64))
            cols.append(np.arange(len(xs), dtype=np.int64))
        if not pts:
            return empty
        return np.concatenate(pts), np.concatenate(rows), np.concatenate(cols)

    def grid_ids(self, rows, cols) -> list[str]:
        """Lattice ids ``<grid>_r<row>_c<col>`` (:data:`GRID_ID_FORMAT`) of spots at ``rows``, ``cols`` (ints >= 0)."""
        return [GRID_ID_FORMAT.format(grid=self.grid, row=int(r), col=int(c))
                for r, c in zip(np.asarray(rows).tolist(), np.asarray(cols).tolist(), strict=True)]

    def lattice_centres(self, rows, cols, origin_um) -> np.ndarray:
        """Centres ``(n, 2)`` µm of lattice positions ``rows``, ``cols`` for a lattice that starts at ``origin_um``."""
        r, c = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
        shift = (np.asarray(rows) % 2) * (self.pitch_um / 2) if self.grid == "hex" else 0.0
        return np.column_stack([origin_um[0] + c * self.pitch_um + shift, origin_um[1] + r * self.row_step_um])

    def contains(self, offsets_um: np.ndarray) -> np.ndarray:
        """Boolean mask: which offsets ``(n, 2)`` from a spot centre (µm) lie inside the spot shape."""
        d = np.abs(np.asarray(offsets_um, dtype=np.float64))
        r = self.diameter_um / 2
        eps = 1e-9 * max(1.0, r)
        if self.shape == "disc":
            return (d * d).sum(1) <= r * r + eps
        if self.shape == "square":
            return (d[:, 0] <= r + eps) & (d[:, 1] <= r + eps)
        # pointy-top hexagon, circumradius r: |x| <= r·√3/2 and |y| <= r − |x|/√3
        return (d[:, 0] <= r * math.sqrt(3) / 2 + eps) & (d[:, 1] <= r - d[:, 0] / math.sqrt(3) + eps)

    @property
    def is_tiling(self) -> bool:
        """True when the spots tile the plane with no gap and no overlap: hexagons on a hex lattice whose pitch is
        the hexagon's width (``diameter · √3/2``), or squares on a square lattice whose pitch is their side."""
        if self.shape == "hexagon" and self.grid == "hex":
            return math.isclose(self.pitch_um, self.diameter_um * math.sqrt(3) / 2, rel_tol=1e-9)
        if self.shape == "square" and self.grid == "square":
            return math.isclose(self.pitch_um, self.diameter_um, rel_tol=1e-9)
        return False

    def assign(self, points_um: np.ndarray, centres_um: np.ndarray) -> sp.csr_matrix:
        """Spot × point membership ``(n_spots, n_points)`` float32 CSR: 1 where a point lies inside a spot.

        Points are cell centroids, transcript positions or Visium HD bin centres, in µm. In a tiling geometry
        (:attr:`is_tiling`) every point goes to exactly one spot, its nearest centre (the tile holding it; a point
        on an edge shared by two tiles goes to the one on its right/lower side, never both); otherwise a point belongs to every spot
        whose shape contains it (overlapping discs share points).
        """
        pts = np.asarray(points_um, dtype=np.float64).reshape(-1, 2)
        ctr = np.asarray(centres_um, dtype=np.float64).reshape(-1, 2)
        if len(pts) == 0 or len(ctr) == 0:
            return sp.csr_matrix((len(ctr), len(pts)), dtype=np.float32)
        if self.is_tiling:
            # Half-open tiles: a point on a shared edge or corner goes to the tile it enters when moved by a tiny
            # step along a direction parallel to no edge, so every tile holds its share (50 × 50 bins of 2 µm
            # in a 100 µm square, not 51 × 51 in some and 49 × 49 in others).
            step = 1e-7 * self.pitch_um * np.array([1.0, math.sqrt(2) + 0.1])
            _, nearest = cKDTree(ctr).query(pts + step, k=1)
            j = np.flatnonzero(self.contains(pts - ctr[nearest]))
            m = sp.csr_matrix((np.ones(len(j), np.float32), (nearest[j], j)), shape=(len(ctr), len(pts)))
            m.sort_indices()
            return m
        pairs = cKDTree(ctr).sparse_distance_matrix(cKDTree(pts), self.circumradius_um * (1 + 1e-12),
                                                    output_type="ndarray")
        i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
        keep = self.contains(pts[j] - ctr[i])
        m = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (i[keep], j[keep])), shape=(len(ctr), len(pts)))
        m.sort_indices()
        return m

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        """JSON-ready record (written to ``manifest.json`` as ``geometry``), with the derived patch size."""
        return {**asdict(self), "patch_px": self.patch_px, "spot_area_um2": round(self.area_um2, 3)}

    @classmethod
    def from_dict(cls, d: dict) -> SpotGeometry:
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        if not isinstance(d, dict):
            msg = f"geometry record: expected a JSON object, found {type(d).__name__}"
            raise HescapeDataError(msg)
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(d) - {"name"})
        if missing:
            msg = f"geometry record: expected keys {sorted(names)}, missing {missing}"
            raise HescapeDataError(msg)
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **changes) -> SpotGeometry:
        """A copy with some fields changed; ``name`` becomes ``"<preset>+custom"`` when a spot field changes."""
        changes = {k: v for k, v in changes.items() if v is not None}
        spot_keys = {"shape", "diameter_um", "pitch_um", "grid"}
        if "name" not in changes and any(k in spot_keys and changes[k] != getattr(self, k) for k in changes):
            changes["name"] = self.name if self.name.endswith("+custom") else f"{self.name}+custom"
        return replace(self, **changes)


#: Named geometries; see the module docstring for the source of each.
GEOMETRY_PRESETS: dict[str, SpotGeometry] = {
    "hescape": SpotGeometry(shape="hexagon", diameter_um=55.0, pitch_um=55.0 * math.sqrt(3) / 2, grid="hex",
                            name="hescape"),
    "hest": SpotGeometry(shape="square", diameter_um=100.0, pitch_um=100.0, grid="square", name="hest"),
    "visium": SpotGeometry(shape="disc", diameter_um=55.0, pitch_um=100.0, grid="hex", name="visium"),
}


def parse_grid_id(spot_id: str) -> tuple[str, int, int]:
    """``(grid, row, col)`` of a lattice id such as ``hex_r0012_c0034`` (inverse of :meth:`SpotGeometry.grid_ids`).

    Raises
    ------
    HescapeDataError
        ``spot_id`` is not a lattice id (e.g. a Visium barcode).
    """
    m = _GRID_ID.match(str(spot_id))
    if m is None:
        msg = (f"spot id: expected a lattice id like 'hex_r0012_c0034' (<grid>_r<row>_c<col>), found {spot_id!r}; "
               "only pseudo-spots have lattice ids (Visium spots keep their barcodes)")
        raise HescapeDataError(msg)
    return m.group(1), int(m.group(2)), int(m.group(3))


def get_geometry(name: str | SpotGeometry) -> SpotGeometry:
    """A preset by name (``hescape``, ``hest``, ``visium``), or the geometry itself."""
    if isinstance(name, SpotGeometry):
        return name
    if name not in GEOMETRY_PRESETS:
        msg = f"spot geometry preset: expected one of {sorted(GEOMETRY_PRESETS)}, found {name!r}"
        raise HescapeDataError(msg)
    return GEOMETRY_PRESETS[name]
