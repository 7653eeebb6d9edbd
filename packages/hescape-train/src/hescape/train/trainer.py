"""The training loop: data, model, AdamW + warm-up/cosine, validation, test retrieval, run directory."""

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
from hescape.models import HescapeCLIP, TowerCfg, cfg_from_dict, cfg_to_dict, create_loss, create_model
from tqdm.auto import tqdm

from .config import TrainConfig, config_to_dict
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .errors import HescapeConfigError
from .report import format_results_table

__all__ = ["RunResult", "train"]


@dataclass
class RunResult:
    run_dir: Path
    test: dict  # {"i2g": RetrievalResult, "g2i": RetrievalResult}
    best_epoch: int
    wall_s: float
    probe: dict | None = None  # the colour-statistics probe on the same split (same keys), if computed


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


# Haematoxylin, eosin and residual optical-density vectors (rows; Ruifrok & Johnston, Anal Quant Cytol Histol
# 2001), the residual orthogonal to both: OD (RGB) = concentrations @ _HED_TO_OD.
_H = torch.tensor([0.65, 0.70, 0.29], dtype=torch.float64)
_E = torch.tensor([0.07, 0.99, 0.11], dtype=torch.float64)
_R = torch.linalg.cross(_H, _E)
_HED_TO_OD = torch.stack([_H / _H.norm(), _E / _E.norm(), _R / _R.norm()])
_OD_TO_HED = torch.linalg.inv(_HED_TO_OD)
_HED_TO_OD, _OD_TO_HED = _HED_TO_OD.float(), _OD_TO_HED.float()


def _augment(images: torch.Tensor, gen: torch.Generator, stain_jitter: float = 0.0,
             hed_jitter: float = 0.0) -> torch.Tensor:
    """Random flip and 90° rotation per patch (H&E has no preferred orientation), and optionally stain
    augmentation in optical density (OD = -ln I):

    * ``hed_jitter``: colour deconvolution of each patch into haematoxylin and eosin amounts (Ruifrok & Johnston
      vectors), each scaled by ``exp(hed_jitter · N(0, 1))`` per patch, then recomposed (HED augmentation,
      Tellez et al., IEEE TMI 2018);
    * ``stain_jitter``: each patch's per-channel OD scaled by ``1 + stain_jitter · N(0, 1)``.

    ``images``: ``(B, 3, H, W)`` uint8 or float in [0, 1]. Returns float images in [0, 1] when a stain
    augmentation is on, else the input dtype.
    """
    if stain_jitter > 0 or hed_jitter > 0:
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        od = -torch.log(x.clamp_min(1.0 / 255.0))
        if hed_jitter > 0:
            amount = torch.exp(hed_jitter * torch.randn(len(x), 3, 1, 1, generator=gen))
            amount[:, 2] = 1.0  # the residual channel keeps its amount
            conc = torch.einsum("bchw,cs->bshw", od, _OD_TO_HED) * amount
            od = torch.einsum("bshw,sc->bchw", conc, _HED_TO_OD).clamp_min(0.0)
        if stain_jitter > 0:
            scale = 1.0 + stain_jitter * torch.randn(len(x), 3, 1, 1, generator=gen)
            od = od * scale.clamp_min(0.5)
        images = torch.exp(-od)
    flip = torch.rand(len(images), generator=gen) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    k = torch.randint(0, 4, (len(images),), generator=gen)
    out = images.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(images[sel], r, dims=(-2, -1))
    return out


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([i["image"] for i in items]), "gexp": torch.stack([i["gexp"] for i in items])}


