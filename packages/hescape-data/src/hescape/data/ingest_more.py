"""Build paired datasets from the inputs users often have instead of raw 10x outputs: an AnnData with its H&E
image (:func:`build_anndata_dataset`) and samples of a HEST-1k download (:func:`build_hest_dataset`).

Both use the machinery of :mod:`hescape.data.ingest`: options and the output location are checked before any input
is read (:func:`~hescape.data.ingest.check_build_options`), genes are harmonised (duplicates, ``panel``) by
:func:`~hescape.data.ingest.harmonise_genes`, cells/transcripts are pooled into the spots of a
:class:`~hescape.data.geometry.SpotGeometry` by :func:`~hescape.data.ingest.pseudo_spots`, patches are cut
µm-exact with the same resolution, outside-image and tissue checks as the other builders, a QC figure per sample
goes to ``qc/<sample>.png``, and everything is written by one :class:`~hescape.data.arrow.DatasetWriter`
(atomic: a failure at any sample leaves nothing). Every row keeps its source identity in ``spot_id``: the obs
name (Visium barcode, HEST spot id) for spots kept as they are, the geometry's lattice id (``hex_r0012_c0034``,
:data:`~hescape.data.geometry.GRID_ID_FORMAT`) for pooled pseudo-spots; each sample's manifest entry ``spot_ids``
says which, and how a lattice id decodes to its centre.

Spots kept as they are (Visium, HEST's Xenium pseudo-spots) cannot be re-pooled: the geometry's spot fields must
be the ``visium`` preset's (``hest`` for HEST's pseudo-spots); only the patch field of view and µm/px may change.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .arrow import DatasetWriter, SpotRecords
from .errors import HescapeDataError, InputFormatError
from .geometry import GEOMETRY_PRESETS, SpotGeometry, get_geometry
from .ingest import (
    REGISTRATION_CAUSE,
    PatchOptions,
    SpotOptions,
    check_build_options,
    check_spots_on_image,
    cut_patches,
    harmonise_genes,
    pseudo_spots,
    write_qc,
)
from .outputs import check_output_location
from .readers.xenium import SpatialSample
from .registration import check_registration
from .splits import known_sample_donor

__all__ = ["build_anndata_dataset", "build_hest_dataset", "Prepared", "lattice_ids", "cli_build"]

#: Default spot and patch options (frozen dataclasses, shared).
DEFAULT_SPOTS = SpotOptions()
DEFAULT_PATCH = PatchOptions()


@dataclass
class Prepared:
    """One sample's spots, ready to cut patches for: centres (µm), raw counts, point counts and source ids."""

    sample: SpatialSample
    spots_um: np.ndarray  # (n, 2)
    gexp: np.ndarray  # (n, genes) float32 raw counts, columns in ``genes`` order
    n_cells: np.ndarray  # (n,) int32; -1 = unknown (spots kept as they are)
    spot_ids: list[str]
    genes: list[str]
    gene_ids: list[str]
    donor: str
    tissue: str
    source: str
    meta: dict


def _spot_fields(g: SpotGeometry) -> tuple:
    return g.shape, g.diameter_um, g.pitch_um, g.grid


def _resolve_geometry(geometry, changes: dict | None, default: str) -> SpotGeometry:
    g = get_geometry(default if geometry is None else geometry)
    return g.with_(**changes) if changes else g


def _require_same_spots(g: SpotGeometry, preset: str, what: str) -> None:
    ref = GEOMETRY_PRESETS[preset]
    if _spot_fields(g) != _spot_fields(ref):
        msg = (f"{what} are kept as they are ({ref.shape} {ref.diameter_um:g} µm, pitch {ref.pitch_um:g} µm, "
               f"{ref.grid} lattice), found a {g.name!r} geometry ({g.shape} {g.diameter_um:g} µm, pitch "
               f"{g.pitch_um:g} µm, {g.grid}); spots cannot be re-pooled: use --geometry {preset} (change only "
               "--fov-um / --um-per-px)")
        raise HescapeDataError(msg)


