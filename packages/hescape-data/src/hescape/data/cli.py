"""``hescape-data``: build paired datasets from Xenium / Visium outputs and inspect them.

    hescape-data build xenium BUNDLE --out DIR [--he-image FILE --alignment CSV] [options]
    hescape-data build visium OUTS --image FILE|hires|lowres --out DIR [options]
    hescape-data build visium-hd OUTS --image FILE|hires|lowres [--bin-size 8] --out DIR [options]
    hescape-data build spatialdata STORE.zarr --table T --image I [--shapes S] [--um-per-unit X] --out DIR
    hescape-data build anndata X.h5ad --image HE.tif [--image-um-per-px U] [--level auto|spots|cells] --out DIR
    hescape-data build hest HEST_DIR --ids TENX95,NCBI783|all [--pixel-size metadata|lattice] --out DIR
    hescape-data import hescape DIR --panel PANEL --out OUT   # the official HESCAPE parquet/Arrow shards
    hescape-data build --samplesheet samples.csv --out DIR [--jobs N] [--options 'min_counts=5;...']  # many samples
    hescape-data merge A B ... --out DIR [--overwrite]  # datasets built separately (same panel and geometry)
    hescape-data info DIR [--verify]
    hescape-data split DIR --preset PANEL [--match name|donor]   # the reference split of a HESCAPE panel
    hescape-data split DIR --by donor --val 1 --test 1 --seed 0  # whole donors at random
    hescape-data synth xenium DIR [--size-um 300]        # a synthetic bundle in the real file formats
    hescape-data synth dataset DIR --batch-strength 0.5 [--n-donors 8]  # synthetic dataset, batch effect as a dial

Input errors are reported on one line (what was expected, what was found, how to fix it) with exit code 2;
options and the output location are checked before any input is read; datasets are written atomically, so a
failed or killed build leaves nothing behind (its hidden leftovers are removed by the next build of the same
--out), and --overwrite replaces only a HESCAPE dataset, never an input or a folder of anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from .errors import HescapeDataError

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path,
                   help="output dataset directory (must not exist; never an input or inside one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing HESCAPE dataset (or empty folder) at --out, with no moment where it is "
                        "half-written; any other folder is refused, never deleted")
    p.add_argument("--sample", help="sample name (default: from the input)")
    p.add_argument("--donor", help="donor (patient) id; default: the preset's patient for a reference HESCAPE sample "
                                   "id, else the sample name (then two sections of one patient become two donors)")
    p.add_argument("--tissue", help="tissue label")
    p.add_argument("--source", help="source label (default: xenium / visium / visium-hd)")
    p.add_argument("--split", default="train",
                   help="split recorded in the manifest: train, val or test (default: train)")
    p.add_argument("--fov-um", type=float, help="patch field of view in µm (default: the geometry's, 112)")
    p.add_argument("--um-per-px", type=float,
                   help="patch pixel size in µm (default: the geometry's, 0.5 -> 224 px)")
    p.add_argument("--max-upsample", type=float, default=2.0,
                   help="refuse an H&E image coarser than this many times --um-per-px (default 2)")
    p.add_argument("--min-counts", type=float, default=1.0, help="drop spots with fewer total counts (default 1)")
    p.add_argument("--panel", help="reorder/subset genes to a vendored HESCAPE panel, e.g. human-breast-panel")
    p.add_argument("--missing-genes", choices=["error", "zero"], default="error",
                   help="panel genes absent from the data (by Ensembl id and symbol): refuse (default) or fill zeros")
    p.add_argument("--max-missing", type=float, default=0.1,
                   help="with --missing-genes zero: largest fraction of the panel that may be zero-filled (default 0.1)")
    p.add_argument("--duplicate-genes", choices=["error", "sum"], default="error",
                   help="features sharing a gene name: refuse (default) or sum them")
    p.add_argument("--min-tissue-fraction", type=float, default=0.0,
                   help="drop spots whose patch has less tissue (pixels darker than the glass); default 0 keeps all")
    p.add_argument("--outside-spots", choices=["error", "drop"], default="error",
                   help="spot centres outside the H&E image: stop with an error (default) or drop them")
    p.add_argument("--skip-registration-check", action="store_true",
                   help="build even when the spots do not seem to lie on the image's tissue (the check still "
                        "measures, and the manifest records the skip); default: refuse a misregistration")
    p.add_argument("--allow-non-integer-counts", action="store_true",
                   help="accept fractional values in the count matrix (refused by default: raw counts expected)")
    p.add_argument("--rows-per-shard", type=int, default=2048, help="rows per shard file, >= 1 (default 2048)")
    p.add_argument("--no-qc", action="store_true", help="skip the QC figure (qc/<sample>.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_geometry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--geometry", choices=["hescape", "hest", "visium"], default="hescape",
                   help="pseudo-spot preset: hescape = 55 µm hexagons tiling the tissue (the published HESCAPE "
                        "dataset; default), hest = 100 µm squares, visium = 55 µm discs 100 µm apart")
    p.add_argument("--spot-shape", choices=["disc", "square", "hexagon"], help="override the preset's spot shape")
    p.add_argument("--grid", choices=["hex", "square"], help="override the preset's lattice")
    p.add_argument("--pitch-um", type=float, help="override the preset's centre-to-centre distance (µm)")
    p.add_argument("--spot-diameter-um", type=float, help="override the preset's spot diameter / side (µm)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="hescape-data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build a dataset from one Xenium bundle or Space Ranger outs/, or from a "
                                         "samplesheet of many (--samplesheet, no kind)")
    _add_samplesheet(build)
    bsub = build.add_subparsers(dest="kind", required=False)
    x = bsub.add_parser("xenium", help="Xenium Onboard Analysis bundle + post-Xenium H&E")
    x.add_argument("bundle", type=Path)
    x.add_argument("--he-image", type=Path, help="H&E OME-TIFF (default: <bundle>/*he_image.ome.tif)")
    x.add_argument("--alignment", type=Path, help="H&E alignment CSV (default: <bundle>/*he_imagealignment.csv)")
    _add_geometry(x)
    x.add_argument("--min-cells", type=int, default=1, help="drop pseudo-spots with fewer cells (default 1)")
    x.add_argument("--counts-from", choices=["cells", "transcripts"], default="cells",
                   help="pool whole cells by centroid (default) or transcripts.parquet by position")
    x.add_argument("--min-qv", type=float, default=20.0, help="transcript QV threshold (default 20, as XOA)")
    _add_common(x)
    v = bsub.add_parser("visium", help="Space Ranger outs/ folder + full-resolution image")
    v.add_argument("outs", type=Path)
    v.add_argument("--image", required=True, help="full-resolution image file, or 'hires' / 'lowres'")
    v.add_argument("--matrix", choices=["filtered", "raw"], default="filtered")
    _add_common(v)
    hd = bsub.add_parser("visium-hd", help="Visium HD Space Ranger outs/ (binned_outputs) + full-resolution image; "
                                           "bins pooled into pseudo-spots")
    hd.add_argument("outs", type=Path, help="outs/ folder, its binned_outputs/ folder, or one square_XXXum folder")
    hd.add_argument("--image", required=True, help="full-resolution image given to Space Ranger, or 'hires' / 'lowres'")
    hd.add_argument("--bin-size", type=int, choices=[2, 8, 16],
                    help="bin size (µm) to pool; default 8 (10x's analysis bin: ~31 bins per 55 µm spot)")
    hd.add_argument("--matrix", choices=["filtered", "raw"], default="filtered")
    _add_geometry(hd)
    hd.add_argument("--min-cells", type=int, default=1, help="drop pseudo-spots with fewer bins (default 1)")
    _add_common(hd)
    sdp = bsub.add_parser("spatialdata", help="a SpatialData store (.zarr): a table of raw counts, the shapes it "
                                              "annotates and an H&E image (needs hescape-data[spatialdata])")
    sdp.add_argument("store", type=Path, help="the .zarr directory")
    sdp.add_argument("--table", required=True, help="table element (raw counts; its obs index becomes spot_id)")
    sdp.add_argument("--image", required=True, help="H&E image element")
    sdp.add_argument("--shapes", help="shapes element (default: the table's region)")
    sdp.add_argument("--coordinate-system", help="coordinate system joining shapes and image (default: global)")
    sdp.add_argument("--um-per-unit", type=float,
                     help="µm per unit of that coordinate system (needed unless a spatialdata-io Xenium/Visium store)")
    sdp.add_argument("--observations", choices=["auto", "spots", "cells"], default="auto",
                     help="rows are spots kept as they are, or cells pooled into pseudo-spots (default auto: "
                          "polygons and circles under 30 µm are cells)")
    sdp.add_argument("--layer", help="take counts from table.layers[LAYER] instead of X")
    _add_geometry(sdp)
    sdp.add_argument("--min-cells", type=int, default=1, help="drop pseudo-spots with fewer cells (default 1)")
    _add_common(sdp)
    ad = bsub.add_parser("anndata", help="an AnnData .h5ad (obsm['spatial'] in pixels of --image) + its H&E image "
                                         "(needs hescape-data[anndata])",
                         description="--geometry defaults to visium for spots (kept as they are) and hescape for "
                                     "cells (pooled)")
    ad.add_argument("h5ad", type=Path)
    ad.add_argument("--image", required=True,
                    help="the H&E image whose pixels obsm['spatial'] is in, or 'hires' / 'lowres' (uns['spatial'])")
    ad.add_argument("--image-um-per-px", type=float,
                    help="µm per pixel of obsm['spatial'] (full resolution); default: measured from the Visium spot "
                         "lattice (100 µm pitch) or uns['spatial'] scale factors, else refused")
    ad.add_argument("--level", choices=["auto", "spots", "cells"], default="auto",
                    help="obs are Visium spots (kept as 55 µm discs) or cells/bins (pooled into pseudo-spots); "
                         "default auto: spots when obs has array_row/array_col or spot_diameter_fullres is set")
    ad.add_argument("--layer", help="count layer: X or a layers key (default: layers['counts'] if present, else X)")
    ad.add_argument("--library-id", help="the uns['spatial'] library, when there are several")
    _add_geometry(ad)
    ad.set_defaults(geometry=None)
    ad.add_argument("--min-cells", type=int, default=1, help="drop pseudo-spots with fewer cells (default 1)")
    _add_common(ad)
    hs = bsub.add_parser("hest", help="samples of a HEST-1k download (st/, wsis/, metadata/, transcripts/) into one "
                                      "dataset (needs hescape-data[anndata])",
                         description="--geometry defaults to visium when a Visium sample is included, else hescape")
    hs.add_argument("hest_dir", type=Path)
    hs.add_argument("--ids", required=True, help="comma-separated sample ids (e.g. TENX95,NCBI783), or 'all'")
    hs.add_argument("--pixel-size", choices=["metadata", "lattice"], default="metadata",
                    help="µm/px of each WSI: HEST's pixel_size_um_estimated (default) or measured (Visium spot "
                         "lattice; Xenium transcripts' µm coordinates); a disagreement above 2%% is warned about")
    hs.add_argument("--counts-from", dest="hest_counts_from", choices=["auto", "spots", "transcripts", "cells"],
                    default="auto", help="Xenium samples: HEST's 100 µm pseudo-spots (auto with --geometry hest), "
                                         "transcripts (auto otherwise) or cells (transcripts grouped by cell_id)")
    hs.add_argument("--min-qv", type=float, default=20.0, help="transcript QV threshold (default 20, as XOA)")
    _add_geometry(hs)
    hs.set_defaults(geometry=None)
    hs.add_argument("--min-cells", type=int, default=1, help="drop pseudo-spots with fewer cells (default 1)")
    _add_common(hs)
    imp = sub.add_parser("import", help="import a published dataset into a HESCAPE dataset")
    isub = imp.add_subparsers(dest="kind", required=True)
    ih = isub.add_parser("hescape", help="the official HESCAPE dataset: a folder of one config's parquet (Hub) or "
                                         "Arrow (save_to_disk) shards")
    ih.add_argument("src", type=Path, help="folder of the shards (searched recursively)")
    ih.add_argument("--panel", required=True,
                    help="the config's panel, e.g. human-breast-panel (gene order, splits, donors, µm/px)")
    ih.add_argument("--out", required=True, type=Path, help="output dataset directory (never inside the input)")
    ih.add_argument("--overwrite", action="store_true", help="replace an existing HESCAPE dataset at --out")
    ih.add_argument("--um-per-px", type=float,
                    help="patch µm/px of every sample (default: the preset's pixel_size_um_estimated)")
    ih.add_argument("--unlisted", choices=["drop", "error"], default="drop",
                    help="samples in no split of the preset: leave them out (default, as the authors) or refuse")
    ih.add_argument("--conflict", choices=["train", "val", "test"],
                    help="the split of a sample the preset lists in two splits (human-skin-panel)")
    ih.add_argument("--check-images", choices=["some", "all"], default="some",
                    help="decode the first and last image of every batch (default) or every image")
    ih.add_argument("--rows-per-shard", type=int, default=512,
                    help="rows per output shard (default 512: about 250 MB of 512 px PNG patches)")
    ih.add_argument("--quiet", action="store_true", help="no progress bar")
    mrg = sub.add_parser("merge", help="merge datasets built separately (same genes and spot geometry) into one")
    mrg.add_argument("datasets", nargs="+", type=Path, help="dataset directories, in the order of the result")
    mrg.add_argument("--out", required=True, type=Path, help="output dataset directory (never an input)")
    mrg.add_argument("--overwrite", action="store_true", help="replace an existing HESCAPE dataset at --out")
    info = sub.add_parser("info", help="summarise a dataset directory")
    info.add_argument("path", type=Path)
    info.add_argument("--verify", action="store_true", help="also check every shard's SHA-256")
    spl = sub.add_parser("split", help="reassign samples to train/val/test (rewrites manifest.json only)")
    spl.add_argument("path", type=Path)
    how = spl.add_mutually_exclusive_group(required=True)
    how.add_argument("--preset", help="reference split of a HESCAPE panel, e.g. human-breast-panel")
    how.add_argument("--by", choices=["donor"], help="draw whole donors at random")
    spl.add_argument("--match", choices=["name", "donor"], default="name",
                     help="with --preset: match the preset's sample ids against this column (default name)")
    spl.add_argument("--keep-donors", action="store_true",
                     help="with --preset: keep the dataset's donors instead of taking them from the preset's patient "
                          "column (two sections of one patient are one donor there)")
    spl.add_argument("--conflict", choices=["train", "val", "test"],
                     help="with --preset: the split of a sample the preset lists in two splits (human-skin-panel)")
    spl.add_argument("--val", type=int, default=1, help="with --by donor: number of val donors (default 1)")
    spl.add_argument("--test", type=int, default=1, help="with --by donor: number of test donors (default 1)")
    spl.add_argument("--seed", type=int, default=0, help="with --by donor: random seed (default 0)")
    syn = sub.add_parser("synth", help="write synthetic inputs in real file formats (for tests and demos)")
    ssub = syn.add_subparsers(dest="kind", required=True)
    sx = ssub.add_parser("xenium", help="a synthetic Xenium bundle with an aligned H&E OME-TIFF")
    sx.add_argument("out", type=Path)
    sx.add_argument("--size-um", type=float, default=300.0)
    sx.add_argument("--seed", type=int, default=0)
    sx.add_argument("--string-cell-ids", action="store_true")
    sx.add_argument("--transcripts", action="store_true")
    sd = ssub.add_parser("dataset", help="a synthetic paired dataset whose batch effect is a dial (known biology in "
                                         "truth/<sample>.npz, each sample's drawn effects in batch/<sample>.npz)")
    sd.add_argument("out", type=Path, help="output dataset directory (must not exist)")
    sd.add_argument("--batch-strength", type=float, default=0.0,
                    help="added batch effects: 0 = none (the demo generator as it is), 1 = the documented reference "
                         "(hescape.data.batch_effects), above 1 stronger (default 0)")
    sd.add_argument("--n-donors", type=int, default=8, help="donors, one val and one test (at least 3; default 8)")
    sd.add_argument("--samples-per-donor", type=int, default=1, help="sections per donor (default 1)")
    sd.add_argument("--size-um", type=float, default=1000.0, help="side of each square section in µm (default 1000)")
    sd.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    sd.add_argument("--overwrite", action="store_true", help="replace an existing HESCAPE dataset at the output directory")
    return ap


def _geometry(a):
    from .geometry import get_geometry

    g = get_geometry(getattr(a, "geometry", None) or "visium")
    return g.with_(shape=getattr(a, "spot_shape", None), grid=getattr(a, "grid", None),
                   pitch_um=getattr(a, "pitch_um", None), diameter_um=getattr(a, "spot_diameter_um", None),
                   fov_um=a.fov_um, um_per_px=a.um_per_px)


def _inputs(a) -> list[Path]:
    """The files and folders a build reads (the output may not be, contain or lie inside any of them)."""
    if a.kind == "xenium":
        return [p for p in (a.bundle, a.he_image, a.alignment) if p is not None]
    if a.kind == "spatialdata":
        return [a.store]
    if a.kind == "anndata":
        return [a.h5ad] + ([] if a.image in ("hires", "lowres") else [Path(a.image)])
    if a.kind == "hest":
        return [a.hest_dir]
    return [a.outs] + ([] if a.image is None or a.image in ("hires", "lowres") else [Path(a.image)])


def _validate(a):
    """Check every option and the output location before any input is read; returns (geometry, patch, spots)."""
    from .ingest import PatchOptions, SpotOptions, check_build_options
    from .outputs import check_output_location

    for opt in ("sample", "donor", "tissue", "source"):
        v = getattr(a, opt, None)
        if v is not None and (not v.strip() or any(not c.isprintable() for c in v)):
            msg = f"--{opt}: expected a non-empty printable name, found {v!r}"
            raise HescapeDataError(msg)
    geometry = _geometry(a)
    patch = PatchOptions(min_tissue_fraction=a.min_tissue_fraction, outside_spots=a.outside_spots,
                         max_upsample=a.max_upsample, registration_check=not a.skip_registration_check)
    pooled = ("xenium", "visium-hd", "spatialdata", "anndata", "hest")
    spots = SpotOptions(min_counts=a.min_counts, min_cells=a.min_cells) if a.kind in pooled else None
    check_build_options(split=a.split, rows_per_shard=a.rows_per_shard, patch=patch, spots=spots,
                        min_counts=a.min_counts, duplicate_genes=a.duplicate_genes, missing_genes=a.missing_genes,
                        max_missing=a.max_missing, counts_from=getattr(a, "counts_from", "cells"),
                        min_qv=getattr(a, "min_qv", 20.0), panel=a.panel)
    check_output_location(a.out, overwrite=a.overwrite, inputs=_inputs(a))
    return geometry, patch, spots


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings raised while building (e.g. a pixel-size cross-check off by more than 5 %), one line on stderr."""
    print(f"hescape-data: warning: {message}", file=sys.stderr)


