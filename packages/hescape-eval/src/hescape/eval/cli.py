"""The ``hescape-eval`` command.

``hescape-eval retrieval RUN_DIR`` reads ``RUN_DIR/embeddings/test.npz`` (:mod:`hescape.eval.io`; an ``.npz``
path works too), ranks both directions under each ``--protocol`` (default: ``full`` and ``batch:64``), prints
one Markdown table per protocol with the protocol, pool size and chance in its header line, and with
``--out FILE.json`` writes the same numbers as JSON. ``hescape-eval report RUN_DIR... --out DIR`` aggregates many
runs over seeds into the paper's Table 2 layout (:mod:`hescape.eval.report`). ``hescape-eval embed MODEL DATASET
--out FILE.npz`` embeds a dataset split with a trained model (:mod:`hescape.eval.embed`; an existing file is refused
unless ``--overwrite``). ``hescape-eval mutation SLIDES.csv --encoder NAME --out DIR`` runs slide-level mutation
prediction (:mod:`hescape.eval.mutation`), ``hescape-eval batch-effects RUN_DIR... --out DIR`` silhouette-batch
against Recall@5 (:mod:`hescape.eval.batch_report`), ``hescape-eval expression SOURCE --out DIR`` the HEST expression
probe on saved embeddings and ``hescape-eval export SOURCE OUT.h5ad`` AnnData (:mod:`hescape.eval.cli_runs`). Every
output file is written atomically, and an existing one is
refused unless ``--overwrite``. Bad input (and an unwritable or unreadable path) is one line on stderr,
``hescape-eval: error: …``, and exit status 2; Ctrl-C is one line and exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from ._argtypes import fraction, int_range, number, seed
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
    msg = f"expected comma-separated positive integers, found {text!r}; fix: pass e.g. 1,5,10"
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(msg) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(msg)
    dups = sorted({k for k in ks if ks.count(k) > 1})
    if dups:  # as hescape-train refuses duplicate recall_ks: a repeated k would print the same column twice
        msg = (f"expected distinct values, found {text!r} ({', '.join(map(str, dups))} repeated); fix: list each k "
               f"once, e.g. {','.join(map(str, sorted(set(ks))))}")
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
    r.add_argument("--out", metavar="FILE.json", help="also write the results as JSON (an existing file is refused "
                   "unless --overwrite)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

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
                   help="folder for report.md, report.csv, report_long.csv, recall_at_K.png (existing files are "
                        "refused unless --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace the report in --out (its files this report "
                   "does not write again, e.g. recall_at_K.png of another K, are removed)")
    t.add_argument("--k", type=int_range(1, example="5"), default=5,
                   help="the k of Recall@k (default 5, as in the paper's Table 2)")
    t.add_argument("--protocol", metavar="P", help="recompute from saved embeddings: full, batch:B or batch:BxW")
    t.add_argument("--backend", default="auto", help="rank backend when recomputing (default auto)")
    t.add_argument("--no-figures", action="store_true", help="skip the PNG figure")
    t.add_argument("--title", help="heading of report.md")
    _add_embed(sub)
    _add_mutation(sub)
    _add_batch_effects(sub)
    from .cli_runs import add_export, add_expression

    add_expression(sub)
    add_export(sub)
    return p


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        msg = f"expected a JSON object such as '{{\"pooling\": \"cls+mean\"}}', found {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_mutation(sub) -> None:
    m = sub.add_parser(
        "mutation",
        help="slide-level mutation prediction: tiles → tile features → transformer MIL over 5 site folds",
        description=textwrap.dedent("""\
            The HESCAPE paper's mutation prediction (section 8.4, Tables 3-5). SLIDES.csv has columns path (Aperio
            SVS or OME-TIFF, relative to the CSV), patient, site (tissue source site) and label (0/1, 1 = mutated);
            optional um_per_px. Slides are tiled (256 px at 0.5 µm/px, >= 50 % tissue), tiles encoded in batches into
            one feature file per slide (cached and reused: rerun the same command to resume), and a transformer MIL
            (2 layers, 8 heads of 64, latent 512; AdamW lr 2e-5, weight decay 2e-5, batch 1, 10 epochs, best
            validation loss every 500 steps) is cross-validated over 5 site-preserving folds. Writes mutation.md,
            mutation.csv, mutation.json, predictions.csv and features.csv into --out: F1 and AUROC per fold and
            mean(std), beside the all-positive and majority-class baselines. Needs tifffile and imagecodecs
            (pip install 'hescape-eval[wsi]') and hescape-models."""),
        epilog=textwrap.dedent("""\
            examples:
              hescape-eval mutation crc_msi.csv --encoder uni --weights weights/uni/pytorch_model.bin --out mut/uni
              hescape-eval mutation crc_msi.csv --encoder runs/gigapath-drvi --device cuda --out mut/gigapath-drvi
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("slides", metavar="SLIDES.csv", help="slide table: path, patient, site, label [, um_per_px]")
    m.add_argument("--encoder", required=True, metavar="NAME|RUN",
                   help="image encoder of `hescape-models list`, or a hescape-train run / checkpoint (its 128-d "
                        "image embedding)")
    m.add_argument("--weights", metavar="PATH", help="weights file or folder of a registered encoder (or 'hf')")
    m.add_argument("--encoder-options", type=_json_object, metavar="JSON", help="builder options, a JSON object")
    m.add_argument("--out", required=True, metavar="DIR", help="result folder (existing results are refused unless "
                   "--overwrite; its features/ folder is reused)")
    m.add_argument("--features", metavar="DIR", help="tile feature cache (default OUT/features)")
    m.add_argument("--batch-size", type=int_range(1, example="64"), default=64,
                   help="tiles per encoder call (default 64)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    m.add_argument("--epochs", type=int_range(1, example="10"), default=10, help="MIL epochs (default 10, the paper's)")
    m.add_argument("--lr", type=number(lo=0, lo_open=True, example="2e-5"), default=2e-5,
                   help="AdamW learning rate (default 2e-5)")
    m.add_argument("--weight-decay", type=number(lo=0, example="2e-5"), default=2e-5,
                   help="AdamW weight decay (default 2e-5)")
    m.add_argument("--val-every", type=int_range(1, example="500"), default=500,
                   help="validation every N steps (default 500)")
    m.add_argument("--folds", type=int_range(3, example="5"), default=5, help="site-preserving folds (default 5)")
    m.add_argument("--seed", type=seed, default=0, help="folds, initialisation and shuffling (default 0)")
    m.add_argument("--min-tissue", type=fraction("0.5"), default=0.5,
                   help="minimum tissue fraction of a tile (default 0.5)")
    m.add_argument("--um-per-px", type=number(lo=0, lo_open=True, example="0.25"), metavar="X",
                   help="level-0 µm/px of slides that record none")
    m.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_batch_effects(sub) -> None:
    b = sub.add_parser(
        "batch-effects", help="silhouette-batch of expression and embeddings vs Recall@5 across runs (paper Fig. 2)",
        description=textwrap.dedent("""\
            For each run: scanpy-preprocessed expression of its dataset (every split; at most --max-spots spots drawn),
            Leiden clusters as labels, scib-metrics silhouette-batch with the split (the paper) or the sample as
            batch, on the expression PCA and on the run's image and gene embeddings of the same spots (its best
            checkpoint); beside it the run's test Recall@5. Writes batch_effects.csv, batch_effects.md and
            silhouette_vs_recall.png (the paper's Fig. 2 layout) into --out. Needs pip install
            'hescape-eval[batch]' (scanpy, leidenalg, scib-metrics, matplotlib), hescape-data and hescape-models."""),
        epilog=textwrap.dedent("""\
            examples:
              hescape-eval batch-effects runs/gigapath-drvi-*/ --out reports/fig2
              hescape-eval batch-effects runs/r1 --dataset datasets/breast --batch-key sample --out reports/be
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="hescape-train run directories")
    b.add_argument("--out", required=True, metavar="DIR", help="folder for the CSV, Markdown and PNG (existing files "
                   "are refused unless --overwrite)")
    b.add_argument("--dataset", metavar="DIR", help="dataset of every run (default: each run's own, from config.json)")
    b.add_argument("--batch-key", choices=("split", "sample"), default="split",
                   help="batch labels: the split (train/val/test, the paper; default) or the sample")
    b.add_argument("--max-spots", type=int_range(0, example="20000"), default=20000,
                   help="spots drawn per dataset (default 20000; 0 = all)")
    b.add_argument("--no-embeddings", action="store_true", help="expression only (no model is loaded)")
    b.add_argument("--protocol", metavar="P", help="recompute Recall@5 from embeddings/test.npz: full, batch:B[xW]")
    b.add_argument("--device", default="cpu", help="torch device for the embeddings (default cpu)")
    b.add_argument("--batch-size", type=int_range(1, example="256"), default=256,
                   help="spots per forward pass (default 256)")
    b.add_argument("--seed", type=seed, default=0, help="spot draw, PCA, neighbours, Leiden, permutation (default 0)")
    b.add_argument("--no-figure", action="store_true", help="skip the PNG")
    b.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _batch_effects(args: argparse.Namespace) -> int:
    from .batch_report import batch_effects_report

    if args.batch_size < 1 or args.max_spots < 0:
        raise HescapeEvalError.build(what="options", expected="--batch-size >= 1 and --max-spots >= 0",
                                     found=f"--batch-size {args.batch_size}, --max-spots {args.max_spots}",
                                     fix="pass valid values")
    res = batch_effects_report(args.run_dirs, args.out, dataset=args.dataset, batch_key=args.batch_key,
                               max_spots=args.max_spots or None, embeddings=not args.no_embeddings,
                               protocol=args.protocol, device=args.device, batch_size=args.batch_size, seed=args.seed,
                               figure=not args.no_figure, overwrite=args.overwrite)
    print(res["markdown"])
    if res.get("figure_skipped"):
        print(f"not in the figure (silhouette undefined: every cluster holds one batch): {res['figure_skipped']}")
    for path in res["files"]:
        print(f"wrote {path}")
    return 0


def _mutation(args: argparse.Namespace) -> int:
    from .mutation import run_mutation

    res = run_mutation(args.slides, args.encoder, args.out, weights=args.weights,
                       encoder_options=args.encoder_options, features_dir=args.features, batch_size=args.batch_size,
                       device=args.device, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       val_every=args.val_every, n_folds=args.folds, seed=args.seed, min_tissue=args.min_tissue,
                       um_per_px=args.um_per_px, overwrite=args.overwrite, progress=not args.no_progress)
    print()
    print(res["markdown"])
    for name in ("mutation.md", "mutation.csv", "mutation.json", "predictions.csv", "features.csv"):
        print(f"wrote {Path(args.out) / name}")
    return 0


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
    e.add_argument("--out", required=True, metavar="FILE.npz",
                   help="where to write the embeddings (an existing file is refused unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    e.add_argument("--split", default="test", help="split to embed (default test)")
    e.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint of a run (default best)")
    e.add_argument("--batch-size", type=int_range(1, example="256"), default=256,
                   help="spots per forward pass (default 256)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _embed(args: argparse.Namespace) -> int:
    from ._write import publish, refuse_existing
    from .embed import embed_split, load_trained_model
    from .io import save_embeddings

    if args.batch_size < 1:
        msg = f"--batch-size: expected a positive integer, found {args.batch_size}"
        raise HescapeEvalError(msg)
    out = Path(args.out)
    if out.suffix != ".npz":
        msg = f"--out: expected a file name ending in .npz, found {args.out!r}"
        raise HescapeEvalError(msg)
    if out.is_dir():
        raise HescapeEvalError.build(what=f"--out {args.out}", expected="a file path ending in .npz",
                                     found="a directory", fix="name a file, e.g. --out embeddings/test.npz")
    if not args.overwrite:
        refuse_existing([out])  # before the model is loaded: a refused command costs nothing
    model, _, file = load_trained_model(args.model, args.which)
    emb = embed_split(model, args.dataset, args.split, batch_size=args.batch_size, device=args.device)
    # atomic: save_embeddings writes a temporary file, fsync, rename; publish then refuses to replace a file that
    # appeared meanwhile (unless --overwrite)
    tmp = out.parent / f".{out.name}.{os.getpid()}.partial"
    try:
        save_embeddings(tmp, **emb)
        publish(tmp, out, overwrite=args.overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"embedded {len(emb['index'])} spots of split {args.split!r} of {args.dataset} with {file}; wrote {out}")
    print(f"next: hescape-eval retrieval {out}")
    return 0


def _os_error(exc: OSError) -> str:
    """An :class:`OSError` in the package's message shape (what / expected / found / fix)."""
    where = exc.filename if exc.filename is not None else "a file of this command"
    found = exc.strerror or type(exc).__name__
    if exc.filename2 is not None:
        found += f" (moving to {exc.filename2})"
    return str(HescapeEvalError.build(what=str(where), expected="a path this command can read or write",
                                      found=found, fix="check the path, its permissions and free disk space, or "
                                                       "choose another --out"))


def _check_out_file(out: Path, suffix: str, overwrite: bool) -> None:
    """Refuse an ``--out`` file with the wrong suffix, that is a directory, or exists (unless ``overwrite``)."""
    from ._write import refuse_existing

    if out.suffix != suffix:
        raise HescapeEvalError.build(what=f"--out {out}", expected=f"a file name ending in {suffix}",
                                     found=repr(out.name), fix=f"e.g. --out results/retrieval{suffix}")
    if out.is_dir():
        raise HescapeEvalError.build(what=f"--out {out}", expected=f"a file path ending in {suffix}",
                                     found="a directory", fix=f"name a file, e.g. --out {out / ('retrieval' + suffix)}")
    if not overwrite:
        refuse_existing([out])


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
    names = [str(p) for p in protocols]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:  # as --ks: a repeated protocol would print the same table twice
        raise HescapeEvalError.build(what="--protocol", expected="each protocol once",
                                     found=f"{', '.join(dups)} given {max(names.count(n) for n in dups)} times "
                                           f"(as {', '.join(args.protocol)})",
                                     fix="pass each --protocol once")
    if args.out:
        _check_out_file(Path(args.out), ".json", args.overwrite)
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
    from ._write import refuse_existing
    from .report import existing_report_files, report_files

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HescapeEvalError.build(what=f"--out {out}", expected="a folder (or a path where one can be made)",
                                     found="a file", fix="name a folder, e.g. --out reports/table2")
    if not args.overwrite:  # before any run is read: a refused command costs nothing
        refuse_existing(report_files(out, args.k, figures=not args.no_figures) + existing_report_files(out))
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
        if args.command == "mutation":
            return _mutation(args)
        if args.command == "batch-effects":
            return _batch_effects(args)
        if args.command in ("expression", "export"):
            from .cli_runs import run_export, run_expression

            return (run_expression if args.command == "expression" else run_export)(args)
    except HescapeEvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed by the reader (`... | head`): not a file problem; stay quiet
        with contextlib.suppress(OSError, AttributeError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    except OSError as exc:  # e.g. --out in a folder we may not write, a full disk
        print(f"{PROG}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every output is written atomically: nothing half-written is left behind
        print(f"{PROG}: interrupted; files already finished are complete, none is half-written (rerun the same "
              "command; mutation reuses the tile features it cached)", file=sys.stderr)
        return 130
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
