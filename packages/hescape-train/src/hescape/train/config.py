"""Training configuration: nested dataclasses, a config file (YAML/JSON), ``key=value`` overrides, and one
validation mechanism declared with the fields.

Every field is declared with :func:`option`: its default, its help text (``hescape-train --help``) and its
constraints (range, choices, a path check). :func:`validate_config` checks all of them in one pass and raises
:class:`HescapeConfigError` with one line for the first field that breaks its constraint. It needs no heavy import
(no torch) and touches nothing on disk, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HescapeConfigError

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "LogConfig", "TrainConfig", "PRESETS", "load_config", "config_to_dict",
           "config_from_dict", "describe_options", "validate_config", "option", "LOSSES", "PROJECTIONS",
           "FINETUNE_MODES", "BATCH_SAMPLING", "GENE_NORMALISATION", "RESUMABLE_KEYS", "resume_config", "apply_overrides"]

#: Choices mirrored from hescape-models (``hescape.models.losses._fused._LOSSES``, ``hescape.models.config``);
#: written out here so that validating a config imports no torch. A test checks they agree with hescape-models.
LOSSES = ("clip", "siglip")
PROJECTIONS = ("linear", "mlp", "transformer")
FINETUNE_MODES = ("full", "frozen", "lora")
#: ``data.batch_sampling`` (hescape.train.sampler) and ``data.gene_normalisation`` (hescape.data.gene_norm).
BATCH_SAMPLING = ("random", "within_sample", "balanced")
GENE_NORMALISATION = ("none", "sample_mean")

#: Keys a ``--resume`` may change: they do not change what is computed.
RESUMABLE_KEYS = ("progress", "data.num_workers", "data.feature_cache_dir", "log.tensorboard", "log.wandb")

#: Training presets (``preset=NAME``): values applied before a config file and the ``key=value`` overrides, so any
#: of them can still be overridden. ``demo`` is the defaults of :class:`TrainConfig` (the small CPU model on the
#: embedded synthetic dataset). ``paper`` is the protocol of the HESCAPE paper, section 8.1 ("Implementation
#: details"): d = 128, a global batch of 256 (the paper: 4 GPUs × 64), 20,000 steps with 780 warm-up steps, AdamW
#: β = (0.9, 0.95), learning rate 1e-5 with cosine decay, weight decay 0.01, gradient clipping 5.0, CLIP loss, MLP
#: projection heads, the image encoder with LoRA on its attention and the gene encoder frozen (the MLP baseline
#: trains from scratch) — the ``paper`` model preset of hescape-models (UNI + MLP; choose others with
#: ``model.image=`` / ``model.gene=``). The paper does not state how often it validated; we validate and checkpoint
#: every 1,000 steps (``eval_every``, ``checkpoint_every``).
PRESETS: dict[str, dict[str, object]] = {
    "demo": {},
    "paper": {
        "model.name": "paper", "model.embed_dim": 128, "model.projection": "mlp", "model.loss": "clip",
        "global_batch_size": 256, "max_steps": 20_000, "eval_every": 1_000, "checkpoint_every": 1_000,
        "optim.lr": 1e-5, "optim.warmup_steps": 780, "optim.beta1": 0.9, "optim.beta2": 0.95,
        "optim.weight_decay": 0.01, "optim.grad_clip": 5.0,
    },
}


# -- constraints -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """Constraints of one field; every one given must hold. ``None`` values pass when the field is optional."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    what: str = "value"  # the noun of a choice refusal ("finetune mode" → "unknown finetune mode 'x'")
    fn: Callable[[str, typing.Any], str | None] | None = None  # custom check: an error message or None
    example: str = ""  # a valid setting, shown in the fix