def lattice_ids(centres_um: np.ndarray, origin_um: np.ndarray, geometry: SpotGeometry) -> list[str]:
    """Lattice ids (:data:`~hescape.data.geometry.GRID_ID_FORMAT`, e.g. ``hex_r0012_c0034``) of pseudo-spot centres.

    The lattice of :func:`~hescape.data.ingest.pseudo_spots` starts at the points' lower-left corner
    ``origin_um``; row ``r`` lies at ``y0 + r·row_step``, column ``c`` at ``x0 + c·pitch`` (+ pitch/2 on odd rows
    of a hex grid), as :meth:`SpotGeometry.lattice_centres` decodes them.
    """
    c = np.asarray(centres_um, dtype=np.float64).reshape(-1, 2) - np.asarray(origin_um, dtype=np.float64)
    row = np.rint(c[:, 1] / geometry.row_step_um).astype(np.int64)
    shift = np.where((row % 2 == 1) & (geometry.grid == "hex"), geometry.pitch_um / 2, 0.0)
    col = np.rint((c[:, 0] - shift) / geometry.pitch_um).astype(np.int64)
    return geometry.grid_ids(row, col)


def _id_record(s: SpatialSample, geometry: SpotGeometry) -> dict:
    """How this sample's ``spot_id`` values read (the manifest's ``spot_ids`` entry of the sample)."""
    if s.kind == "spots":
        return {"kind": "barcode", "source": "the obs name of each spot (Visium barcode, HEST spot id)"}
    from .geometry import GRID_ID_FORMAT

    origin = s.xy_um.min(0)
    return {"kind": "lattice", "format": GRID_ID_FORMAT, "grid": geometry.grid,
            "origin_um": [float(origin[0]), float(origin[1])], "pitch_um": geometry.pitch_um,
            "row_step_um": geometry.row_step_um,
            "centre": "x = origin_x + col * pitch_um (+ pitch_um / 2 on odd rows of a hex grid), "
                      "y = origin_y + row * row_step_um"}


def _prepare(s: SpatialSample, *, geometry: SpotGeometry, spots: SpotOptions, panel, duplicate_genes,
             missing_genes, max_missing, cells_um: np.ndarray | None = None) -> tuple:
    """Harmonised genes and the sample's spots: kept (``kind="spots"``) or pooled (cells, transcripts)."""
    counts, genes, gene_ids = harmonise_genes(s, panel=panel, duplicate_genes=duplicate_genes,
                                              missing_genes=missing_genes, max_missing=max_missing)
    if s.kind == "spots":
        gexp = counts.toarray().astype(np.float32)
        n_cells = np.full(len(gexp), -1, np.int32)
        keep = gexp.sum(1) >= spots.min_counts
        ids = [str(i) for i in s.obs_ids]
        centres = s.xy_um
    else:
        centres, pooled, n_points = pseudo_spots(s.xy_um, counts, geometry)
        ids = lattice_ids(centres, s.xy_um.min(0), geometry)
        if s.kind == "transcripts":
            n_cells = (np.asarray(geometry.assign(cells_um, centres).getnnz(axis=1), dtype=np.int32)
                       if cells_um is not None else np.full(len(centres), -1, np.int32))
        else:
            n_cells = n_points.astype(np.int32)
        gexp = np.asarray(pooled.toarray(), dtype=np.float32) if sp.issparse(pooled) else np.asarray(pooled, np.float32)
        keep = (gexp.sum(1) >= spots.min_counts) & ((n_cells < 0) | (n_cells >= spots.min_cells))
    idx = np.flatnonzero(keep)
    return centres[idx], gexp[idx], n_cells[idx], [ids[i] for i in idx], genes, gene_ids


def _records(p: Prepared, geometry: SpotGeometry, patch: PatchOptions, progress: bool) -> tuple[SpotRecords, dict]:
    """Cut the patches of one prepared sample (the checks of :func:`hescape.data.ingest._write`)."""
    s = p.sample
    if len(p.spots_um) == 0:
        msg = (f"sample {s.name}: expected at least one spot after filtering, found none; lower --min-counts / "
               "--min-cells or check the input")
        raise InputFormatError(msg)
    src_mpp, inside = check_spots_on_image(
        s, p.spots_um, geometry, patch,
        cause="the positions are not in this image's pixels or the pixel size is wrong: check obsm['spatial'], the "
              "image and the QC figure",
        check="the image and pixel size")
    registration = check_registration(s, p.spots_um[inside], geometry, enabled=patch.registration_check,
                                      cause=REGISTRATION_CAUSE)
    keep, images, filters = cut_patches(s, p.spots_um, inside, geometry, patch, progress=progress)
    idx = np.flatnonzero(keep)
    rec = SpotRecords(name=s.name, donor=p.donor, tissue=p.tissue, source=p.source, images=images,
                      gexp=p.gexp[idx], coords_um=p.spots_um[idx], n_cells=p.n_cells[idx],
                      meta={"source_um_per_px": round(src_mpp, 6), "patch_um_per_px": geometry.um_per_px,
                            "filters": filters, **p.meta, "registration": registration},
                      spot_ids=[p.spot_ids[i] for i in idx])
    return rec, filters


