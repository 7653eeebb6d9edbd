"""Training configuration: nested dataclasses, a config file (YAML/JSON) and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import HescapeConfigError

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_config", "config_to_dict", "describe_options"]


@dataclass
class DataConfig:
    path: str | None = None  # dataset directory (manifest.json); empty = the embedded synthetic default, built and cached
    panel: str = "human-breast-panel"  # gene panel of the embedded synthetic default
    augment: bool = True  # random flips and 90° rotations of training patches
    stain_jitter: float = 0.1  # sd of the per-patch, per-channel optical-density scale (0 disables; needs augment)
    hed_jitter: float = 0.4  # sd of the per-patch log haematoxylin / eosin amount (HED augmentation; 0 disables)
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    name: str = "vit_mlp_nano"  # model preset (hescape.models.list_models()); image/gene below override its towers
    image: str | None = None  # image encoder (hescape-models list); empty = the preset's
    gene: str | None = None  # gene encoder (hescape-models list); empty = the preset's
    image_weights: str | None = None  # published image weights: a file or directory, or hf; empty = the preset's
    gene_weights: str | None = None  # published gene-encoder weights (file/directory; DRVI: its model directory)
    image_options: dict | None = None  # image encoder builder options (YAML mapping or JSON, e.g. {"pooling": "cls+mean"})
    gene_options: dict | None = None  # gene encoder builder options (e.g. {"vocabulary": "model.h5ad"})
    image_finetune: str | None = None  # full | frozen | lora; empty = the preset's
    gene_finetune: str | None = None  # full | frozen | lora; empty = the preset's
    lora_rank: int = 8  # LoRA rank of a lora tower (the reference: 8)
    lora_alpha: float = 16.0  # LoRA alpha (the reference: 16)
    loss: str = "clip"  # contrastive loss: clip | siglip
    embed_dim: int = 128  # shared embedding size
    projection: str = "mlp"  # projection head of both towers: mlp | linear | transformer
    image_projection: str | None = None  # image head only (the paper's ablation); empty = projection
    n_genes: int = 0  # gene-panel size the model expects; 0 = take it from the dataset
    init_checkpoint: str | None = None  # start from this checkpoint.pt (its gene panel must match the dataset)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay (the paper: 0.01)
    beta1: float = 0.9  # AdamW beta1 (the paper: 0.9)
    beta2: float = 0.95  # AdamW beta2 (the paper: 0.95)
    warmup_steps: int = 30  # linear warm-up steps, then cosine decay to 0
    grad_clip: float = 5.0  # gradient-norm clipping (the paper: 5.0); 0 disables


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)  # dataset options
    model: ModelConfig = field(default_factory=ModelConfig)  # model options
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimiser options
    epochs: int = 16  # passes over the training split
    batch_size: int = 64  # spots per step (per process)
    seed: int = 0  # seed of model init, sampling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"  # parent directory of run directories
    run_name: str | None = None  # run directory name; empty = timestamp
    recall_ks: tuple[int, ...] = (1, 5, 10)  # k values of the Recall@k table
    probe: bool = True  # also rank the test split with the colour-statistics probe (hescape.eval.baselines)
    progress: bool = True  # show progress bars


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


def load_config(config_file: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML/JSON ``config_file``, then ``key=value`` overrides (dotted keys)."""
    cfg = TrainConfig()
    if config_file:
        p = Path(config_file)
        if not p.is_file():
            msg = f"config file {p} does not exist; pass an existing YAML or JSON file to --config"
            raise HescapeConfigError(msg)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            msg = f"config file {p} is not valid YAML/JSON: {e}"
            raise HescapeConfigError(msg) from None
        if not isinstance(data, dict):
            msg = f"config file {p}: expected a mapping of keys to values at the top level, found {type(data).__name__}"
            raise HescapeConfigError(msg)
        for k, v in data.items():
            _set(cfg, k, v, k)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"override {item!r}: expected key=value (e.g. epochs=5 or optim.lr=3e-4)"
            raise HescapeConfigError(msg)
        _set(cfg, key.strip(), value.strip(), key.strip())
    return cfg


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def describe_options() -> str:
    """Every config key with its default and comment (for --help), read from this module's source."""
    import inspect

    lines = []
    for cls, prefix in ((TrainConfig, ""), (DataConfig, "data."), (ModelConfig, "model."), (OptimConfig, "optim.")):
        src = inspect.getsource(cls).splitlines()
        comments = {}
        for ln in src:
            s = ln.strip()
            if ":" in s and "#" in s and not s.startswith(("#", "class", '"')):
                comments[s.split(":")[0]] = s.split("#", 1)[1].strip()
        defaults = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_resolve(cls)[f.name]):
                continue
            val = getattr(defaults, f.name)
            val = ",".join(map(str, val)) if isinstance(val, tuple) else val
            lines.append(f"  {prefix + f.name:<22} {str(val):<20} {comments.get(f.name, '')}")
    return "\n".join(lines)
