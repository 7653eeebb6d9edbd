"""The training run, in parts with one job each.

* :func:`plan_run_dir` / :func:`resume_config` — where the run lives (refused before any heavy work);
* :class:`Trainer` — set-up (data, model, optimiser, sampler), then :meth:`Trainer.step` (one optimiser step),
  :meth:`Trainer.evaluate` (retrieval on a split), :meth:`Trainer.checkpoint` (the :class:`TrainState` to
  disk), :meth:`Trainer.fit` (epochs of steps, validation, checkpoints) and :meth:`Trainer.test` (the test split
  with the best and the last checkpoint, results files);
* :class:`~hescape.train.state.TrainState` — exactly what a checkpoint saves; resuming is loading it.

Random streams (each its own generator, so that none depends on another or on ``data.num_workers``): the global
torch/NumPy/Python generators seeded with ``seed`` (model initialisation, dropout), the augmentation generator
(``derive_seed(seed, "augment")``), the sampler's permutation of each epoch (``derive_seed(seed, "sampler",
epoch)``) and the DataLoader's own generator (``derive_seed(seed, "loader", epoch)``; it only seeds workers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from hescape.data import PairedSpotDataset, SyntheticConfig, default_dataset, read_manifest
from hescape.data.errors import HescapeDataError
from hescape.eval import retrieval_metrics
from hescape.eval.baselines import colour_statistics, ridge_probe
from hescape.eval.correction import centre_within
from hescape.models import HescapeCLIP, TowerCfg, cfg_from_dict, cfg_to_dict, create_loss, create_model
from tqdm.auto import tqdm

from .atomic import atomic_write_json, atomic_write_text
from .augment import augment as _augment
from .checkpoint import Checkpointer, load_model_checkpoint
from .config import TrainConfig, config_to_dict, resume_config, validate_config
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .errors import HescapeConfigError, TrainingDivergedError
from .faults import fault_point
from .feature_cache import FeatureSource, cached_features, plan_cache
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at
from .report import format_results_table
from .sampler import EpochBatchSampler, derive_seed
from .state import TrainState
from .trackers import Trackers, check_trackers

__all__ = ["RunResult", "Trainer", "train", "plan_run_dir", "resume_config", "embed", "seed_everything"]

CONFIG_FORMAT = "hescape-train-config/1"


@dataclass
class RunResult:
    run_dir: Path
    test: dict  # {"i2g": RetrievalResult, "g2i": RetrievalResult} of the best checkpoint
    best_epoch: int
    wall_s: float
    probe: dict | None = None  # the colour-statistics probe on the same split (same keys), if computed
    last: dict | None = None  # the same for the last checkpoint
    last_epoch: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        msg = f"device={name!r} asked for CUDA but no CUDA device is available; use device=cpu or device=auto"
        raise HescapeConfigError(msg)
    try:
        return torch.device(name)
    except RuntimeError:
        msg = f"device={name!r} is not a torch device; expected auto, cpu, cuda or cuda:N"
        raise HescapeConfigError(msg) from None


def per_process_batch(cfg: TrainConfig, world_size: int) -> int:
    """Spots per step in each process: ``global_batch_size / world_size`` when a global batch is given (it must
    divide evenly), else ``batch_size``."""
    if (cfg.global_batch_size or cfg.batch_size * world_size) < 2:
        msg = ("a contrastive step needs at least 2 pairs (each is the other's negative), found a batch of 1 over "
               f"{world_size} process(es); use batch_size >= 2 (e.g. batch_size=64)")
        raise HescapeConfigError(msg)
    if cfg.global_batch_size <= 0:
        return cfg.batch_size
    if cfg.global_batch_size % world_size:
        msg = (f"global_batch_size={cfg.global_batch_size} does not split evenly over {world_size} processes; use a "
               f"multiple of {world_size} (e.g. {world_size * max(1, cfg.global_batch_size // world_size)})")
        raise HescapeConfigError(msg)
    return cfg.global_batch_size // world_size


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``auto`` is bf16 on CUDA (the paper trained in bf16) and
    fp32 (no autocast) elsewhere; ``bf16`` forces it (CPU autocast included); ``fp32`` never autocasts."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _collate(items: list[dict] | dict) -> dict:
    if isinstance(items, dict):  # a batch source that gathers whole batches (FeatureSource.__getitems__)
        return items
    return {"image": torch.stack([i["image"] for i in items]), "gexp": torch.stack([i["gexp"] for i in items]),
            "index": torch.tensor([int(i["index"]) for i in items], dtype=torch.int64)}



def _batch_len(batch: dict) -> int:
    return len(next(iter(batch.values())))


def _embed_batch(model: HescapeCLIP, b: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of one batch of patches/counts or of cached trunk features (``image_feat``/``gene_feat``)."""
    def dev(key):
        return None if b.get(key) is None else b[key].to(device, non_blocking=True)

    return (model.encode_image(dev("image"), features=dev("image_feat")),
            model.encode_gene(dev("gexp"), features=dev("gene_feat")))


