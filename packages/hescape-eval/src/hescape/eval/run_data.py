"""Join saved embeddings to the rows of the dataset they were computed on (``hescape-eval expression`` / ``export``).

An embeddings file (:mod:`hescape.eval.io`: a run's ``RUN_DIR/embeddings/test.npz``, or one written by
``hescape-eval embed``) stores, per row, ``index`` (the row's position within the *split* that was embedded — the
order of :class:`hescape.data.PairedSpotDataset` ``(dataset, split)`` — or a string spot id), ``sample``, ``donor``
and optionally ``spot_id``. It does not say which split it holds; samples never span splits (HESCAPE splits are by
donor), so the split is read off the manifest from the file's samples (or given with ``--split``).

:func:`open_run_spots` resolves the dataset (``--dataset``, else the run's ``config.json`` as
:func:`hescape.eval.batch_report.run_dataset` reads it), maps every embedding row to its row in the whole dataset
(``PairedSpotDataset(dataset, None)`` order, which lists each split's rows in the same order as the split alone), and
checks that sample, donor and — when the file has them — spot ids agree row for row. A dataset that does not match is
refused with the first differing row named. :func:`dataset_coords_um` reads the spot centres (``cell_coords``, µm,
``(x, y)``; :mod:`hescape.data.arrow`) of those rows straight from the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError, plain_list
from .io import Embeddings, load_embeddings

__all__ = ["RunSpots", "open_run_spots", "dataset_coords_um", "dataset_patches", "read_json_if_any"]


def _fail(*, what: str, expected: str, found: str, fix: str) -> HescapeEvalError:
    return HescapeEvalError.build(what=what, expected=expected, found=found, fix=fix)


@dataclass(frozen=True)
class RunSpots:
    """Embeddings joined to their dataset rows.

    ``rows`` ``(N,)`` are positions in ``PairedSpotDataset(dataset, None)`` (all splits); ``split`` ``(N,)`` the
    manifest split of each row; ``embedded_split`` the split the file's ``index`` refers to (``None``: the whole
    dataset); ``genes`` the dataset's panel; ``run_dir`` the run the file belongs to, when known.
    """

    embeddings: Embeddings
    dataset: Path
    rows: np.ndarray
    split: np.ndarray
    embedded_split: str | None
    genes: list[str]
    spot_id: np.ndarray
    run_dir: Path | None
    _ds: object

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> np.ndarray:
        """Raw counts ``(N, G)`` float32 of the joined rows (read with one Arrow ``take`` per shard).

        Raises
        ------
        HescapeEvalError
            A shard hescape-data cannot read (the message is hescape-data's).
        """
        from hescape.data.errors import HescapeDataError

        try:
            return self._ds.counts(self.rows)
        except HescapeDataError as exc:
            msg = f"dataset {self.dataset}: {exc}"
            raise HescapeEvalError(msg) from None


def read_json_if_any(path: Path) -> dict | None:
    """``json.loads`` of ``path``, or ``None`` when the file is absent or not a JSON object."""
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _run_dir_of(source: Path) -> Path | None:
    if source.is_dir():
        return source
    # RUN_DIR/embeddings/<split>.npz: the run directory is two levels up when it holds config.json
    up = source.parent.parent
    return up if source.parent.name == "embeddings" and (up / "config.json").is_file() else None


def _resolve_dataset(source: Path, run_dir: Path | None, dataset) -> Path:
    from .batch_report import run_dataset

    if dataset is not None:
        ds = Path(dataset)
        if not (ds / "manifest.json").is_file():
            raise _fail(what=f"--dataset {ds}",
                        expected="a dataset folder holding manifest.json (built by hescape-data)",
                        found="no such folder" if not ds.exists() else "no manifest.json there",
                        fix="pass the folder hescape-data built")
        return ds
    if run_dir is None:
        raise _fail(what=f"dataset of {source}", expected="--dataset DIR for an embeddings file outside a run",
                    found="no --dataset and no run directory around the file",
                    fix="pass --dataset DIR (the dataset the embeddings were computed on)")
    return run_dataset(run_dir)


def open_run_spots(source: str | os.PathLike, *, dataset: str | os.PathLike | None = None,
                   split: str | None = None, embeddings_split: str = "test") -> RunSpots:
    """Load embeddings (a run directory or an ``.npz``) and join them to their dataset's rows.

    Parameters
    ----------
    source
        A ``hescape-train`` run directory (``RUN_DIR/embeddings/<embeddings_split>.npz``) or an embeddings ``.npz``.
    dataset
        The dataset the embeddings were computed on (default: the run's, from ``config.json``).
    split
        The split whose rows the file's ``index`` counts (default: the one split holding all the file's samples;
        the whole dataset when they span several).
    embeddings_split
        Which file of ``RUN_DIR/embeddings/`` to read.

    Raises
    ------
    HescapeEvalError
        No embeddings (:func:`hescape.eval.io.load_embeddings`), no dataset, a dataset hescape-data refuses, or one
        whose rows do not match the file (unknown samples, an index out of range, differing sample / donor / spot id).
    """
    from .embed import _need

    source = Path(source)
    emb = load_embeddings(source, split=embeddings_split)
    run_dir = _run_dir_of(source)
    ds_path = _resolve_dataset(source, run_dir, dataset)
    data = _need("hescape.data")
    try:
        ds = data.PairedSpotDataset(ds_path, None)
    except data.HescapeDataError as exc:
        msg = f"dataset {ds_path}: {exc}"
        raise HescapeEvalError(msg) from None
    split_of = {s["name"]: s["split"] for s in ds.manifest["samples"]}
    d_sample = np.asarray(ds.samples, dtype=str)
    d_donor = np.asarray(ds.donors, dtype=str)
    d_spot = np.asarray(ds.spot_ids, dtype=str)
    d_split = np.asarray([split_of[s] for s in d_sample.tolist()], dtype=str)
    fix = ("pass --dataset with the dataset these embeddings were computed on (a run's own: its config.json), and "
           "--split with the split that was embedded")
    unknown = sorted(set(emb.sample.tolist()) - set(split_of))
    if unknown:
        raise _fail(what=f"embeddings {emb.path} and dataset {ds_path}", expected="the same samples",
                    found=f"{len(unknown)} sample(s) of the embeddings not in the dataset, e.g. "
                          f"{plain_list(unknown, 3)}", fix=fix)
    spans: list[str] = []  # the splits of the file's samples, when no one split holds them all
    if split is None:
        splits = sorted({split_of[s] for s in set(emb.sample.tolist())})
        split = splits[0] if len(splits) == 1 else None
        spans = splits if len(splits) > 1 else []
    elif split not in set(split_of.values()):
        raise _fail(what=f"--split {split}", expected=f"a split of dataset {ds_path}: {sorted(set(split_of.values()))}",
                    found=repr(split), fix="pass one of those")
    positions = np.arange(len(d_sample)) if split is None else np.flatnonzero(d_split == split)
    where = "the whole dataset" if split is None else f"split {split!r}"
    if spans:  # an embeddings file holds one split: its samples in several means the splits are not the file's
        n_samples = len(set(emb.sample.tolist()))
        why = (f"; no split of the dataset holds all {n_samples} samples of the file (they are in splits "
               f"{', '.join(spans)}), so its index was read as rows of the whole dataset")
        fix = ("the dataset's splits may have changed since the embeddings were computed (a re-split), or it is not "
               "their dataset: pass --dataset with the dataset as it was when they were computed, or --split with "
               "the split that was embedded")
    else:
        why = f" (the file's index read as rows of {where})"
    if emb.index.dtype.kind in "iu":
        idx = emb.index.astype(np.int64)
        bad = np.flatnonzero((idx < 0) | (idx >= len(positions)))
        if len(bad):
            raise _fail(what=f"embeddings {emb.path} and dataset {ds_path}",
                        expected=f"row indices into {where} ({len(positions)} rows)",
                        found=f"index {int(idx[bad[0]])} at embedding row {int(bad[0])}{why}", fix=fix)
        rows = positions[idx]
    else:  # string ids: join on (sample, spot id)
        lookup = {(d_sample[p], d_spot[p]): p for p in positions.tolist()}
        keys = list(zip(emb.sample.tolist(), emb.index.astype(str).tolist(), strict=True))
        missing = [i for i, k in enumerate(keys) if k not in lookup]
        if missing:
            raise _fail(what=f"embeddings {emb.path} and dataset {ds_path}",
                        expected=f"every (sample, spot id) of the embeddings among the rows of {where}",
                        found=f"{len(missing)} missing, first (sample {keys[missing[0]][0]}, spot id "
                              f"{keys[missing[0]][1]}){why}", fix=fix)
        rows = np.asarray([lookup[k] for k in keys], dtype=np.int64)
    checks = [("sample", emb.sample, d_sample), ("donor", emb.donor, d_donor)]
    if emb.spot_id is not None:
        checks.append(("spot_id", emb.spot_id, d_spot))
    for name, mine, theirs in checks:
        diff = np.flatnonzero(mine.astype(str) != theirs[rows])
        if len(diff):
            i = int(diff[0])
            raise _fail(what=f"embeddings {emb.path} and dataset {ds_path}",
                        expected=f"the same {name} on every row",
                        found=f"{len(diff)} of {len(rows)} rows differ, first embedding row {i}: {name} "
                              f"{str(mine[i])!r} vs {str(theirs[rows[i]])!r} in the dataset{why}", fix=fix)
    if len(np.unique(rows)) != len(rows):
        raise _fail(what=f"embeddings {emb.path}", expected="each dataset row once",
                    found=f"{len(rows) - len(np.unique(rows))} repeated row(s)", fix="embed each spot once")
    return RunSpots(embeddings=emb, dataset=ds_path, rows=rows, split=d_split[rows], embedded_split=split,
                    genes=list(ds.genes), spot_id=d_spot[rows], run_dir=run_dir, _ds=ds)


def dataset_coords_um(spots: RunSpots) -> tuple[np.ndarray, str | None]:
    """Spot centres ``(N, 2)`` float64, ``(x, y)`` in µm, of the joined rows, from the shards' ``cell_coords``.

    Returns ``(coords, note)``: ``note`` is ``None`` for coordinates in µm, else why they are not (the manifest's
    ``import.cell_coords`` record of datasets imported from the official HESCAPE shards, whose units the authors do
    not state; ``"absent"`` when the column is missing or holds NaN).

    Raises
    ------
    HescapeEvalError
        Shards whose rows do not line up with the dataset's (a damaged dataset).
    """
    from hescape.data.arrow import open_shard, string_column

    ds = spots._ds
    names = {s["name"] for s in ds.manifest["samples"]}
    parts, sample_parts = [], []
    from hescape.data.errors import HescapeDataError

    for s in ds.manifest["shards"]:
        try:
            t = open_shard(ds.path / s["file"], s["rows"])
        except HescapeDataError as exc:
            msg = f"dataset {ds.path}: {exc}"
            raise HescapeEvalError(msg) from None
        col_names = string_column(t, "name")
        keep = np.flatnonzero(np.isin(col_names, list(names)))  # PairedSpotDataset(path, None) keeps these rows
        sample_parts.append(col_names[keep].astype(str))
        if "cell_coords" not in t.column_names:
            parts.append(np.full((len(keep), 2), np.nan))
            continue
        flat = t.column("cell_coords").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        parts.append(np.asarray(flat, dtype=np.float64).reshape(-1, 2)[keep])
    coords = np.concatenate(parts) if parts else np.zeros((0, 2))
    order = np.concatenate(sample_parts) if sample_parts else np.zeros(0, dtype=str)
    if len(order) != len(ds) or (order != np.asarray(ds.samples, dtype=str)).any():
        raise _fail(what=f"dataset {ds.path}", expected="shards whose rows line up with its manifest",
                    found="a different row order", fix=f"check it with `hescape-data info {ds.path} --verify`")
    coords = coords[spots.rows]
    record = ds.manifest.get("import")
    note = record.get("cell_coords") if isinstance(record, dict) else None
    if not np.isfinite(coords).all():
        note = "absent"
    return coords, note


def dataset_patches(spots: RunSpots) -> np.ndarray:
    """The H&E patches ``(N, H, W, 3)`` uint8 of the joined rows (for the colour-statistics baseline).

    Raises
    ------
    HescapeEvalError
        Patches of different sizes (they cannot be stacked).
    """
    ds = spots._ds
    out = None
    for i, r in enumerate(spots.rows.tolist()):
        img = ds[r]["image"].permute(1, 2, 0).numpy()
        if out is None:
            out = np.empty((len(spots.rows), *img.shape), dtype=np.uint8)
        elif img.shape != out.shape[1:]:
            raise _fail(what=f"patches of dataset {ds.path}", expected=f"one size {out.shape[1:]}",
                        found=f"{img.shape} at row {r}", fix="drop --colour-baseline for datasets of mixed patch sizes")
        out[i] = img
    return out
