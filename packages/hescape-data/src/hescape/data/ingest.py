"""Build paired H&E / gene-expression Arrow datasets from real Xenium bundles and Space Ranger outputs.

One call = one sample (one bundle or one ``outs/`` folder) written with :class:`~hescape.data.arrow.DatasetWriter`
(atomic: the output directory appears only when complete). Xenium cells are pooled into pseudo-spots laid out
by a :class:`~hescape.data.geometry.SpotGeometry` (recorded in ``manifest.json``), and so are Visium HD bins
(:func:`build_visium_hd_dataset`); Visium spots are used as they are. Each spot gets a µm-exact
H&E patch (:mod:`hescape.data.patches`, :func:`~hescape.data.patches.iter_patches`: block by block, each image
tile decoded once, on a pool of threads).

Every row keeps its identity in the source, the ``spot_id`` column, so embeddings and predictions join back to the
user's AnnData / Seurat / SpatialData object by id rather than by coordinates: a Visium spot's Space Ranger barcode;
a Xenium or Visium HD pseudo-spot's lattice id ``<grid>_r<row>_c<col>`` (e.g. ``hex_r0012_c0034``,
:data:`~hescape.data.geometry.GRID_ID_FORMAT`), its row and column on the geometry's lattice, which starts at the
smallest cell (bin) x and y. The manifest's ``spot_ids`` entry, at the top level and in the sample's entry (which a
merge keeps), says which (``kind`` ``"barcode"`` or ``"lattice"``, with the lattice ``origin_um``, ``pitch_um`` and
``row_step_um``, so an id decodes to its centre with :meth:`~hescape.data.geometry.SpotGeometry.lattice_centres`).
Ids are given before any spot is dropped (``min_counts``, ``min_cells``, tissue fraction, outside the image), so a
kept spot's id never depends on the filters, and the same input and geometry give the same ids on every build.

A QC figure (spots over the H&E thumbnail, coloured by total counts) is written to ``<out>/qc/<sample>.png`` (the
name made safe by :func:`~hescape.data.outputs.safe_filename`), inside the writer's temporary directory, so it
appears with the dataset or not at all. Every builder checks its options (:func:`check_build_options`) and the
output location (never an input, never a folder that is not a HESCAPE dataset) before it reads any input.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from .arrow import SPLITS, DatasetWriter, SpotRecords, encode_png
from .counts import check_feature_names
from .errors import HescapeDataError, InputFormatError, PanelMismatchError
from .geometry import GEOMETRY_PRESETS, SpotGeometry, get_geometry
from .outputs import check_output_location, safe_filename
from .panels import load_panel
from .patches import iter_patches, um_per_px
from .pseudospots import pool_counts
from .readers.visium import read_visium
from .readers.xenium import SpatialSample, read_transcripts, read_xenium
from .registration import check_registration
from .splits import known_sample_donor

__all__ = ["SpotOptions", "PatchOptions", "build_xenium_dataset", "build_visium_dataset", "qc_figure",
           "build_visium_hd_dataset", "harmonise_genes", "pseudo_spots", "check_build_options", "lattice_id_record",
           "check_spots_on_image", "cut_patches", "write_qc"]


@dataclass(frozen=True)
class SpotOptions:
    """Which pooled pseudo-spots are kept (the spot layout itself is a :class:`~hescape.data.geometry.SpotGeometry`)."""

    min_counts: float = 1.0  # drop spots with fewer total counts
    min_cells: int = 1  # drop spots with fewer cells (Xenium) or bins (Visium HD)


@dataclass(frozen=True)
class PatchOptions:
    """Which H&E patches are kept, and how far the source may be upsampled (patch size: the geometry)."""

    min_tissue_fraction: float = 0.0  # drop spots whose patch has less tissue (non-background pixels); 0 keeps all
    outside_spots: str = "error"  # spot centres outside the H&E image: "error" (default) or "drop"
    max_upsample: float = 2.0  # refuse a source image coarser than this many times the patch µm/px
    #: check that the spots lie on the image's tissue (:mod:`hescape.data.registration`); False
    #: (``--skip-registration-check``) still measures and records it, but never refuses
    registration_check: bool = True


#: Largest number of patch pixels one build cuts (spots × patch_px²): 2·10¹⁰ is ~400,000 spots of 224 px, several
#: times a whole Xenium 5K section; beyond it a build runs for hours on a misplaced option.
MAX_OUTPUT_PIXELS = 2e10

#: More spot centres than this fraction off the H&E image means a wrong alignment, not a partial scan: refused
#: even with ``outside_spots="drop"`` (a post-Xenium H&E covers the section it was aligned to).
MAX_OUTSIDE_FRACTION = 0.5

#: A pixel is background (glass) when its mean intensity is at least this (0–255).
BACKGROUND_LEVEL = 220.0

#: What the registration check's refusal (:func:`~hescape.data.registration.check_registration`) says to check.
REGISTRATION_CAUSE = ("check that the image is this section's, neither mirrored nor rotated, the scale (Visium: "
                      "tissue_hires_scalef / tissue_lowres_scalef for --image hires/lowres, Xenium: pixel_size and "
                      "the alignment CSV, AnnData: the µm per pixel) and the x/y order of the positions")


def tissue_fraction(patch: np.ndarray) -> float:
    """Fraction of a patch's pixels that are tissue, i.e. darker than the glass background."""
    return float((patch.reshape(-1, patch.shape[-1])[:, :3].mean(1) < BACKGROUND_LEVEL).mean())