def _write_samples(out: Path, prepared_iter, *, genes: list[str], gene_ids: list[str], geometry: SpotGeometry,
                   patch: PatchOptions, split: str, overwrite: bool, progress: bool, qc: bool, rows_per_shard: int,
                   extra: dict, inputs) -> Path:
    """Write every prepared sample (an iterable, consumed one at a time) into one dataset, atomically."""
    totals = {"outside_image": 0, "low_tissue": 0, "kept": 0}
    extra = {**extra, "geometry": geometry.to_dict(), "filters": totals}
    with DatasetWriter(out, genes=genes, gene_ids=gene_ids, rows_per_shard=rows_per_shard, overwrite=overwrite,
                       extra=extra, inputs=inputs) as w:
        for p in prepared_iter:
            try:
                rec, filters = _records(p, geometry, patch, progress)
                for k in totals:
                    totals[k] += filters[k]
                w.add(rec, split=split)
                if qc:
                    write_qc(w, p.sample, rec.name, rec.coords_um, rec.gexp, geometry, len(genes))
            finally:
                p.sample.close()
    return w.out_dir


def _align_genes(p_genes: list[str], gexp: np.ndarray, genes: list[str], name: str, first: str) -> np.ndarray:
    """``gexp``'s columns reordered to ``genes`` (same names required)."""
    if p_genes == genes:
        return gexp
    if set(p_genes) != set(genes) or len(p_genes) != len(genes):
        only_a = [g for g in genes if g not in set(p_genes)]
        only_b = [g for g in p_genes if g not in set(genes)]
        msg = (f"samples {first} and {name}: expected the same genes in every sample of one dataset, found "
               f"{len(only_a)} only in {first} (e.g. {only_a[:3]}) and {len(only_b)} only in {name} (e.g. "
               f"{only_b[:3]}); pass --panel PANEL (with --missing-genes zero if needed) to put all samples on one "
               "gene panel, or build the samples separately")
        raise InputFormatError(msg)
    col = {g: i for i, g in enumerate(p_genes)}
    return gexp[:, [col[g] for g in genes]]