def option(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING, **check):  # noqa: A002
    """A config field: ``default`` (or ``factory``), ``help`` for ``--help``, constraints as :class:`Check` fields."""
    meta = {"help": help, "check": Check(**check)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _bound_text(c: Check) -> str:
    parts = []
    if c.gt is not None:
        parts.append(f"> {c.gt:g}")
    if c.ge is not None:
        parts.append(f">= {c.ge:g}")
    if c.lt is not None:
        parts.append(f"< {c.lt:g}")
    return " and ".join(parts)


def _check_value(key: str, value, c: Check) -> str | None:
    """The refusal message for ``value`` of ``key`` under ``c``, or None when it passes."""
    if value is None:
        return None
    if c.choices is not None and value not in c.choices:
        close = difflib.get_close_matches(str(value), list(c.choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}: unknown {c.what} {value!r}; expected one of {', '.join(c.choices)}{hint}"
    numbers = value if isinstance(value, tuple) else (value,)
    for v in numbers:
        if isinstance(v, bool) or not isinstance(v, int | float):
            break
        bound = _bound_text(c)
        finite = not (isinstance(v, float) and not math.isfinite(v))
        ok = finite and (c.gt is None or v > c.gt) and (c.ge is None or v >= c.ge) and (c.lt is None or v < c.lt)
        if not ok:
            expected = f"a finite number {bound}".rstrip() if bound else "a finite number"
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            fix = f" (e.g. {c.example})" if c.example else ""
            return f"{key}={shown}: expected {expected}{fix}"
    if c.fn is not None:
        return c.fn(key, value)
    return None


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_out_dir(key: str, value: str) -> str | None:
    if not value:
        return f"{key}: expected a directory path, found an empty string (e.g. out_dir=runs)"
    anc = _nearest_existing(Path(value))
    if not anc.is_dir():
        return f"{key}={value!r}: cannot create run directories there, {anc} is not a directory; choose another out_dir"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"{key}={value!r}: {anc} is not writable; choose a writable out_dir"
    try:  # root passes os.access everywhere: try an anonymous file (read-only mounts, quotas)
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        return f"{key}={value!r}: {anc} is not writable ({e.strerror}); choose a writable out_dir"
    return None


def _check_run_name(key: str, value: str) -> str | None:
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if value in ("", ".", "..") or any(s in value for s in seps) or "\0" in value:
        return (f"{key}={value!r}: expected one directory name inside out_dir (no path separator, not '.' or '..'); "
                "put parent folders in out_dir instead")
    return None


#: Options whose path must exist (checked with :func:`_check_existing`).
_PATH_KEYS = ("data.path", "model.init_checkpoint")


def _check_existing(what: str, fix: str) -> Callable[[str, str], str | None]:
    def check(key: str, value: str) -> str | None:
        if value and not Path(value).exists():
            where = "" if os.path.isabs(value) else f" (resolved against the current directory: {os.path.abspath(value)})"
            return f"{key}={value!r} does not exist{where}; {fix}"
        return None

    check.__doc__ = f"{what} must exist"
    return check


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_device(key: str, value: str) -> str | None:
    if not _DEVICE.match(value):
        return f"{key}={value!r} is not a device; expected auto, cpu, cuda or cuda:N"
    return None


def _check_recall_ks(key: str, value: tuple) -> str | None:
    if not value or min(value) < 1:
        return f"recall_ks must list positive k values (e.g. recall_ks=1,5,10), found {value!r}"
    if len(set(value)) != len(value):
        twice = sorted({k for k in value if value.count(k) > 1})
        return f"recall_ks lists {', '.join(map(str, twice))} twice; give each k once (e.g. recall_ks=1,5,10)"
    return None


# -- the configuration ---------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    path: str | None = option(None, "dataset directory (manifest.json); empty = the embedded synthetic default, "
                                    "built and cached",
                              fn=_check_existing("data.path", "give the directory of a HESCAPE dataset (it holds "
                                                 "manifest.json), or leave data.path empty to use the embedded "
                                                 "synthetic default"))
    panel: str = option("human-breast-panel", "gene panel of the embedded synthetic default")
    augment: bool = option(True, "random flips and 90° rotations of training patches")
    stain_jitter: float = option(0.1, "sd of the per-patch, per-channel optical-density scale (0 disables)", ge=0,
                                 example="data.stain_jitter=0.1")
    hed_jitter: float = option(0.4, "sd of the per-patch log haematoxylin / eosin amount (HED; 0 disables)", ge=0,
                               example="data.hed_jitter=0.4")
    num_workers: int = option(0, "DataLoader worker processes (results do not depend on it)", ge=0,
                              example="data.num_workers=4")
    batch_sampling: str = option("random", "which rows share a step: random | within_sample (every batch from one "
                                           "sample) | balanced (samples in equal shares per batch)",
                                 choices=BATCH_SAMPLING, what="batch sampling")
    gene_normalisation: str = option("none", "per-sample expression correction before the gene encoder: none | "
                                             "sample_mean (each sample's gene means scaled to the training split's)",
                                     choices=GENE_NORMALISATION, what="gene normalisation")
    feature_cache: str = option("auto", "cache the features of a frozen trunk whose input is deterministic (the "
                                        "gene tower; the image tower when data.augment=false): auto | on (refuse "
                                        "when no tower can be cached) | off", choices=("auto", "on", "off"),
                                what="feature_cache setting")
    feature_cache_dir: str | None = option(None, "where feature caches live; empty = $HESCAPE_CACHE_DIR/features "
                                                 "(else ~/.cache/hescape/features)")


@dataclass
class ModelConfig:
    name: str = option("vit_mlp_nano", "model preset (hescape.models.list_models()); image/gene override its towers")
    image: str | None = option(None, "image encoder (hescape-models list); empty = the preset's")
    gene: str | None = option(None, "gene encoder (hescape-models list); empty = the preset's")
    image_weights: str | None = option(None, "published image weights: a file or directory, or hf; empty = the "
                                             "preset's")
    gene_weights: str | None = option(None, "published gene-encoder weights (file/directory); DRVI instead takes "
                                            "model.gene_options='{\"model_dir\": DIR}'")
    image_options: dict | None = option(None, 'image encoder builder options (JSON, e.g. {"pooling": "cls+mean"})')
    gene_options: dict | None = option(None, 'gene encoder builder options (e.g. {"vocabulary": "model.h5ad"})')
    image_finetune: str | None = option(None, "full | frozen | lora; empty = the preset's", choices=FINETUNE_MODES,
                                        what="finetune mode")
    gene_finetune: str | None = option(None, "full | frozen | lora; empty = the preset's", choices=FINETUNE_MODES,
                                       what="finetune mode")
    lora_rank: int = option(8, "LoRA rank of a lora tower (the reference: 8)", gt=0, example="model.lora_rank=8")
    lora_alpha: float = option(16.0, "LoRA alpha (the reference: 16)", gt=0, example="model.lora_alpha=16")
    image_lora_targets: tuple[str, ...] = option((), "image modules LoRA adapts (name suffixes); empty = the encoder's "
                                                     "(ViTs: attn.qkv,attn.proj)")
    gene_lora_targets: tuple[str, ...] = option((), "gene modules LoRA adapts; empty = the encoder's (Nicheformer: "
                                                    "self_attn.out_proj,linear1,linear2)")
    loss: str = option("clip", "contrastive loss: clip | siglip", choices=LOSSES, what="loss")
    embed_dim: int = option(128, "shared embedding size", gt=0, example="model.embed_dim=128")
    projection: str = option("mlp", "projection head of both towers: mlp | linear | transformer", choices=PROJECTIONS,
                             what="projection")
    image_projection: str | None = option(None, "image head only (the paper's ablation); empty = projection",
                                          choices=PROJECTIONS, what="projection")
    n_genes: int = option(0, "gene-panel size the model expects; 0 = take it from the dataset", ge=0,
                          example="model.n_genes=0")
    init_checkpoint: str | None = option(None, "start from this run directory or checkpoint (same gene panel)",
                                         fn=_check_existing("model.init_checkpoint",
                                                            "give a run directory or a checkpoint of an earlier run"))


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate (AdamW)", gt=0, example="optim.lr=1e-3")
    weight_decay: float = option(0.01, "AdamW weight decay (the paper: 0.01); none on biases, norms, tokens", ge=0,
                                 example="optim.weight_decay=0.01")
    beta1: float = option(0.9, "AdamW beta1 (the paper: 0.9)", ge=0, lt=1, example="optim.beta1=0.9")
    beta2: float = option(0.95, "AdamW beta2 (the paper: 0.95)", ge=0, lt=1, example="optim.beta2=0.95")
    warmup_steps: int = option(30, "linear warm-up steps, then cosine decay to 0", ge=0, example="optim.warmup_steps=30")
    grad_clip: float = option(5.0, "gradient-norm clipping (the paper: 5.0); 0 disables", ge=0,
                              example="optim.grad_clip=5.0")


@dataclass
class LogConfig:
    tensorboard: bool = option(False, "also write TensorBoard event files to RUN_DIR/tensorboard (needs tensorboard)")
    wandb: bool = option(False, "also log to Weights & Biases (needs wandb; offline unless you are logged in)")
    wandb_project: str = option("hescape", "Weights & Biases project")


@dataclass
class TrainConfig:
    data: DataConfig = option(help="dataset options", factory=DataConfig)
    model: ModelConfig = option(help="model options", factory=ModelConfig)
    optim: OptimConfig = option(help="optimiser options", factory=OptimConfig)
    log: LogConfig = option(help="experiment trackers", factory=LogConfig)
    preset: str = option("demo", "training preset applied before all other options: demo | paper (section 8.1 of "
                                 "the HESCAPE paper)", choices=tuple(PRESETS), what="preset")
    epochs: int = option(16, "passes over the training split (ignored when max_steps > 0)", gt=0, example="epochs=16")
    max_steps: int = option(0, "train for this many optimiser steps (the paper: 20000); 0 = epochs decide", ge=0,
                            example="max_steps=20000")
    eval_every: int = option(0, "validate (and checkpoint) every N steps; 0 = at each epoch end", ge=0,
                             example="eval_every=1000")
    batch_size: int = option(64, "spots per step per process (ignored when global_batch_size > 0)", gt=0,
                             example="batch_size=64")
    global_batch_size: int = option(0, "spots per step over all processes (split evenly; the paper: 256); 0 = "
                                       "batch_size per process", ge=0, example="global_batch_size=256")
    local_loss: bool = option(False, "distributed runs: each process scores its own rows against all columns "
                                     "(open_clip's --local-loss; same loss, less work per process)")
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16; the loss is always "
                                    "computed in fp32", choices=("auto", "fp32", "bf16"), what="precision")
    seed: int = option(0, "seed of model init, sampling and augmentation (0 <= seed < 2**32, NumPy's range)", ge=0,
                       lt=2**32, example="seed=0")
    device: str = option("auto", "auto | cpu | cuda | cuda:N", fn=_check_device)
    out_dir: str = option("runs", "parent directory of run directories", fn=_check_out_dir)
    run_name: str | None = option(None, "run directory name inside out_dir; empty = timestamp", fn=_check_run_name)
    checkpoint_every: int = option(1000, "also checkpoint every N optimiser steps (0 = at epoch ends only)", ge=0,
                                   example="checkpoint_every=1000")
    log_every: int = option(10, "write a steps.jsonl/csv line every N steps", gt=0, example="log_every=10")
    recall_ks: tuple[int, ...] = option((1, 5, 10), "k values of the Recall@k table", fn=_check_recall_ks)
    sample_centring: bool = option(False, "subtract each sample's mean embedding (per minibatch in training, per "
                                          "sample in evaluation) before the loss and retrieval, both modalities")
    probe: bool = option(True, "also rank the test split with the colour-statistics probe (hescape.eval.baselines)")
    progress: bool = option(True, "show progress bars")