def _build(a) -> int:
    import warnings

    if a.samplesheet is not None or a.kind is None:
        return _build_samplesheet(a)

    from .ingest import SpotOptions, build_visium_dataset, build_visium_hd_dataset, build_xenium_dataset

    warnings.showwarning = _print_warning
    geometry, patch, spots = _validate(a)
    common = {"sample": a.sample, "donor": a.donor, "split": a.split, "panel": a.panel,
              "duplicate_genes": a.duplicate_genes, "missing_genes": a.missing_genes, "max_missing": a.max_missing,
              "allow_non_integer_counts": a.allow_non_integer_counts,
              "overwrite": a.overwrite, "progress": not a.quiet, "qc": not a.no_qc, "rows_per_shard": a.rows_per_shard,
              "patch": patch, "geometry": geometry}
    if a.kind == "xenium":
        out = build_xenium_dataset(a.bundle, a.out, he_image=a.he_image, alignment=a.alignment, tissue=a.tissue,
                                   counts_from=a.counts_from, min_qv=a.min_qv,
                                   source=a.source or "xenium", spots=spots, **common)
    elif a.kind == "spatialdata":
        from .ingest_spatialdata import build_spatialdata_dataset

        out = build_spatialdata_dataset(
            a.store, a.out, table=a.table, image=a.image, shapes=a.shapes, coordinate_system=a.coordinate_system,
            um_per_unit=a.um_per_unit, observations=a.observations, layer=a.layer, tissue=a.tissue or "unknown",
            source=a.source or "spatialdata", spots=spots, **common)
    elif a.kind in ("anndata", "hest"):
        from .ingest_more import cli_build

        out = cli_build(a, patch)
    elif a.kind == "visium-hd":
        out = build_visium_hd_dataset(a.outs, a.out, image=a.image, bin_size_um=a.bin_size, matrix=a.matrix,
                                      tissue=a.tissue or "unknown", source=a.source or "visium-hd",
                                      spots=SpotOptions(min_counts=a.min_counts, min_cells=a.min_cells), **common)
    else:
        out = build_visium_dataset(a.outs, a.out, image=a.image, tissue=a.tissue or "unknown",
                                   source=a.source or "visium", matrix=a.matrix, min_counts=a.min_counts, **common)
    _info(out, verify=False)
    return 0


