"""Frozen-trunk feature cache: compute a frozen tower's trunk features once, then train the heads from them.

A tower is cached when its trunk is frozen (``finetune="frozen"``: no gradient, eval mode, so its output is a fixed
function of its input) and its input is deterministic: always for the gene tower (raw counts), for the image tower
only when ``data.augment=false`` (flips, rotations and stain jitter change the input every step), and never when
its head is the transformer projection (it reads every token, not the pooled features). ``data.feature_cache``:
``auto`` caches every such tower, ``on`` refuses a run with none, ``off`` never caches.

The features of each (tower, dataset split) are one ``(N, D)`` float32 ``.npy`` file, memory-mapped, under
``$HESCAPE_CACHE_DIR/features/<fingerprint>/`` (:func:`hescape.data.build.cache_dir`). The fingerprint is the
SHA-256 of everything the features depend on: the cache format, the encoder's name and class, its input contract
and builder options, its weights tag and a digest of every tensor of the trunk's ``state_dict`` (so a change of
weights rebuilds, whatever the file is called), the autocast dtype, and the dataset's rows (the manifest's shard
checksums and gene panel, the split, every row's sample and spot id). A cache is written to a temporary file in
the same folder, flushed, fsynced and renamed, with its ``meta.json`` last: a killed build leaves no cache that
looks complete. ``meta.json`` also records the SHA-256 of the features file, checked at every use: a cache whose
file was changed or damaged after it was written is rebuilt (with a warning), never trained on.

Training from the cache is only a different batch source (:class:`FeatureSource`): batches carry ``image_feat`` /
``gene_feat`` instead of patches / counts, and :class:`hescape.models.HescapeCLIP` runs only the heads for them.
The trunk in the training loop would compute the same values (a frozen trunk runs in eval mode), so cached and
uncached training agree up to float rounding of batched matrix products.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_json
from .errors import HescapeConfigError

__all__ = ["CACHE_FORMAT", "plan_cache", "tensor_digest", "fingerprint", "cached_features", "FeatureSource",
           "feature_cache_root"]

CACHE_FORMAT = "hescape-feature-cache/1"


def feature_cache_root() -> Path:
    """``$HESCAPE_CACHE_DIR/features`` (else ``~/.cache/hescape/features``)."""
    from hescape.data.build import cache_dir

    return cache_dir() / "features"


def plan_cache(model, cfg) -> list[str]:
    """The towers (``"image"``, ``"gene"``) whose trunk features this run takes from the cache.

    Raises
    ------
    HescapeConfigError
        ``data.feature_cache=on`` and no tower can be cached (the reasons are named).
    """
    mode = cfg.data.feature_cache
    if mode == "off":
        return []
    towers, why = [], {}
    for key, enc, proj in (("image", model.image_encoder, model.image_proj),
                           ("gene", model.gene_encoder, model.gene_proj)):
        if getattr(enc, "finetune_mode", "full") != "frozen":
            why[key] = f"its trunk trains (finetune={getattr(enc, 'finetune_mode', 'full')})"
        elif key == "image" and cfg.data.augment:
            why[key] = "its input is augmented (data.augment=true)"
        elif proj.wants_tokens:
            why[key] = "its transformer head reads every token"
        else:
            towers.append(key)
    if mode == "on" and not towers:
        reasons = "; ".join(f"{k} tower: {v}" for k, v in why.items())
        msg = (f"data.feature_cache=on but no tower can be cached ({reasons}); freeze a tower "
               "(model.image_finetune=frozen / model.gene_finetune=frozen, and data.augment=false for the image), "
               "or use data.feature_cache=auto")
        raise HescapeConfigError(msg)
    return towers


def tensor_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``module.state_dict()`` (name, dtype, shape and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dataset_identity(ds, tower: str) -> dict:
    rows = hashlib.sha256()
    for sample, spot in zip(ds.samples, ds.spot_ids, strict=True):
        rows.update(f"{sample}\x00{spot}\x01".encode())
    manifest = ds.manifest
    # counts scaled per sample (hescape.data.gene_norm) change the gene tower's input only
    transform = getattr(ds, "count_transform", None) if tower == "gene" else None
    return {**({"count_transform": transform} if transform else {}), "shards": [s.get("sha256") or f"{s['file']}:{s['rows']}" for s in manifest["shards"]],
            "genes": hashlib.sha256(json.dumps(list(manifest["genes"])).encode()).hexdigest(),
            "n_rows": len(ds), "rows": rows.hexdigest()}


def fingerprint(model, tower: str, ds, amp_dtype: torch.dtype | None) -> tuple[str, dict]:
    """The cache key of ``tower``'s trunk features of every row of ``ds``, and what it was computed from."""
    enc = model.image_encoder if tower == "image" else model.gene_encoder
    tcfg = model.cfg.image if tower == "image" else model.cfg.gene
    facts = {"format": CACHE_FORMAT, "tower": tower, "encoder": enc.encoder_name,
             "class": f"{type(enc).__module__}.{type(enc).__qualname__}", "contract": enc.contract.to_dict(),
             "options": tcfg.options, "weights": enc.weights_tag, "state": tensor_digest(enc),
             "autocast": str(amp_dtype), "dataset": _dataset_identity(ds, tower)}
    key = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
    return key, facts


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def _compute(model, tower: str, ds, device: torch.device, amp_dtype, out: np.ndarray, batch_size: int,
             progress: bool) -> None:
    model.eval()
    fn = model.image_features if tower == "image" else model.gene_features
    n = len(ds)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for start in tqdm(range(0, n, batch_size), desc=f"caching {tower} features", unit="batch",
                          disable=not progress, leave=False):
            idx = np.arange(start, min(n, start + batch_size))
            if tower == "image":
                x = torch.stack([ds[int(i)]["image"] for i in idx])
            else:
                x = torch.from_numpy(ds.counts(idx))
            out[idx] = fn(x.to(device)).float().cpu().numpy()


