"""The ``hescape-train`` command."""

from __future__ import annotations

import argparse
import sys
import textwrap

from hescape.data.errors import HescapeDataError
from hescape.eval.errors import HescapeEvalError
from hescape.models.errors import HescapeModelError

from .config import config_to_dict, describe_options, load_config
from .errors import HescapeConfigError

__all__ = ["main", "build_parser"]

_EPILOG = """\
options as key=value overrides (dotted keys; applied after --config):
{options}

examples:
  hescape-train                                   train on the embedded synthetic dataset, print the table
  hescape-train epochs=3 model.loss=siglip         a short SigLIP run
  hescape-train --config my.yaml optim.lr=3e-4     a config file, then one override
  hescape-train data.path=/data/breast-spots       your own dataset (built by hescape-data)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hescape-train",
        description=textwrap.dedent("""\
            Contrastive (CLIP/SigLIP) training of an H&E image encoder and a gene-expression encoder.
            With no arguments: builds (or finds, cached) the embedded synthetic Xenium-like dataset,
            trains the small vit_mlp_nano model on the CPU, evaluates retrieval on held-out donors and
            prints a Recall@1/5/10 table with chance levels. Each run writes a directory under out_dir
            with config.json, metrics.jsonl, checkpoint.pt, results.md and results.json."""),
        epilog=_EPILOG.format(options=describe_options()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (nested or dotted keys)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. epochs=5 optim.lr=3e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
            return 0
        from .trainer import train  # heavy imports only when training

        result = train(cfg)
        if result is None:  # a non-zero rank of a distributed run: rank 0 prints
            return 0
    except (HescapeConfigError, HescapeDataError, HescapeEvalError, HescapeModelError) as e:
        print(f"hescape-train: error: {e}", file=sys.stderr)
        return 2
    print((result.run_dir / "results.md").read_text().rstrip())
    print(f"\nrun directory: {result.run_dir}  (wall time {result.wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