# ----------------------------------------------------------------------------------------------------- AnnData
def build_anndata_dataset(h5ad: str | os.PathLike, out: str | os.PathLike, *, image: str | os.PathLike | None,
                          image_um_per_px: float | None = None, level: str = "auto", layer: str | None = None,
                          library_id: str | None = None, sample: str | None = None, donor: str | None = None,
                          tissue: str = "unknown", source: str = "anndata", split: str = "train",
                          geometry: SpotGeometry | str | None = None, geometry_changes: dict | None = None,
                          spots: SpotOptions = DEFAULT_SPOTS, patch: PatchOptions = DEFAULT_PATCH,
                          panel: str | None = None, duplicate_genes: str = "error", missing_genes: str = "error",
                          max_missing: float = 0.1, allow_non_integer_counts: bool = False, overwrite: bool = False,
                          progress: bool = True, qc: bool = True, rows_per_shard: int = 2048) -> Path:
    """Build a one-sample dataset from an AnnData (``.h5ad``) and the H&E image its ``obsm["spatial"]`` is in.

    Parameters
    ----------
    h5ad
        The AnnData file: positions in ``obsm["spatial"]`` (x, y **pixels of** ``image``), raw counts in
        ``layers["counts"]`` or ``X``, genes in ``var`` (:mod:`hescape.data.readers.anndata`).
    out
        The dataset directory to create.
    image
        The H&E image file, or ``"hires"``/``"lowres"`` for the images stored in ``uns["spatial"]``.
    image_um_per_px
        µm per pixel of ``obsm["spatial"]`` (full resolution); default measured from the Visium spot lattice or
        taken from ``uns["spatial"]`` scale factors; refused when there is none.
    level
        ``"spots"`` (Visium spots, kept as 55 µm discs), ``"cells"`` (pooled into pseudo-spots) or ``"auto"``
        (``spots`` when ``obs`` has ``array_row``/``array_col`` or the scale factors ``spot_diameter_fullres``;
        ``cells`` otherwise and for Visium HD bins).
    layer
        Count layer (``"X"`` or a ``layers`` key); default ``layers["counts"]``, else ``X``.
    geometry, geometry_changes
        Spot layout and patch size (a :class:`SpotGeometry` or preset name); default ``visium`` for spots and
        ``hescape`` (55 µm hexagons tiling the tissue) for cells. ``geometry_changes``: fields changed on it
        (:meth:`SpotGeometry.with_`, e.g. ``{"fov_um": 224}``).
    spots
        ``min_counts`` for every spot, ``min_cells`` for pooled ones.

    Other parameters are those of :func:`~hescape.data.ingest.build_xenium_dataset`. Returns the dataset path.

    Raises
    ------
    InputFormatError
        No ``obsm["spatial"]``, normalised counts (the message names ``layers["counts"]``), no pixel size (names
        ``--image-um-per-px``), positions off the image; nothing is written then.
    """
    from .readers.anndata import LEVELS, import_anndata, read_anndata

    if level not in LEVELS:
        msg = f"--level: expected one of {list(LEVELS)}, found {level!r}"
        raise HescapeDataError(msg)
    if geometry is not None or geometry_changes:
        _resolve_geometry(geometry, geometry_changes, "visium")  # bad values fail before reading
    check_build_options(split=split, rows_per_shard=rows_per_shard, patch=patch, spots=spots,
                        duplicate_genes=duplicate_genes, missing_genes=missing_genes, max_missing=max_missing,
                        panel=panel)
    inputs = [h5ad] + ([] if image is None or str(image) in ("hires", "lowres") else [image])
    out = check_output_location(out, overwrite=overwrite, inputs=inputs)
    import_anndata()
    s = read_anndata(h5ad, image=image, image_um_per_px=image_um_per_px, level=level, layer=layer,
                     library_id=library_id, allow_non_integer_counts=allow_non_integer_counts, name=sample)
    try:
        g = _resolve_geometry(geometry, geometry_changes, "visium" if s.kind == "spots" else "hescape")
        if s.kind == "spots":
            _require_same_spots(g, "visium", "Visium spots (--level spots)")
        centres, gexp, n_cells, ids, genes, gene_ids = _prepare(
            s, geometry=g, spots=spots, panel=panel, duplicate_genes=duplicate_genes, missing_genes=missing_genes,
            max_missing=max_missing)
        p = Prepared(s, centres, gexp, n_cells, ids, genes, gene_ids,
                     donor=donor or known_sample_donor(s.name) or s.name, tissue=tissue, source=source,
                     meta={"level": s.kind, "spot_ids": _id_record(s, g),
                           "pixel_size": {k: v for k, v in s.metadata.items()
                                          if k.startswith("um_per_px") or "warning" in k}})
    except BaseException:
        s.close()
        raise
    extra = {"ingest": {"kind": "anndata", "input": str(Path(h5ad).resolve()), "spots": asdict(spots),
                        "patch": asdict(patch), "metadata": s.metadata, "panel": panel}}
    return _write_samples(out, [p], genes=genes, gene_ids=gene_ids, geometry=g, patch=patch, split=split,
                          overwrite=overwrite, progress=progress, qc=qc, rows_per_shard=rows_per_shard,
                          extra=extra, inputs=inputs)


# ----------------------------------------------------------------------------------------------------- HEST-1k
def _hest_counts_from(tech: str, counts_from: str, g: SpotGeometry, has_transcripts: bool, sample_id: str) -> str:
    if tech == "Visium":
        if counts_from not in ("auto", "spots"):
            msg = (f"HEST sample {sample_id}: Visium spots are kept as they are, found --counts-from {counts_from} "
                   "(for Xenium samples); drop it or build the Visium samples separately")
            raise HescapeDataError(msg)
        return "spots"
    if counts_from != "auto":
        return counts_from
    if _spot_fields(g) == _spot_fields(GEOMETRY_PRESETS["hest"]):
        return "spots"
    if not has_transcripts:
        msg = (f"HEST sample {sample_id}: expected transcripts/{sample_id}_transcripts.parquet to pool the "
               f"{g.name!r} pseudo-spots, found none; download HEST's transcripts/ folder for this id, or keep "
               "HEST's own 100 µm pseudo-spots with --geometry hest")
        raise InputFormatError(msg)
    return "transcripts"