@torch.no_grad()
def embed(model: HescapeCLIP, ds: PairedSpotDataset, device, batch_size: int = 256, num_workers: int = 0, *,
          rows=None, amp_dtype: torch.dtype | None = None):
    """Image and gene embeddings ``(N, d)`` of every row of ``ds`` (or of ``rows``), in that order (eval mode,
    deterministic; the loader has its own generator, so embedding consumes no global random number). ``ds`` may be a
    :class:`~hescape.train.feature_cache.FeatureSource` (cached trunk features)."""
    model.eval()
    source = ds if rows is None else torch.utils.data.Subset(ds, list(rows))
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    img, gex = [], []
    device = torch.device(device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for b in loader:
            i, g = _embed_batch(model, b, device)
            img.append(i.float().cpu())
            gex.append(g.float().cpu())
    if not img:
        d = model.cfg.embed_dim
        return torch.empty(0, d), torch.empty(0, d)
    return torch.cat(img), torch.cat(gex)


def colour_features(ds: PairedSpotDataset, chunk: int = 256) -> np.ndarray:
    """Colour statistics (:func:`hescape.eval.baselines.colour_statistics`) of every patch of ``ds``, ``(N, F)``."""
    feats, buf = [], []
    for i in range(len(ds)):
        buf.append(ds[i]["image"].permute(1, 2, 0).numpy())
        if len(buf) == chunk or i == len(ds) - 1:
            feats.append(colour_statistics(np.stack(buf)))
            buf = []
    return np.concatenate(feats)


def colour_probe_baseline(train_ds: PairedSpotDataset, test_ds: PairedSpotDataset, ks) -> dict:
    """The colour-statistics probe (:mod:`hescape.eval.baselines`) fitted on ``train_ds``, ranked on ``test_ds``."""
    return ridge_probe(colour_features(train_ds), train_ds.raw_counts(), colour_features(test_ds),
                       test_ds.raw_counts(), ks=ks)


# -- where the run lives -------------------------------------------------------------------------------------------

def _exists_refusal(run_dir: Path) -> HescapeConfigError:
    return HescapeConfigError(f"run directory {run_dir} already exists; choose another run_name, or continue that run "
                              f"with hescape-train --resume {run_dir}")


def plan_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name`` (or a timestamp, with ``-2``, ``-3``… if taken); an existing named directory is refused.
    Nothing is created here (see :func:`create_run_dir`)."""
    out = Path(cfg.out_dir)
    if cfg.run_name:
        run_dir = out / cfg.run_name
        if run_dir.exists() or run_dir.is_symlink():
            raise _exists_refusal(run_dir)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, i = out / stamp, 1
    while run_dir.exists() or run_dir.is_symlink():
        i += 1
        run_dir = out / f"{stamp}-{i}"
    return run_dir


def create_run_dir(run_dir: Path) -> None:
    """Claim ``run_dir`` (exclusive ``mkdir``: a directory made by someone else meanwhile is refused)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise _exists_refusal(run_dir) from None


def _check_names(cfg: TrainConfig) -> None:
    """Model preset and encoder names against the registries (before the dataset is built)."""
    from hescape.models import get_model_cfg
    from hescape.models.zoo import get_encoder_entry

    get_model_cfg(cfg.model.name)
    for modality in ("image", "gene"):
        name = getattr(cfg.model, modality)
        if name:
            get_encoder_entry(name, modality)


def _resolve_dataset(cfg: TrainConfig) -> Path:
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.exists():
            msg = (f"data.path={cfg.data.path!r} does not exist; give the directory of a HESCAPE dataset "
                   "(it holds manifest.json), or leave data.path empty to use the embedded synthetic default")
            raise HescapeConfigError(msg)
        return path
    return default_dataset(SyntheticConfig(panel=cfg.data.panel), progress=cfg.progress)


def _tower_overrides(cfg: TrainConfig, key: str) -> dict | None:
    m = cfg.model
    fields = {"weights": getattr(m, f"{key}_weights"), "options": getattr(m, f"{key}_options"),
              "finetune": getattr(m, f"{key}_finetune")}
    if key == "image":
        fields["projection"] = m.image_projection
    out = {k: v for k, v in fields.items() if v is not None}
    if out.get("finetune") == "lora":
        out.update(lora_rank=m.lora_rank, lora_alpha=m.lora_alpha)
    if getattr(m, f"{key}_lora_targets"):
        out["lora_targets"] = tuple(getattr(m, f"{key}_lora_targets"))
    name = getattr(m, key)
    if name is None and not out:
        return None
    from hescape.models import get_model_cfg

    base = getattr(get_model_cfg(m.name), key)
    tower = dataclasses.replace(base if name in (None, base.name) else TowerCfg(name), **out)
    return {f.name: getattr(tower, f.name) for f in dataclasses.fields(tower)}


def _load_init_checkpoint(cfg: TrainConfig, genes: list[str]) -> dict:
    path = cfg.model.init_checkpoint
    ckpt = load_model_checkpoint(path)
    if list(ckpt["genes"]) != list(genes):
        msg = (f"checkpoint {ckpt['source']} was trained on a {len(ckpt['genes'])}-gene panel but the dataset has "
               f"{len(genes)} genes (or another order); train from scratch or use a dataset with the checkpoint's panel")
        raise HescapeConfigError(msg)
    return ckpt


def _check_init_overrides(cfg: TrainConfig, mcfg) -> None:
    """Refuse model options that a ``model.init_checkpoint`` fixes but that the user set to something else: they
    would be silently dropped while config.json records them. Options equal to the checkpoint's pass."""
    from .config import ModelConfig

    m, default = cfg.model, ModelConfig()
    fixed = {
        "image": mcfg.image.name, "gene": mcfg.gene.name,
        "image_options": mcfg.image.options, "gene_options": mcfg.gene.options,
        "image_finetune": mcfg.image.finetune, "gene_finetune": mcfg.gene.finetune,
        "embed_dim": mcfg.embed_dim, "projection": mcfg.projection, "loss": mcfg.loss,
        "image_projection": mcfg.image.projection or mcfg.projection,
        "lora_rank": mcfg.image.lora_rank if mcfg.image.finetune == "lora" else mcfg.gene.lora_rank,
        "lora_alpha": mcfg.image.lora_alpha if mcfg.image.finetune == "lora" else mcfg.gene.lora_alpha,
        "image_lora_targets": tuple(mcfg.image.lora_targets), "gene_lora_targets": tuple(mcfg.gene.lora_targets),
    }
    for key in ("name", "image_weights", "gene_weights"):  # the checkpoint holds the architecture and its weights
        if getattr(m, key) != getattr(default, key):
            msg = (f"model.{key}={getattr(m, key)!r} cannot apply with model.init_checkpoint, which fixes the "
                   f"architecture and holds every weight; drop model.{key}")
            raise HescapeConfigError(msg)
    for key, theirs in fixed.items():
        ours = getattr(m, key)
        if ours != getattr(default, key) and ours != theirs:
            msg = (f"model.{key}={ours!r} conflicts with model.init_checkpoint, which fixes {key}={theirs!r}; drop "
                   f"model.{key} (or set it to the checkpoint's value), or train a new model without init_checkpoint")
            raise HescapeConfigError(msg)


def _build_model(cfg: TrainConfig, ckpt: dict | None, genes: list[str], gene_ids) -> HescapeCLIP:
    """The model of a new run, or of ``model.init_checkpoint`` (architecture, contracts and panel from it)."""
    if ckpt is not None:
        try:
            mcfg = cfg_from_dict(ckpt["model_cfg"])
        except (KeyError, TypeError) as e:
            msg = (f"model.init_checkpoint={cfg.model.init_checkpoint!r}: expected a hescape-train checkpoint with a "
                   f"model_cfg, found one without ({e}); give a checkpoint of a run of this version")
            raise HescapeConfigError(msg) from None
        _check_init_overrides(cfg, mcfg)
        model = HescapeCLIP(mcfg, load_weights=False)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:300]
            msg = (f"model.init_checkpoint={cfg.model.init_checkpoint!r}: its weights do not fit its recorded "
                   f"architecture ({first}); the file is damaged or from another version")
            raise HescapeConfigError(msg) from None
        return model
    ids = list(gene_ids) if gene_ids and len(gene_ids) == len(genes) and any(gene_ids) else None
    return create_model(cfg.model.name, panel=genes, gene_ids=ids, loss=cfg.model.loss,
                        embed_dim=cfg.model.embed_dim, projection=cfg.model.projection,
                        image=_tower_overrides(cfg, "image"), gene=_tower_overrides(cfg, "gene"))