def spots_inside_image(sample: SpatialSample, spots_um: np.ndarray) -> np.ndarray:
    """Boolean mask of the spot centres that map inside the level-0 H&E image."""
    h, w = sample.image.shape
    px = (sample.um_to_px @ np.column_stack([spots_um, np.ones(len(spots_um))]).T)[:2].T
    return (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)


def _strip_version(gene_id: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510`` (Ensembl version suffixes are ignored when matching)."""
    gid = str(gene_id).strip()
    return gid.split(".", 1)[0] if gid.upper().startswith("ENS") else gid


def match_panel(panel_genes, panel_ids, genes, gene_ids) -> list[list[int]]:
    """Data columns of every panel gene, matched by Ensembl id, else by symbol (``[]`` when absent).

    Ensembl ids are compared without their version suffix, against both the data's feature ids and its feature
    names (some tools write Ensembl ids as names). A panel gene whose id is present takes exactly the features
    with that id, so two genes that share a symbol in the reference (GRCh38 has about 20 such pairs) are never
    merged; only a gene absent by id falls back to its symbol. Returns one list of column indices per panel gene.
    """
    by_id: dict[str, list[int]] = {}
    by_symbol: dict[str, list[int]] = {}
    for i, (name, gid) in enumerate(zip(genes, gene_ids, strict=True)):
        keys = {k for k in (_strip_version(gid), _strip_version(name)) if k.upper().startswith("ENS")}
        for key in keys:
            by_id.setdefault(key, []).append(i)
        by_symbol.setdefault(name, []).append(i)
    return [by_id.get(_strip_version(gid)) or by_symbol.get(sym, [])
            for sym, gid in zip(panel_genes, panel_ids, strict=True)]


def _to_panel(sample, counts, genes, gene_ids, panel, duplicate_genes, missing_genes, max_missing):
    """Counts reordered to a vendored panel's genes (see :func:`harmonise_genes`)."""
    if missing_genes not in ("error", "zero"):
        msg = f"missing_genes must be 'error' or 'zero', found {missing_genes!r}"
        raise HescapeDataError(msg)
    if not 0.0 <= max_missing <= 1.0:
        msg = f"max_missing must be a fraction in [0, 1], found {max_missing!r}"
        raise HescapeDataError(msg)
    p = load_panel(panel)
    cols = match_panel(p.genes, p.gene_ids, genes, gene_ids)
    multi = {g: c for g, c in zip(p.genes, cols, strict=True) if len(c) > 1}
    if multi and duplicate_genes == "error":
        ex = "; ".join(f"{g}: {[gene_ids[i] for i in c]}" for g, c in list(multi.items())[:3])
        msg = (f"sample {sample.name}: expected one feature per panel gene, found {len(multi)} panel genes matching "
               f"several features ({ex}); pass duplicate_genes='sum' (--duplicate-genes sum) to add their counts")
        raise InputFormatError(msg)
    missing = [g for g, c in zip(p.genes, cols, strict=True) if not c]
    if missing and missing_genes == "error":
        msg = (f"sample {sample.name}: panel {panel} has {p.n_genes} genes, {len(missing)} of them absent from "
               f"the data by Ensembl id and by symbol (e.g. {missing[:5]}); choose the panel the data were "
               f"measured with, or pass missing_genes='zero' (--missing-genes zero) to fill up to "
               f"{max_missing:.0%} of the panel with zeros")
        raise PanelMismatchError(msg)
    if len(missing) > max_missing * p.n_genes:
        msg = (f"sample {sample.name}: expected at most {max_missing:.0%} of panel {panel} to be zero-filled, "
               f"found {len(missing)} of {p.n_genes} genes absent ({len(missing) / p.n_genes:.0%}, e.g. "
               f"{missing[:5]}); this is not the panel the data were measured with: choose the right --panel, "
               "or raise --max-missing if you mean it")
        raise PanelMismatchError(msg)
    rows = [i for c in cols for i in c]
    dst = [j for j, c in enumerate(cols) for _ in c]
    take = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, dst)), shape=(len(genes), p.n_genes))
    if multi:
        sample.metadata["merged_features"] = {g: [gene_ids[i] for i in c] for g, c in multi.items()}
    if missing:
        sample.metadata["zero_filled_genes"] = missing
    return sp.csr_matrix(counts @ take), list(p.genes), list(p.gene_ids)