def _info(path: Path, verify: bool) -> int:
    from .arrow import read_manifest, verify_dataset, zero_gene_columns

    m = verify_dataset(path) if verify else read_manifest(path)
    zero = zero_gene_columns(path, m) if verify else []
    print(f"{path}: {m['n_rows']} spots, {len(m['genes'])} genes, {len(m['samples'])} samples, "
          f"{len(m['shards'])} shards{' (checksums OK)' if verify else ''}")
    if zero:
        filled = ((m.get("ingest") or {}).get("metadata") or {}).get("zero_filled_genes") or []
        print(f"hescape-data: warning: {len(zero)} of {len(m['genes'])} gene columns are zero in every row"
              f"{f' ({len(filled)} zero-filled at build)' if filled else ''}: {', '.join(zero[:20])}"
              f"{', ...' if len(zero) > 20 else ''}; they carry no signal: check the panel matched the data",
              file=sys.stderr)
    splits = Counter()
    for s in m["samples"]:
        splits[s["split"]] += s["n_spots"]
    print("splits: " + ", ".join(f"{k}={v}" for k, v in sorted(splits.items())))
    for s in m["samples"]:
        print(f"  {s['name']}: {s['n_spots']} spots, donor={s['donor']}, tissue={s.get('tissue', 'unknown')}, "
              f"source={s.get('source', 'unknown')}, split={s['split']}")
    qc = sorted((path / "qc").glob("*.png")) if (path / "qc").is_dir() else []
    if qc:
        print("qc figures: " + ", ".join(str(p) for p in qc))
    return 0


