"""Embed any HESCAPE dataset with a trained model: zero-shot transfer to other samples, donors or technologies.

``hescape-eval embed MODEL DATASET --out FILE.npz`` loads the model of a hescape-train run (a run directory — its
best checkpoint by ``checkpoints/index.json``, or ``--which last`` — a checkpoint directory, or its
``model.safetensors``), embeds one split of a dataset built by hescape-data, and writes the embeddings in the format
of :mod:`hescape.eval.io`, ready for ``hescape-eval retrieval FILE.npz``.

The model is read from files only: ``model.safetensors`` (safetensors, no pickle) whose metadata holds the model
configuration (``model_cfg``, JSON) and gene panel (``genes``), as hescape-train writes them. hescape-models and
hescape-data are imported when this runs, never by ``import hescape.eval``; hescape-train is never imported.
The dataset must carry the model's gene panel in the same order (the gene tower's input layer is that panel):
another panel is refused by the dataset with the differing genes named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import HescapeEvalError

__all__ = ["resolve_model_file", "load_trained_model", "embed_split"]


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = module.split(".")[0] + "-" + module.split(".")[1]
        msg = f"hescape-eval embed needs {pkg}: pip install {pkg} (or the HESCAPE workspace)"
        raise HescapeEvalError(msg) from None


def resolve_model_file(path: str | os.PathLike, which: str = "best") -> Path:
    """The ``model.safetensors`` that ``path`` names (run directory, checkpoints folder, checkpoint directory, file).

    Raises
    ------
    HescapeEvalError
        Nothing there, or a run without a finished checkpoint.
    """
    if which not in ("best", "last"):
        msg = f"--which: expected 'best' or 'last', found {which!r}"
        raise HescapeEvalError(msg)
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            msg = (f"model {p}: expected a model.safetensors written by hescape-train (or its run directory), found "
                   f"a {p.suffix or 'suffix-less'} file")
            raise HescapeEvalError(msg)
        return p
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            index = folder / "index.json"
            if index.is_file():
                try:
                    name = json.loads(index.read_text(encoding="utf-8-sig")).get(which)
                except (OSError, ValueError) as e:
                    msg = f"model {p}: {index} cannot be read ({e}); the run may be damaged"
                    raise HescapeEvalError(msg) from None
                if name and (folder / name / "model.safetensors").is_file():
                    return folder / name / "model.safetensors"
                msg = f"model {p}: {index} names no finished '{which}' checkpoint; let the run finish or use --which"
                raise HescapeEvalError(msg)
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
    msg = (f"model {p}: expected a hescape-train run directory (checkpoints/index.json), a checkpoint directory or "
           f"its model.safetensors, found {'nothing' if not p.exists() else 'none of them'}")
    raise HescapeEvalError(msg)


def load_trained_model(path: str | os.PathLike, which: str = "best"):
    """The ``HescapeCLIP`` of a hescape-train checkpoint, in eval mode, with its recorded contracts.

    Returns
    -------
    (model, genes, file)
    """
    file = resolve_model_file(path, which)
    models = _need("hescape.models")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state_dict = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        msg = f"model {file}: expected a safetensors file, found one that cannot be read ({e})"
        raise HescapeEvalError(msg) from None
    try:
        cfg = models.cfg_from_dict(json.loads(meta["model_cfg"]))
        genes = json.loads(meta["genes"])
    except (KeyError, ValueError) as e:
        msg = (f"model {file}: its metadata lacks the model configuration ({e}); expected a model.safetensors "
               "written by hescape-train")
        raise HescapeEvalError(msg) from None
    except models.HescapeModelError as e:
        msg_0 = f"model {file}: {e}"
        raise HescapeEvalError(msg_0) from None
    try:
        inference = json.loads(meta.get("inference") or "{}")
    except ValueError:
        msg = f"model {file}: its metadata 'inference' is not JSON; the file is damaged"
        raise HescapeEvalError(msg) from None
    model = models.HescapeCLIP(cfg, load_weights=False)
    model.hescape_inference = inference  # what embed_split applies besides the weights
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        msg = f"model {file}: the weights do not fit the recorded architecture ({first}); the file is damaged"
        raise HescapeEvalError(msg) from None
    return model.eval(), genes, file


def embed_split(model, dataset: str | os.PathLike, split: str | None = "test", *, batch_size: int = 256,
                device: str = "cpu", rows=None) -> dict[str, np.ndarray]:
    """Image and gene embeddings ``(N, d)`` (L2-normalised, float32) of one split, with row ids, samples, donors and spot ids.

    Parameters
    ----------
    split
        The split to embed; ``None``: every row of the dataset (``PairedSpotDataset(dataset, None)`` order).
    rows
        Optional row indices into that selection (embedded in the given order; ``index`` returns them).

    A model trained with a per-sample correction (its checkpoint metadata ``inference``, set by
    :func:`load_trained_model`) gets it here too: ``gene_normalisation`` scales each sample's counts to the training
    split's gene means (:mod:`hescape.data.gene_norm`, factors from all of the sample's rows in ``split``), and
    ``sample_centring`` removes each sample's mean embedding (:func:`hescape.eval.correction.centre_by_sample`, over
    the rows embedded).

    Raises
    ------
    HescapeEvalError
        No such split, or a dataset whose gene panel is not the model's (named by hescape-data); rows out of range.
    """
    import torch

    data = _need("hescape.data")
    try:
        ds = data.PairedSpotDataset(dataset, split, genes=list(model.panel))
    except data.HescapeDataError as e:
        msg = f"dataset {dataset}: {e}"
        raise HescapeEvalError(msg) from None
    if len(ds) == 0:
        msg = f"dataset {dataset}: the split {split!r} has no spots; choose another with --split"
        raise HescapeEvalError(msg)
    index = np.arange(len(ds))
    if rows is not None:
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(index) == 0 or index.min() < 0 or index.max() >= len(ds):
            found = "none" if len(index) == 0 else f"indices from {index.min()} to {index.max()}"
            msg = f"dataset {dataset}: expected row indices in [0, {len(ds)}), found {found}; pass rows of this split"
            raise HescapeEvalError(msg)
    samples, donors = np.asarray(ds.samples)[index], np.asarray(ds.donors)[index]
    spot_ids = np.asarray(ds.spot_ids)[index]
    inference = getattr(model, "hescape_inference", None) or {}
    norm = inference.get("gene_normalisation")
    if norm:
        from hescape.data.gene_norm import scale_to_reference

        ds = scale_to_reference(ds, np.asarray(norm["reference"], dtype=np.float64))
    if rows is not None:
        ds = torch.utils.data.Subset(ds, index.tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         collate_fn=lambda items: (torch.stack([i["image"] for i in items]),
                                                                   torch.stack([i["gexp"] for i in items])))
    model = model.to(device).eval()
    img, gex = [], []
    with torch.no_grad():
        for images, counts in loader:
            img.append(model.encode_image(images.to(device)).float().cpu())
            gex.append(model.encode_gene(counts.to(device)).float().cpu())
    image, gene = torch.cat(img).numpy(), torch.cat(gex).numpy()
    if inference.get("sample_centring"):
        from .correction import centre_by_sample

        image, gene = centre_by_sample(image, samples), centre_by_sample(gene, samples)
    return {"image": image, "gene": gene, "index": index, "sample": samples, "donor": donors, "spot_id": spot_ids}