def harmonise_genes(sample: SpatialSample, *, panel: str | None = None, duplicate_genes: str = "error",
                    missing_genes: str = "error", max_missing: float = 0.1) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """Counts, gene names and gene ids after handling duplicated names and (optionally) reordering to a panel.

    Parameters
    ----------
    sample
        The sample read from its files (``counts`` is ``(n_obs, n_features)``).
    panel
        A vendored panel name; columns are reordered to its genes, matched by Ensembl id (version suffix
        ignored) and else by symbol (:func:`match_panel`).
    duplicate_genes
        ``"error"`` (default) or ``"sum"``: without a panel, add up the features that share a name; with a panel,
        add up the features that match one panel gene (same Ensembl id, or same symbol when the id is absent).
        Every merged feature id is recorded in ``sample.metadata["merged_features"]`` (written to the manifest).
        Features with different Ensembl ids that share a symbol are never merged into a panel gene.
    missing_genes
        ``"error"`` (default) or ``"zero"`` (panel genes absent from the data get zero counts; they are listed in
        ``sample.metadata["zero_filled_genes"]``).
    max_missing
        With ``missing_genes="zero"``, the largest fraction of the panel that may be zero-filled (default 0.1).

    Raises
    ------
    InputFormatError, PanelMismatchError
        Empty, space-padded or non-printable names, or such ids (an empty id means "unknown" here;
        :func:`~hescape.data.counts.check_feature_names`); duplicated names without
        ``"sum"``; panel genes absent (beyond ``max_missing`` when zero-filling).
    """
    counts, genes, gene_ids = sample.counts.tocsc(), list(sample.genes), list(sample.gene_ids)
    check_feature_names(genes, gene_ids, f"sample {sample.name}", empty_ids=True)
    if duplicate_genes not in ("error", "sum"):
        msg = f"duplicate_genes must be 'error' or 'sum', found {duplicate_genes!r}"
        raise HescapeDataError(msg)
    if panel is not None:
        return _to_panel(sample, counts, genes, gene_ids, panel, duplicate_genes, missing_genes, max_missing)
    if len(set(genes)) != len(genes):
        seen: dict[str, int] = {}
        for g in genes:
            seen[g] = seen.get(g, 0) + 1
        dup = sorted(g for g, k in seen.items() if k > 1)
        if duplicate_genes == "error":
            msg = (f"sample {sample.name}: expected unique gene names, found {len(dup)} duplicated "
                   f"(e.g. {dup[:5]}); pass duplicate_genes='sum' (--duplicate-genes sum) to add their counts, "
                   "or --panel to take the panel's genes by Ensembl id")
            raise InputFormatError(msg)
        order: list[str] = list(dict.fromkeys(genes))
        col = {g: i for i, g in enumerate(order)}
        ids_of: dict[str, list[str]] = {}
        for g, i in zip(genes, gene_ids, strict=True):
            ids_of.setdefault(g, []).append(i)
        agg = sp.csr_matrix((np.ones(len(genes), np.float32), ([col[g] for g in genes], np.arange(len(genes)))),
                            shape=(len(order), len(genes)))
        counts = (counts @ agg.T).tocsc()
        genes, gene_ids = order, [ids_of[g][0] for g in order]
        sample.metadata["merged_features"] = {g: ids for g, ids in ids_of.items() if len(ids) > 1}
    return sp.csr_matrix(counts), genes, gene_ids


def pseudo_spots(xy_um: np.ndarray, counts: sp.csr_matrix, geometry: SpotGeometry, *, with_ids: bool = False):
    """Spot centres ``(n, 2)`` µm, pooled counts ``(n, genes)`` and points per spot ``(n,)`` over the points' extent.

    ``xy_um`` are cell centroids (Xenium) or bin centres (Visium HD) in µm; counts are summed over the points
    inside each spot of ``geometry`` (sum pooling, as the HESCAPE paper, section 7.1). With ``with_ids``, also
    each spot's lattice id (``list[str]``, :meth:`~hescape.data.geometry.SpotGeometry.grid_ids`) and the
    record of how ids decode (:func:`lattice_id_record`).
    """
    if len(xy_um) == 0:
        msg = "expected cells to pool into pseudo-spots, found none"
        raise InputFormatError(msg)
    lo, hi = xy_um.min(0), xy_um.max(0)
    # The lattice starts at the first point and runs one pitch past the last, so that points along the far edges
    # still fall in a spot of a dense tiling; spots that hold no point are dropped by the count filters.
    spots, rows, cols = geometry.lattice((lo[0], lo[1], hi[0] + geometry.pitch_um, hi[1] + geometry.pitch_um))
    assign = geometry.assign(xy_um, spots)
    used = assign.getnnz(axis=1) > 0
    spots, assign, rows, cols = spots[used], assign[used], rows[used], cols[used]
    pooled = pool_counts(assign, counts)
    n_cells = np.asarray(assign.sum(1)).ravel().astype(np.int32)
    if with_ids:
        return spots, pooled, n_cells, geometry.grid_ids(rows, cols), lattice_id_record(geometry, lo)
    return spots, pooled, n_cells


def lattice_id_record(geometry: SpotGeometry, origin_um) -> dict:
    """The manifest's ``spot_ids`` entry for lattice ids: format, lattice origin (µm), pitch and row step (µm)."""
    from .geometry import GRID_ID_FORMAT

    return {"kind": "lattice", "format": GRID_ID_FORMAT, "grid": geometry.grid,
            "origin_um": [float(origin_um[0]), float(origin_um[1])], "pitch_um": geometry.pitch_um,
            "row_step_um": geometry.row_step_um,
            "centre": "x = origin_x + col * pitch_um (+ pitch_um / 2 on odd rows of a hex grid), "
                      "y = origin_y + row * row_step_um"}


