"""DRVI as a frozen gene trunk: pretraining on a HESCAPE dataset and the registered ``drvi`` encoder.

DRVI (Moinfar & Theis, "Unsupervised deep disentangled representation of single-cell omics", bioRxiv 2024;
theislab/DRVI, PyPI ``drvi-py``) is a variational auto-encoder of raw counts. HESCAPE pretrains one per gene
panel with the sample id as a categorical covariate, ``n_latent`` 128 and layers 128-128, and uses the mean of
its encoder, ``module.z_encoder(log1p(counts))[0]``, as a frozen 128-d gene trunk (peng-lab/hescape
``experiments/drvi_pretrain/train.py`` and ``src/hescape/models/gexp_models/gexp_encoder.py``; facts sheet
``reference/encoders.md``, section DRVI).

:func:`pretrain_drvi` writes a directory, atomically (a hidden temporary sibling renamed into place)::

    hescape_drvi.json        panel genes and ids in order, architecture, covariate, dataset fingerprint,
                             training settings, versions, SHA-256 of the encoder file
    z_encoder.safetensors    the encoder's weights, keys as in DRVIModule.state_dict() ("z_encoder.…")
    drvi/model.pt            the whole model as scvi-tools saves it (drvi.model.DRVI.load(dir, adata=…))
    drvi_reference.h5ad      the first training rows, an AnnData that DRVI.load accepts

``create_gene_encoder("drvi", panel=…, model_dir=DIR)`` reads that directory: it refuses another panel, rebuilds
the encoder with drvi-py's own ``DRVIModule`` and loads ``z_encoder.safetensors`` through
:func:`~hescape.models.weights.load_weights` (strict keys and shapes, no pickle). ``weights=`` is not used: a DRVI
is its panel, architecture and weights together, and the pickled ``drvi/model.pt`` is never read by this module.

drvi-py is optional (``pip install 'hescape-models[drvi]'``) and imported only inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import GeneEncoder
from ..contracts import GeneContract
from ..errors import HescapeModelError
from ..weights import WeightsSpec, file_digest, load_weights
from ..zoo import EncoderEntry, register_encoder

__all__ = ["DRVIGeneEncoder", "build_drvi_encoder", "pretrain_drvi", "drvi_anndata", "read_drvi_config",
           "DRVI_FORMAT", "CONFIG_FILE", "ENCODER_FILE", "INSTALL_HINT"]

DRVI_FORMAT = "hescape-drvi/1"
CONFIG_FILE = "hescape_drvi.json"
ENCODER_FILE = "z_encoder.safetensors"
SCVI_DIR = "drvi"  # scvi-tools' save directory, as the HESCAPE authors name it
REFERENCE_FILE = "drvi_reference.h5ad"
REFERENCE_ROWS = 10  # rows of the reference AnnData (the authors keep adata[:10])
INSTALL_HINT = "pip install 'hescape-models[drvi]'"
COVARIATES = ("sample", "donor")

#: How ``z_encoder.safetensors`` is read: safetensors only, every key of the encoder required.
_SPEC = WeightsSpec(files=(ENCODER_FILE,), licence="that of the data it was trained on",
                    url="a directory written by `hescape-models pretrain-drvi`")


def _import_drvi():
    """``drvi`` (drvi-py), or one error saying how to install it."""
    try:
        import drvi
        from drvi.model import DRVI, DRVIModule  # noqa: F401 - the names this module uses
    except ImportError as e:
        msg = f"the DRVI gene encoder needs drvi-py, which cannot be imported ({e}); install it with {INSTALL_HINT}"
        raise HescapeModelError(msg) from None
    return drvi


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class DRVIGeneEncoder(GeneEncoder):
    """DRVI's encoder mean as a gene trunk: raw counts ``(B, G)`` → log1p (the contract) → ``(B, n_latent)``.

    Parameters
    ----------
    panel
        Gene names of the input columns, in the order the DRVI was trained on.
    z_encoder
        ``DRVIModule.z_encoder`` (drvi-py ``Encoder``), called as ``z_encoder(x, None)`` → ``(q_m, q_v, z)``;
        covariates are not encoded (``encode_covariates=False``, DRVI's default), so none are needed.
    n_latent
        Width of ``q_m``, the output.
    gene_ids, config, model_dir
        The panel's Ensembl ids, the directory's ``hescape_drvi.json`` and the directory (records).

    ``forward_features(x)`` is ``q_m`` of log1p counts ``x``; the encoder is put in ``fully_deterministic`` mode so
    that no latent sample is drawn, and the variance head (kept so the weights load with DRVI's own key layout)
    does not train, as it has no effect on the output. Dropout (``encoder_dropout_rate`` 0.1) acts in training
    mode only.
    """

    def __init__(self, panel: Sequence[str], z_encoder: nn.Module, n_latent: int, *,
                 gene_ids: Sequence[str] | None = None, config: dict[str, Any] | None = None,
                 model_dir: str | None = None):
        super().__init__()
        self.panel = tuple(panel)
        self.gene_ids = None if gene_ids is None else tuple(gene_ids)
        self.z_encoder = z_encoder
        self.z_encoder.fully_deterministic = True  # z = q_m: no sample drawn, no random state used
        for p in self.z_encoder.var_encoder.parameters():  # the variance head never reaches q_m: keep it fixed
            p.requires_grad_(False)
        self.out_dim = int(n_latent)
        self.drvi_config = config
        self.model_dir = model_dir
        self._weights_tag = "random-init"
        self._loaded_tag: str | None = None

    @property
    def weights_tag(self) -> str:
        """Provenance of the weights, recorded in checkpoints: ``"<dir>/z_encoder.safetensors sha256:<16 hex>"``."""
        return self._loaded_tag or self._weights_tag

    @weights_tag.setter
    def weights_tag(self, value: str) -> None:
        # create_gene_encoder marks each new encoder "random-init" after its builder ran; one whose builder loaded
        # a DRVI directory keeps that directory's tag
        self._weights_tag = value

    @property
    def trained_on_samples(self) -> tuple[str, ...]:
        """Samples DRVI was pretrained on (``hescape_drvi.json``); training refuses a run that holds any of them out."""
        dataset = (self.drvi_config or {}).get("dataset") or {}
        return tuple(str(s) for s in dataset.get("samples") or ())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        q_m, _q_v, _z = self.z_encoder(x, None)
        return q_m


# ----------------------------------------------------------------------------------------------- the directory

def read_drvi_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``hescape_drvi.json`` of a directory written by :func:`pretrain_drvi`.

    Raises
    ------
    HescapeModelError
        No such directory or file, invalid JSON, another format, or missing keys.
    """
    d = Path(model_dir).expanduser()
    f = d / CONFIG_FILE
    if not f.is_file():
        what = "does not exist" if not d.exists() else f"has no {CONFIG_FILE}"
        msg = (f"encoder 'drvi': model_dir {d} {what}; expected a directory written by "
               f"`hescape-models pretrain-drvi DATASET --out DIR`")
        raise HescapeModelError(msg)
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"encoder 'drvi': {f} cannot be read as JSON ({e}); pretrain the DRVI again"
        raise HescapeModelError(msg) from None
    if not isinstance(cfg, dict) or cfg.get("format") != DRVI_FORMAT:
        found = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        msg = f"encoder 'drvi': {f}: expected format {DRVI_FORMAT!r}, found {found!r}; pretrain the DRVI again"
        raise HescapeModelError(msg)
    missing = [k for k in ("genes", "gene_ids", "n_latent", "module_kwargs", "files") if k not in cfg]
    if missing:
        msg = f"encoder 'drvi': {f} lacks the keys {missing}; the file was edited or truncated: pretrain again"
        raise HescapeModelError(msg)
    return cfg


def _check_panel(cfg: dict[str, Any], panel: tuple[str, ...], gene_ids: tuple[str, ...] | None,
                 model_dir: Path) -> None:
    trained = tuple(cfg["genes"])
    fix = ("use the dataset it was trained on, or pretrain a DRVI on this panel with "
           "`hescape-models pretrain-drvi DATASET --out DIR`")
    if trained != panel:
        i = next((k for k, (a, b) in enumerate(zip(trained, panel, strict=False)) if a != b),
                 min(len(trained), len(panel)))
        have = repr(trained[i]) if i < len(trained) else "no gene (its panel ends there)"
        got = repr(panel[i]) if i < len(panel) else "no gene (it ends there)"
        msg = (f"encoder 'drvi': the DRVI in {model_dir} was trained on another gene panel ({len(trained)} genes; "
               f"this one has {len(panel)}): they first differ at column {i}, where the DRVI has {have} and the "
               f"panel has {got}; {fix}")
        raise HescapeModelError(msg)
    known = tuple(cfg.get("gene_ids") or ())
    if gene_ids is not None and len(known) == len(gene_ids):
        for i, (a, b) in enumerate(zip(known, gene_ids, strict=True)):
            if a and b and a != b:
                msg = (f"encoder 'drvi': gene {panel[i]!r} (column {i}) has Ensembl id {b!r} here but {a!r} in the "
                       f"DRVI of {model_dir}; the panels name different genes: {fix}")
                raise HescapeModelError(msg)


def build_drvi_encoder(panel: Sequence[str], gene_ids: Sequence[str] | None = None, *,
                       model_dir: str | os.PathLike | None = None, random_init: bool = False,
                       n_latent: int | None = None, encoder_dims: Sequence[int] | None = None) -> DRVIGeneEncoder:
    """The registered builder of ``drvi`` (``create_gene_encoder("drvi", panel=…, model_dir=…)``).

    Parameters
    ----------
    panel, gene_ids
        The dataset's genes (and Ensembl ids) in column order; they must equal those the DRVI was trained on.
    model_dir
        A directory written by :func:`pretrain_drvi`; its architecture and weights are used.
    random_init
        Without ``model_dir``: build an untrained encoder of ``n_latent`` (128) and ``encoder_dims`` (128, 128)
        for tests and parameter counts. It is refused otherwise, since an untrained DRVI trunk is of no use.
    n_latent, encoder_dims
        Architecture of a ``random_init`` encoder; with ``model_dir`` they may only repeat what it recorded.

    Raises
    ------
    HescapeModelError
        drvi-py missing, no ``model_dir``, a directory of another panel or format, conflicting options;
        :class:`~hescape.models.weights.WeightsError` when ``z_encoder.safetensors`` does not fit.
    """
    panel = tuple(panel)
    ids = None if gene_ids is None else tuple(gene_ids)
    if model_dir is None and not random_init:
        msg = ("encoder 'drvi' is a pretrained trunk: pass model_dir=DIR, a directory written by "
               "`hescape-models pretrain-drvi DATASET --out DIR` (weights= is not used: the directory holds the "
               "panel, architecture and weights together); random_init=True builds an untrained one")
        raise HescapeModelError(msg)
    if model_dir is not None and random_init:
        msg = "encoder 'drvi': pass either model_dir=… (pretrained) or random_init=True, not both"
        raise HescapeModelError(msg)
    drvi = _import_drvi()
    if model_dir is None:
        kwargs = {"n_input": len(panel), "n_latent": int(n_latent or 128),
                  "encoder_dims": [int(d) for d in (encoder_dims or (128, 128))],
                  "decoder_dims": [int(d) for d in (encoder_dims or (128, 128))]}
        module = drvi.model.DRVIModule(**kwargs)
        return DRVIGeneEncoder(panel, module.z_encoder, kwargs["n_latent"], gene_ids=ids)

    d = Path(model_dir).expanduser()
    cfg = read_drvi_config(d)
    _check_panel(cfg, panel, ids, d)
    kwargs = dict(cfg["module_kwargs"])
    for name, given, recorded in (("n_latent", n_latent, cfg["n_latent"]),
                                  ("encoder_dims", encoder_dims, kwargs.get("encoder_dims"))):
        if given is not None and (list(given) if name == "encoder_dims" else given) != recorded:
            msg = (f"encoder 'drvi': {name}={given!r} conflicts with the DRVI in {d} ({name}={recorded!r}); "
                   f"drop the option, the directory sets it")
            raise HescapeModelError(msg)
    if kwargs.get("encode_covariates"):
        msg = (f"encoder 'drvi': the DRVI in {d} encodes covariates (encode_covariates=True), so its encoder needs "
               "the sample id of every spot; only encoders of counts alone can serve as a trunk: pretrain again")
        raise HescapeModelError(msg)
    if kwargs.get("n_input") != len(panel):
        msg = f"encoder 'drvi': {d}/{CONFIG_FILE} records n_input={kwargs.get('n_input')} for {len(panel)} genes"
        raise HescapeModelError(msg)
    with torch.device("meta"):  # the decoder is dropped: build it without memory, then load every encoder weight
        module = drvi.model.DRVIModule(**kwargs)
    enc = DRVIGeneEncoder(panel, module.z_encoder.to_empty(device="cpu"), cfg["n_latent"], gene_ids=ids,
                          config=cfg, model_dir=str(d))
    load_weights(enc, d, _SPEC, "drvi")  # every key of z_encoder, no other, same shapes; safetensors only
    want = (cfg["files"].get("encoder") or {}).get("sha256")
    if want and file_digest(d / ENCODER_FILE) != want:
        msg = (f"encoder 'drvi': {d / ENCODER_FILE} does not match the SHA-256 recorded in {CONFIG_FILE}: the file "
               "was replaced or corrupted; pretrain the DRVI again")
        raise HescapeModelError(msg)
    enc._loaded_tag = f"{d.name}/{ENCODER_FILE} sha256:{(want or file_digest(d / ENCODER_FILE))[:16]}"
    return enc


register_encoder(EncoderEntry(
    name="drvi", modality="gene", builder=build_drvi_encoder,
    contract=GeneContract(preprocessing="log1p", vocabulary="panel"), out_dim=128, pooling="none",
    pretrained=True,  # trained by pretrain-drvi and given as model_dir; frozen by default, as the paper uses it
    description="DRVI encoder mean (drvi-py) on log1p counts, frozen; pretrain it per panel with "
                "`hescape-models pretrain-drvi`, then pass model_dir=DIR (Moinfar & Theis 2024; theislab/DRVI)"))


# ------------------------------------------------------------------------------------------------ pretraining

def _check_covariate(covariate: str | None) -> str | None:
    if covariate in (None, "none"):
        return None
    if covariate not in COVARIATES:
        msg = f"DRVI covariate: expected one of {list(COVARIATES)} or None, found {covariate!r}"
        raise HescapeModelError(msg)
    return covariate


def drvi_anndata(dataset_dir: str | os.PathLike, *, split: str | Sequence[str] | None = "train",
                 covariate: str | None = "sample"):
    """The AnnData :func:`pretrain_drvi` trains on: raw counts of ``split`` with the sample id in ``obs``.

    ``X`` and ``layers["counts"]`` hold the raw counts (float32, spots × genes); ``obs`` has ``sample`` and
    ``donor`` (categorical); ``var_names`` are the panel genes, ``var["gene_ids"]`` their Ensembl ids. Needs
    hescape-data (to read the dataset) and anndata (a dependency of drvi-py).
    """
    _check_covariate(covariate)
    try:
        from hescape.data import PairedSpotDataset
    except ImportError as e:
        msg = f"reading a HESCAPE dataset needs hescape-data, which cannot be imported ({e}); pip install hescape-data"
        raise HescapeModelError(msg) from None
    _import_drvi()
    import anndata
    import numpy as np
    import pandas as pd

    ds = PairedSpotDataset(dataset_dir, split)
    counts = ds.raw_counts()
    genes = list(ds.genes)
    ids = [str(g) for g in ds.manifest.get("gene_ids", [""] * len(genes))]
    obs = pd.DataFrame({"sample": pd.Categorical(ds.samples), "donor": pd.Categorical(ds.donors)},
                       index=[f"spot{i}" for i in range(len(ds))])
    var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(genes, name="gene"))
    adata = anndata.AnnData(X=np.ascontiguousarray(counts, dtype=np.float32), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    return adata


def dataset_fingerprint(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's panel, samples and shards (their checksums included), canonical JSON."""
    core = {k: manifest.get(k) for k in ("schema_version", "genes", "gene_ids", "samples", "shards")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_max_epochs(n_obs: int) -> int:
    """Epochs of the HESCAPE authors' DRVI pretraining for ``n_obs`` training spots.

    ``min(round(20000 / n_obs * 400), 400)``; below 400 epochs the KL term warms up over half of them, at 400 the
    scvi-tools default (400 epochs) applies (peng-lab/hescape ``experiments/drvi_pretrain/train.py``,
    ``train_drvi``); :func:`pretrain_drvi` applies the same warm-up rule to a given ``max_epochs``.
    """
    return max(1, min(round(20000 / max(n_obs, 1) * 400), 400))


def _check_out(out: Path, dataset: Path, overwrite: bool) -> None:
    if out == dataset or out.is_relative_to(dataset) or dataset.is_relative_to(out):
        msg = f"pretrain-drvi: the output {out} is, contains or lies inside the dataset {dataset}; choose another --out"
        raise HescapeModelError(msg)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            msg = f"pretrain-drvi: the output {out} exists and is not a directory; choose another --out"
            raise HescapeModelError(msg)
        if any(out.iterdir()):
            if not overwrite:
                msg = f"pretrain-drvi: the output {out} exists; pass overwrite=True (--overwrite) to replace it"
                raise HescapeModelError(msg)
            if not (out / CONFIG_FILE).is_file():
                msg = (f"pretrain-drvi: {out} is not a DRVI directory (no {CONFIG_FILE}), so it is not replaced even "
                       "with --overwrite; choose another --out")
                raise HescapeModelError(msg)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is renamed aside first and deleted last."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None:
            os.replace(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def pretrain_drvi(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "train",
                  n_latent: int = 128, layers: Sequence[int] = (128, 128), max_epochs: int | None = None,
                  seed: int = 0, covariate: str | None = "sample", batch_size: int = 128,
                  accelerator: str = "auto", overwrite: bool = False, progress: bool = True) -> Path:
    """Train a DRVI on the raw counts of a HESCAPE dataset's ``split`` and write it to ``out_dir``, atomically.

    As the HESCAPE authors did (peng-lab/hescape ``experiments/drvi_pretrain/train.py``): raw counts in
    (``layer="counts"``, ``is_count_data=True``), the sample id as categorical covariate (decoder only),
    ``n_latent`` 128, encoder and decoder layers 128-128, batch size 128, all spots used for training
    (``train_size=1.0``), no early stopping, and their epoch rule (:func:`default_max_epochs`) unless
    ``max_epochs`` is given. The panel keeps the dataset's column order.

    Parameters
    ----------
    dataset_dir
        A HESCAPE Arrow dataset (``manifest.json`` and shards).
    out_dir
        The directory to create; it may not be, contain or lie inside the dataset. See the module docstring for
        its files.
    split
        The dataset split to train on (``train``; never the held-out donors).
    n_latent, layers
        Latent size and the widths of the encoder's (and decoder's) hidden layers.
    max_epochs
        Training epochs; ``None`` applies the authors' rule.
    seed
        Seed of every random draw (``scvi.settings.seed``: Python, NumPy, torch; cuDNN deterministic). The same
        seed, data and device give the same weights.
    covariate
        ``"sample"`` (the authors' choice), ``"donor"`` or None.
    batch_size, accelerator
        Mini-batch size; Lightning accelerator (``auto``, ``cpu``, ``gpu``), one device.
    overwrite
        Replace an existing DRVI directory (one holding ``hescape_drvi.json``); any other folder is refused.
    progress
        Show the training progress bar.

    Returns
    -------
    Path
        ``out_dir``.
    """
    covariate = _check_covariate(covariate)
    layers = [int(w) for w in layers]
    bad = [] if isinstance(n_latent, int) and n_latent >= 1 else [f"n_latent={n_latent!r}"]
    bad += [] if layers and all(w >= 1 for w in layers) else [f"layers={layers!r}"]
    bad += [] if max_epochs is None or (isinstance(max_epochs, int) and max_epochs >= 1) else [
        f"max_epochs={max_epochs!r}"]
    bad += [] if isinstance(batch_size, int) and batch_size >= 2 else [f"batch_size={batch_size!r}"]
    if bad:
        msg = (f"pretrain-drvi: expected n_latent >= 1, layers of widths >= 1, max_epochs >= 1 (or None) and "
               f"batch_size >= 2, found {', '.join(bad)}")
        raise HescapeModelError(msg)
    dataset = Path(dataset_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute()
    out = out.parent.resolve() / out.name
    _check_out(out, dataset, overwrite)
    drvi = _import_drvi()
    import scvi
    from safetensors.torch import save_file

    adata = drvi_anndata(dataset, split=split, covariate=covariate)
    from hescape.data import read_manifest
    from hescape.data.outputs import dir_mode, file_mode

    manifest = read_manifest(dataset)
    epochs = default_max_epochs(adata.n_obs) if max_epochs is None else max_epochs
    warmup = None if epochs >= 400 else max(1, round(epochs * 0.5))  # the authors' KL warm-up rule

    scvi.settings.seed = seed
    drvi.model.DRVI.setup_anndata(adata, layer="counts", is_count_data=True,
                                  categorical_covariate_keys=[covariate] if covariate else None)
    model_kwargs = {"encoder_dims": layers, "decoder_dims": layers}
    model = drvi.model.DRVI(adata, n_latent=n_latent, **model_kwargs)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes 0700
        model.train(max_epochs=epochs, accelerator=accelerator, devices=1, train_size=1.0, batch_size=batch_size,
                    early_stopping=False, plan_kwargs={"n_epochs_kl_warmup": warmup} if warmup else None,
                    enable_progress_bar=progress, default_root_dir=str(tmp / "_logs"),
                    log_every_n_steps=max(1, min(10, -(-adata.n_obs // batch_size))))  # ≤ batches per epoch
        shutil.rmtree(tmp / "_logs", ignore_errors=True)
        model.module.cpu()
        model.save(str(tmp / SCVI_DIR), save_anndata=False)
        sd = {f"z_encoder.{k}": v.detach().cpu().contiguous() for k, v in model.module.z_encoder.state_dict().items()}
        save_file(sd, str(tmp / ENCODER_FILE))
        adata[:REFERENCE_ROWS].copy().write_h5ad(tmp / REFERENCE_FILE)
        history = getattr(model, "history", None) or {}
        last = {k: float(history[k].iloc[-1, 0]) for k in ("train_loss", "reconstruction_loss_train", "kl_local_train")
                if k in history and len(history[k])}
        config = {
            "format": DRVI_FORMAT,
            "genes": list(map(str, adata.var_names)),
            "gene_ids": [str(g) for g in adata.var["gene_ids"]],
            "n_latent": n_latent,
            "module_kwargs": {"n_input": adata.n_vars, "n_latent": n_latent, **model_kwargs},
            "preprocessing": "log1p",
            "covariate": covariate,
            "covariate_categories": list(map(str, adata.obs[covariate].cat.categories)) if covariate else [],
            "dataset": {"path": str(dataset), "fingerprint": dataset_fingerprint(manifest), "split": split,
                        "n_spots": int(adata.n_obs), "samples": sorted(map(str, adata.obs["sample"].unique()))},
            "training": {"max_epochs": epochs, "n_epochs_kl_warmup": warmup, "batch_size": batch_size,
                         "train_size": 1.0, "early_stopping": False, "seed": seed, "accelerator": accelerator,
                         "last_epoch": last},
            "files": {"encoder": {"name": ENCODER_FILE, "sha256": file_digest(tmp / ENCODER_FILE)},
                      "scvi_model": f"{SCVI_DIR}/model.pt", "reference_anndata": REFERENCE_FILE},
            "versions": {"drvi-py": drvi.__version__, "scvi-tools": scvi.__version__, "torch": torch.__version__,
                         "hescape-models": _version("hescape-models"), "hescape-data": _version("hescape-data")},
        }
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        for dirpath, dirnames, filenames in os.walk(tmp):  # the modes the umask gives (some writers make 0600)
            for n in dirnames:
                os.chmod(Path(dirpath) / n, dir_mode())
            for n in filenames:
                os.chmod(Path(dirpath) / n, file_mode())
        _check_out(out, dataset, overwrite)  # the location may have changed while training
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