_SECTIONS = ((TrainConfig, ""), (DataConfig, "data."), (ModelConfig, "model."), (OptimConfig, "optim."),
             (LogConfig, "log."))


# -- reading and writing --------------------------------------------------------------------------------------------

def _resolve(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str):
    """Convert a YAML value or an override string to the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
        if tp is dict or origin is dict:
            if isinstance(value, dict):
                return value
            parsed = json.loads(value) if isinstance(value, str) else None
            if isinstance(parsed, dict):
                return parsed
            raise ValueError
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_coerce(v, args[0], key) for v in items if str(v).strip() != "")
    except (TypeError, ValueError):
        pass
    else:
        if tp not in (bool, int, float, str) and origin is not tuple:
            return value
    msg = f"config key {key!r}: expected a value of type {getattr(tp, '__name__', tp)}, found {value!r}"
    raise HescapeConfigError(msg)


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _resolve(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


#: Keys of earlier versions and where their choice lives now.
_MOVED = {
    "data.gene_transform": "gene preprocessing is now the gene encoder's input contract (see `hescape-models list`); "
                           "choose the encoder with model.gene=…",
}


def _unknown_key(key: str) -> HescapeConfigError:
    if key in _MOVED:
        return HescapeConfigError(f"unknown config key {key!r}: {_MOVED[key]}")
    keys = _all_keys(TrainConfig)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return HescapeConfigError(
        f"unknown config key {key!r}.{hint} Valid keys: {', '.join(keys)} (see `hescape-train --help`)"
    )


def _set(obj, dotted: str, value, full_key: str) -> None:
    head, _, rest = dotted.partition(".")
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise _unknown_key(full_key)
    tp = _resolve(type(obj))[head]
    if dataclasses.is_dataclass(tp):
        if rest:
            _set(getattr(obj, head), rest, value, full_key)
            return
        if not isinstance(value, dict):
            msg = f"config key {full_key!r} is a section; expected a mapping of its keys, found {value!r}"
            raise HescapeConfigError(msg)
        for k, v in value.items():
            _set(getattr(obj, head), k, v, f"{full_key}.{k}")
        return
    if rest:
        raise _unknown_key(full_key)
    setattr(obj, head, _coerce(value, tp, full_key))


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply ``key=value`` strings (dotted keys) to ``cfg`` in place; returns it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"override {item!r}: expected key=value (e.g. epochs=5 or optim.lr=3e-4)"
            raise HescapeConfigError(msg)
        _set(cfg, key.strip(), value.strip(), key.strip())
    return cfg


def load_config(config_file: str | None = None, overrides: list[str] = (), *, validate: bool = True) -> TrainConfig:
    """Defaults, then the YAML/JSON ``config_file``, then ``key=value`` overrides (dotted keys), then
    :func:`validate_config` (unless ``validate=False``).

    A relative path in ``config_file`` (``data.path``, ``out_dir``, ``model.*_weights``…) means what it means on
    the command line: relative to the current directory, not to the file's folder (a file's values are overrides
    like any other, and a run's ``config.json`` records them as given).

    Raises
    ------
    HescapeConfigError
        An unknown key, a value of the wrong type, a missing or malformed file, or a value out of its range (a
        value set by ``config_file`` names the file, and a missing relative path that exists beside the file says
        so).
    """
    data = _read_config_file(config_file) if config_file else {}
    cfg = TrainConfig()
    apply_preset(cfg, _preset_name(data, overrides))
    for k, v in data.items():
        _set(cfg, k, v, k)
    apply_overrides(cfg, overrides)
    if validate:
        try:
            validate_config(cfg)
        except HescapeConfigError as e:
            key = getattr(e, "key", None)
            overridden = {item.partition("=")[0].strip() for item in overrides}
            if not config_file or key not in _dotted_keys(data) or key in overridden:
                raise
            hint = file_relative_hint(key, _get(cfg, key), Path(config_file), "config file")
            msg = f"config file {config_file}: {e}{hint}"
            err = HescapeConfigError(msg)
            err.key = key
            raise err from None
    return cfg


def _dotted_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys a config mapping sets (``{"data": {"path": …}}`` → ``{"data.path"}``)."""
    sections = {p.rstrip(".") for _, p in _SECTIONS if p}
    out: set[str] = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out |= _dotted_keys(v, key + ".") if isinstance(v, dict) and key in sections else {key}
    return out


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def file_relative_hint(key: str | None, value, file: Path, noun: str) -> str:
    """A clause for the refusal of a missing relative path ``key=value`` given in ``file`` (a ``noun``: "config
    file", "grid file"), when that path exists relative to the file's folder (the likely mix-up); else ``""``."""
    if key not in _PATH_KEYS or not isinstance(value, str) or not value or os.path.isabs(value):
        return ""
    folder = Path(os.path.abspath(file)).parent
    there = folder / value
    if Path(os.path.abspath(value)) == there or not there.exists():
        return ""
    return (f"; relative paths in a {noun} are read from the current directory ({os.getcwd()}), not from the "
            f"{noun}'s folder, where {there} exists: run from {folder} or give an absolute path")