def _check_trunk_leakage(model: HescapeCLIP, val_ds, test_ds) -> None:
    """Refuse a tower trained (before this run) on samples this run holds out: a DRVI pretrained on the test split
    has seen the held-out donors' expression, and the test retrieval would no longer measure unseen donors."""
    held = {s for ds in (val_ds, test_ds) if ds is not None for s in ds.samples}
    for key, enc in (("image", model.image_encoder), ("gene", model.gene_encoder)):
        seen = set(getattr(enc, "trained_on_samples", ()) or ())
        both = sorted(seen & held)
        if both:
            msg = (f"{key} encoder {enc.encoder_name!r} was trained on {len(both)} sample(s) this run holds out for "
                   f"validation/test ({', '.join(both[:5])}); pretrain it on the training split only "
                   f"(hescape-models pretrain-drvi DATASET --split train)")
            raise HescapeConfigError(msg)


def _warn_scale(model: HescapeCLIP, manifest: dict, info: DistInfo) -> None:
    geo = manifest.get("geometry") or {}
    um, fov = geo.get("um_per_px"), geo.get("fov_um")
    if not (um and fov) or not info.is_main:
        return
    text = model.image_encoder.contract.scale_warning(float(um), round(float(fov) / float(um)))
    if text:
        tqdm.write(f"warning: image encoder {model.cfg.image.name!r}: {text}")


def _plain(obj):
    """``obj`` as JSON values (tuples → lists; anything else JSON cannot hold → its ``str``)."""
    return json.loads(json.dumps(obj, default=str))


def _num(x: float, fmt: str = ".3f") -> str:
    """A number for the progress bar; NaN/inf are printed, never raised on."""
    return format(x, fmt) if math.isfinite(x) else str(x)


# -- the run ---------------------------------------------------------------------------------------------------------

