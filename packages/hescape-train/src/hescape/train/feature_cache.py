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

Temporary files are named ``.features.npy.tmp-<pid>-<host>-<random>`` (``.meta.json.tmp-…``) and their writer
holds an exclusive ``flock`` on each for as long as it writes it; the kernel drops the lock when the writer dies,
even by SIGKILL. Every use of a cache folder removes the temporaries whose lock is free (their writer is dead)
and that were made on this host or not modified for :data:`STALE_AFTER_S` (a guard for shared file systems whose
locks do not reach other hosts); a temporary a live process is writing is never touched, whichever process or
rank it is (the processes of a torchrun launch, or several runs of a sweep, may share one cache folder). A writer
creates and locks its temporary under a shared lock on the folder's ``.lock`` file, and the clean-up holds it
exclusively, so no temporary is ever seen between its creation and its lock. Temporaries of hescape-train 0.1
(``.features.npy.tmp-<pid>``, ``.meta.json.<random>.tmp``, written without a lock) are removed once they have
not been modified for :data:`STALE_AFTER_S`. Where there are no locks (no ``fcntl``, or a file system without
them) nothing is removed.

Training from the cache is only a different batch source (:class:`FeatureSource`): batches carry ``image_feat`` /
``gene_feat`` instead of patches / counts, and :class:`hescape.models.HescapeCLIP` runs only the heads for them.
The trunk in the training loop would compute the same values (a frozen trunk runs in eval mode), so cached and
uncached training agree up to float rounding of batched matrix products.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import _finite, fsync_dir
from .errors import HescapeConfigError
from .faults import fault_point

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no temporary is ever judged stale
    fcntl = None

__all__ = ["CACHE_FORMAT", "STALE_AFTER_S", "plan_cache", "tensor_digest", "fingerprint", "cached_features",
           "FeatureSource", "feature_cache_root", "remove_stale_temporaries"]

CACHE_FORMAT = "hescape-feature-cache/1"
#: Seconds without modification after which an unlocked temporary of another host, or an (unlockable) temporary
#: of hescape-train 0.1, counts as left by a dead writer: one day (a live writer modifies its file batch by batch).
STALE_AFTER_S = 24 * 3600
_LOCK_FILE = ".lock"
_TEMP = re.compile(r"^\.(features\.npy|meta\.json)\.tmp-(\d+)-(.+)-([0-9a-f]{8})$")
_LEGACY_TEMP = re.compile(r"^\.(features\.npy\.tmp-\d+|meta\.json\.[^.]+\.tmp)$")


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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "host")[:64] or "host"


@contextlib.contextmanager
def _folder_lock(folder: Path, exclusive: bool):
    """``flock`` on ``folder/.lock``: shared while a writer creates and locks its temporary, exclusive while
    :func:`remove_stale_temporaries` looks at them. Yields whether the lock is held: False where the lock file
    cannot be opened or the file system has no locks (the writer goes on; the clean-up then does nothing)."""
    fd = None
    with contextlib.suppress(OSError):
        try:
            fd = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: reading is enough for flock on a local file system
            fd = os.open(folder / _LOCK_FILE, os.O_RDONLY)
    held = False
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            held = True
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _new_temp(folder: Path, name: str):
    """A new temporary file for ``folder/name``, locked by this process until :func:`_commit` or :func:`_discard`.

    Returns ``(tmp_path, file)`` (opened ``r+b``, empty). Write through this file object only: on file systems that
    emulate ``flock`` with POSIX locks (NFS), closing any other descriptor of the file in this process would drop
    the lock.

    Raises
    ------
    OSError
        The folder cannot be written.
    """
    tmp = folder / f".{name}.tmp-{os.getpid()}-{_host()}-{secrets.token_hex(4)}"
    if fcntl is not None:
        with _folder_lock(folder, exclusive=False):
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            with contextlib.suppress(OSError):  # no locks on this file system: never judged stale, never removed
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    else:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "r+b")


def _commit(tmp: Path, f, target: Path) -> None:
    """Flush and fsync the temporary, rename it over ``target`` while still locked, then fsync the folder."""
    f.flush()
    os.fsync(f.fileno())
    os.replace(tmp, target)
    f.close()
    fsync_dir(target.parent)


def _discard(tmp: Path, f) -> None:
    tmp.unlink(missing_ok=True)
    f.close()


def _lock_is_free(path: Path) -> bool:
    """Whether nobody holds the ``flock`` of ``path`` (False when it cannot be opened or locked at all)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        return True
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers killed inside a cache write left in ``folder``; returns them.

    A temporary counts as stale when its writer's lock is free and it was made on this host or has not been
    modified for :data:`STALE_AFTER_S`; a temporary of hescape-train 0.1 (no lock) when it has not been modified
    for :data:`STALE_AFTER_S`. A temporary a live process is writing is never removed. Best effort: a folder that
    cannot be written (a read-only shared cache) or locked is left as it is.
    """
    folder = Path(folder)
    if fcntl is None:
        return []
    try:
        names = [e.name for e in os.scandir(folder) if _TEMP.match(e.name) or _LEGACY_TEMP.match(e.name)]
    except OSError:
        return []
    if not names:
        return []
    removed, host, now = [], _host(), time.time()
    with _folder_lock(folder, exclusive=True) as held:
        if not held:
            return []
        for name in names:
            path, m = folder / name, _TEMP.match(name)
            try:
                old = now - path.stat().st_mtime > STALE_AFTER_S
                if (m and _lock_is_free(path) and (m.group(3) == host or old)) or (not m and old):
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone meanwhile (renamed into place), or not ours to remove
                continue
    return removed


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
    remove_stale_temporaries(folder)  # what writers killed inside a write left here
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
    shape = (len(ds), width)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp, f = _new_temp(folder, "features.npy")
    except OSError as e:
        msg = (f"feature cache: cannot write {folder} ({e.strerror or e}); set data.feature_cache_dir to a writable "
               "folder, or data.feature_cache=off")
        raise HescapeConfigError(msg) from None
    arr = None
    try:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        f.flush()
        arr = np.memmap(f, dtype=np.float32, mode="r+", offset=f.tell(), shape=shape)  # maps the locked file
        _compute(model, tower, ds, device, amp_dtype, arr, batch_size, progress)
        arr.flush()
        fault_point("feature_cache_write")
        _commit(tmp, f, path)
    except BaseException:
        _discard(tmp, f)
        raise
    del arr  # unmapped after the rename: closing the map's descriptor could drop an NFS-emulated lock
    text = json.dumps(_finite({"key": key, **facts, "shape": list(shape), "sha256": _file_sha256(path)}), indent=1)
    tmp, f = _new_temp(folder, "meta.json")
    try:
        f.write((text + "\n").encode("utf-8"))
        _commit(tmp, f, meta)
    except BaseException:
        _discard(tmp, f)
        raise
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