def _split(a) -> int:
    from .arrow import read_manifest
    from .splits import apply_splits, donor_split_assignment, preset_donors, preset_split_assignment

    donors = None

    samples = read_manifest(a.path)["samples"]
    if a.preset:
        assignment, absent = preset_split_assignment(samples, a.preset, match=a.match, conflict=a.conflict)
        if absent:
            print(f"note: {len(absent)} sample(s) of preset {a.preset} are not in this dataset: {', '.join(absent)}")
        if not a.keep_donors:
            by_id = preset_donors(a.preset)
            donors = {s["name"]: by_id[s[a.match]] for s in samples if s[a.match] in by_id}
            old = {s["name"]: s["donor"] for s in samples}
            changed = [f"{n}: {old[n]!r} -> {d!r}" for n, d in donors.items() if old[n] != d]
            if changed:
                print(f"donors from the preset's patient column ({len(changed)} changed): " + "; ".join(changed))
    else:
        assignment = donor_split_assignment(samples, n_val=a.val, n_test=a.test, seed=a.seed)
    apply_splits(a.path, assignment, donors=donors)
    return _info(a.path, verify=False)


def _import(a) -> int:
    import warnings

    from .import_hescape import import_hescape

    warnings.showwarning = _print_warning
    out = import_hescape(a.src, a.out, panel=a.panel, um_per_px=a.um_per_px, unlisted=a.unlisted,
                         conflict=a.conflict, check_images=a.check_images, rows_per_shard=a.rows_per_shard,
                         overwrite=a.overwrite, progress=not a.quiet)
    return _info(out, verify=False)