def _preset_name(data: dict, overrides) -> str:
    """The preset a file and overrides ask for (the last override wins, as for any key)."""
    name = data.get("preset", "demo")
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "preset":
            name = value.strip()
    return name


def apply_preset(cfg: TrainConfig, name) -> TrainConfig:
    """Set the values of preset ``name`` (:data:`PRESETS`) on ``cfg``; returns it.

    Raises
    ------
    HescapeConfigError
        An unknown preset.
    """
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = f"preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}{hint}"
        raise HescapeConfigError(msg)
    cfg.preset = name
    for k, v in PRESETS[name].items():
        _set(cfg, k, v, k)
    return cfg


def _read_config_file(config_file) -> dict:
    import yaml

    p = Path(config_file)
    if not p.is_file():
        msg = f"config file {p} does not exist; pass an existing YAML or JSON file to --config"
        raise HescapeConfigError(msg)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        msg = f"config file {p} is not valid YAML/JSON: {' '.join(str(e).split())}"
        raise HescapeConfigError(msg) from None
    if not isinstance(data, dict):
        msg = f"config file {p}: expected a mapping of keys to values at the top level, found {type(data).__name__}"
        raise HescapeConfigError(msg)
    return data


def config_to_dict(cfg) -> dict:
    """Plain JSON-safe dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict, *, source: str = "config") -> TrainConfig:
    """Inverse of :func:`config_to_dict` (a run's ``config.json``); keys outside :class:`TrainConfig` are refused,
    except the run facts hescape-train itself adds (``data_resolved``, ``world_size``, ``format``)."""
    cfg = TrainConfig()
    if "preset" in d:
        try:
            apply_preset(cfg, d["preset"])
        except HescapeConfigError as e:
            msg = f"{source}: {e}"
            raise HescapeConfigError(msg) from None
    for k, v in d.items():
        if k in ("data_resolved", "world_size", "format"):
            continue
        try:
            _set(cfg, k, v, k)
        except HescapeConfigError as e:
            msg = f"{source}: {e}"
            raise HescapeConfigError(msg) from None
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Check every field of ``cfg`` against the constraints declared with it (:func:`option`).

    Raises
    ------
    HescapeConfigError
        One line naming the first key out of its range or choices, the value found, and a valid example.
    """
    for cls, prefix in _SECTIONS:
        obj = cfg if not prefix else getattr(cfg, prefix.rstrip("."))
        if not isinstance(obj, cls):
            msg = f"config section {prefix.rstrip('.')!r}: expected a {cls.__name__}, found {type(obj).__name__}"
            raise HescapeConfigError(msg)
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check is None or dataclasses.is_dataclass(_resolve(cls)[f.name]):
                continue
            problem = _check_value(prefix + f.name, getattr(obj, f.name), check)
            if problem:
                err = HescapeConfigError(problem)
                err.key = prefix + f.name  # the refused option (a config file's error names the file)
                raise err


def describe_options() -> str:
    """Every config key with its default and help (for ``--help``), read from the field declarations."""
    lines = []
    for cls, prefix in _SECTIONS:
        defaults = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_resolve(cls)[f.name]):
                continue
            val = getattr(defaults, f.name)
            val = ",".join(map(str, val)) if isinstance(val, tuple) else val
            lines.append(f"  {prefix + f.name:<22} {str(val):<20} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def resume_config(run_dir: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The configuration of the run in ``run_dir`` (its ``config.json``), with the few overrides a resume allows
    (:data:`~hescape.train.config.RESUMABLE_KEYS`), validated.

    Raises
    ------
    HescapeConfigError
        No run there, a damaged ``config.json``, or an override that would change what the run computes.
    """
    p = Path(run_dir)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        msg = (f"--resume {run_dir}: expected a run directory holding config.json, found "
               f"{'a directory without it' if p.is_dir() else 'nothing'}; give the run directory printed by the run")
        raise HescapeConfigError(msg)
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        msg = f"--resume {run_dir}: {cfg_file} cannot be read ({e}); the run directory is damaged"
        raise HescapeConfigError(msg) from None
    if not isinstance(data, dict):
        msg = f"--resume {run_dir}: {cfg_file} holds a {type(data).__name__}, expected a mapping"
        raise HescapeConfigError(msg)
    cfg = config_from_dict(data, source=str(cfg_file))
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            msg = (f"--resume continues the run with its own config.json; {key!r} cannot change (only "
                   f"{', '.join(RESUMABLE_KEYS)} can); start a new run (model.init_checkpoint={run_dir}) instead")
            raise HescapeConfigError(msg)
    apply_overrides(cfg, overrides)
    cfg.out_dir, cfg.run_name = str(p.parent), p.name
    validate_config(cfg)
    return cfg
