"""The ``hescape-eval`` command.

``hescape-eval retrieval RUN_DIR`` reads ``RUN_DIR/embeddings/test.npz`` (:mod:`hescape.eval.io`; an ``.npz``
path works too), ranks both directions under each ``--protocol`` (default: ``full`` and ``batch:64``), prints
one Markdown table per protocol with the protocol, pool size and chance in its header line, and with
``--out FILE.json`` writes the same numbers as JSON. ``hescape-eval report RUN_DIR... --out DIR`` aggregates many
runs over seeds into the paper's Table 2 layout (:mod:`hescape.eval.report`). Bad input is one line on stderr,
``hescape-eval: error: …``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from .errors import HescapeEvalError
from .io import _umask

__all__ = ["build_parser", "main"]

PROG = "hescape-eval"
_EPILOG = """\
protocols:
  full          rank every query against the whole test set (chance R@k = k/N)
  batch[:B]     rank inside consecutive test batches of B (default 64) in dataset order, last partial batch kept,
                as the HESCAPE reference code did on one device (chance R@k = k/B, R@5 = 0.078 at B = 64)
  batch:BxW     the same on W devices (DistributedSampler interleave and padding); batch:64x4 is the paper's
                Table 2 setting (see hescape.eval.protocol)

examples:
  hescape-eval retrieval runs/r1                               full gallery and batches of 64
  hescape-eval retrieval runs/r1 --protocol batch:64x4 --by sample
  hescape-eval retrieval runs/r1 --ks 1,5,10,50 --out runs/r1/retrieval.json
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error shape: one line, ``hescape-eval: error: …``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _ks(text: str) -> list[int]:
    msg = f"expected comma-separated positive integers such as 1,5,10, found {text!r}"
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(msg) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(msg)
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Evaluation of HESCAPE image–gene embeddings.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    r = sub.add_parser(
        "retrieval", help="image→gene and gene→image Recall@k of a run's saved test embeddings",
        description=textwrap.dedent("""\
            Recall@k, mean and median rank of a run's test embeddings in both directions, under each protocol,
            with chance levels. Reads RUN_DIR/embeddings/test.npz (written by hescape.eval.io.save_embeddings;
            an .npz path is accepted too)."""),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or an embeddings .npz file)")
    r.add_argument("--protocol", action="append", metavar="P",
                   help="full, batch, batch:B or batch:BxW; repeat for several (default: full and batch:64)")
    r.add_argument("--by", choices=("sample", "donor"),
                   help="also evaluate each sample (or donor) on its own rows, with its own pool and chance")
    r.add_argument("--ks", type=_ks, default=[1, 5, 10], metavar="K,K,..", help="Recall@k values (default 1,5,10)")
    r.add_argument("--split", default="test", help="which embeddings file of RUN_DIR/embeddings/ (default test)")
    r.add_argument("--backend", default="auto", help="rank backend: auto, cpp, torch, ... (default auto)")
    r.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")

    t = sub.add_parser(
        "report", help="aggregate runs over seeds into the paper's Table 2 layout (Markdown, CSV, PNG)",
        description=textwrap.dedent("""\
            One row per model (<gene encoder>-<image encoder>), one column per (panel, direction), mean(std) of test
            Recall@k over seeds (sample std), best in bold and second underlined, protocol, pool and chance stated.
            Numbers come from each run's results.json (protocol full) or, with --protocol, are recomputed from
            RUN_DIR/embeddings/test.npz. A column never mixes protocols or pool sizes."""),
        epilog=textwrap.dedent("""\
            examples:
              hescape-eval report runs/*/ --out reports/table2
              hescape-eval report runs/*/ --out reports/table2_paper --protocol batch:64x4
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="hescape-train run directories")
    t.add_argument("--out", required=True, metavar="DIR",
                   help="folder for report.md, report.csv, report_long.csv, recall_at_K.png")
    t.add_argument("--k", type=int, default=5, help="the k of Recall@k (default 5, as in the paper's Table 2)")
    t.add_argument("--protocol", metavar="P", help="recompute from saved embeddings: full, batch:B or batch:BxW")
    t.add_argument("--backend", default="auto", help="rank backend when recomputing (default auto)")
    t.add_argument("--no-figures", action="store_true", help="skip the PNG figure")
    t.add_argument("--title", help="heading of report.md")
    _add_embed(sub)
    return p


def _add_embed(sub) -> None:
    e = sub.add_parser(
        "embed", help="embed a dataset's split with a trained model (zero-shot transfer), for `retrieval`",
        description=textwrap.dedent("""\
            Load a trained model (a hescape-train run directory, a checkpoint directory or its model.safetensors),
            embed one split of a HESCAPE dataset with the same gene panel, and write the embeddings as .npz
            (hescape.eval.io) for `hescape-eval retrieval FILE.npz`."""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", metavar="MODEL", help="run directory, checkpoint directory or model.safetensors")
    e.add_argument("dataset", metavar="DATASET", help="dataset directory (manifest.json) built by hescape-data")
    e.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the embeddings")
    e.add_argument("--split", default="test", help="split to embed (default test)")
    e.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint of a run (default best)")
    e.add_argument("--batch-size", type=int, default=256, help="spots per forward pass (default 256)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _embed(args: argparse.Namespace) -> int:
    from .embed import embed_split, load_trained_model
    from .io import save_embeddings

    if args.batch_size < 1:
        msg = f"--batch-size: expected a positive integer, found {args.batch_size}"
        raise HescapeEvalError(msg)
    out = Path(args.out)
    if out.suffix != ".npz":
        msg = f"--out: expected a file name ending in .npz, found {args.out!r}"
        raise HescapeEvalError(msg)
    model, _, file = load_trained_model(args.model, args.which)
    emb = embed_split(model, args.dataset, args.split, batch_size=args.batch_size, device=args.device)
    save_embeddings(out, **emb)
    print(f"embedded {len(emb['index'])} spots of split {args.split!r} of {args.dataset} with {file}; wrote {out}")
    print(f"next: hescape-eval retrieval {out}")
    return 0


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _retrieval(args: argparse.Namespace) -> int:
    from .io import load_embeddings
    from .protocol import RetrievalProtocol
    from .retrieval import retrieval_reports

    protocols = [RetrievalProtocol.parse(p) for p in (args.protocol or ["full", "batch:64"])]  # fail fast
    emb = load_embeddings(args.run_dir, split=args.split)
    groups = emb.labels(args.by) if args.by else None
    reports = retrieval_reports(emb.image, emb.gene, protocols=protocols, ks=args.ks, groups=groups,
                                group_key=args.by, backend=args.backend)
    n, d = emb.image.shape
    print(f"# Retrieval: {emb.path} ({n} spots, d = {d}, {len(set(emb.sample.tolist()))} samples, "
          f"{len(set(emb.donor.tolist()))} donors)")
    for rep in reports:
        print()
        print(rep.to_markdown(title=f"protocol {rep.protocol}"))
    if args.out:
        _write_json(Path(args.out), {"source": str(emb.path), "n": n, "d": d, "ks": list(args.ks),
                                     "reports": [rep.to_dict() for rep in reports]})
        print(f"\nwrote {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    if args.k < 1:
        raise HescapeEvalError.build(what="--k", expected="a positive integer", found=str(args.k), fix="e.g. --k 5")
    res = write_report(args.run_dirs, args.out, k=args.k, protocol=args.protocol, backend=args.backend,
                       figures=not args.no_figures, title=args.title)
    print(res["table"].to_markdown())
    print()
    for key in ("markdown", "csv", "long_csv"):
        print(f"wrote {res[key]}")
    if "figure" in res:
        fig = res["figure"]
        print(f"wrote {fig}" if isinstance(fig, Path) else fig)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hescape-eval`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "retrieval":
            return _retrieval(args)
        if args.command == "embed":
            return _embed(args)
        if args.command == "report":
            return _report(args)
    except HescapeEvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out in a folder we may not write
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
