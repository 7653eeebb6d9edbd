"""A map-style torch Dataset over the memory-mapped shards of a HESCAPE Arrow dataset."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .arrow import gexp_matrix, iter_split_names, open_shard, read_manifest, string_column
from .errors import DatasetFormatError, PanelMismatchError, brief
from .splits import check_no_donor_leakage

__all__ = ["PairedSpotDataset", "decode_image"]


def decode_image(data: bytes) -> torch.Tensor:
    """Decode PNG/JPEG bytes to a ``(3, H, W)`` uint8 tensor."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class PairedSpotDataset(torch.utils.data.Dataset):
    """Random access to (image, raw counts) pairs of one or more splits.

    Shards are memory-mapped lazily in each process, so the dataset is safe to use with
    ``DataLoader(num_workers > 0)``: a worker opens its own maps after the fork.

    Parameters
    ----------
    path
        Dataset directory (holds ``manifest.json``).
    split
        ``"train"``, ``"val"``, ``"test"``, several of them, or None for all rows.
    genes
        If given, the gene panel the caller expects; a dataset with another panel is refused.
    image_transform, gene_transform
        Applied to the ``(3, H, W)`` uint8 image tensor and to the float32 raw-count vector.

    Shards may also be in the official HESCAPE layout (``gexp`` as a ``(1, G)`` nested list, ``name`` as a
    ``ClassLabel``) once :func:`hescape.data.arrow.index_arrow_shards` has written their manifest.

    A dataset in which one donor has samples in two splits is refused (:class:`SplitLeakageError`), whatever
    split is asked for: training on it would leak the held-out donor's tissue into training.

    Items are dicts with ``image``, ``gexp``, ``index`` (row in this dataset), ``sample``, ``donor`` and
    ``spot_id``. :attr:`samples`, :attr:`donors` and :attr:`spot_ids` list them for every row, in dataset order:
    ``(sample, spot_id)`` names a row uniquely and joins it back to the source (a Visium barcode, a pseudo-spot's
    lattice id; see :mod:`hescape.data.ingest`). Datasets written before the ``spot_id`` column existed (and the
    official HESCAPE shards) have none: their spot ids are the row's index within its sample, ``"0"``, ``"1"``, …
    in dataset order, which is what the writer stores when no ids are given.
    """

    def __init__(self, path: str | os.PathLike, split: str | Sequence[str] | None = None, *,
                 genes: Sequence[str] | None = None,
                 image_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 gene_transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.genes: list[str] = list(self.manifest["genes"])
        if genes is not None and list(genes) != self.genes:
            missing = [g for g in genes if g not in set(self.genes)]
            msg = (f"dataset {self.path} has a {len(self.genes)}-gene panel but {len(genes)} genes were asked for"
                   f" ({len(missing)} of them absent, e.g. {missing[:5]}); use a dataset built with the same panel")
            raise PanelMismatchError(msg)
        check_no_donor_leakage(self.manifest["samples"])
        names = iter_split_names(self.manifest, split)
        self.image_transform = image_transform
        self.gene_transform = gene_transform
        donor_of = {s["name"]: s["donor"] for s in self.manifest["samples"]}
        rows: list[np.ndarray] = []
        shard_ids: list[np.ndarray] = []
        self._samples: list[str] = []
        self._donors: list[str] = []
        self._spot_ids: list[str] = []
        seen: Counter = Counter()  # rows of each sample so far: the spot ids of shards without the column
        for i, s in enumerate(self.manifest["shards"]):
            t = open_shard(self.path / s["file"], s["rows"])
            col_names = string_column(t, "name")
            keep = np.flatnonzero(np.isin(col_names, list(names)))
            rows.append(keep)
            shard_ids.append(np.full(len(keep), i))
            self._samples.extend(col_names[keep].tolist())
            self._donors.extend(donor_of[n] for n in col_names[keep])
            if "spot_id" in t.column_names:
                self._spot_ids.extend(str(v) for v in string_column(t, "spot_id")[keep].tolist())
            else:
                for n in col_names[keep].tolist():
                    self._spot_ids.append(str(seen[n]))
                    seen[n] += 1
        self._row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self._shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, dtype=np.int64)
        if len(self._row) == 0:
            msg = f"dataset {self.path} has no rows in split {split!r}"
            raise DatasetFormatError(msg)
        self._tables: dict[int, object] | None = None

    def __len__(self) -> int:
        return len(self._row)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def donors(self) -> list[str]:
        return self._donors

    @property
    def samples(self) -> list[str]:
        return self._samples

    @property
    def spot_ids(self) -> list[str]:
        """Each row's identity within its sample (barcode, lattice id, or row index within the sample), in
        dataset order; see the class docstring."""
        return self._spot_ids

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tables"] = None  # memory maps are reopened in each worker
        return state

    def _table(self, shard: int):
        if self._tables is None:
            self._tables = {}
        t = self._tables.get(shard)
        if t is None:
            s = self.manifest["shards"][shard]
            t = self._tables[shard] = open_shard(self.path / s["file"], s["rows"])
        return t

    def raw_counts(self) -> np.ndarray:
        """All raw count vectors of this dataset, ``(len(self), n_genes)`` float32."""
        out = np.empty((len(self), self.n_genes), dtype=np.float32)
        for shard in np.unique(self._shard):
            sel = np.flatnonzero(self._shard == shard)
            out[sel] = gexp_matrix(self._table(int(shard)).column("gexp"), self.n_genes)[self._row[sel]]
        return out

    def counts(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw count vectors of the rows ``indices`` (positions in this dataset, any order), ``(len(indices),
        n_genes)`` float32, read shard by shard with one Arrow ``take`` each (a whole batch without a Python loop
        over rows).

        Raises
        ------
        IndexError
            An index outside ``[0, len(self))``.
        """
        import pyarrow as pa

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            msg = f"index {bad} out of range for a dataset of {len(self)} rows"
            raise IndexError(msg)
        out = np.empty((len(idx), self.n_genes), dtype=np.float32)
        shards = self._shard[idx]
        for shard in np.unique(shards):
            sel = np.flatnonzero(shards == shard)
            col = self._table(int(shard)).column("gexp").take(pa.array(self._row[idx[sel]]))
            out[sel] = gexp_matrix(col, self.n_genes)
        return out

    def __getitem__(self, idx: int) -> dict:
        if idx < 0 or idx >= len(self):
            msg = f"index {idx} out of range for a dataset of {len(self)} rows"
            raise IndexError(msg)
        t = self._table(int(self._shard[idx]))
        r = int(self._row[idx])
        try:
            image = decode_image(t.column("image")[r]["bytes"].as_py())
        except (OSError, ValueError, SyntaxError) as e:
            shard = self.manifest["shards"][int(self._shard[idx])]["file"]
            msg = (f"dataset {self.path}: the image of row {r} of {shard} (sample {self._samples[idx]}, spot "
                   f"{self._spot_ids[idx]}) cannot be decoded ({type(e).__name__}: {brief(e, 80)}); the shard is damaged "
                   f"(check with `hescape-data info {self.path} --verify`) — rebuild the dataset")
            raise DatasetFormatError(msg) from None
        gexp = torch.from_numpy(gexp_matrix(t.column("gexp").slice(r, 1), self.n_genes)[0].copy())
        if self.image_transform is not None:
            image = self.image_transform(image)
        if self.gene_transform is not None:
            gexp = self.gene_transform(gexp)
        return {"image": image, "gexp": gexp, "index": idx, "sample": self._samples[idx], "donor": self._donors[idx],
                "spot_id": self._spot_ids[idx]}