def _hest_donor(sample_id: str, meta: dict) -> str:
    """The preset's patient for a reference HESCAPE id, else HEST's ``dataset_title / patient``, else the id.

    HEST's own benchmark splits group samples by ``(dataset_title, patient)`` (``HESTData.create_benchmark_data``);
    ``patient`` alone ("patient 1") repeats across datasets.
    """
    known = known_sample_donor(sample_id)
    if known:
        return known
    patient = meta.get("patient")
    if isinstance(patient, str) and patient.strip():
        title = meta.get("dataset_title")
        return f"{title} / {patient.strip()}" if isinstance(title, str) and title.strip() else patient.strip()
    return sample_id


def build_hest_dataset(hest_dir: str | os.PathLike, out: str | os.PathLike, *, ids="all", pixel_size: str = "metadata",
                       counts_from: str = "auto", min_qv: float = 20.0, sample: str | None = None,
                       donor: str | None = None, tissue: str | None = None, source: str = "hest",
                       split: str = "train", geometry: SpotGeometry | str | None = None,
                       geometry_changes: dict | None = None, spots: SpotOptions = DEFAULT_SPOTS,
                       patch: PatchOptions = DEFAULT_PATCH, panel: str | None = None, duplicate_genes: str = "error",
                       missing_genes: str = "error", max_missing: float = 0.1, allow_non_integer_counts: bool = False,
                       overwrite: bool = False, progress: bool = True, qc: bool = True,
                       rows_per_shard: int = 2048) -> Path:
    """Build one dataset from samples of a local HEST-1k download (``st/``, ``wsis/``, ``metadata/``, ``transcripts/``).

    Parameters
    ----------
    hest_dir
        The HEST-1k folder (:mod:`hescape.data.readers.hest` for the layout, verified against mahmoodlab/HEST).
    ids
        ``"all"``, a list of sample ids, or a comma-separated string (``"TENX95,NCBI783"``). All are checked to
        exist before anything is read; an absent id is refused with the list of available ones.
    pixel_size
        ``"metadata"`` (HEST's ``pixel_size_um_estimated``, default) or ``"lattice"`` (measured: Visium spot
        lattice, Xenium transcripts' µm coordinates or pseudo-spot grid). Either way a disagreement above 2 %
        is warned about.
    counts_from
        Xenium samples: ``"auto"`` (HEST's own 100 µm pseudo-spots with the ``hest`` geometry, else the
        transcripts), ``"spots"``, ``"transcripts"`` (``qv >= min_qv``, by position) or ``"cells"`` (transcripts
        grouped by ``cell_id``). Visium spots are always kept as they are.
    geometry, geometry_changes
        Default: ``visium`` when any sample is Visium (its spots cannot be re-pooled; Xenium samples are then
        pooled into the same 55 µm discs on the 100 µm hex lattice), else ``hescape``.
    sample
        A sample name, only with one id (default: the id).
    donor, tissue
        Default: the reference HESCAPE patient for ids of the vendored presets, else HEST's
        ``dataset_title / patient``, else the id; tissue: HEST's ``organ`` (lower case).
    panel
        A vendored gene panel; needed when the samples do not share one gene list.

    Other parameters are those of :func:`~hescape.data.ingest.build_xenium_dataset`. Returns the dataset path.

    Raises
    ------
    InputFormatError
        An absent id or file, an unsupported technology (Visium HD, ST), samples with different genes and no
        ``panel``, missing transcripts where the geometry needs them; nothing is written then.
    """
    from .readers.anndata import import_anndata
    from .readers.hest import (
        COUNTS_FROM_CHOICES,
        HEST_TECHNOLOGIES,
        PIXEL_SIZE_CHOICES,
        hest_paths,
        read_hest_metadata,
        read_hest_sample,
        resolve_hest_ids,
    )

    if pixel_size not in PIXEL_SIZE_CHOICES:
        msg = f"--pixel-size: expected one of {list(PIXEL_SIZE_CHOICES)}, found {pixel_size!r}"
        raise HescapeDataError(msg)
    if counts_from not in COUNTS_FROM_CHOICES:
        msg = f"--counts-from: expected one of {list(COUNTS_FROM_CHOICES)}, found {counts_from!r}"
        raise HescapeDataError(msg)
    if geometry is not None or geometry_changes:
        _resolve_geometry(geometry, geometry_changes, "visium")
    check_build_options(split=split, rows_per_shard=rows_per_shard, patch=patch, spots=spots,
                        duplicate_genes=duplicate_genes, missing_genes=missing_genes, max_missing=max_missing,
                        min_qv=min_qv, panel=panel)
    out = check_output_location(out, overwrite=overwrite, inputs=[hest_dir])
    sample_ids = resolve_hest_ids(hest_dir, ids)
    if sample is not None and len(sample_ids) != 1:
        msg = f"--sample: expected one id to rename, found {len(sample_ids)} ids; drop --sample (samples keep their ids)"
        raise HescapeDataError(msg)
    import_anndata()

    # pass 1 (cheap): technologies, geometry and the gene list, before any counts or image is read
    metas = {i: read_hest_metadata(hest_paths(hest_dir, i).metadata) for i in sample_ids}
    techs = {i: str(m.get("st_technology") or "") for i, m in metas.items()}
    bad = {i: t for i, t in techs.items() if t not in HEST_TECHNOLOGIES}
    if bad and isinstance(ids, str) and ids.strip() == "all" and len(bad) < len(sample_ids):
        kinds = sorted(set(bad.values()))
        warnings.warn(f"{hest_dir}: --ids all: leaving out {len(bad)} sample(s) of st_technology {kinds} "
                      f"(e.g. {sorted(bad)[:5]}), which this builder does not read; building {len(sample_ids) - len(bad)}"
                      f" Visium/Xenium sample(s)", UserWarning, stacklevel=2)
        sample_ids = [i for i in sample_ids if i not in bad]
        techs = {i: techs[i] for i in sample_ids}
        metas = {i: metas[i] for i in sample_ids}
        bad = {}
    if bad:
        i, t = next(iter(bad.items()))
        msg = (f"HEST sample {i}: expected st_technology {list(HEST_TECHNOLOGIES)}, found {t!r} ({len(bad)} such "
               f"sample(s): {sorted(bad)[:10]}); leave them out of --ids (Visium HD: `hescape-data build visium-hd` "
               "on its Space Ranger output)")
        raise InputFormatError(msg)
    default = "visium" if "Visium" in techs.values() else "hescape"
    g = _resolve_geometry(geometry, geometry_changes, default)
    modes = {i: _hest_counts_from(techs[i], counts_from, g, hest_paths(hest_dir, i).transcripts is not None, i)
             for i in sample_ids}
    for i, m in modes.items():
        if m == "spots":
            if techs[i] == "Visium":
                _require_same_spots(g, "visium", f"HEST sample {i}: Visium spots")
            else:
                _require_same_spots(g, "hest", f"HEST sample {i}: HEST's Xenium pseudo-spots (--counts-from spots)")
    genes, gene_ids = _hest_genes(hest_dir, sample_ids, techs, panel)

    def prepared():
        for i in sample_ids:
            hs = read_hest_sample(hest_dir, i, counts_from=modes[i], pixel_size=pixel_size, min_qv=min_qv,
                                  allow_non_integer_counts=allow_non_integer_counts)
            s = hs.sample
            try:
                if sample:
                    s.name = sample
                centres, gexp, n_cells, sids, s_genes, _ = _prepare(
                    s, geometry=g, spots=spots, panel=panel, duplicate_genes=duplicate_genes,
                    missing_genes=missing_genes, max_missing=max_missing, cells_um=hs.cells_um)
                gexp = _align_genes(s_genes, gexp, genes, s.name, sample_ids[0])
                organ = hs.metadata.get("organ")
                sample_meta[s.name] = s.metadata
                p = Prepared(s, centres, gexp, n_cells, sids, genes, gene_ids,
                             donor=donor or _hest_donor(i, hs.metadata),
                             tissue=tissue or (organ.strip().lower() if isinstance(organ, str) and organ.strip()
                                               else "unknown"),
                             source=source,
                             meta={"hest_id": i, "st_technology": hs.technology, "counts_from": hs.counts_from,
                                   "spot_ids": _id_record(s, g),
                                   "pixel_size": {k: v for k, v in s.metadata.items()
                                                  if k.startswith(("um_per_px", "pixel_size", "measured",
                                                                   "disagreement"))}})
            except BaseException:
                s.close()
                raise
            yield p

    sample_meta: dict = {}  # filled as samples are read; the manifest is written after the last one
    extra = {"ingest": {"kind": "hest", "input": str(Path(hest_dir).resolve()), "ids": sample_ids,
                        "pixel_size": pixel_size, "counts_from": {i: modes[i] for i in sample_ids},
                        "min_qv": min_qv, "spots": asdict(spots), "patch": asdict(patch), "panel": panel,
                        "samples": sample_meta}}
    return _write_samples(out, prepared(), genes=genes, gene_ids=gene_ids, geometry=g, patch=patch, split=split,
                          overwrite=overwrite, progress=progress, qc=qc, rows_per_shard=rows_per_shard, extra=extra,
                          inputs=[hest_dir])