def _lr_at(step: int, total: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def embed(model: HescapeCLIP, ds: PairedSpotDataset, device, batch_size: int = 256, num_workers: int = 0):
    """Image and gene embeddings of every row of ``ds`` (eval mode, deterministic)."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate)
    img, gex = [], []
    for b in loader:
        img.append(model.encode_image(b["image"].to(device)).float().cpu())
        gex.append(model.encode_gene(b["gexp"].to(device)).float().cpu())
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


def _resolve_dataset(cfg: TrainConfig) -> Path:
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.exists():
            msg = (f"data.path={cfg.data.path!r} does not exist; give the directory of a HESCAPE dataset "
                   "(it holds manifest.json), or leave data.path empty to use the embedded synthetic default")
            raise HescapeConfigError(msg)
        return path
    return default_dataset(SyntheticConfig(panel=cfg.data.panel), progress=cfg.progress)


def _load_init_checkpoint(path: str, genes: list[str]) -> dict:
    p = Path(path)
    if not p.is_file():
        msg = f"model.init_checkpoint={path!r} does not exist; give the checkpoint.pt of an earlier run"
        raise HescapeConfigError(msg)
    try:  # weights_only: a checkpoint from elsewhere cannot run code when it is loaded
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad or unsafe file
        msg = (f"model.init_checkpoint={path!r}: expected a hescape-train checkpoint.pt (tensors and plain values "
               f"only), found a file torch cannot load safely ({type(e).__name__}); give the checkpoint.pt of a run")
        raise HescapeConfigError(msg) from None
    if not isinstance(ckpt, dict):
        msg = f"model.init_checkpoint={path!r}: expected a hescape-train checkpoint (a dict), found {type(ckpt).__name__}"
        raise HescapeConfigError(msg)
    if list(ckpt.get("genes", [])) != list(genes):
        msg = (f"checkpoint {p} was trained on a {len(ckpt.get('genes', []))}-gene panel but the dataset has "
               f"{len(genes)} genes (or another order); train from scratch or use a dataset with the checkpoint's panel")
        raise HescapeConfigError(msg)
    return ckpt


def _tower_overrides(cfg: TrainConfig, key: str) -> dict | None:
    m = cfg.model
    fields = {"weights": getattr(m, f"{key}_weights"), "options": getattr(m, f"{key}_options"),
              "finetune": getattr(m, f"{key}_finetune")}
    if key == "image":
        fields["projection"] = m.image_projection
    out = {k: v for k, v in fields.items() if v is not None}
    if out.get("finetune") == "lora":
        out.update(lora_rank=m.lora_rank, lora_alpha=m.lora_alpha)
    name = getattr(m, key)
    if name is None and not out:
        return None
    from hescape.models import get_model_cfg

    base = getattr(get_model_cfg(m.name), key)
    tower = dataclasses.replace(base if name in (None, base.name) else TowerCfg(name), **out)
    return {f.name: getattr(tower, f.name) for f in dataclasses.fields(tower)}


def _build_model(cfg: TrainConfig, ckpt: dict | None, genes: list[str], gene_ids) -> HescapeCLIP:
    """The model of a new run, or of ``model.init_checkpoint`` (architecture, contracts and panel from it)."""
    if ckpt is not None:
        try:
            mcfg = cfg_from_dict(ckpt["model_cfg"])
        except (KeyError, TypeError) as e:
            msg = (f"model.init_checkpoint={cfg.model.init_checkpoint!r}: expected a hescape-train checkpoint with a "
                   f"model_cfg, found one without ({e}); give the checkpoint.pt of a run of this version")
            raise HescapeConfigError(msg) from None
        model = HescapeCLIP(mcfg, load_weights=False)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:300]
            msg = (f"model.init_checkpoint={cfg.model.init_checkpoint!r}: its weights do not fit its recorded "
                   f"architecture ({first}); the file is damaged or from another version")
            raise HescapeConfigError(msg) from None
        return model
    ids = list(gene_ids) if gene_ids and len(gene_ids) == len(genes) and any(gene_ids) else None
    return create_model(cfg.model.name, panel=genes, gene_ids=ids, loss=cfg.model.loss,
                        embed_dim=cfg.model.embed_dim, projection=cfg.model.projection,
                        image=_tower_overrides(cfg, "image"), gene=_tower_overrides(cfg, "gene"))


def _warn_scale(model: HescapeCLIP, manifest: dict, info: DistInfo) -> None:
    geo = manifest.get("geometry") or {}
    um, fov = geo.get("um_per_px"), geo.get("fov_um")
    if not (um and fov) or not info.is_main:
        return
    text = model.image_encoder.contract.scale_warning(float(um), round(float(fov) / float(um)))
    if text:
        tqdm.write(f"warning: image encoder {model.cfg.image.name!r}: {text}")


def train(cfg: TrainConfig) -> RunResult | None:
    """Train, validate each epoch, test the best epoch on held-out donors, write the run directory.

    Under torchrun/srun every process trains on its shard of each epoch (DistributedSampler), the
    contrastive loss gathers features from all ranks (gather with gradients), and rank 0 validates,
    tests and writes the run directory; other ranks return None.
    """
    device = _device(cfg.device)
    info, device = init_distributed(device)
    try:
        result = _train(cfg, device, info)
        if info.enabled:
            torch.distributed.barrier()  # the other ranks wait while rank 0 tests and writes the results
        return result
    finally:
        cleanup_distributed(info)


def _train(cfg: TrainConfig, device: torch.device, info: DistInfo) -> RunResult | None:
    t0 = time.time()
    seed_everything(cfg.seed)
    if info.is_main:
        data_path = _resolve_dataset(cfg)
    if info.enabled:
        # Rank 0 builds the default dataset (if needed) first; the others then find it in the cache.
        torch.distributed.barrier()
        if not info.is_main:
            data_path = _resolve_dataset(cfg)
    manifest = read_manifest(data_path)
    genes = manifest["genes"]
    if cfg.model.n_genes and cfg.model.n_genes != len(genes):
        msg = (f"the model expects {cfg.model.n_genes} genes (model.n_genes) but dataset {data_path} has "
               f"{len(genes)}; set model.n_genes=0 to take the panel size from the dataset, or use a matching dataset")
        raise HescapeConfigError(msg)
    ckpt = _load_init_checkpoint(cfg.model.init_checkpoint, genes) if cfg.model.init_checkpoint else None

    splits = {s["split"] for s in manifest["samples"]}
    for needed in ("train", "test"):
        if needed not in splits:
            msg = f"dataset {data_path} has no {needed!r} split (found {sorted(splits)}); rebuild it with donor splits"
            raise HescapeDataError(msg)
    # Raw counts and raw patches: each encoder prepares its own input with its contract.
    train_ds = PairedSpotDataset(data_path, "train")
    val_ds = PairedSpotDataset(data_path, "val") if "val" in splits else None
    test_ds = PairedSpotDataset(data_path, "test")
    if not cfg.recall_ks or min(cfg.recall_ks) < 1:
        msg = f"recall_ks must list positive k values (e.g. recall_ks=1,5,10), found {cfg.recall_ks!r}"
        raise HescapeConfigError(msg)
    if max(cfg.recall_ks) > len(test_ds):
        msg = (f"recall_ks={','.join(map(str, cfg.recall_ks))} asks for Recall@{max(cfg.recall_ks)} but the test split "
               f"has {len(test_ds)} spots; lower recall_ks or put more samples in the test split")
        raise HescapeConfigError(msg)

    model = _build_model(cfg, ckpt, genes, manifest.get("gene_ids"))
    _warn_scale(model, manifest, info)
    model.to(device)
    if info.enabled:
        model.loss_fn = create_loss(cfg.model.loss, rank=info.rank, world_size=info.world_size,
                                    gather_with_grad=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        ddp = model

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = (torch.utils.data.DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                                   shuffle=True, seed=cfg.seed, drop_last=True)
               if info.enabled else None)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None,
                                         sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers,
                                         collate_fn=_collate, generator=gen)
    if len(loader) == 0:
        msg = f"batch_size={cfg.batch_size} is larger than the training split ({len(train_ds)} spots); lower it"
        raise HescapeConfigError(msg)
    total_steps = cfg.epochs * len(loader)

    run_dir = Path(cfg.out_dir) / (cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {**config_to_dict(cfg), "data_resolved": str(data_path), "world_size": info.world_size}, indent=1))
        metrics_f = open(run_dir / "metrics.jsonl", "w")  # noqa: SIM115
    else:
        metrics_f = open(os.devnull, "w")  # noqa: SIM115
    ks = cfg.recall_ks
    best, best_epoch, step = -math.inf, -1, 0
    try:
        for epoch in range(cfg.epochs):
            model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and info.is_main),
                       leave=False)
            losses = []
            for batch in bar:
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total_steps, cfg.optim)
                images = batch["image"]
                if cfg.data.augment:
                    images = _augment(images, gen, cfg.data.stain_jitter, cfg.data.hed_jitter)
                out = ddp(images.to(device, non_blocking=True), batch["gexp"].to(device, non_blocking=True))
                loss_terms = model.loss(out)
                loss = sum(v for k, v in loss_terms.items() if k.endswith("_loss"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                model.clamp_logit_scale()  # after the step, as open_clip: the scale used is the scale stored
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", T=f"{1 / float(out['logit_scale'].detach()):.3f}")
                step += 1
            rec = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                   "logit_scale": model.logit_scale.detach().exp().item(), "lr": opt.param_groups[0]["lr"]}
            if not info.is_main:
                continue
            if val_ds is not None:
                v = retrieval_metrics(*embed(model, val_ds, device), ks=[k for k in ks if k <= len(val_ds)])
                rec.update(v["i2g"].as_dict("val_i2g_"))
                rec.update(v["g2i"].as_dict("val_g2i_"))
                score = float(np.mean([v["i2g"].mean_rank, v["g2i"].mean_rank]))
                score = -score  # lower mean rank is better: selection uses every query, not one k
            else:
                score = float(epoch)
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            if cfg.progress:
                extra = ""
                if val_ds is not None:
                    extra = f"  val R@5 i2g {rec.get('val_i2g_R@5', float('nan')):.3f} g2i {rec.get('val_g2i_R@5', float('nan')):.3f}"
                tqdm.write(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {rec['train_loss']:.4f}{extra}")
            if score > best:
                best, best_epoch = score, epoch + 1
                torch.save({"state_dict": model.state_dict(), "model_cfg": cfg_to_dict(model.recorded_cfg()),
                            "encoders": model.describe(), "genes": genes, "epoch": epoch + 1,
                            "train_config": config_to_dict(cfg)}, run_dir / "checkpoint.pt")

        if not info.is_main:
            return None
        best_state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(best_state["state_dict"])
        test = retrieval_metrics(*embed(model, test_ds, device), ks=ks)
        test_rec = {"split": "test", "best_epoch": best_epoch, **test["i2g"].as_dict("i2g_"),
                    **test["g2i"].as_dict("g2i_")}
        probe = colour_probe_baseline(train_ds, test_ds, ks) if cfg.probe else None
        if probe is not None:
            for d in ("i2g", "g2i"):
                test_rec.update({f"{d}_R@{k}_probe": v for k, v in probe[d].recall.items()})
                test_rec[f"{d}_mean_rank_probe"] = probe[d].mean_rank
        metrics_f.write(json.dumps(test_rec) + "\n")
    finally:
        metrics_f.close()
    donors = sorted(set(test_ds.donors))
    table = format_results_table(test, title=f"Test retrieval: full gallery of {len(test_ds)} spots from held-out "
                                             f"donor(s) {', '.join(donors)}; best epoch {best_epoch}/{cfg.epochs}",
                                 baseline=probe, baseline_name="colour probe")
    (run_dir / "results.md").write_text(table + "\n")
    (run_dir / "results.json").write_text(json.dumps(test_rec, indent=1))
    return RunResult(run_dir=run_dir, test=test, best_epoch=best_epoch, wall_s=time.time() - t0, probe=probe)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
