"""Build synthetic paired datasets, and find or build the embedded default dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .arrow import DatasetWriter, encode_png, read_manifest
from .errors import DatasetFormatError, HescapeDataError
from .outputs import is_hescape_dataset, temp_sibling
from .panels import load_panel
from .splits import check_no_donor_leakage, donor_split_assignment
from .synthetic import SyntheticConfig, crop_patch, generate_sample, spot_centres
from .xenium_bundle import XeniumBundleOptions

__all__ = ["GENERATOR_VERSION", "bundle_options", "build_synthetic_dataset", "default_dataset", "cache_dir",
           "synthetic_splits", "spot_lattice_ids", "synthetic_config_record", "default_dataset_path"]

#: Bumped whenever the generator's output changes, so cached default datasets are rebuilt.
#: 4: samples go through the real pipeline (Xenium bundle on disk -> reader -> pooling -> µm-exact patches).
#: 5: the modalities are tied through morphology (architecture, nuclear size/shape/density, states), with
#: regional stain variation; spots follow ``SyntheticConfig.geometry`` (hescape hexagons by default);
#: donor splits from :func:`hescape.data.splits.donor_split_assignment`.
#: 6: every row has its lattice id in the ``spot_id`` column (``hex_r0003_c0007``; samples' ``spot_ids``).
GENERATOR_VERSION = 6


def cache_dir() -> Path:
    """Where built datasets are cached: ``$HESCAPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hescape``, else ``~/.cache/hescape``."""
    env = os.environ.get("HESCAPE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "hescape"


def synthetic_config_record(cfg: SyntheticConfig) -> dict:
    """``cfg`` as the plain dict recorded in a manifest (``generator.config``) and hashed into the cache key.

    ``batch`` is left out when no dial is on, so configs without added batch effects keep the record and cache key
    they had before ``SyntheticConfig.batch`` existed (their data are byte-identical).
    """
    rec = dataclasses.asdict(cfg)
    if not cfg.batch.active:
        rec.pop("batch", None)
    return rec


def _sample_name(donor: int, sample: int) -> str:
    return f"SYN-D{donor:02d}-S{sample}"


def synthetic_splits(cfg: SyntheticConfig) -> dict[str, str]:
    """``{sample name: split}`` of a synthetic dataset: one val donor, one test donor, the rest train.

    Whole donors are drawn by :func:`hescape.data.splits.donor_split_assignment` with ``seed=cfg.seed``.
    """
    samples = [{"name": _sample_name(d, s), "donor": f"donor_{d:02d}"}
               for d in range(cfg.n_donors) for s in range(cfg.samples_per_donor)]
    return donor_split_assignment(samples, n_val=1, n_test=1, seed=cfg.seed)



def spot_lattice_ids(cfg: SyntheticConfig) -> tuple[list[str], dict]:
    """Lattice ids of the spots of a synthetic section (the order of :func:`~hescape.data.synthetic.spot_centres`)
    and the ``spot_ids`` record of each sample's manifest entry (the lattice starts half a patch inside the
    section's corner)."""
    from .ingest import lattice_id_record

    geo, size, margin = cfg.geometry, cfg.sample_size_um, cfg.geometry.fov_um / 2
    centres, rows, cols = geo.lattice((0.0, 0.0, size, size), margin_um=margin)
    if not np.array_equal(centres, spot_centres(cfg)):  # the generator's own spots, whatever it becomes
        msg = "synthetic spot ids: the generator's spot centres are not its geometry's lattice; update spot_lattice_ids"
        raise HescapeDataError(msg)
    return geo.grid_ids(rows, cols), lattice_id_record(geo, (margin, margin))


def bundle_options(cfg: SyntheticConfig) -> XeniumBundleOptions:
    """How :func:`build_synthetic_dataset` writes each sample as a Xenium bundle: an H&E OME-TIFF at the
    generator's pixel size, rotated 23° against the morphology frame (so patches go through the full affine)."""
    return XeniumBundleOptions(he_um_per_px=cfg.pixel_size_um, he_rotation_deg=23.0, he_tile=256)