def qc_figure(path: str | os.PathLike, sample: SpatialSample, spots_um: np.ndarray, totals: np.ndarray,
              diameter_um: float, title: str | None = None) -> Path:
    """Spots drawn as discs of ``diameter_um`` (µm) over the H&E thumbnail, coloured by log10 total counts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    thumb, (fx, fy) = sample.image.thumbnail(1200)
    to_thumb = np.diag([1 / fx, 1 / fy, 1.0]) @ sample.um_to_px
    pts = (to_thumb @ np.column_stack([spots_um, np.ones(len(spots_um))]).T)[:2].T
    d_px = diameter_um / np.sqrt(abs(np.linalg.det(np.linalg.inv(to_thumb[:2, :2]))))
    fig, ax = plt.subplots(figsize=(8, 8 * thumb.shape[0] / max(thumb.shape[1], 1) + 0.6), dpi=110)
    ax.imshow(thumb, extent=(0, thumb.shape[1], thumb.shape[0], 0), interpolation="nearest")
    coll = EllipseCollection(np.full(len(pts), d_px), np.full(len(pts), d_px), np.zeros(len(pts)), units="xy",
                             offsets=pts, offset_transform=ax.transData, cmap="viridis", alpha=0.55,
                             edgecolors="none")
    coll.set_array(np.log10(1 + np.asarray(totals, dtype=np.float64)))
    ax.add_collection(coll)
    fig.colorbar(coll, ax=ax, fraction=0.04, label="log10(1 + total counts)")
    ax.set_xlim(0, thumb.shape[1])
    ax.set_ylim(thumb.shape[0], 0)
    ax.set_title(title or sample.name, fontsize=9)
    ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def source_um_per_px(sample: SpatialSample) -> float:
    """µm per level-0 pixel of the sample's image (geometric mean of the two axes)."""
    return um_per_px(sample.um_to_px)


def check_resolution(sample: SpatialSample, geometry: SpotGeometry, patch: PatchOptions) -> float:
    """The source µm/px; refuse a source coarser than ``patch.max_upsample`` × the patch µm/px (upsampling)."""
    src = source_um_per_px(sample)
    if src > patch.max_upsample * geometry.um_per_px * (1 + 1e-6):
        msg = (f"sample {sample.name}: expected an H&E image at most {patch.max_upsample:g}× coarser than the "
               f"{geometry.um_per_px:g} µm/px patches, found {src:.3g} µm/px (patches would be upsampled "
               f"{src / geometry.um_per_px:.1f}×, with no real detail); pass the full-resolution image, choose a "
               f"coarser --um-per-px, or allow it with --max-upsample {np.ceil(src / geometry.um_per_px):g}")
        raise InputFormatError(msg)
    return src


def check_spots_on_image(sample: SpatialSample, spots_um: np.ndarray, geometry: SpotGeometry, patch: PatchOptions,
                         *, cause: str, check: str) -> tuple[float, np.ndarray]:
    """The checks before any patch of a sample is cut; returns the source µm/px and which centres are on the image.

    Refuses a source coarser than ``patch.max_upsample`` × the patch µm/px (:func:`check_resolution`), more than
    :data:`MAX_OUTPUT_PIXELS` patch pixels, more than :data:`MAX_OUTSIDE_FRACTION` of the spot centres off the
    level-0 image (``cause`` says why that happens for this input), and, with ``patch.outside_spots == "error"``,
    any centre off it (``check`` names what to check).

    Returns
    -------
    tuple
        The source µm/px (float) and the ``(n,)`` bool mask of spot centres on the image.
    """
    src_mpp = check_resolution(sample, geometry, patch)
    pixels = len(spots_um) * geometry.patch_px ** 2
    if pixels > MAX_OUTPUT_PIXELS:
        msg = (f"sample {sample.name}: expected at most {MAX_OUTPUT_PIXELS:.0e} patch pixels in one build, found "
               f"{len(spots_um)} spots × {geometry.patch_px}² px = {pixels:.1e}; use smaller patches (--fov-um / "
               "--um-per-px) or a coarser spot geometry")
        raise InputFormatError(msg)
    inside = spots_inside_image(sample, spots_um)
    h, w = sample.image.shape
    if (~inside).mean() > MAX_OUTSIDE_FRACTION:
        msg = (f"sample {sample.name}: expected most spot centres on the H&E image, found {int((~inside).sum())} of "
               f"{len(spots_um)} outside it ({w} x {h} px); {cause}")
        raise InputFormatError(msg)
    if not inside.all() and patch.outside_spots == "error":
        msg = (f"sample {sample.name}: {int((~inside).sum())} of {len(spots_um)} spot centres fall outside the "
               f"H&E image ({w} x {h} px); check {check}, or, if the image covers only part of the section, pass "
               "outside_spots='drop' (--outside-spots drop) to leave those spots out")
        raise InputFormatError(msg)
    return src_mpp, inside