def _add_samplesheet(p: argparse.ArgumentParser) -> None:
    """``build --samplesheet``: options given before any kind (``build --samplesheet s.csv --out DIR``)."""
    p.add_argument("--samplesheet", type=Path,
                   help="CSV, one row per sample (technology,path,sample,donor,tissue,panel,split[,he_image,"
                        "alignment,options]): build them all into one dataset; give no kind")
    p.add_argument("--out", type=Path, help="with --samplesheet: output dataset directory")
    p.add_argument("--jobs", type=int, default=1, help="with --samplesheet: samples built at once, each in its own "
                                                       "worker process (default 1: in this process)")
    p.add_argument("--options", help="with --samplesheet: build options for every row, key=value;... or JSON "
                                     "(e.g. 'min_counts=5;geometry=hest'); a row's options column overrides them")
    p.add_argument("--overwrite", action="store_true",
                   help="with --samplesheet: replace an existing dataset at --out (finished samples are reused)")
    p.add_argument("--rows-per-shard", type=int, default=2048, help="with --samplesheet: rows per shard (default 2048)")
    p.add_argument("--no-qc", action="store_true", help="with --samplesheet: skip the QC figures")
    p.add_argument("--quiet", action="store_true", help="with --samplesheet: no progress output")


def _build_samplesheet(a) -> int:
    """``build --samplesheet``: exit code 0 when every sample is in the dataset, 2 when any failed (the dataset
    then holds the others) or nothing could be built."""
    from .samplesheet import build_from_samplesheet

    if a.kind is not None:
        msg = (f"build --samplesheet: expected no kind (each row names its technology), found {a.kind!r}; "
               "drop it, or drop --samplesheet to build one sample")
        raise HescapeDataError(msg)
    if a.samplesheet is None:
        msg = ("build: expected a kind (xenium, visium, visium-hd, ...) or --samplesheet FILE, found neither; "
               "see hescape-data build --help")
        raise HescapeDataError(msg)
    if a.out is None:
        msg = "build --samplesheet: expected --out DIR (the dataset to write), found none; add it"
        raise HescapeDataError(msg)
    res = build_from_samplesheet(a.samplesheet, a.out, jobs=a.jobs, options=a.options, overwrite=a.overwrite,
                                 rows_per_shard=a.rows_per_shard, qc=not a.no_qc, progress=not a.quiet)
    print(res.table())
    if res.out is not None:
        _info(res.out, verify=False)
    failed = res.failed
    if failed:
        where = (f"the dataset {res.out} holds the other {len(res.samples) - len(failed)}" if res.out is not None
                 else "nothing was written")
        print(f"hescape-data: error: {len(failed)} of {len(res.samples)} samples failed "
              f"({', '.join(s.sample for s in failed)}; errors above); {where}; fix them and re-run the same "
              "command: finished samples are not built again", file=sys.stderr)
        return 2
    return 0


