"""The ``hescape-models`` command: list the registered encoders, pretrain a DRVI gene encoder.

::

    hescape-models list [--modality image|gene] [--json]
    hescape-models pretrain-drvi DATASET --out DIR [--split train] [--n-latent 128] [--layers 128 128]
                                 [--max-epochs N] [--seed 0] [--covariate sample|donor|none] [--overwrite]

Input and usage errors end in one line on stderr, ``hescape-models: error: ...`` (expected, found, fix), and
exit code 2; ``pretrain-drvi`` writes its directory atomically, so nothing is left behind then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .contracts import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD
from .errors import HescapeModelError

__all__ = ["main", "format_encoder_table"]

PROG = "hescape-models"


def _norm_name(mean, std) -> str:
    pair = (tuple(mean), tuple(std))
    if pair == (IMAGENET_MEAN, IMAGENET_STD):
        return "ImageNet mean/std"
    if pair == (OPENAI_MEAN, OPENAI_STD):
        return "OpenAI mean/std"
    return "mean " + "/".join(f"{v:.3g}" for v in mean) + " std " + "/".join(f"{v:.3g}" for v in std)


def _contract_text(c: dict[str, Any]) -> str:
    if c.get("kind") == "image":
        size = f"{c['input_size']} px" + (f" (resize {c['resize_size']})" if c.get("resize_size") else "")
        scale = f", {c['um_per_px']:g} µm/px" if c.get("um_per_px") else ""
        return f"{size} {c['interpolation']}, {_norm_name(c['mean'], c['std'])}{scale}"
    opts = "".join(f", {k}={v}" for k, v in sorted((c.get("options") or {}).items()))
    total = f" (target_sum {c['target_sum']:g})" if c.get("preprocessing") not in ("raw", "log1p") else ""
    return f"{c['preprocessing']}{total}, vocabulary {c['vocabulary']}{opts}"


def _weights_text(w: dict[str, Any] | None) -> str:
    if not w:
        return "-"
    where = w.get("hf_id") or (w.get("files") or ["local file"])[0]
    return where + (" (gated)" if w.get("gated") else "")


def format_encoder_table(entries: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`~hescape.models.zoo.describe_encoders` entries, one line per encoder."""
    head = ("modality", "name", "out_dim", "params", "input contract", "weights", "description")
    rows = [head]
    for e in entries:
        rows.append((e["modality"], e["name"], "-" if e.get("out_dim") is None else str(e["out_dim"]),
                     "-" if e.get("params") is None else f"{e['params']:,}", _contract_text(e["contract"]),
                     _weights_text(e.get("weights")), e.get("description") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]]).rstrip()
                     for r in rows)


def _list(a: argparse.Namespace) -> int:
    from .zoo import describe_encoders

    entries = [e for e in describe_encoders() if a.modality in (None, e["modality"])]
    if a.json:
        print(json.dumps(entries, indent=1, ensure_ascii=False))
    else:
        print(format_encoder_table(entries))
    return 0


def _pretrain_drvi(a: argparse.Namespace) -> int:
    from .gene.drvi import pretrain_drvi

    out = pretrain_drvi(a.dataset, a.out, split=a.split, n_latent=a.n_latent, layers=tuple(a.layers),
                        max_epochs=a.max_epochs, seed=a.seed, covariate=None if a.covariate == "none" else a.covariate,
                        batch_size=a.batch_size, accelerator=a.accelerator, overwrite=a.overwrite,
                        progress=not a.no_progress)
    print(f"DRVI model directory: {out}")
    print(f'use it as the gene encoder: create_gene_encoder("drvi", panel=<the dataset\'s genes>, model_dir="{out}")')
    return 0


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``hescape-models: error: ...``, exit code 2)."""

    def error(self, message: str):
        msg = f"{message} (see {self.prog} --help)"
        raise _UsageError(msg)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        msg = f"expected a whole number >= 1, found {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="HESCAPE encoders: list them, pretrain a DRVI gene encoder.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="registered image and gene encoders with their input contracts")
    ls.add_argument("--modality", choices=("image", "gene"), help="only this tower's encoders")
    ls.add_argument("--json", action="store_true", help="machine-readable output (describe_encoders())")
    ls.set_defaults(func=_list)
    pd = sub.add_parser("pretrain-drvi", help="train a DRVI on a dataset's raw counts (needs hescape-models[drvi])",
                        description="Train a DRVI (drvi-py) on the raw counts of a HESCAPE dataset's training split, "
                                    "as the HESCAPE authors did, and write a directory usable as "
                                    "create_gene_encoder('drvi', model_dir=DIR).")
    pd.add_argument("dataset", type=Path, help="HESCAPE Arrow dataset directory (holds manifest.json)")
    pd.add_argument("--out", type=Path, required=True, help="directory to write (created atomically)")
    pd.add_argument("--split", default="train", help="split to train on (default: train)")
    pd.add_argument("--n-latent", type=_positive, default=128, help="latent size = encoder output (default: 128)")
    pd.add_argument("--layers", type=_positive, nargs="+", default=[128, 128],
                    help="hidden widths of the encoder and decoder (default: 128 128)")
    pd.add_argument("--max-epochs", type=_positive, default=None,
                    help="epochs (default: the authors' rule, min(round(20000 / spots * 400), 400))")
    pd.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    pd.add_argument("--covariate", choices=("sample", "donor", "none"), default="sample",
                    help="categorical covariate of the decoder (default: sample, the authors' choice)")
    pd.add_argument("--batch-size", type=_positive, default=128, help="mini-batch size (default: 128)")
    pd.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default: auto)")
    pd.add_argument("--overwrite", action="store_true", help="replace an existing DRVI directory at --out")
    pd.add_argument("--no-progress", action="store_true", help="no progress bar")
    pd.set_defaults(func=_pretrain_drvi)
    return p


def _input_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (HescapeModelError,)
    try:
        from hescape.data import HescapeDataError
    except ImportError:
        return errors
    return (*errors, HescapeDataError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hescape-models`` console script; returns the exit code."""
    try:
        a = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return a.func(a)
    except _input_errors() as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error: {e.strerror or e}{where}; check the paths, permissions and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