class Trainer:
    """One training run: built by :meth:`setup`, driven by :meth:`fit` then :meth:`test`.

    Parameters
    ----------
    cfg
        A validated configuration.
    device, info
        The torch device and the distributed rank info (:func:`~hescape.train.distributed.init_distributed`).
    run_dir
        The run directory: to be created (new run, rank 0) or existing (``resume=True``). ``None`` on ranks > 0.
    resume
        Continue the run in ``run_dir`` from its last checkpoint (from scratch if it has none yet).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, info: DistInfo, run_dir: Path | None, *,
                 resume: bool = False):
        self.cfg, self.device, self.info, self.run_dir, self.resume = cfg, device, info, run_dir, resume
        self.t0 = time.time()
        self.main = info.is_main
        self.steps_log = self.metrics_log = self.checkpointer = None
        self.trackers = Trackers()

    # set-up ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model, optimiser, sampler, run directory and logs; from the last checkpoint when resuming.
        Every refusal happens before a new run directory is created."""
        cfg, info = self.cfg, self.info
        seed_everything(cfg.seed)
        _check_names(cfg)
        self._setup_data()
        self._setup_model()
        self._setup_loader()
        # plain values only (JSON round trip), so that state.pt loads with weights_only=True whatever an encoder
        # records; the model configuration must be JSON exactly (it rebuilds the model), the description may not be
        model_cfg = json.dumps(cfg_to_dict(self.model.recorded_cfg()))
        self.run_facts = {"model_cfg": json.loads(model_cfg),
                          **_plain({"encoders": self.model.describe(), "genes": list(self.genes),
                                    "train_config": config_to_dict(cfg), "world_size": info.world_size,
                                    "n_train": len(self.train_ds), "total_steps": self.total_steps})}
        self.weights_meta = {"model_cfg": model_cfg, "genes": json.dumps(self.genes),
                             "inference": json.dumps(self._inference())}
        if self.main:
            if not self.resume:
                create_run_dir(self.run_dir)
                resolved = dataclasses.replace(cfg, run_name=self.run_dir.name)
                atomic_write_json(self.run_dir / "config.json",
                                  {**config_to_dict(resolved), "format": CONFIG_FORMAT,
                                   "data_resolved": str(self.data_path), "world_size": info.world_size})
            self.steps_log = MetricsLog(self.run_dir, "steps")
            self.metrics_log = MetricsLog(self.run_dir, "metrics")
            self.trackers = Trackers(cfg.log, self.run_dir, config_to_dict(cfg))
        if self.run_dir is not None:
            self.checkpointer = Checkpointer(self.run_dir)
        if self.resume:
            self._load_last_checkpoint()

    def _setup_data(self) -> None:
        cfg, info = self.cfg, self.info
        data_path = _resolve_dataset(cfg) if info.is_main else None
        if info.enabled:  # rank 0 builds the default dataset (if needed) first; the others find it in the cache
            torch.distributed.barrier()
            if not info.is_main:
                data_path = _resolve_dataset(cfg)
        self.data_path = data_path
        manifest = read_manifest(data_path)
        self.manifest, self.genes = manifest, list(manifest["genes"])
        if cfg.model.n_genes and cfg.model.n_genes != len(self.genes):
            msg = (f"the model expects {cfg.model.n_genes} genes (model.n_genes) but dataset {data_path} has "
                   f"{len(self.genes)}; set model.n_genes=0 to take the panel size from the dataset, or use a matching "
                   "dataset")
            raise HescapeConfigError(msg)
        self.init_ckpt = _load_init_checkpoint(cfg, self.genes) if cfg.model.init_checkpoint else None
        splits = {s["split"] for s in manifest["samples"]}
        for needed in ("train", "test"):
            if needed not in splits:
                msg = f"dataset {data_path} has no {needed!r} split (found {sorted(splits)}); rebuild it with donor splits"
                raise HescapeDataError(msg)
        # Raw counts and raw patches: each encoder prepares its own input with its contract.
        self.train_ds = PairedSpotDataset(data_path, "train")
        self.val_ds = PairedSpotDataset(data_path, "val") if "val" in splits else None
        self.test_ds = PairedSpotDataset(data_path, "test")
        self.gene_reference = None
        if cfg.data.gene_normalisation == "sample_mean":
            self._scale_counts()
        if max(cfg.recall_ks) > len(self.test_ds):
            msg = (f"recall_ks={','.join(map(str, cfg.recall_ks))} asks for Recall@{max(cfg.recall_ks)} but the test "
                   f"split has {len(self.test_ds)} spots; lower recall_ks or put more samples in the test split")
            raise HescapeConfigError(msg)

    def _inference(self) -> dict:
        """What embedding with this model needs besides its weights (every checkpoint's metadata ``inference``;
        hescape-eval's ``embed`` applies it): the per-sample gene normalisation with its reference means, and the
        per-sample centring of the embeddings."""
        out: dict = {"sample_centring": bool(self.cfg.sample_centring)}
        if self.gene_reference is not None:
            out["gene_normalisation"] = {"method": "sample_mean", "reference": [float(v) for v in self.gene_reference]}
        return out

    def _scale_counts(self) -> None:
        """``data.gene_normalisation=sample_mean`` (:mod:`hescape.data.gene_norm`): every split's counts scaled per
        sample to the training split's gene means."""
        from hescape.data.gene_norm import scale_to_reference

        train_counts = self.train_ds.raw_counts()
        self.gene_reference = reference = train_counts.mean(axis=0, dtype=np.float64)
        self.train_ds = scale_to_reference(self.train_ds, reference, train_counts)
        self.val_ds = None if self.val_ds is None else scale_to_reference(self.val_ds, reference)
        self.test_ds = scale_to_reference(self.test_ds, reference)

    def _setup_model(self) -> None:
        cfg, info = self.cfg, self.info
        model = _build_model(cfg, self.init_ckpt, self.genes, self.manifest.get("gene_ids"))
        self.init_ckpt = None  # its weights are in the model now
        _warn_scale(model, self.manifest, info)
        _check_trunk_leakage(model, self.val_ds, self.test_ds)
        model.to(self.device)
        if info.enabled:
            model.loss_fn = create_loss(cfg.model.loss, rank=info.rank, world_size=info.world_size,
                                        gather_with_grad=True, local_loss=cfg.local_loss)
            dev = [self.device] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=dev)
        else:
            self.ddp = model
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState(model=model, optimizer=build_optimizer(model, cfg.optim),
                                generators={"augment": torch.Generator().manual_seed(self._augment_seed())})
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.cached_towers = plan_cache(model, cfg)

    def _augment_seed(self) -> int:
        """Each process augments with its own stream (rank 0's is the single-process stream)."""
        rank = self.info.rank
        return derive_seed(self.cfg.seed, "augment") if rank == 0 else derive_seed(self.cfg.seed, "augment", rank)

    def _setup_loader(self) -> None:
        cfg, info = self.cfg, self.info
        self.batch_size = per_process_batch(cfg, info.world_size)
        self.sampler = EpochBatchSampler(len(self.train_ds), self.batch_size, cfg.seed, info.rank, info.world_size,
                                         mode=cfg.data.batch_sampling, groups=self.train_ds.samples)
        names = {s: i for i, s in enumerate(dict.fromkeys(self.train_ds.samples))}
        self.train_codes = torch.tensor([names[s] for s in self.train_ds.samples], dtype=torch.int64)
        self.n_train_samples = len(names)
        if len(self.sampler) == 0:
            msg = (f"a batch of {self.batch_size} spots per process is larger than the training split "
                   f"({len(self.train_ds)} spots{f' over {info.world_size} processes' if info.enabled else ''}); "
                   "lower batch_size / global_batch_size")
            raise HescapeConfigError(msg)
        self.sources = self._feature_sources() if self.cached_towers else {}
        self.loader_gen = torch.Generator()
        self.loader = torch.utils.data.DataLoader(self._source(self.train_ds), batch_sampler=self.sampler,
                                                  num_workers=cfg.data.num_workers, collate_fn=_collate,
                                                  generator=self.loader_gen)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * len(self.sampler)
        self.total_epochs = math.ceil(self.total_steps / len(self.sampler))

    def _feature_sources(self) -> dict[int, FeatureSource]:
        """Cached trunk features of every split for the cached towers (rank 0 computes missing caches first; the
        other ranks then find them, or compute their own where the cache folder is not shared)."""
        info, out = self.info, {}
        for turn in ((0, 1) if info.enabled else (0,)):
            if info.enabled and (turn == 0) != info.is_main:
                torch.distributed.barrier()
                continue
            for ds in (self.train_ds, self.val_ds, self.test_ds):
                if ds is None:
                    continue
                feats = {}
                for tower in self.cached_towers:
                    arr, folder, made = cached_features(self.model, tower, ds, self.device, self.amp_dtype,
                                                        root=self.cfg.data.feature_cache_dir,
                                                        progress=self.cfg.progress and info.is_main)
                    feats[tower] = arr
                    if info.is_main and self.cfg.progress:
                        tqdm.write(f"feature cache: {tower} trunk, {len(ds)} rows "
                                   f"{'computed into' if made else 'read from'} {folder}")
                out[id(ds)] = FeatureSource(ds, feats.get("image"), feats.get("gene"))
            if info.enabled:
                torch.distributed.barrier()
        return out

    def _source(self, ds):
        """The batch source of ``ds``: its cached features when a tower is cached, else the dataset itself."""
        return self.sources.get(id(ds), ds)

    def _load_last_checkpoint(self) -> None:
        ckpt = Checkpointer(self.run_dir)
        index = ckpt.read_index()
        if index is None:  # killed before its first checkpoint: start again from step 0 in the same directory
            sizes = {}
        else:
            weights, side = ckpt.load(index["last"])
            for key, have in (("genes", self.genes), ("world_size", self.info.world_size),
                              ("n_train", len(self.train_ds)), ("total_steps", self.total_steps)):
                if side.get(key) != have:
                    shown = (f"{len(side.get(key) or [])} genes", f"{len(have)} genes") if key == "genes" else (
                        side.get(key), have)
                    msg = (f"--resume {self.run_dir}: the checkpoint has {key} {shown[0]} but this run would have "
                           f"{shown[1]}; resume with the same dataset and number of processes")
                    raise HescapeConfigError(msg)
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
            self.state.load_side_state(side)
            sizes = self.state.metrics_sizes
        if self.main:
            self.steps_log.truncate(sizes)
            self.metrics_log.truncate(sizes)
            ckpt.clean()

    # one step --------------------------------------------------------------------------------------------------

    def step(self, batch: dict) -> dict:
        """One optimiser step on ``batch``; returns its log record. Stops the run (:class:`TrainingDivergedError`)
        before the optimiser step when the loss or the gradient norm is NaN/inf."""
        cfg, st = self.cfg, self.state
        lr = lr_at(st.step, self.total_steps, cfg.optim.lr, cfg.optim.warmup_steps)
        for g in st.optimizer.param_groups:
            g["lr"] = lr
        images = batch.get("image")
        if cfg.data.augment and images is not None:
            images = _augment(images, st.generators["augment"], cfg.data.stain_jitter, cfg.data.hed_jitter)

        def dev(x):
            return None if x is None else x.to(self.device, non_blocking=True)

        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.ddp(dev(images), dev(batch.get("gexp")), image_features=dev(batch.get("image_feat")),
                           gene_features=dev(batch.get("gene_feat")))
        # the loss in fp32 whatever the towers ran in (the paper: bf16 towers, fp32 loss accumulation)
        out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
        if cfg.sample_centring:  # the means of the global minibatch: W processes centre as one would
            codes = self.train_codes[batch["index"]].to(self.device)
            reduce = None
            if self.info.enabled:
                import torch.distributed.nn.functional as dist_fn  # all_reduce that passes gradients

                reduce = dist_fn.all_reduce
            for key in ("image_features", "gene_features"):
                out[key] = centre_within(out[key], codes, n_codes=self.n_train_samples, all_reduce=reduce)
        terms = self.model.loss(out)
        loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf  # inf: measure, scale by 1.0
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        logged = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).float()
        if self.info.enabled and self.cfg.local_loss:  # each process holds its part: log the global loss
            torch.distributed.all_reduce(logged)
            logged /= self.info.world_size
        loss_v, scale = float(logged[0]), float(out["logit_scale"].detach())
        record = {"step": st.step + 1, "epoch": st.epoch + 1, "lr": lr, "loss": loss_v,
                  **{k: float(v) for k, v in zip(terms, logged[1:], strict=True)}, "logit_scale": scale,
                  "grad_norm": grad_norm}
        if self._any_rank(not (math.isfinite(loss_v) and math.isfinite(grad_norm))):
            raise self._diverged(record)
        st.optimizer.step()
        self.model.clamp_logit_scale()  # after the step, as open_clip: the scale used is the scale stored
        st.step += 1
        st.batch += 1
        st.epoch_losses.append(loss_v)
        return record

    def _any_rank(self, flag: bool) -> bool:
        if not self.info.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _diverged(self, record: dict, what: str = "the step was not taken") -> TrainingDivergedError:
        terms = ", ".join(f"{k} {_num(v, '.4g')}" for k, v in record.items() if k.endswith("_loss"))
        index = self.checkpointer.read_index() if self.checkpointer else None
        kept = (f"the last good checkpoint {self.run_dir / 'checkpoints' / index['last']} (step {index['step']}) is "
                "kept" if index else "no checkpoint had been written yet")
        return TrainingDivergedError(
            f"training diverged at step {record['step']} (epoch {record['epoch']}): loss {_num(record['loss'], '.4g')} "
            f"({terms}), logit_scale {_num(record['logit_scale'], '.4g')}, grad norm "
            f"{_num(record['grad_norm'], '.4g')}, lr {record['lr']:.3g}; {what} and {kept}; lower "
            f"optim.lr (now {self.cfg.optim.lr:g}) or raise optim.warmup_steps, then start a new run")

    # evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, ds: PairedSpotDataset, ks) -> tuple[dict | None, torch.Tensor, torch.Tensor]:
        """Retrieval on every row of ``ds`` (full gallery) with the model as it is; also returns the embeddings.

        Under torch.distributed every process embeds its share of the rows (row ``i`` on rank ``i % world_size``)
        and the embeddings are gathered in row order on every rank; rank 0 ranks them (the others get ``None``)."""
        info = self.info
        rows = range(info.rank, len(ds), info.world_size) if info.enabled else None
        img, gex = embed(self.model, self._source(ds), self.device, num_workers=self.cfg.data.num_workers, rows=rows,
                         amp_dtype=self.amp_dtype)
        if info.enabled:
            img, gex = self._gather_rows(img, len(ds)), self._gather_rows(gex, len(ds))
        if not self.main:
            return None, img, gex
        if self.cfg.sample_centring:  # every sample's mean embedding removed (hescape.eval.correction)
            from hescape.eval.correction import centre_by_sample

            img = torch.from_numpy(centre_by_sample(img, ds.samples))
            gex = torch.from_numpy(centre_by_sample(gex, ds.samples))
        return retrieval_metrics(img, gex, ks=[k for k in ks if k <= len(ds)]), img, gex

    def _gather_rows(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``(n, d)`` from each rank's strided share ``x`` (rows ``rank, rank + W, …``), in row order."""
        world, m = self.info.world_size, -(-n // self.info.world_size)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL gathers CUDA tensors
        padded = torch.zeros(m, x.shape[1], dtype=torch.float32, device=dev)
        padded[: len(x)] = x.to(dev)
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        return torch.stack(parts, 1).reshape(m * world, -1)[:n].cpu()

    def _broadcast_weights(self) -> None:
        """Every rank takes rank 0's weights (the test split is scored with the best checkpoint on all ranks)."""
        for t in self.model.state_dict().values():
            torch.distributed.broadcast(t, 0)

    # checkpoints ---------------------------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write the :class:`TrainState` (rank 0): metrics files are synced first and their lengths recorded."""
        if not self.main:
            return
        st = self.state
        if not all(bool(torch.isfinite(p).all()) for p in self.trainable):
            raise self._diverged({"step": st.step, "epoch": st.epoch + 1, "loss": math.nan, "logit_scale": math.nan,
                                  "grad_norm": math.nan, "lr": st.optimizer.param_groups[0]["lr"]},
                                 "the weights became non-finite, no checkpoint was written")
        self.steps_log.sync()
        self.metrics_log.sync()
        st.metrics_sizes = {**self.steps_log.sizes(), **self.metrics_log.sizes()}
        self.checkpointer.save(st, self.run_facts, self.weights_meta)

    # the loop ----------------------------------------------------------------------------------------------------

    def fit(self) -> None:
        """Steps from the state's position until ``total_steps`` (``max_steps``, or ``epochs`` × batches per epoch).

        An evaluation point — validation, the metrics line, the best-checkpoint update and a checkpoint — comes at
        each epoch end (``eval_every=0``) or every ``eval_every`` steps and at the last step; a checkpoint also comes
        every ``checkpoint_every`` steps."""
        cfg, st = self.cfg, self.state
        n_batches = len(self.sampler)
        while st.step < self.total_steps:
            if st.batch >= n_batches:  # a checkpoint taken on an epoch's last batch: the next epoch starts
                st.epoch, st.batch = st.epoch + 1, 0
            self.model.train()
            self.sampler.set_epoch(st.epoch, st.batch)
            self.loader_gen.manual_seed(derive_seed(cfg.seed, "loader", st.epoch))
            left = min(n_batches, st.batch + self.total_steps - st.step)
            bar = tqdm(total=left, initial=st.batch, desc=f"epoch {st.epoch + 1}/{self.total_epochs}",
                       unit="step", disable=not (cfg.progress and self.main), leave=False)
            t_last, n_since = time.perf_counter(), 0
            try:
                for batch in self.loader:
                    rec = self.step(batch)
                    fault_point("step", st.step)
                    last = st.step == self.total_steps
                    if self.main and (st.step % cfg.log_every == 0 or last):
                        self.steps_log.write(rec)
                        self.trackers.log(rec, st.step, "train/")
                    bar.update(1)
                    n_since += _batch_len(batch)
                    if bar.n % 10 == 0 or last:
                        rate = n_since * self.info.world_size / max(time.perf_counter() - t_last, 1e-9)
                        t_last, n_since = time.perf_counter(), 0
                        scale = rec["logit_scale"]
                        bar.set_postfix_str(f"loss={_num(rec['loss'])}, T={_num(1 / scale if scale else math.inf)}, "
                                            f"{rate:.0f} spots/s")
                    epoch_done = st.batch >= n_batches
                    if epoch_done and not cfg.eval_every:
                        break
                    if cfg.eval_every and (st.step % cfg.eval_every == 0 or last):
                        self.eval_point()
                    elif cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                        self.checkpoint()
                    if last:
                        break
            finally:
                bar.close()  # before any error message, which then starts on a clean line
            if not cfg.eval_every and (st.batch >= n_batches or st.step == self.total_steps):
                if st.batch >= n_batches:
                    st.epoch, st.batch = st.epoch + 1, 0
                self.eval_point()

    def eval_point(self) -> None:
        """Close a stretch of training: its record (mean loss since the last record, validation Recall@k), the
        best-score update and a checkpoint."""
        cfg, st = self.cfg, self.state
        epoch = st.epoch + (1 if st.batch > 0 else 0)  # the epoch this point lies in (1-based)
        rec = {"epoch": epoch, "step": st.step,
               "train_loss": float(np.mean(st.epoch_losses)) if st.epoch_losses else math.nan,
               "logit_scale": self.model.logit_scale.detach().exp().item(), "lr": st.optimizer.param_groups[0]["lr"]}
        st.epoch_losses = []
        v = None
        if self.val_ds is not None:
            v, _, _ = self.evaluate(self.val_ds, cfg.recall_ks)
            self.model.train()  # an evaluation inside an epoch: training goes on in train mode (dropout)
        if not self.main:
            return
        if v is not None:
            rec.update(v["i2g"].as_dict("val_i2g_"))
            rec.update(v["g2i"].as_dict("val_g2i_"))
            # lower mean rank is better: selection uses every query, not one k
            score = -float(np.mean([v["i2g"].mean_rank, v["g2i"].mean_rank]))
        else:
            score = float(st.step)
        self.metrics_log.write(rec)
        self.trackers.log({k: val for k, val in rec.items() if k not in ("epoch", "step")}, st.step, "val/")
        if cfg.progress:
            extra = ""
            if v is not None:
                extra = (f"  val R@5 i2g {_num(rec.get('val_i2g_R@5', math.nan))} "
                         f"g2i {_num(rec.get('val_g2i_R@5', math.nan))}")
            where = (f"epoch {epoch:>3}/{self.total_epochs}" if not cfg.eval_every
                     else f"step {st.step:>6}/{self.total_steps}")
            tqdm.write(f"{where}  loss {_num(rec['train_loss'], '.4f')}{extra}")
        if score > st.best_score:
            st.best_score, st.best_epoch, st.best_dir = score, epoch, Checkpointer.name_for(st.step)
        self.checkpoint()

    # test ----------------------------------------------------------------------------------------------------------

    def test(self) -> RunResult | None:
        """Score the test split with the last and the best checkpoint; write results (atomically), the best
        checkpoint's test embeddings, and the test lines of metrics.jsonl. Every process embeds its share of the
        test split; rank 0 scores and writes, and returns the result (other ranks return None)."""
        cfg, st, ks = self.cfg, self.state, self.cfg.recall_ks
        last, _, _ = self.evaluate(self.test_ds, ks)  # the model holds the last checkpoint's weights
        index = self.checkpointer.read_index() if self.main else None
        last_name = best_name = None
        if self.main:
            last_name, best_name = index["last"], index["best"] or index["last"]
            if best_name != last_name:
                weights, _ = self.checkpointer.load(best_name)
                self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        if self.info.enabled and self._any_rank(best_name != last_name):
            self._broadcast_weights()
        best, img, gex = self.evaluate(self.test_ds, ks)
        if not self.main:
            return None
        probe = colour_probe_baseline(self.train_ds, self.test_ds, ks) if cfg.probe else None

        def record(kind: str, name: str, res: dict, epoch: int) -> dict:
            return {"split": "test", "checkpoint": kind, "epoch": epoch, "step": int(name.split("-")[1]),
                    "path": f"checkpoints/{name}", **res["i2g"].as_dict("i2g_"), **res["g2i"].as_dict("g2i_")}

        last_rec = record("last", last_name, last, st.epoch + (1 if st.batch > 0 else 0))
        best_rec = {**record("best", best_name, best, st.best_epoch), "best_epoch": st.best_epoch}
        if probe is not None:
            for d in ("i2g", "g2i"):
                best_rec.update({f"{d}_R@{k}_probe": v for k, v in probe[d].recall.items()})
                best_rec[f"{d}_mean_rank_probe"] = probe[d].mean_rank
        self.metrics_log.write(last_rec, csv=False)
        self.metrics_log.write(best_rec, csv=False)
        self.metrics_log.sync()
        self.steps_log.sync()
        fault_point("results")
        from hescape.eval.io import embeddings_path, save_embeddings

        save_embeddings(embeddings_path(self.run_dir, "test"), image=img, gene=gex,
                        index=np.arange(len(self.test_ds)), sample=self.test_ds.samples, donor=self.test_ds.donors,
                        spot_id=self.test_ds.spot_ids)
        donors = sorted(set(self.test_ds.donors))
        where = (f"best epoch {st.best_epoch}/{self.total_epochs}" if not cfg.eval_every
                 else f"best step {int(best_name.split('-')[1])}/{self.total_steps}")
        table = format_results_table(best, title=f"Test retrieval: full gallery of {len(self.test_ds)} spots from "
                                                 f"held-out donor(s) {', '.join(donors)}; {where}",
                                     baseline=probe, baseline_name="colour probe")
        r5 = 5 if 5 in ks else ks[0]
        table += (f"\n\nlast checkpoint (epoch {last_rec['epoch']}, step {st.step}): image → gene R@{r5} "
                  f"{last['i2g'].recall[r5]:.3f}, gene → image R@{r5} {last['g2i'].recall[r5]:.3f} (mean rank "
                  f"{last['i2g'].mean_rank:.1f} / {last['g2i'].mean_rank:.1f})")
        atomic_write_text(self.run_dir / "results.md", table + "\n")
        atomic_write_json(self.run_dir / "results.json", {**best_rec, "last": last_rec})
        cols = list(dict.fromkeys([*best_rec, *last_rec]))
        rows = [",".join(cols)] + [",".join(_csv_cell(r.get(c)) for c in cols) for r in (best_rec, last_rec)]
        atomic_write_text(self.run_dir / "results.csv", "\n".join(rows) + "\n")
        return RunResult(run_dir=self.run_dir, test=best, best_epoch=st.best_epoch, wall_s=time.time() - self.t0,
                         probe=probe, last=last, last_epoch=st.epoch)

    def close(self) -> None:
        self.trackers.close()
        for log in (self.steps_log, self.metrics_log):
            if log is not None:
                log.close()


def _csv_cell(v) -> str:
    if v is None:
        return ""
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None) -> RunResult | None:
    """Train, validate each epoch, test the best and the last checkpoint on held-out donors, write the run directory.

    ``resume``: continue the run in that directory from its last checkpoint (``cfg`` from :func:`resume_config`);
    the result equals an uninterrupted run's, bit for bit on the CPU.

    Under torchrun/srun every process trains on its shard of each epoch, the contrastive loss gathers features
    from all ranks (gather with gradients), and rank 0 validates, checkpoints, tests and writes the run directory;
    other ranks return None.

    Raises
    ------
    HescapeConfigError
        A configuration refused before any heavy work (nothing is created), or a run that diverged
        (:class:`TrainingDivergedError`, its last good checkpoint kept).
    """
    validate_config(cfg)
    check_trackers(cfg.log)
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            msg = f"--resume {resume}: expected a run directory holding config.json; give the run directory of a run"
            raise HescapeConfigError(msg)
    else:
        run_dir = None
    device = _device(cfg.device)
    info, device = init_distributed(device)
    try:
        if run_dir is None and info.is_main:
            run_dir = plan_run_dir(cfg)
        trainer = Trainer(cfg, device, info, run_dir, resume=resume is not None)
        try:
            trainer.setup()
            trainer.fit()
            result = trainer.test()
        finally:
            trainer.close()
        if info.enabled:
            torch.distributed.barrier()  # the other ranks wait while rank 0 writes the results
        return result
    finally:
        cleanup_distributed(info)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