def _merge(a) -> int:
    from .merge import merge_datasets

    return _info(merge_datasets(a.datasets, a.out, overwrite=a.overwrite), verify=False)


def _synth(a) -> int:
    from .xenium_bundle import XeniumBundleOptions, small_bundle_config, write_xenium_bundle

    if a.kind == "dataset":
        return _synth_dataset(a)

    out = write_xenium_bundle(a.out, small_bundle_config(a.size_um, seed=a.seed),
                              XeniumBundleOptions(string_cell_ids=a.string_cell_ids, transcripts=a.transcripts))
    print(f"wrote synthetic Xenium bundle {out}")
    return 0


def _synth_dataset(a) -> int:
    from .batch_effects import BatchEffects
    from .build import build_synthetic_dataset
    from .synthetic import SyntheticConfig

    if a.n_donors < 3 or a.samples_per_donor < 1:
        msg = (f"synth dataset: expected --n-donors >= 3 (one val, one test, at least one train donor) and "
               f"--samples-per-donor >= 1, found {a.n_donors} and {a.samples_per_donor}; raise them")
        raise HescapeDataError(msg)
    cfg = SyntheticConfig(n_donors=a.n_donors, samples_per_donor=a.samples_per_donor, sample_size_um=a.size_um,
                          seed=a.seed, batch=BatchEffects.at(a.batch_strength))
    out = build_synthetic_dataset(a.out, cfg, overwrite=a.overwrite, truth=True)
    print(f"batch strength {a.batch_strength:g}: " + ", ".join(f"{k} {v:g}" for k, v in cfg.batch.to_dict().items()))
    return _info(out, verify=False)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (``hescape-data: error: ...``, exit code 2) like every other error."""

    def error(self, message: str):
        msg = f"{self.prog}: {message} (see {self.prog} --help)"
        raise _UsageError(msg)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hescape-data`` console script; returns the exit code.

    Every input or usage error ends in one line on stderr, ``hescape-data: error: ...`` (expected, found, fix),
    and exit code 2; nothing is written or deleted then.
    """
    try:
        a = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"hescape-data: error: {e}", file=sys.stderr)
        return 2
    try:
        if a.cmd == "build":
            return _build(a)
        if a.cmd == "info":
            return _info(a.path, a.verify)
        if a.cmd == "merge":
            return _merge(a)
        if a.cmd == "import":
            return _import(a)
        if a.cmd == "split":
            return _split(a)
        return _synth(a)
    except (HescapeDataError, FileExistsError) as e:
        print(f"hescape-data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (permissions, disk full, ...): one line, not a traceback
        print(f"hescape-data: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}; check the "
              "paths, permissions and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hescape-data: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