def cut_patches(sample: SpatialSample, spots_um: np.ndarray, inside: np.ndarray, geometry: SpotGeometry,
                patch: PatchOptions, *, progress: bool, workers: int | None = None) -> tuple[np.ndarray, list, dict]:
    """PNG-encoded H&E patches of the spots on the image (``inside``), block by block (:func:`iter_patches`).

    Spots off the image get no patch; with ``patch.min_tissue_fraction`` > 0, spots whose patch has less tissue
    (:func:`tissue_fraction`) are dropped too.

    Returns
    -------
    tuple
        ``keep`` (``(n,)`` bool: spots kept), the PNG bytes of the kept spots in spot order, and the filter counts
        ``{"outside_image", "low_tissue", "kept"}`` recorded in the manifest.

    Raises
    ------
    InputFormatError
        No spot is left.
    """
    min_tissue = patch.min_tissue_fraction

    def encode(p: np.ndarray) -> bytes | None:  # in the worker thread: the PNG encoder releases the GIL
        return None if min_tissue > 0 and tissue_fraction(p) < min_tissue else encode_png(p)

    todo = np.flatnonzero(inside)  # spots off the image are dropped: no patch is cut for them
    pngs: dict[int, bytes | None] = {}
    with tqdm(total=len(todo), desc=f"patches {sample.name}", disable=not progress, unit="spot") as bar:
        for j, png in iter_patches(sample.image, sample.um_to_px, spots_um[todo], fov_um=geometry.fov_um,
                                   target_um_per_px=geometry.um_per_px, transform=encode, workers=workers):
            pngs[int(todo[j])] = png
            bar.update(1)
    keep = inside.copy()
    keep[todo] = [pngs[i] is not None for i in todo.tolist()]
    images = [pngs[i] for i in np.flatnonzero(keep).tolist()]
    if not keep.any():
        msg = (f"sample {sample.name}: expected at least one spot inside the image with tissue fraction >= "
               f"{patch.min_tissue_fraction}, found none; check the image and alignment or lower --min-tissue-fraction")
        raise InputFormatError(msg)
    filters = {"outside_image": int((~inside).sum()), "low_tissue": int((inside & ~keep).sum()),
               "kept": int(keep.sum())}
    return keep, images, filters


def write_qc(writer: DatasetWriter, sample: SpatialSample, name: str, spots_um: np.ndarray, gexp: np.ndarray,
             geometry: SpotGeometry, n_genes: int) -> Path:
    """The sample's QC figure, ``qc/<name>.png`` inside the writer's temporary directory (:func:`qc_figure`): the
    kept spots as discs of the spot's equal-area diameter, coloured by total counts."""
    d_equal_area = 2 * np.sqrt(geometry.area_um2 / np.pi)
    return qc_figure(writer.file_path("qc", f"{safe_filename(name)}.png"), sample, spots_um, gexp.sum(1),
                     d_equal_area, title=f"{name}: {len(spots_um)} spots ({geometry.name}), {n_genes} genes")


def _write(sample: SpatialSample, out, *, spots_um, gexp, n_cells, genes, gene_ids, donor, tissue, source, split,
           geometry: SpotGeometry, patch: PatchOptions, overwrite: bool, progress: bool, qc: bool,
           rows_per_shard: int, extra: dict, inputs=(), spot_ids, workers: int | None = None) -> Path:
    spot_ids = np.asarray([str(i) for i in spot_ids], dtype=object)
    id_record = extra.get("spot_ids")  # how the ids read: also in the sample's manifest entry (survives a merge)
    if len(spot_ids) != len(spots_um):
        msg = f"sample {sample.name}: expected one spot id per spot ({len(spots_um)}), found {len(spot_ids)}"
        raise HescapeDataError(msg)
    if len(spots_um) == 0:
        msg = (f"sample {sample.name}: expected at least one spot after filtering, found none; "
               "lower --min-counts / --min-cells or check the input")
        raise InputFormatError(msg)
    out = Path(out)
    if patch.outside_spots not in ("error", "drop"):
        msg = f"outside_spots must be 'error' or 'drop', found {patch.outside_spots!r}"
        raise HescapeDataError(msg)
    src_mpp, inside = check_spots_on_image(
        sample, spots_um, geometry, patch,
        cause="the alignment is wrong (an inverted matrix, another image's alignment or positions, a wrong pixel "
              "size or image scale factor): check the image belongs to these positions (Xenium: in Xenium "
              "Explorer; Visium: scalefactors_json.json) and the QC figure",
        check="the alignment matrix and pixel size")
    registration = check_registration(sample, spots_um[inside], geometry, enabled=patch.registration_check,
                                      cause=REGISTRATION_CAUSE)
    keep, images, filters = cut_patches(sample, spots_um, inside, geometry, patch, progress=progress,
                                        workers=workers)
    extra = {**extra, "geometry": geometry.to_dict(), "filters": filters, "registration": registration}
    spots_um, gexp, n_cells, spot_ids = spots_um[keep], gexp[keep], n_cells[keep], spot_ids[keep]
    with DatasetWriter(out, genes=genes, gene_ids=gene_ids, rows_per_shard=rows_per_shard, overwrite=overwrite,
                       extra=extra, inputs=inputs) as w:
        w.add(SpotRecords(name=sample.name, donor=donor, tissue=tissue, source=source, images=images, gexp=gexp,
                          coords_um=spots_um, n_cells=n_cells, spot_ids=spot_ids.tolist(),
                          meta={"source_um_per_px": round(src_mpp, 6), "patch_um_per_px": geometry.um_per_px,
                                **({} if id_record is None else {"spot_ids": id_record}),
                                "registration": registration}),
              split=split)
        if qc:  # written inside the temporary directory: it appears with the dataset, or not at all
            write_qc(w, sample, sample.name, spots_um, gexp, geometry, len(genes))
    return w.out_dir


