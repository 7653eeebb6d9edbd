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
           "synthetic_splits"]

#: Bumped whenever the generator's output changes, so cached default datasets are rebuilt.
#: 4: samples go through the real pipeline (Xenium bundle on disk -> reader -> pooling -> µm-exact patches).
#: 5: the modalities are tied through morphology (architecture, nuclear size/shape/density, states), with
#: regional stain variation; spots follow ``SyntheticConfig.geometry`` (hescape hexagons by default);
#: donor splits from :func:`hescape.data.splits.donor_split_assignment`.
GENERATOR_VERSION = 5


def cache_dir() -> Path:
    """Where built datasets are cached: ``$HESCAPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hescape``, else ``~/.cache/hescape``."""
    env = os.environ.get("HESCAPE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "hescape"


def _sample_name(donor: int, sample: int) -> str:
    return f"SYN-D{donor:02d}-S{sample}"


def synthetic_splits(cfg: SyntheticConfig) -> dict[str, str]:
    """``{sample name: split}`` of a synthetic dataset: one val donor, one test donor, the rest train.

    Whole donors are drawn by :func:`hescape.data.splits.donor_split_assignment` with ``seed=cfg.seed``.
    """
    samples = [{"name": _sample_name(d, s), "donor": f"donor_{d:02d}"}
               for d in range(cfg.n_donors) for s in range(cfg.samples_per_donor)]
    return donor_split_assignment(samples, n_val=1, n_test=1, seed=cfg.seed)



def bundle_options(cfg: SyntheticConfig) -> XeniumBundleOptions:
    """How :func:`build_synthetic_dataset` writes each sample as a Xenium bundle: an H&E OME-TIFF at the
    generator's pixel size, rotated 23° against the morphology frame (so patches go through the full affine)."""
    return XeniumBundleOptions(he_um_per_px=cfg.pixel_size_um, he_rotation_deg=23.0, he_tile=256)


def _sample_via_bundle(cfg: SyntheticConfig, donor: int, sample: int, tmp: Path):
    """One sample through the real pipeline: write a Xenium bundle, read it back, pool cells, cut patches."""
    from .ingest import harmonise_genes
    from .patches import extract_patches
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
        images = [encode_png(p) for p in extract_patches(s.image, s.um_to_px, spots, fov_um=geo.fov_um,
                                                          target_um_per_px=geo.um_per_px)]
        return s.name, spots, gexp, images, np.asarray(assign.sum(1)).ravel()
    finally:
        s.close()
        shutil.rmtree(bundle, ignore_errors=True)


def build_synthetic_dataset(out_dir: str | os.PathLike, cfg: SyntheticConfig | None = None, *,
                            overwrite: bool = False, progress: bool = True, via_bundle: bool = True) -> Path:
    """Generate a synthetic dataset (see :mod:`hescape.data.synthetic`) and write it as sharded Arrow.

    With ``via_bundle`` (default) every sample goes through the real pipeline: it is written as a Xenium
    bundle (cells.parquet, cell_feature_matrix.h5, H&E OME-TIFF + alignment), read back with
    :func:`~hescape.data.readers.xenium.read_xenium`, pooled into pseudo-spots and cut into µm-exact patches,
    as ``hescape-data build xenium`` does. ``via_bundle=False`` pools and crops the generator's arrays
    directly (same counts; patches without the rotate-and-resample round trip; needs
    ``cfg.geometry.um_per_px == cfg.pixel_size_um``).

    Spots and patches follow ``cfg.geometry``, recorded in ``manifest.json`` under ``geometry``. Splits are by
    donor (:func:`synthetic_splits`: one val donor, one test donor, the rest train). Returns the directory.
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
    gen = {"name": "hescape.data.synthetic", "version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg),
           "pipeline": "xenium-bundle" if via_bundle else "direct"}
    if via_bundle:
        gen["bundle_options"] = dataclasses.asdict(bundle_options(cfg))
    out_dir = Path(out_dir)
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
                w.add(SpotRecords(name=name, donor=donor, tissue="synthetic-breast", source="hescape-synthetic",
                                  images=images, gexp=gexp, coords_um=xy, n_cells=n_cells), split=split_of[name])
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        check_no_donor_leakage(w.samples)
    return out_dir


def default_dataset(cfg: SyntheticConfig | None = None, *, progress: bool = True) -> Path:
    """Path of the embedded default dataset for ``cfg``, built into the cache on first use."""
    cfg = cfg or SyntheticConfig()
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, dataclasses.asdict(cfg)], sort_keys=True).encode())
    path = cache_dir() / "datasets" / f"synthetic-{key.hexdigest()[:12]}"
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
