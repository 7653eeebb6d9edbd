"""Build a paired dataset from a SpatialData store (``hescape-data build spatialdata STORE.zarr --table T --image I``).

The store is read by :func:`~hescape.data.readers.spatialdata_store.read_spatialdata` (the optional ``spatialdata``
package): each table row's shape is placed on the H&E image with the store's own coordinate transformations, and
µm come from ``--um-per-unit`` or from what a spatialdata-io store says (see that module). Then the steps of
:mod:`hescape.data.ingest`: panel harmonisation (:func:`~hescape.data.ingest.harmonise_genes`), µm-exact patches
(:mod:`hescape.data.patches`), the resolution / outside-image / tissue filters, the QC figure and the atomic
:class:`~hescape.data.arrow.DatasetWriter` (all through :mod:`hescape.data.ingest`'s own writer).

Observations (``observations``):

``spots``
    Each table row is one spot, kept as it is (Visium circles); its ``spot_id`` is the table's ``obs`` index and
    ``n_cells`` is -1 (unknown). The manifest's geometry is a disc of the circles' mean diameter, with the median
    nearest-neighbour distance of the spots as pitch; its patch field of view and µm/px are the given geometry's.
``cells``
    Rows are cells (polygons, or small circles) pooled by sum into the pseudo-spots of ``geometry`` (default the
    ``hescape`` preset: 55 µm hexagons tiling the tissue), as :func:`~hescape.data.ingest.build_xenium_dataset` pools
    Xenium cells; ``spot_id`` is the pseudo-spot's lattice id (``hex_r0012_c0034``; the manifest's ``spot_ids``
    record decodes it to its centre in µm of the store's scaled coordinate system).
``auto`` (default)
    Polygons are cells; circles are spots when their mean diameter is at least :data:`MIN_SPOT_DIAMETER_UM`
    (Visium: 55 µm capture areas, drawn 65 µm wide by spatialdata-io from ``spot_diameter_fullres``), else cells
    (spatialdata-io's Xenium ``cell_circles`` have radius √(cell area / π), a few µm).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .errors import HescapeDataError, InputFormatError
from .geometry import SpotGeometry, get_geometry
from .ingest import PatchOptions, SpotOptions, _write, check_build_options, harmonise_genes, pseudo_spots
from .outputs import check_output_location
from .readers.xenium import SpatialSample
from .splits import known_sample_donor

__all__ = ["build_spatialdata_dataset", "MIN_SPOT_DIAMETER_UM", "OBSERVATIONS"]

#: Circles at least this wide (µm) are spots, narrower ones cells, under ``observations="auto"``.
MIN_SPOT_DIAMETER_UM = 30.0
OBSERVATIONS = ("auto", "spots", "cells")


def _observation_kind(s: SpatialSample, observations: str) -> str:
    if observations not in OBSERVATIONS:
        msg = f"--observations: expected one of {list(OBSERVATIONS)}, found {observations!r}"
        raise HescapeDataError(msg)
    if observations != "auto":
        if observations == "spots" and s.kind != "circles":
            msg = (f"sample {s.name}: --observations spots expects circles (spots), found {s.kind}; pass "
                   "--observations cells to pool them into pseudo-spots")
            raise InputFormatError(msg)
        return observations
    if s.kind == "circles" and (s.spot_diameter_um or 0.0) >= MIN_SPOT_DIAMETER_UM:
        return "spots"
    return "cells"


def _spots_geometry(s: SpatialSample, geometry: SpotGeometry) -> SpotGeometry:
    """The manifest geometry of spots kept as they are: a disc of their mean diameter, their median spacing."""
    from scipy.spatial import cKDTree

    pitch = geometry.pitch_um
    if len(s.xy_um) >= 2:
        d, _ = cKDTree(s.xy_um).query(s.xy_um, k=2)
        pitch = float(np.median(d[:, 1]))
    return SpotGeometry(shape="disc", diameter_um=round(float(s.spot_diameter_um), 3),
                        pitch_um=round(max(pitch, 1.0), 3),
                        grid="hex", fov_um=geometry.fov_um, um_per_px=geometry.um_per_px, name="spatialdata-circles")


def build_spatialdata_dataset(store: str | os.PathLike, out: str | os.PathLike, *, table: str, image: str,
                              shapes: str | None = None, coordinate_system: str | None = None,
                              um_per_unit: float | None = None, observations: str = "auto", layer: str | None = None,
                              sample: str | None = None, donor: str | None = None, tissue: str = "unknown",
                              source: str = "spatialdata", split: str = "train",
                              geometry: SpotGeometry | str | None = None, spots: SpotOptions | None = None,
                              patch: PatchOptions | None = None, panel: str | None = None,
                              duplicate_genes: str = "error", missing_genes: str = "error", max_missing: float = 0.1,
                              allow_non_integer_counts: bool = False, overwrite: bool = False, progress: bool = True,
                              qc: bool = True, rows_per_shard: int = 2048) -> Path:
    """Read a SpatialData store's table, shapes and H&E image; write a one-sample dataset at ``out``.

    Parameters
    ----------
    store
        The ``.zarr`` directory.
    table, image, shapes, coordinate_system, um_per_unit, layer
        See :func:`~hescape.data.readers.spatialdata_store.read_spatialdata`.
    observations
        ``"auto"``, ``"spots"`` or ``"cells"`` (module docstring).
    geometry
        Spot layout and patch size (a :class:`~hescape.data.geometry.SpotGeometry` or preset name). Default:
        ``"visium"`` for spots (only its 112 µm / 0.5 µm/px patch is used) and ``"hescape"`` for cells.
    sample
        Sample name (default: the store's folder name without ``.zarr``).
    donor
        Donor id (default: the preset's patient for a reference HESCAPE sample id, else the sample).

    Other parameters are those of :func:`~hescape.data.ingest.build_xenium_dataset`; ``spots.min_counts`` drops
    spots with fewer total counts, ``spots.min_cells`` pseudo-spots with fewer cells (defaults:
    :class:`~hescape.data.ingest.SpotOptions` and :class:`~hescape.data.ingest.PatchOptions`).

    Raises
    ------
    InputFormatError, HescapeDataError
        Bad options (before any input is read), a missing element (naming the available ones), unknown µm, spots
        off the image. Nothing is written then.
    """
    spots = SpotOptions() if spots is None else spots
    patch = PatchOptions() if patch is None else patch
    check_build_options(split=split, rows_per_shard=rows_per_shard, patch=patch, spots=spots,
                        duplicate_genes=duplicate_genes, missing_genes=missing_genes, max_missing=max_missing,
                        panel=panel)
    if observations not in OBSERVATIONS:
        msg = f"--observations: expected one of {list(OBSERVATIONS)}, found {observations!r}"
        raise HescapeDataError(msg)
    user_geometry = get_geometry(geometry) if geometry is not None else None
    out = check_output_location(out, overwrite=overwrite, inputs=[store])
    from .readers.spatialdata_store import read_spatialdata

    s = read_spatialdata(store, table=table, image=image, shapes=shapes, coordinate_system=coordinate_system,
                         um_per_unit=um_per_unit, layer=layer, allow_non_integer_counts=allow_non_integer_counts)
    try:
        if sample:
            s.name = sample
        kind = _observation_kind(s, observations)
        counts, genes, gene_ids = harmonise_genes(s, panel=panel, duplicate_genes=duplicate_genes,
                                                  missing_genes=missing_genes, max_missing=max_missing)
        if kind == "spots":
            g = _spots_geometry(s, user_geometry or get_geometry("visium"))
            gexp = counts.toarray().astype(np.float32)
            keep = gexp.sum(1) >= spots.min_counts
            centres, n_cells = s.xy_um[keep], np.full(int(keep.sum()), -1, np.int32)
            ids = np.asarray(s.obs_ids, dtype=object)[keep]
            gexp = gexp[keep]
            id_record = {"kind": "barcode", "source": f"the obs index of table {table!r} (one row per spot)"}
        else:
            g = user_geometry or get_geometry("hescape")
            centres, pooled, n_cells, ids, id_record = pseudo_spots(s.xy_um, counts, g, with_ids=True)
            keep = (pooled.sum(1) >= spots.min_counts) & (n_cells >= spots.min_cells)
            centres, gexp, n_cells = centres[keep], pooled[keep], n_cells[keep]
            ids = np.asarray(ids, dtype=object)[keep]
        extra = {"ingest": {"kind": "spatialdata", "input": str(Path(store).resolve()), "observations": kind,
                            "spots": asdict(spots), "patch": asdict(patch), "metadata": s.metadata, "panel": panel},
                 "spot_ids": id_record}
        return _write(s, out, spots_um=centres, gexp=gexp, n_cells=n_cells, spot_ids=ids, genes=genes,
                      gene_ids=gene_ids, donor=donor or known_sample_donor(s.name) or s.name, tissue=tissue,
                      source=source, split=split, geometry=g, patch=patch, overwrite=overwrite,
                      progress=progress, qc=qc, rows_per_shard=rows_per_shard, extra=extra, inputs=[store])
    finally:
        s.close()
