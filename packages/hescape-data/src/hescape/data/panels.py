"""Gene panels and split presets of the seven HESCAPE Xenium panels (vendored, MIT licence)."""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .errors import HescapeDataError

__all__ = ["GenePanel", "list_panels", "load_panel", "load_split_preset"]


@dataclass(frozen=True)
class GenePanel:
    """A gene panel in reference order.

    Attributes
    ----------
    name
        Panel name, e.g. ``"human-breast-panel"``.
    genes
        Gene symbols (unique).
    gene_ids
        Ensembl gene ids, aligned with ``genes``.
    mean_counts
        Mean raw counts per 55 µm pseudo-spot in the reference data, aligned with ``genes``.
    pct_dropout
        Percentage of pseudo-spots with zero counts, aligned with ``genes``.
    """

    name: str
    genes: tuple[str, ...]
    gene_ids: tuple[str, ...]
    mean_counts: np.ndarray
    pct_dropout: np.ndarray

    @property
    def n_genes(self) -> int:
        return len(self.genes)


def _root():
    return resources.files("hescape.data") / "panels"


def list_panels() -> list[str]:
    """Names of the vendored panels, sorted."""
    return sorted(p.name for p in _root().iterdir() if p.is_dir() and (p / "genes.csv").is_file())


def _check_name(name: str) -> None:
    panels = list_panels()
    if name not in panels:
        close = difflib.get_close_matches(name, panels, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        msg = f"unknown gene panel {name!r}: expected one of {panels}.{hint}"
        raise HescapeDataError(msg)


def load_panel(name: str) -> GenePanel:
    """Load a vendored panel by name (see :func:`list_panels`)."""
    _check_name(name)
    with (_root() / name / "genes.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return GenePanel(
        name=name,
        genes=tuple(r["gene"] for r in rows),
        gene_ids=tuple(r["gene_id"] for r in rows),
        mean_counts=np.array([float(r["mean_counts"]) for r in rows]),
        pct_dropout=np.array([float(r["pct_dropout_by_counts"]) for r in rows]),
    )


def load_split_preset(name: str) -> dict[str, list[dict[str, str]]]:
    """The reference train/val/test sample tables of a panel: ``{"train": [row, ...], ...}``.

    Each row has the reference columns (``id``, ``patient``, ``organ``, ``disease_state``, ...).
    """
    _check_name(name)
    out = {}
    for split in ("train", "val", "test"):
        with (_root() / name / f"{split}.csv").open(newline="") as fh:
            out[split] = list(csv.DictReader(fh))
    return out