def _hest_genes(hest_dir, sample_ids: list[str], techs: dict, panel: str | None) -> tuple[list[str], list[str]]:
    """The dataset's genes and gene ids, from the panel or from the samples' ``var`` (read backed, no counts).

    Without a panel every sample must have the same genes (after dropping non-Gene-Expression features and
    Xenium control features, and merging repeated names); a gene's id is the first Ensembl id any sample gives it.
    """
    from .panels import load_panel
    from .readers.anndata import anndata_genes, read_h5ad
    from .readers.hest import hest_paths, is_control_feature

    if panel is not None:
        pnl = load_panel(panel)
        return list(pnl.genes), list(pnl.gene_ids)
    lists: dict[str, list[str]] = {}
    ids_of: dict[str, str] = {}
    for i in sample_ids:
        path = hest_paths(hest_dir, i).st
        a = read_h5ad(path, backed=True)
        try:
            names, gids, keep = anndata_genes(a, f"HEST sample {i} ({path})")
        finally:
            a.file.close()
        if techs[i] == "Xenium":
            keep = keep & np.array([not is_control_feature(n) for n in names], dtype=bool)
        kept = [(n, d) for n, d, k in zip(names, gids, keep, strict=True) if k]
        lists[i] = list(dict.fromkeys(n for n, _ in kept))
        for n, d in kept:
            if n not in ids_of or (not ids_of[n].upper().startswith("ENS") and d.upper().startswith("ENS")):
                ids_of[n] = d
    first = sample_ids[0]
    for i in sample_ids[1:]:
        _align_genes(lists[i], np.zeros((0, len(lists[i])), np.float32), lists[first], i, first)
    return lists[first], [ids_of[n] for n in lists[first]]