def _fresh_output(out: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Fail fast, before reading any input, when the output location may not be written or replaced.

    See :func:`~hescape.data.outputs.check_output_location`: ``out`` may not be, contain or lie inside an input;
    an existing ``out`` is replaced only with ``overwrite`` and only when it is a HESCAPE dataset or empty.
    """
    return check_output_location(out, overwrite=overwrite, inputs=inputs)


def _finite(name: str, v, lo: float | None = None, hi: float | None = None, *, integer: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v)
    ok = ok and (not integer or float(v) == int(v)) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None else ""
        msg = f"{name}: expected a finite {'whole ' if integer else ''}number{rng}, found {v!r}"
        raise HescapeDataError(msg)


def check_build_options(*, split: str = "train", rows_per_shard: int = 2048, patch: PatchOptions = PatchOptions(),
                        spots: SpotOptions | None = None, min_counts: float | None = None,
                        duplicate_genes: str = "error", missing_genes: str = "error", max_missing: float = 0.1,
                        counts_from: str = "cells", min_qv: float = 20.0, panel: str | None = None) -> None:
    """Refuse a bad build option before any input is read (one line: option, expected, found).

    ``split`` must be ``train``, ``val`` or ``test`` exactly; ``rows_per_shard`` at least 1; fractions in
    [0, 1]; thresholds finite and >= 0; choices among their values; ``panel`` a vendored panel.
    """
    if split not in SPLITS:
        msg = f"--split: expected one of {list(SPLITS)} (lower case), found {split!r}"
        raise HescapeDataError(msg)
    if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, (int, np.integer)) or rows_per_shard < 1:
        msg = f"--rows-per-shard: expected a whole number >= 1, found {rows_per_shard!r}; pass e.g. 2048"
        raise HescapeDataError(msg)
    _finite("--min-tissue-fraction", patch.min_tissue_fraction, 0.0, 1.0)
    _finite("--max-upsample", patch.max_upsample, 1.0)
    if patch.outside_spots not in ("error", "drop"):
        msg = f"--outside-spots: expected 'error' or 'drop', found {patch.outside_spots!r}"
        raise HescapeDataError(msg)
    if not isinstance(patch.registration_check, (bool, np.bool_)):
        msg = f"registration_check: expected True or False, found {patch.registration_check!r}"
        raise HescapeDataError(msg)
    if spots is not None:
        _finite("--min-counts", spots.min_counts, 0.0)
        _finite("--min-cells", spots.min_cells, 0.0, integer=True)
    if min_counts is not None:
        _finite("--min-counts", min_counts, 0.0)
    _finite("--max-missing", max_missing, 0.0, 1.0)
    _finite("--min-qv", min_qv, 0.0)
    for name, v, choices in (("--duplicate-genes", duplicate_genes, ("error", "sum")),
                             ("--missing-genes", missing_genes, ("error", "zero")),
                             ("--counts-from", counts_from, ("cells", "transcripts"))):
        if v not in choices:
            msg = f"{name}: expected one of {list(choices)}, found {v!r}"
            raise HescapeDataError(msg)
    if panel is not None:
        load_panel(panel)
    if counts_from == "transcripts" and (panel is not None or duplicate_genes != "error"):
        msg = "--counts-from transcripts: expected the bundle's own genes, found --panel / --duplicate-genes; drop them"
        raise HescapeDataError(msg)


def build_xenium_dataset(bundle: str | os.PathLike, out: str | os.PathLike, *,
                         he_image: str | os.PathLike | None = None, alignment: str | os.PathLike | None = None,
                         sample: str | None = None, donor: str | None = None, tissue: str | None = None,
                         source: str = "xenium", split: str = "train",
                         geometry: SpotGeometry | str = "hescape", spots: SpotOptions = SpotOptions(),
                         patch: PatchOptions = PatchOptions(), panel: str | None = None,
                         duplicate_genes: str = "error", missing_genes: str = "error", max_missing: float = 0.1,
                         counts_from: str = "cells", min_qv: float = 20.0, allow_non_integer_counts: bool = False,
                         overwrite: bool = False, progress: bool = True, qc: bool = True,
                         rows_per_shard: int = 2048) -> Path:
    """Pool an XOA bundle's cells into pseudo-spots, crop H&E patches, write a one-sample dataset at ``out``.

    ``geometry``: the spot layout and patch size (:class:`~hescape.data.geometry.SpotGeometry` or a preset name;
    default ``"hescape"``, the published HESCAPE dataset's 55 µm pseudo-spots). ``sample`` defaults to the
    bundle's ``region_name``/``run_name``; ``donor`` to the sample; ``tissue`` to ``panel_tissue_type``.
    ``split`` is recorded in the manifest (re-split later at donor level). ``counts_from="transcripts"`` pools
    ``transcripts.parquet`` (``qv >= min_qv``) by transcript position instead of whole cells by centroid
    (``n_cells`` still counts cell centroids in each spot).
    """
    geometry = get_geometry(geometry)
    check_build_options(split=split, rows_per_shard=rows_per_shard, patch=patch, spots=spots,
                        duplicate_genes=duplicate_genes, missing_genes=missing_genes, max_missing=max_missing,
                        counts_from=counts_from, min_qv=min_qv, panel=panel)
    inputs = [bundle, he_image, alignment]
    out = _fresh_output(out, overwrite, inputs)
    s = read_xenium(bundle, he_image=he_image, alignment=alignment, allow_non_integer_counts=allow_non_integer_counts)
    try:
        if sample:
            s.name = sample
        counts, genes, gene_ids = harmonise_genes(s, panel=panel, duplicate_genes=duplicate_genes,
                                                  missing_genes=missing_genes, max_missing=max_missing)
        centres, pooled, n_cells, ids, id_record = pseudo_spots(s.xy_um, counts, geometry, with_ids=True)
        if counts_from == "transcripts":
            if panel is not None or duplicate_genes != "error":
                msg = "counts_from='transcripts' pools the bundle's own genes; drop --panel / --duplicate-genes"
                raise HescapeDataError(msg)
            t_xy, t_gene = read_transcripts(bundle, genes, min_qv=min_qv)
            onehot = sp.csr_matrix((np.ones(len(t_gene), np.float32), (np.arange(len(t_gene)), t_gene)),
                                   shape=(len(t_gene), len(genes)))
            pooled = pool_counts(geometry.assign(t_xy, centres), onehot)
        elif counts_from != "cells":
            msg = f"counts_from must be 'cells' or 'transcripts', found {counts_from!r}"
            raise HescapeDataError(msg)
        keep = (pooled.sum(1) >= spots.min_counts) & (n_cells >= spots.min_cells)
        extra = {"ingest": {"kind": "xenium", "input": str(Path(bundle).resolve()), "spots": asdict(spots),
                            "counts_from": counts_from, "min_qv": min_qv,
                            "patch": asdict(patch), "metadata": s.metadata, "panel": panel},
                 "spot_ids": id_record}
        return _write(s, out, spots_um=centres[keep], gexp=pooled[keep], n_cells=n_cells[keep], genes=genes,
                      spot_ids=np.asarray(ids, dtype=object)[keep],
                      gene_ids=gene_ids, donor=donor or known_sample_donor(s.name) or s.name,
                      tissue=tissue or str(s.metadata.get("panel_tissue_type") or "unknown"), source=source,
                      split=split, geometry=geometry, patch=patch, overwrite=overwrite,
                      progress=progress, qc=qc, rows_per_shard=rows_per_shard, extra=extra, inputs=inputs)
    finally:
        s.close()


def build_visium_dataset(outs: str | os.PathLike, out: str | os.PathLike, *, image: str | os.PathLike | None,
                         sample: str | None = None, donor: str | None = None, tissue: str = "unknown",
                         source: str = "visium", split: str = "train", matrix: str = "filtered",
                         min_counts: float = 1.0, geometry: SpotGeometry | str = "visium",
                         patch: PatchOptions = PatchOptions(), panel: str | None = None,
                         duplicate_genes: str = "error", missing_genes: str = "error", max_missing: float = 0.1,
                         allow_non_integer_counts: bool = False, overwrite: bool = False, progress: bool = True,
                         qc: bool = True, rows_per_shard: int = 2048) -> Path:
    """Crop a µm-exact H&E patch around every in-tissue Visium spot and write a one-sample dataset at ``out``.

    ``image``: the full-resolution image, or ``"hires"``/``"lowres"``. ``n_cells`` is -1 (unknown) for Visium.
    ``geometry``: must describe Visium's own spots (55 µm discs, 100 µm hex lattice); only its patch field of
    view and µm/px may differ from the ``visium`` preset.
    """
    geometry = get_geometry(geometry)
    vis = GEOMETRY_PRESETS["visium"]
    if (geometry.shape, geometry.diameter_um, geometry.pitch_um, geometry.grid) != \
            (vis.shape, vis.diameter_um, vis.pitch_um, vis.grid):
        msg = (f"Visium spots are {vis.diameter_um:g} µm discs on a {vis.pitch_um:g} µm hex lattice, found a "
               f"{geometry.name!r} geometry ({geometry.shape} {geometry.diameter_um:g} µm, pitch {geometry.pitch_um:g}"
               " µm); spots cannot be re-pooled: use the 'visium' geometry (change only --fov-um / --um-per-px)")
        raise HescapeDataError(msg)
    check_build_options(split=split, rows_per_shard=rows_per_shard, patch=patch, min_counts=min_counts,
                        duplicate_genes=duplicate_genes, missing_genes=missing_genes, max_missing=max_missing,
                        panel=panel)
    inputs = [outs] + ([] if image is None or str(image) in ("hires", "lowres") else [image])
    out = _fresh_output(out, overwrite, inputs)
    s = read_visium(outs, image=image, matrix=matrix, allow_non_integer_counts=allow_non_integer_counts)
    try:
        if sample:
            s.name = sample
        counts, genes, gene_ids = harmonise_genes(s, panel=panel, duplicate_genes=duplicate_genes,
                                                  missing_genes=missing_genes, max_missing=max_missing)
        gexp = counts.toarray().astype(np.float32)
        keep = gexp.sum(1) >= min_counts
        extra = {"ingest": {"kind": "visium", "input": str(Path(outs).resolve()), "min_counts": min_counts,
                            "patch": asdict(patch), "metadata": s.metadata, "panel": panel},
                 "spot_ids": {"kind": "barcode", "source": "Space Ranger barcode (the matrix's and "
                                                           "tissue_positions' barcode column)"}}
        return _write(s, out, spots_um=s.xy_um[keep], gexp=gexp[keep], n_cells=np.full(int(keep.sum()), -1, np.int32),
                      spot_ids=np.asarray(s.obs_ids, dtype=object)[keep],
                      genes=genes, gene_ids=gene_ids, donor=donor or known_sample_donor(s.name) or s.name, tissue=tissue, source=source,
                      split=split, geometry=geometry, patch=patch, overwrite=overwrite,
                      progress=progress, qc=qc, rows_per_shard=rows_per_shard, extra=extra, inputs=inputs)
    finally:
        s.close()


def build_visium_hd_dataset(outs: str | os.PathLike, out: str | os.PathLike, *, image: str | os.PathLike | None,
                            bin_size_um: int | None = None, sample: str | None = None, donor: str | None = None,
                            tissue: str = "unknown", source: str = "visium-hd", split: str = "train",
                            matrix: str = "filtered", geometry: SpotGeometry | str = "hescape",
                            spots: SpotOptions = SpotOptions(), patch: PatchOptions = PatchOptions(),
                            panel: str | None = None, duplicate_genes: str = "error", missing_genes: str = "error",
                            max_missing: float = 0.1, allow_non_integer_counts: bool = False,
                            overwrite: bool = False, progress: bool = True, qc: bool = True,
                            rows_per_shard: int = 2048) -> Path:
    """Pool a Visium HD output's bins into pseudo-spots, crop H&E patches, write a one-sample dataset at ``out``.

    Bins are treated like Xenium cells: their centres (µm, pixel size measured from the bin lattice; see
    :mod:`hescape.data.readers.visium_hd`) are pooled by sum into the spots of ``geometry`` (default
    ``"hescape"``, the published HESCAPE dataset's 55 µm pseudo-spots) exactly as :func:`build_xenium_dataset`
    pools cells. ``n_cells`` holds the number of bins pooled into each spot; ``spots.min_cells`` is a minimum
    number of bins.

    Parameters
    ----------
    outs
        The Space Ranger ``outs/`` folder, its ``binned_outputs/`` folder, or one ``square_XXXum`` folder.
    image
        The full-resolution H&E image given to Space Ranger, or ``"hires"``/``"lowres"``.
    bin_size_um
        2, 8 or 16 µm (default 8: 10x's recommended analysis bin, ~31 bins per 55 µm spot).

    Other parameters are those of :func:`build_xenium_dataset`. A geometry whose spot holds fewer than 16 bins
    is accepted with a warning (the pooled area is quantised to whole bins).
    """
    import warnings

    from .readers.visium_hd import read_visium_hd

    geometry = get_geometry(geometry)
    check_build_options(split=split, rows_per_shard=rows_per_shard, patch=patch, spots=spots,
                        duplicate_genes=duplicate_genes, missing_genes=missing_genes, max_missing=max_missing,
                        panel=panel)
    inputs = [outs] + ([] if image is None or str(image) in ("hires", "lowres") else [image])
    out = _fresh_output(out, overwrite, inputs)
    s = read_visium_hd(outs, image=image, bin_size_um=bin_size_um, matrix=matrix,
                       allow_non_integer_counts=allow_non_integer_counts)
    try:
        if sample:
            s.name = sample
        bin_um = float(s.metadata["bin_size_um"])
        bins_per_spot = geometry.area_um2 / bin_um**2
        if bins_per_spot < 16:
            s.metadata["pooling_warning"] = (
                f"sample {s.name}: a {geometry.name} spot ({geometry.area_um2:.0f} µm²) holds only "
                f"{bins_per_spot:.1f} bins of {bin_um:g} µm, so its pooled area is quantised to whole bins; "
                "choose a smaller --bin-size")
            warnings.warn(s.metadata["pooling_warning"], UserWarning, stacklevel=2)
        counts, genes, gene_ids = harmonise_genes(s, panel=panel, duplicate_genes=duplicate_genes,
                                                  missing_genes=missing_genes, max_missing=max_missing)
        centres, pooled, n_bins, ids, id_record = pseudo_spots(s.xy_um, counts, geometry, with_ids=True)
        keep = (pooled.sum(1) >= spots.min_counts) & (n_bins >= spots.min_cells)
        extra = {"ingest": {"kind": "visium-hd", "input": str(Path(outs).resolve()), "spots": asdict(spots),
                            "bin_size_um": bin_um, "n_cells_counts": "bins", "patch": asdict(patch),
                            "metadata": s.metadata, "panel": panel},
                 "spot_ids": id_record}
        return _write(s, out, spots_um=centres[keep], gexp=pooled[keep], n_cells=n_bins[keep], genes=genes,
                      spot_ids=np.asarray(ids, dtype=object)[keep],
                      gene_ids=gene_ids, donor=donor or known_sample_donor(s.name) or s.name, tissue=tissue,
                      source=source, split=split, geometry=geometry, patch=patch, overwrite=overwrite,
                      progress=progress, qc=qc, rows_per_shard=rows_per_shard, extra=extra, inputs=inputs)
    finally:
        s.close()
