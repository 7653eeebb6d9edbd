"""The ``hescape-train`` command.

Importing this module loads no torch, hescape.data, hescape.models or hescape.eval: ``--help``, ``--print-config``
and configuration refusals answer at once; the training stack is imported only when a run starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from .config import config_to_dict, describe_options, load_config, resume_config
from .errors import HescapeConfigError

__all__ = ["main", "build_parser", "launch_rank", "user_error_exit"]

_EPILOG = """\
options as key=value overrides (dotted keys; applied after --config):
{options}

examples:
  hescape-train                                   train on the embedded synthetic dataset, print the table
  hescape-train epochs=3 model.loss=siglip         a short SigLIP run
  hescape-train --config my.yaml optim.lr=3e-4     a config file, then one override
  hescape-train data.path=/data/breast-spots       your own dataset (built by hescape-data)
  hescape-train --resume runs/my-run              continue an interrupted run exactly where it stopped
  hescape-train sweep grid.yaml                   one run per grid point, then a mean(std) table (sweep --help)
  hescape-train batch-benchmark OUT               batch-robust methods vs batch strength (batch-benchmark --help)
"""

#: Exception classes whose message is shown as one line (exit 2), by module; looked up only once the module is
#: loaded, so that catching them imports nothing.
_USER_ERRORS = (("hescape.data.errors", "HescapeDataError"), ("hescape.eval.errors", "HescapeEvalError"),
                ("hescape.models.errors", "HescapeModelError"))


def _user_error_types() -> tuple[type[BaseException], ...]:
    types_ = [HescapeConfigError]
    for module, name in _USER_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            types_.append(getattr(mod, name))
    return tuple(types_)


def launch_rank() -> int:
    """This process's rank in a torchrun or srun launch (``RANK``, else ``SLURM_PROCID``); 0 outside one.

    Read from the environment, so it is known before (and without) ``torch.distributed``.
    """
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "").strip()
        if value:
            return int(value) if value.isdigit() else 0
    return 0


#: Characters of a user error that the non-zero ranks of a launch print (rank 0 prints all of it).
_SHORT = 60


def user_error_exit(prog: str, error: Exception) -> int:
    """Report ``error`` as one line on stderr and return the exit status 2, if it is a user error (a refused option,
    a missing file, a diverged loss: :func:`_user_error_types`); re-raise anything else (a bug keeps its traceback).

    Call it in an ``except Exception as e:`` block: ``return user_error_exit("hescape-train", e)``. Under torchrun
    or srun every rank usually meets the same error; rank 0 prints ``<prog>: error: <message>`` and every other rank
    only ``<prog>: rank <r>: error: <the first 60 characters>…``, so that an error only that rank met (a path
    missing on its node) is not lost.
    """
    if not isinstance(error, _user_error_types()):
        raise error
    text = " ".join(str(error).split())
    rank = launch_rank()
    if rank == 0:
        print(f"{prog}: error: {text}", file=sys.stderr)
    else:
        short = text if len(text) <= _SHORT else text[:_SHORT].rstrip() + "…"
        print(f"{prog}: rank {rank}: error: {short}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hescape-train",
        description=textwrap.dedent("""\
            Contrastive (CLIP/SigLIP) training of an H&E image encoder and a gene-expression encoder.
            With no arguments: builds (or finds, cached) the embedded synthetic Xenium-like dataset,
            trains the small vit_mlp_nano model on the CPU, evaluates retrieval on held-out donors and
            prints a Recall@1/5/10 table with chance levels. Each run writes a directory under out_dir
            with config.json, checkpoints/ (the best and the last: model.safetensors + state.pt),
            metrics.jsonl/.csv, steps.jsonl/.csv, results.md/.json/.csv and embeddings/test.npz.
            An interrupted run continues exactly with --resume RUN_DIR."""),
        epilog=_EPILOG.format(options=describe_options()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (nested or dotted keys; relative "
                                                    "paths in it are read from the current directory, as on the "
                                                    "command line)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, with its own config.json "
                        "(only progress=, data.num_workers=, data.feature_cache_dir=, log.* may be given)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. epochs=5 optim.lr=3e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # a subcommand beside the key=value options (hescape.train.sweep)
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["batch-benchmark"]:  # hescape.train.batch_benchmark
        from .batch_benchmark import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            if args.config:
                msg = "--resume uses the run's own config.json; drop --config (a resumed run cannot change its options)"
                raise HescapeConfigError(msg)
            cfg = resume_config(args.resume, args.overrides)
            done = Path(args.resume) / "results.md"
            if (Path(args.resume) / "results.json").is_file() and done.is_file() and not args.print_config:
                # a finished run is not trained or tested again: its results stand as they were written
                print(done.read_text().rstrip())
                print(f"\nrun directory: {args.resume}  (finished earlier: nothing to resume)")
                return 0
        else:
            cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
            return 0
        from .trainer import train  # the training stack loads only when a run starts

        result = train(cfg, resume=args.resume)
        if result is None:  # a non-zero rank of a distributed run: rank 0 prints
            return 0
    except Exception as e:
        return user_error_exit("hescape-train", e)
    print((result.run_dir / "results.md").read_text().rstrip())
    print(f"\nrun directory: {result.run_dir}  (wall time {result.wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