def cached_features(model, tower: str, ds, device: torch.device, amp_dtype: torch.dtype | None = None, *,
                    root: str | os.PathLike | None = None, batch_size: int = 256, progress: bool = False
                    ) -> tuple[np.ndarray, Path, bool]:
    """The ``(len(ds), D)`` trunk features of ``tower`` for every row of ``ds`` (memory-mapped, read-only), from the
    cache or computed and cached now. Returns the array, its folder and whether it was computed now."""
    key, facts = fingerprint(model, tower, ds, amp_dtype)
    folder = Path(root) if root is not None else feature_cache_root()
    folder = folder / key[:40]
    path, meta = folder / "features.npy", folder / "meta.json"
    if meta.is_file() and path.is_file():
        try:
            recorded = json.loads(meta.read_text())
            arr = np.load(path, mmap_mode="r")
            if (recorded.get("key") == key and arr.shape[0] == len(ds) and arr.dtype == np.float32
                    and recorded.get("sha256") == _file_sha256(path)):
                return arr, folder, False
            del arr
        except (OSError, ValueError):
            pass
        warnings.warn(f"feature cache {folder} does not match its record (changed or damaged file); it is rebuilt",
                      stacklevel=2)
    enc = model.image_encoder if tower == "image" else model.gene_encoder
    width = int(enc.out_dim)
    tmp = folder / f".features.npy.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ds), width))
    except OSError as e:
        msg = (f"feature cache: cannot write {folder} ({e.strerror or e}); set data.feature_cache_dir to a writable "
               "folder, or data.feature_cache=off")
        raise HescapeConfigError(msg) from None
    try:
        _compute(model, tower, ds, device, amp_dtype, arr, batch_size, progress)
        arr.flush()
        del arr
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(meta, {"key": key, **facts, "shape": [len(ds), width], "sha256": _file_sha256(path)})
    return np.load(path, mmap_mode="r"), folder, True


def _file_sha256(path: Path) -> str:
    """SHA-256 of a cache file (checked at every use: a changed or damaged cache is never trained on)."""
    from hescape.models.weights import file_digest

    return file_digest(path)


class FeatureSource(torch.utils.data.Dataset):
    """A batch source over ``ds`` whose batches carry cached trunk features for the cached towers.

    ``__getitems__(indices)`` (used by ``torch.utils.data.DataLoader`` with a batch sampler) returns one batch dict:
    ``image_feat`` ``(B, D_img)`` or ``image`` ``(B, 3, H, W)`` uint8, and ``gene_feat`` ``(B, D_gene)`` or ``gexp``
    ``(B, G)`` raw counts; rows are gathered with one fancy index per array (no decoding of patches whose features
    are cached, no Python loop over counts).
    """

    def __init__(self, ds, image_feat: np.ndarray | None = None, gene_feat: np.ndarray | None = None):
        self.ds, self.image_feat, self.gene_feat = ds, image_feat, gene_feat

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([idx]).items()}

    def __getitems__(self, indices) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        out = {}
        if self.image_feat is not None:
            out["image_feat"] = torch.from_numpy(np.ascontiguousarray(self.image_feat[idx]))
        else:
            out["image"] = torch.stack([self.ds[int(i)]["image"] for i in idx])
        if self.gene_feat is not None:
            out["gene_feat"] = torch.from_numpy(np.ascontiguousarray(self.gene_feat[idx]))
        else:
            out["gexp"] = torch.from_numpy(self.ds.counts(idx))
        out["index"] = torch.from_numpy(idx)
        return out