# ----------------------------------------------------------------------------------------------------- CLI
def cli_build(a, patch: PatchOptions) -> Path:
    """Run ``hescape-data build anndata`` / ``build hest`` from parsed arguments (called by :mod:`hescape.data.cli`).

    ``--geometry`` defaults to the input's own (see the builders); ``--spot-shape`` etc. change it.
    """
    changes = {"shape": a.spot_shape, "grid": a.grid, "pitch_um": a.pitch_um, "diameter_um": a.spot_diameter_um,
               "fov_um": a.fov_um, "um_per_px": a.um_per_px}
    changes = {k: v for k, v in changes.items() if v is not None}
    common = {"donor": a.donor, "split": a.split, "panel": a.panel, "duplicate_genes": a.duplicate_genes,
              "missing_genes": a.missing_genes, "max_missing": a.max_missing,
              "allow_non_integer_counts": a.allow_non_integer_counts, "overwrite": a.overwrite,
              "progress": not a.quiet, "qc": not a.no_qc, "rows_per_shard": a.rows_per_shard, "patch": patch,
              "geometry": a.geometry, "geometry_changes": changes, "sample": a.sample,
              "spots": SpotOptions(min_counts=a.min_counts, min_cells=a.min_cells)}
    if a.kind == "anndata":
        return build_anndata_dataset(a.h5ad, a.out, image=a.image, image_um_per_px=a.image_um_per_px, level=a.level,
                                     layer=a.layer, library_id=a.library_id, tissue=a.tissue or "unknown",
                                     source=a.source or "anndata", **common)
    return build_hest_dataset(a.hest_dir, a.out, ids=a.ids, pixel_size=a.pixel_size, counts_from=a.hest_counts_from,
                              min_qv=a.min_qv, tissue=a.tissue, source=a.source or "hest", **common)