def _sample_via_bundle(cfg: SyntheticConfig, donor: int, sample: int, tmp: Path):
    """One sample through the real pipeline: write a Xenium bundle, read it back, pool cells, cut patches."""
    from .ingest import harmonise_genes
    from .patches import iter_patches
    from .pseudospots import pool_counts
    from .readers.xenium import read_xenium
    from .xenium_bundle import write_xenium_bundle

    bundle = write_xenium_bundle(tmp / f"bundle-{donor}-{sample}", cfg, bundle_options(cfg), donor=donor,
                                 sample=sample)
    s = read_xenium(bundle)
    try:
        counts, _, _ = harmonise_genes(s, panel=cfg.panel)
        geo = cfg.geometry
        spots = spot_centres(cfg)  # the geometry's lattice, centres at least half a patch inside the section
        assign = geo.assign(s.xy_um, spots)
        gexp = pool_counts(assign, counts)
        pngs = dict(iter_patches(s.image, s.um_to_px, spots, fov_um=geo.fov_um, target_um_per_px=geo.um_per_px,
                                 transform=encode_png))
        images = [pngs[i] for i in range(len(spots))]
        return s.name, spots, gexp, images, np.asarray(assign.sum(1)).ravel()
    finally:
        s.close()
        shutil.rmtree(bundle, ignore_errors=True)


def build_synthetic_dataset(out_dir: str | os.PathLike, cfg: SyntheticConfig | None = None, *,
                            overwrite: bool = False, progress: bool = True, via_bundle: bool = True,
                            truth: bool | None = None) -> Path:
    """Generate a synthetic dataset (see :mod:`hescape.data.synthetic`) and write it as sharded Arrow.

    With ``via_bundle`` (default) every sample goes through the real pipeline: it is written as a Xenium
    bundle (cells.parquet, cell_feature_matrix.h5, H&E OME-TIFF + alignment), read back with
    :func:`~hescape.data.readers.xenium.read_xenium`, pooled into pseudo-spots and cut into µm-exact patches,
    as ``hescape-data build xenium`` does. ``via_bundle=False`` pools and crops the generator's arrays
    directly (same counts; patches without the rotate-and-resample round trip; needs
    ``cfg.geometry.um_per_px == cfg.pixel_size_um``).

    Spots and patches follow ``cfg.geometry``, recorded in ``manifest.json`` under ``geometry``; each row's
    ``spot_id`` is its lattice id (:func:`spot_lattice_ids`; each sample's manifest entry ``spot_ids``). Splits are by
    donor (:func:`synthetic_splits`: one val donor, one test donor, the rest train). Returns the directory.

    ``cfg.batch`` (:class:`~hescape.data.batch_effects.BatchEffects`) adds per-donor batch effects, recorded with
    the config in ``manifest.json`` (``generator.config.batch``) when a dial is on. With ``truth`` (default: when a
    ``cfg.batch`` dial is on) each sample also gets ``truth/<sample>.npz``, the known biology of every row, which the
    batch dials never change: ``spot_id``, ``spot_xy`` (µm), ``n_cells``, ``type_counts`` ``(n_spots, n_types)``
    (cells of each type, names in ``cell_types``), ``state`` ``(n_spots, n_states)`` (mean cell-state activation,
    names in ``states``), ``niche`` (index into ``niches``); and ``batch/<sample>.npz``, the effects its donor got
    (:class:`~hescape.data.batch_effects.DonorBatch` fields, ``gene_mean_per_cell`` and ``blur_px``; neutral
    values when no dial is on).
    """
    from .arrow import SpotRecords

    cfg = cfg or SyntheticConfig()
    if not via_bundle and not np.isclose(cfg.geometry.um_per_px, cfg.pixel_size_um):
        msg = (f"direct synthetic build: expected patches at the generator's pixel size {cfg.pixel_size_um} µm/px, "
               f"found geometry.um_per_px={cfg.geometry.um_per_px}; use via_bundle=True (resamples) or set "
               f"geometry=cfg.geometry.with_(um_per_px={cfg.pixel_size_um})")
        raise DatasetFormatError(msg)
    panel = load_panel(cfg.panel)
    donors = [f"donor_{d:02d}" for d in range(cfg.n_donors)]
    split_of = synthetic_splits(cfg)
    jobs = [(d, s) for d in range(cfg.n_donors) for s in range(cfg.samples_per_donor)]
    gen = {"name": "hescape.data.synthetic", "version": GENERATOR_VERSION, "config": synthetic_config_record(cfg),
           "pipeline": "xenium-bundle" if via_bundle else "direct"}
    if via_bundle:
        gen["bundle_options"] = dataclasses.asdict(bundle_options(cfg))
    out_dir = Path(out_dir)
    spot_ids, id_record = spot_lattice_ids(cfg)  # the same lattice in every section
    truth = cfg.batch.active if truth is None else bool(truth)
    with DatasetWriter(out_dir, genes=list(panel.genes), gene_ids=list(panel.gene_ids), overwrite=overwrite,
                       extra={"generator": gen, "geometry": cfg.geometry.to_dict()}) as w:
        tmp = temp_sibling(w.out_dir, "bundles") if via_bundle else None  # cleaned by the next build if killed
        try:
            for d, s in tqdm(jobs, desc="synthetic samples", disable=not progress):
                if via_bundle:
                    name, xy, gexp, images, n_cells = _sample_via_bundle(cfg, d, s, tmp)
                    donor = donors[d]
                else:
                    smp = generate_sample(cfg, d, s, panel)
                    centres_px = smp.spot_xy[:, ::-1] / cfg.pixel_size_um  # (row, col)
                    images = [encode_png(crop_patch(smp.image, c, cfg.patch_px)) for c in centres_px]
                    name, donor, xy = smp.name, smp.donor, smp.spot_xy
                    gexp, n_cells = smp.spot_counts, smp.spot_n_cells
                if truth:  # the bundle path's sample again, without its image (cells and counts are the same)
                    known = generate_sample(cfg, d, s, panel, render=False) if via_bundle else smp
                    _write_truth(w, cfg, d, known, spot_ids, panel)
                w.add(SpotRecords(name=name, donor=donor, tissue="synthetic-breast", source="hescape-synthetic",
                                  images=images, gexp=gexp, coords_um=xy, n_cells=n_cells, spot_ids=spot_ids,
                                  meta={"spot_ids": id_record}),
                      split=split_of[name])
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        check_no_donor_leakage(w.samples)
    return out_dir


