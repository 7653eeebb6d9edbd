"""Build synthetic paired datasets, and find or build the embedded default dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .arrow import DatasetWriter, read_manifest
from .errors import DatasetFormatError
from .panels import load_panel
from .splits import check_no_donor_leakage
from .synthetic import SyntheticConfig, crop_patch, generate_sample

__all__ = ["GENERATOR_VERSION", "build_synthetic_dataset", "default_dataset", "cache_dir", "donor_splits"]

#: Bumped whenever the generator's output changes, so cached default datasets are rebuilt.
GENERATOR_VERSION = 3


def cache_dir() -> Path:
    """Where built datasets are cached: ``$HESCAPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hescape``, else ``~/.cache/hescape``."""
    env = os.environ.get("HESCAPE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "hescape"


def donor_splits(donors: list[str], n_val: int = 1, n_test: int = 1) -> dict[str, str]:
    """Assign whole donors to splits: the last ``n_test`` donors to test, the ``n_val`` before them to val."""
    if len(donors) < n_val + n_test + 1:
        msg = f"need at least {n_val + n_test + 1} donors for train/val/test, found {len(donors)}"
        raise DatasetFormatError(msg)
    out = {}
    for i, d in enumerate(donors):
        out[d] = "test" if i >= len(donors) - n_test else "val" if i >= len(donors) - n_test - n_val else "train"
    return out


def _encode_png(patch: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def build_synthetic_dataset(out_dir: str | os.PathLike, cfg: SyntheticConfig | None = None, *,
                            overwrite: bool = False, progress: bool = True) -> Path:
    """Generate a synthetic dataset (see :mod:`hescape.data.synthetic`) and write it as sharded Arrow.

    Splits are by donor (one val donor, one test donor, the rest train). Returns the directory.
    """
    from .arrow import SpotRecords

    cfg = cfg or SyntheticConfig()
    panel = load_panel(cfg.panel)
    donors = [f"donor_{d:02d}" for d in range(cfg.n_donors)]
    split_of = donor_splits(donors)
    jobs = [(d, s) for d in range(cfg.n_donors) for s in range(cfg.samples_per_donor)]
    extra = {"generator": {"name": "hescape.data.synthetic", "version": GENERATOR_VERSION,
                           "config": dataclasses.asdict(cfg)}}
    with DatasetWriter(out_dir, genes=list(panel.genes), gene_ids=list(panel.gene_ids), overwrite=overwrite,
                       extra=extra) as w:
        for d, s in tqdm(jobs, desc="synthetic samples", disable=not progress):
            smp = generate_sample(cfg, d, s, panel)
            centres_px = smp.spot_xy[:, ::-1] / cfg.pixel_size_um  # (row, col)
            images = [_encode_png(crop_patch(smp.image, c, cfg.patch_px)) for c in centres_px]
            w.add(SpotRecords(name=smp.name, donor=smp.donor, tissue="synthetic-breast", source="hescape-synthetic",
                              images=images, gexp=smp.spot_counts, coords_um=smp.spot_xy, n_cells=smp.spot_n_cells),
                  split=split_of[smp.donor])
        check_no_donor_leakage(w.samples)
    return Path(out_dir)


def default_dataset(cfg: SyntheticConfig | None = None, *, progress: bool = True) -> Path:
    """Path of the embedded default dataset for ``cfg``, built into the cache on first use."""
    cfg = cfg or SyntheticConfig()
    key = hashlib.sha256(json.dumps([GENERATOR_VERSION, dataclasses.asdict(cfg)], sort_keys=True).encode())
    path = cache_dir() / "datasets" / f"synthetic-{key.hexdigest()[:12]}"
    if (path / "manifest.json").is_file():
        try:
            read_manifest(path)
            return path
        except DatasetFormatError:
            pass
    return build_synthetic_dataset(path, cfg, overwrite=True, progress=progress)
