"""``hescape-eval export RUN_DIR OUT.h5ad``: a run's embeddings and spot metadata as AnnData, for scanpy users.

The embeddings (``RUN_DIR/embeddings/test.npz``, or an ``.npz`` of ``hescape-eval embed`` with ``--dataset``) are
joined to their dataset's rows (:func:`hescape.eval.run_data.open_run_spots`, which refuses a dataset that does not
match) and written by :func:`hescape.eval.export.export_anndata`: ``obsm["X_hescape_img"]``, ``obsm["X_hescape_gex"]``,
``obsm["spatial"]`` (spot centres ``(x, y)`` in µm, the dataset's ``cell_coords``), ``obs`` sample / donor / split /
spot_id, ``obs["row"]`` the file's index (the row within the embedded split), ``obs_names`` ``"<sample>:<spot_id>"``
(unique within the dataset), optionally ``X`` = raw counts with the
gene panel as ``var_names``, and ``uns["hescape"]`` the run's parameters (:func:`hescape.eval.export.read_params`):
``config`` (``config.json``), ``results`` (``results.json``) and where everything came from.

Datasets imported from the official HESCAPE shards record that their coordinates' units are not stated
(``manifest.json`` ``import.cell_coords``): those are written as they are and the note is kept in the parameters
(``spatial_note``); coordinates that are absent (NaN) are left out of ``obsm``, and the note says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._write import refuse_existing
from .errors import HescapeEvalError
from .io import probe_writable

__all__ = ["export_run"]


def export_run(source: str | os.PathLike, out: str | os.PathLike, *, dataset: str | os.PathLike | None = None,
               split: str | None = None, counts: bool = False, overwrite: bool = False) -> dict:
    """Write the embeddings of a run (or an embeddings file) with their spots' metadata to ``out`` (``.h5ad``).

    Parameters
    ----------
    source
        A run directory or an embeddings ``.npz``.
    out
        The ``.h5ad`` file; missing parent folders are created.
    dataset, split
        As :func:`hescape.eval.run_data.open_run_spots`.
    counts
        Also store the spots' raw counts as ``X`` (float32, ``var_names`` = the gene panel).
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    dict
        ``{"path": Path, "n": int, "d_img": int, "d_gex": int, "spatial_note": str | None, "params": dict}``.

    Raises
    ------
    HescapeEvalError
        ``out`` not ending in ``.h5ad``, a folder, or existing without ``overwrite``; no embeddings; a dataset that
        does not match them; anndata missing.
        An ``out`` whose folder cannot be made or written is refused before anything is read.
    """
    from .export import export_anndata
    from .run_data import dataset_coords_um, open_run_spots, read_json_if_any

    out = Path(out)
    if out.suffix != ".h5ad":
        raise HescapeEvalError.build(what=f"OUT {out}", expected="a file name ending in .h5ad", found=repr(out.name),
                                     fix="e.g. runs/r1/embeddings.h5ad")
    if out.is_dir():
        raise HescapeEvalError.build(what=f"OUT {out}", expected="a file path ending in .h5ad", found="a directory",
                                     fix=f"name a file, e.g. {out / 'run.h5ad'}")
    if not overwrite:
        refuse_existing([out], option="OUT")
    try:
        probe_writable(out.parent)  # unwritable: refused before the work
    except OSError as exc:
        raise HescapeEvalError.build(what=f"OUT {out}", expected="a file in a folder this command can create and "
                                     "write", found=exc.strerror or type(exc).__name__,
                                     fix="check the path and its permissions, or choose another OUT") from None
    spots = open_run_spots(source, dataset=dataset, split=split)
    emb = spots.embeddings
    coords, note = dataset_coords_um(spots)
    params = {"embeddings": str(emb.path), "dataset": str(spots.dataset), "embedded_split": spots.embedded_split,
              "run_dir": None if spots.run_dir is None else str(spots.run_dir), "spatial_unit": "um",
              "spatial_note": note}
    if spots.run_dir is not None:
        params["config"] = read_json_if_any(spots.run_dir / "config.json")
        params["results"] = read_json_if_any(spots.run_dir / "results.json")
    x = spots.counts() if counts else None
    path = export_anndata(out, obs={"sample": emb.sample, "donor": emb.donor, "split": spots.split},
                          row_ids=emb.index, image_embeddings=emb.image, gene_embeddings=emb.gene,
                          coords_um=None if note == "absent" else coords, params=params, counts=x,
                          gene_names=spots.genes if counts else None, overwrite=overwrite, spot_ids=spots.spot_id)
    return {"path": path, "n": len(spots), "d_img": emb.image.shape[1], "d_gex": emb.gene.shape[1],
            "spatial_note": note, "params": params}