def _write_truth(w: DatasetWriter, cfg: SyntheticConfig, donor: int, smp, spot_ids: list[str], panel) -> None:
    """``truth/<sample>.npz`` and ``batch/<sample>.npz`` of one generated sample (:func:`build_synthetic_dataset`)."""
    from .batch_effects import donor_batch_effects
    from .synthetic import CELL_TYPES, NICHES, STATES

    np.savez_compressed(w.file_path("truth", f"{smp.name}.npz"), spot_id=np.asarray(spot_ids), spot_xy=smp.spot_xy,
                        n_cells=smp.spot_n_cells, type_counts=smp.extra["spot_type_counts"],
                        state=smp.extra["spot_state"], niche=smp.spot_niche, cell_types=np.asarray(list(CELL_TYPES)),
                        states=np.asarray(list(STATES)), niches=np.asarray(list(NICHES)))
    batch = smp.extra.get("batch") or donor_batch_effects(cfg.batch, cfg.seed, donor, panel.n_genes)
    gene_mean = smp.extra.get("gene_mean_per_cell", np.full(panel.n_genes, np.nan))
    np.savez_compressed(w.file_path("batch", f"{smp.name}.npz"), **batch.arrays(), gene_mean_per_cell=gene_mean,
                        blur_px=batch.blur_um / cfg.pixel_size_um, donor=smp.donor)


def default_dataset_path(cfg: SyntheticConfig | None = None) -> Path:
    """Where :func:`default_dataset` caches the dataset of ``cfg``: ``<cache_dir>/datasets/synthetic-<key>``, the key
    hashing :data:`GENERATOR_VERSION` and :func:`synthetic_config_record`."""
    cfg = cfg or SyntheticConfig()
    record = synthetic_config_record(cfg)
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, record], sort_keys=True).encode())
    return cache_dir() / "datasets" / f"synthetic-{key.hexdigest()[:12]}"


def default_dataset(cfg: SyntheticConfig | None = None, *, progress: bool = True) -> Path:
    """Path of the embedded default dataset for ``cfg``, built into the cache on first use."""
    cfg = cfg or SyntheticConfig()
    path = default_dataset_path(cfg)
    if (path / "manifest.json").is_file():
        try:
            read_manifest(path)
            return path
        except HescapeDataError:
            pass
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and not is_hescape_dataset(path):
        # a damaged cache entry of ours (named by the config's hash): move it aside and delete it
        aside = temp_sibling(path, "old")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    return build_synthetic_dataset(path, cfg, overwrite=True, progress=progress)
