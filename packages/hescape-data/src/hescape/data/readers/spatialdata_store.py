"""Read a SpatialData store (``.zarr``): a table of raw counts, the shapes it annotates and an H&E image, placed in
one coordinate system with the store's own transformations.

The optional ``spatialdata`` package (``pip install "hescape-data[spatialdata]"``) reads the store; it is imported
only here, when a store is read. Conventions used (spatialdata 0.7, checked against its source and a store written
by it):

* The table's ``uns["spatialdata_attrs"]`` links it to its element: ``region`` (element name, or a list of names),
  ``region_key`` (the ``obs`` column naming each row's element) and ``instance_key`` (the ``obs`` column holding
  the index of the row's shape in that element's GeoDataFrame).
* Shapes are circles (``Point`` geometries with a ``radius`` column, in the element's own units) or polygons
  (``Polygon``/``MultiPolygon``; their centroids are used). Each element and image carries a transformation to
  every coordinate system it belongs to (:func:`spatialdata.transformations.get_transformation`); all of them are
  affine in ``x, y``. A multiscale image is a ``DataTree`` whose ``scale0`` holds the full resolution and whose
  transformation is that of ``scale0``.
* Image pixels: the intrinsic coordinate of pixel ``(row r, column c)`` spans ``[c, c+1) × [r, r+1)`` (spatialdata
  labels pixel centres ``c + 0.5``), the convention of :mod:`hescape.data.readers.image`, so an image's
  transformation maps our pixel coordinates as they are.

Physical units: spatialdata writes the placeholder unit ``"unit"`` for every axis, so a store does not say how many
µm one unit of a coordinate system is. It is taken, in this order, from ``um_per_unit`` (``--um-per-unit``, given by
the user), or from stores written by spatialdata-io, recognised by ``sdata.attrs["spatialdata_io_reader"]``:

* ``"xenium"``: circles, polygons and points are built from µm coordinates (``cells.parquet`` centroids, boundary
  vertices) with a ``Scale(1 / pixel_size)`` into ``"global"`` (spatialdata-io ``readers/xenium.py`` at a63ca08,
  L623, L660, L706), so ``"global"`` is morphology pixels (0.2125 µm), not µm, and the shapes' intrinsic unit is
  1 µm: µm per unit = 1 / scale of the shapes' transformation.
* ``"visium"``: the coordinate system is full-resolution pixels and the spots lie 100 µm apart centre to centre
  (Visium spec; the formats fact sheet §2), so µm per unit = 100 / the median nearest-neighbour distance of the
  spot centres (2 or more circles; coincident centres are refused). Unlike
  :func:`~hescape.data.readers.visium.visium_um_per_px_from_spots` (AnnData, HEST: at least 7 spots, 80 % regular)
  no regularity is asked for: here the store's own reader attribute says the circles are Visium spots.

Anything else is refused with a message asking for ``--um-per-unit``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..counts import check_counts
from ..errors import InputFormatError, brief
from ..patches import check_affine, um_per_px
from .image import SlideImage, check_not_blank
from .visium import VISIUM_PITCH_UM  # 100 µm between Visium spot centres: µm per unit in a spatialdata-io Visium store
from .xenium import SpatialSample

__all__ = ["read_spatialdata", "SpatialDataImage", "require_spatialdata", "VISIUM_PITCH_UM"]

_INSTALL = 'pip install "hescape-data[spatialdata]"'


def require_spatialdata():
    """The ``spatialdata`` module; :class:`InputFormatError` naming the install command when it is missing."""
    try:
        import spatialdata
    except ImportError as e:
        msg = (f"reading a SpatialData store needs the optional package spatialdata, found it not installed "
               f"({brief(e, 80)}); install it with: {_INSTALL}")
        raise InputFormatError(msg) from None
    return spatialdata


class SpatialDataImage(SlideImage):
    """An image element of a SpatialData store (``DataArray`` or multiscale ``DataTree``), read lazily by region.

    Accepted: 2-D images with dims ``(c, y, x)``, 3 or 4 channels (RGB[A]), 8-bit. Each scale of a ``DataTree`` is a
    pyramid level; its downsample factor is read from its pixel-centre coordinates (level-0 units), not from the
    shape ratio, so odd sizes do not skew it.
    """

    def __init__(self, element, name: str):
        self.name = name
        levels = _scales(element)
        arrays = []
        self.level_shapes = []
        self._down = []
        for lvl in levels:
            if tuple(lvl.dims) != ("c", "y", "x"):
                msg = (f"image {name!r}: expected a 2-D image with dims (c, y, x), found dims {tuple(lvl.dims)}; "
                       "give an H&E image element (Image2DModel)")
                raise InputFormatError(msg)
            c, h, w = (int(n) for n in lvl.shape)
            if c not in (3, 4):
                msg = (f"image {name!r}: expected an RGB(A) H&E image (3 or 4 channels), found {c} channel(s) "
                       f"(a fluorescence/morphology image?); choose the H&E image element with --image")
                raise InputFormatError(msg)
            if lvl.dtype != np.uint8:
                msg = f"image {name!r}: expected 8-bit RGB, found dtype {lvl.dtype}; convert the image to uint8 RGB"
                raise InputFormatError(msg)
            arrays.append(lvl.data)
            self.level_shapes.append((h, w))
            self._down.append((_spacing(lvl, "x", w, self.level_shapes[0][1]),
                               _spacing(lvl, "y", h, self.level_shapes[0][0])))
        self._arrays = arrays

    def downsample(self, level: int) -> tuple[float, float]:
        return self._down[level]

    def _read(self, level, r0, r1, c0, c1):
        return _materialise(self._arrays[level][:3, r0:r1, c0:c1])

    def thumbnail(self, max_side: int = 1600) -> tuple[np.ndarray, tuple[float, float]]:
        """As :meth:`SlideImage.thumbnail`, but strided lazily (a single-scale store image is never read whole)."""
        level = 0
        for i, (h, w) in enumerate(self.level_shapes):
            if max(h, w) >= max_side:
                level = i
        h, w = self.level_shapes[level]
        step = max(1, int(np.ceil(max(h, w) / max_side)))
        arr = _materialise(self._arrays[level][:3, ::step, ::step])
        fx, fy = self.downsample(level)
        return arr, (fx * step, fy * step)


def _materialise(a) -> np.ndarray:
    arr = a.compute() if hasattr(a, "compute") else a
    return np.ascontiguousarray(np.moveaxis(np.asarray(arr), 0, -1))


def _scales(element) -> list:
    """The pyramid levels of an image element, full resolution first, as ``DataArray`` objects."""
    if type(element).__name__ == "DataTree":
        out = []
        for key in sorted(element.children, key=lambda k: int(str(k).removeprefix("scale") or 0)):
            ds = element[key].ds
            var = list(ds.data_vars)
            out.append(ds[var[0]])
        return out
    return [element]


def _spacing(arr, dim: str, n: int, n0: int) -> float:
    """Level-0 pixels per pixel of ``arr`` along ``dim``, from its pixel-centre coordinates (else the size ratio)."""
    try:
        c = np.asarray(arr.coords[dim].values, dtype=np.float64)
        if len(c) >= 2 and np.isfinite(c[:2]).all() and c[1] > c[0]:
            return float(c[1] - c[0])
    except (KeyError, TypeError, ValueError):
        pass
    return n0 / max(n, 1)


def _affine(sd, element, cs: str, what: str) -> np.ndarray:
    t = sd.transformations.get_transformation(element, to_coordinate_system=cs)
    try:
        m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)
    except (ValueError, KeyError) as e:
        msg = f"{what}: expected an x/y transformation to coordinate system {cs!r}, found one that fails ({brief(e, 200)})"
        raise InputFormatError(msg) from None
    return check_affine(m, f"{what} → {cs!r} transformation")


def _pick(kind: str, name: str | None, available: list[str], option: str, store: Path) -> str:
    """``name`` if the store has a ``kind`` element of that name; else one line naming the available ones."""
    if name is None:
        msg = (f"{store}: expected {option} NAME naming the {kind} element to use, found none given; the store's "
               f"{kind} elements are {available}")
        raise InputFormatError(msg)
    if name not in available:
        msg = (f"{store}: expected {kind} element {name!r} ({option}), found none of that name; the store's {kind} "
               f"elements are {available or '(none)'}: pass one of them")
        raise InputFormatError(msg)
    return name


def read_spatialdata(store: str | os.PathLike, *, table: str, image: str, shapes: str | None = None,
                     coordinate_system: str | None = None, um_per_unit: float | None = None,
                     layer: str | None = None, allow_non_integer_counts: bool = False) -> SpatialSample:
    """Read a SpatialData store into a :class:`~hescape.data.readers.xenium.SpatialSample`.

    Parameters
    ----------
    store
        The ``.zarr`` directory written by ``SpatialData.write``.
    table
        Name of the table (raw counts in ``X``, or in ``layers[layer]``; ``obs`` index = each row's identity).
    image
        Name of the H&E image element.
    shapes
        Name of the shapes element the table annotates (default: the table's own ``region``, when it is one name).
    coordinate_system
        The coordinate system in which the shapes are mapped onto the image (default: ``"global"`` when both
        belong to it, else the only one they share).
    um_per_unit
        µm per unit of that coordinate system (see the module docstring for when the store itself says).
    layer
        Take counts from ``table.layers[layer]`` instead of ``X``.
    allow_non_integer_counts
        Accept fractional counts (refused by default: raw counts are expected).

    Returns
    -------
    SpatialSample
        ``xy_um`` = each table row's shape centre (circle centre or polygon centroid) in µm of the scaled
        coordinate system; ``um_to_px`` = µm → level-0 image pixel affine built from the store's two
        transformations; ``obs_ids`` = the table's ``obs`` index; ``kind`` = ``"circles"`` or ``"polygons"``;
        ``spot_diameter_um`` = mean circle diameter in µm (circles only). ``metadata`` records the elements, the
        coordinate system, µm per unit and where it came from, and the image's µm/px.

    Raises
    ------
    InputFormatError
        A missing store or element (naming the available ones), a table not linked to the shapes, rows without a
        shape, a non-RGB image, counts that are not raw, or µm per unit unknown (pass ``um_per_unit``).
    """
    sd = require_spatialdata()
    store = Path(store)
    if not store.is_dir():
        msg = f"expected a SpatialData store (a .zarr directory) at {store}, found no such directory"
        raise InputFormatError(msg)
    if um_per_unit is not None and (isinstance(um_per_unit, bool) or not np.isfinite(um_per_unit) or um_per_unit <= 0):
        msg = f"--um-per-unit: expected a positive finite number of µm per coordinate unit, found {um_per_unit!r}"
        raise InputFormatError(msg)
    try:
        sdata = sd.read_zarr(store, selection=("images", "shapes", "tables"))
    except Exception as e:  # noqa: BLE001 - zarr/ome-zarr raise many types; each becomes one clear line
        msg = (f"{store}: expected a SpatialData store written by spatialdata, found one it cannot read "
               f"({type(e).__name__}: {brief(e, 120)})")
        raise InputFormatError(msg) from None
    table = _pick("table", table, sorted(sdata.tables), "--table", store)
    image = _pick("image", image, sorted(sdata.images), "--image", store)
    adata = sdata.tables[table]
    attrs = dict(adata.uns.get("spatialdata_attrs") or {})
    region, region_key, instance_key = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    regions = [region] if isinstance(region, str) else [str(r) for r in (region if region is not None else [])]
    if not regions or instance_key is None:
        msg = (f"{store}: expected table {table!r} to be linked to a shapes element (uns['spatialdata_attrs'] with "
               f"region and instance_key), found {attrs or 'no link'}; parse the table with TableModel.parse(..., "
               "region=..., region_key=..., instance_key=...)")
        raise InputFormatError(msg)
    if shapes is None:
        if len(regions) != 1:
            msg = (f"{store}: table {table!r} annotates several elements {regions}; expected one: choose it with "
                   "--shapes NAME")
            raise InputFormatError(msg)
        if regions[0] not in sdata.shapes:
            msg = (f"{store}: table {table!r} annotates {regions[0]!r}, expected a shapes element (circles or "
                   f"polygons), found none of that name among the shapes {sorted(sdata.shapes) or '(none)'} (labels "
                   "are not read); give the shapes element with --shapes NAME")
            raise InputFormatError(msg)
        shapes = regions[0]
    shapes = _pick("shapes", shapes, sorted(sdata.shapes), "--shapes", store)
    if shapes not in regions:
        msg = (f"{store}: expected table {table!r} to annotate shapes {shapes!r}, found it annotates {regions}; "
               "choose the table's own shapes element with --shapes")
        raise InputFormatError(msg)
    gdf = sdata.shapes[shapes]
    img_el = sdata.images[image]

    # rows of this table that belong to the shapes element, and their shape
    obs = adata.obs
    if instance_key not in obs.columns:
        msg = f"{store}: table {table!r}: expected its instance_key column {instance_key!r} in obs, found none"
        raise InputFormatError(msg)
    rows = np.ones(adata.n_obs, dtype=bool)
    if len(regions) > 1 or (region_key is not None and region_key in obs.columns):
        if region_key not in obs.columns:
            msg = f"{store}: table {table!r}: expected its region_key column {region_key!r} in obs, found none"
            raise InputFormatError(msg)
        rows = np.asarray(obs[region_key].astype(str).to_numpy() == shapes)
    if not rows.any():
        msg = f"{store}: table {table!r}: expected rows annotating {shapes!r}, found none"
        raise InputFormatError(msg)
    import pandas as pd

    pos = pd.Index(gdf.index).get_indexer(obs[instance_key].to_numpy()[rows])
    if (pos < 0).any():
        ex = obs[instance_key].to_numpy()[rows][pos < 0][:3].tolist()
        msg = (f"{store}: expected every row of table {table!r} to have its shape in {shapes!r} (obs[{instance_key!r}] "
               f"= the shapes' index), found {int((pos < 0).sum())} without one (e.g. {ex}); the table and the shapes "
               "do not belong together")
        raise InputFormatError(msg)
    geo = gdf.geometry.iloc[pos]
    types = set(geo.geom_type.unique().tolist())
    if types <= {"Point"}:
        if "radius" not in gdf.columns:
            msg = f"{store}: shapes {shapes!r}: expected circles (points with a 'radius' column), found no radius"
            raise InputFormatError(msg)
        kind = "circles"
        xy_in = np.column_stack([geo.x.to_numpy(), geo.y.to_numpy()]).astype(np.float64)
        radius_in = np.asarray(gdf["radius"].to_numpy()[pos], dtype=np.float64)
    elif types <= {"Polygon", "MultiPolygon"}:
        kind = "polygons"
        c = geo.centroid
        xy_in = np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)
        radius_in = None
    else:
        msg = (f"{store}: shapes {shapes!r}: expected circles or polygons, found geometries {sorted(types)}; give a "
               "shapes element of spots (circles) or cells (polygons)")
        raise InputFormatError(msg)
    if not np.isfinite(xy_in).all():
        bad = int((~np.isfinite(xy_in)).any(1).sum())
        msg = f"{store}: shapes {shapes!r}: expected finite coordinates, found NaN/inf for {bad} shapes"
        raise InputFormatError(msg)

    # one coordinate system shared by the image and the shapes
    t_img = sd.transformations.get_transformation(img_el, get_all=True)
    t_shp = sd.transformations.get_transformation(gdf, get_all=True)
    shared = sorted(set(t_img) & set(t_shp))
    if coordinate_system is None:
        if "global" in shared:
            coordinate_system = "global"
        elif len(shared) == 1:
            coordinate_system = shared[0]
        else:
            msg = (f"{store}: expected image {image!r} and shapes {shapes!r} to share one coordinate system, found "
                   f"{shared or 'none'} (image: {sorted(t_img)}, shapes: {sorted(t_shp)}); "
                   + ("choose one with --coordinate-system" if shared else
                      "align them in the store (set_transformation) first"))
            raise InputFormatError(msg)
    elif coordinate_system not in shared:
        msg = (f"--coordinate-system {coordinate_system!r}: expected a coordinate system of both image {image!r} and "
               f"shapes {shapes!r}, found it is not; they share {shared or 'none'}")
        raise InputFormatError(msg)
    a_img = _affine(sd, img_el, coordinate_system, f"image {image!r}")
    a_shp = _affine(sd, gdf, coordinate_system, f"shapes {shapes!r}")
    xy_cs = (a_shp @ np.column_stack([xy_in, np.ones(len(xy_in))]).T)[:2].T
    shp_scale = float(np.sqrt(abs(np.linalg.det(a_shp[:2, :2]))))  # coordinate units per shapes unit

    reader = str(sdata.attrs.get("spatialdata_io_reader", "") or "") if isinstance(sdata.attrs, dict) else ""
    if um_per_unit is not None:
        s, source = float(um_per_unit), "given (--um-per-unit)"
    elif reader == "xenium":
        s, source = 1.0 / shp_scale, "spatialdata-io xenium store: shapes' intrinsic unit is 1 µm"
    elif reader == "visium" and kind == "circles" and len(xy_cs) >= 2:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(xy_cs).query(xy_cs, k=2)
        nn = float(np.median(d[:, 1]))
        if not nn > 0:
            msg = f"{store}: expected distinct Visium spot centres to measure the lattice, found coincident ones"
            raise InputFormatError(msg)
        s, source = VISIUM_PITCH_UM / nn, f"spatialdata-io visium store: spot lattice, {VISIUM_PITCH_UM:g} µm pitch"
    else:
        msg = (f"{store}: expected to know how many µm one unit of coordinate system {coordinate_system!r} is, found "
               "no statement in the store (spatialdata writes the placeholder unit 'unit'); pass --um-per-unit X "
               "(1 if the coordinates are µm; the µm/px of the image whose pixels they are, e.g. 0.2125 for "
               "Xenium morphology pixels)")
        raise InputFormatError(msg)
    um_to_px = check_affine(np.linalg.inv(a_img) @ np.diag([1.0 / s, 1.0 / s, 1.0]), "µm → image pixel transform")

    # counts
    x = adata.X if layer is None else adata.layers[layer] if layer in adata.layers else None
    if x is None:
        msg = (f"{store}: table {table!r}: expected a layer {layer!r}, found layers {sorted(adata.layers)}; "
               "choose one with --layer, or drop --layer to use X")
        raise InputFormatError(msg)
    counts = sp.csr_matrix(x, dtype=np.float32)
    if not rows.all():
        counts = counts[np.flatnonzero(rows)]
    where = f"{store} table {table!r} {'X' if layer is None else f'layers[{layer!r}]'}"
    try:
        check_counts(counts.data, where, allow_non_integer=allow_non_integer_counts)
    except InputFormatError as e:
        hint = ("" if layer is not None or "counts" not in adata.layers
                else "; the table has layers['counts']: pass --layer counts")
        msg = f"{e}{hint}"
        raise InputFormatError(msg) from None
    genes = [str(g) for g in adata.var_names]
    gene_ids = ([str(g) for g in adata.var["gene_ids"]] if "gene_ids" in adata.var.columns else [""] * len(genes))

    img = SpatialDataImage(img_el, name=f"{store}::{image}")
    check_not_blank(img, f"{store} image {image!r}")
    meta = {"store": str(store.resolve()), "table": table, "image": image, "shapes": shapes, "shape_type": kind,
            "coordinate_system": coordinate_system, "um_per_unit": s, "um_per_unit_source": source,
            "he_um_per_px": um_per_px(um_to_px), "spatialdata_io_reader": reader or None,
            "image_to_cs": a_img.tolist(), "shapes_to_cs": a_shp.tolist()}
    diameter = None
    if radius_in is not None:
        diameter = float(2.0 * np.mean(radius_in) * shp_scale * s)
        meta["circle_diameter_um"] = diameter
    obs_ids = np.asarray([str(v) for v in adata.obs_names[rows]], dtype=object)
    return SpatialSample(name=store.name.removesuffix(".zarr") or "sample", obs_ids=obs_ids, xy_um=xy_cs * s,
                         counts=counts, genes=genes, gene_ids=gene_ids, image=img, um_to_px=um_to_px, kind=kind,
                         spot_diameter_um=diameter, metadata=meta)
