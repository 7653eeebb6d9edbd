"""The ``expression`` and ``export`` subcommands of ``hescape-eval`` (their parsers and handlers).

``hescape-eval expression SOURCE --out DIR`` runs the HEST expression probe (paper Table 6) on saved embeddings
(:mod:`hescape.eval.expression_report`); ``hescape-eval export SOURCE OUT.h5ad`` writes them to AnnData
(:mod:`hescape.eval.export_run`). SOURCE is a hescape-train run directory or an embeddings ``.npz`` (``hescape-eval
embed``). :mod:`hescape.eval.cli` registers both and turns their errors into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import textwrap

from ._argtypes import fraction, int_range, seed

__all__ = ["add_expression", "add_export", "run_expression", "run_export"]


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        msg = f"expected a positive finite number, found {text!r}; fix: pass e.g. 10, or --alpha-cv"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_expression(sub) -> None:
    e = sub.add_parser(
        "expression", help="HEST expression probe from saved embeddings: Pearson r and MSE over patient folds "
                           "(paper Table 6)",
        description=textwrap.dedent("""\
            Predict log1p expression of the 50 most variable genes from a run's image embeddings (or those of any
            model, written by `hescape-eval embed`) with HEST's probe: StandardScaler -> PCA(min(256, d)) -> Ridge
            (lsqr, no intercept, alpha = 100 / (PCA width * genes)). Protocol paper (default): cross-validation over
            the samples of the test split, folds by patient (donor), as the HESCAPE paper's Table 6; cv: the same over
            every row of the embeddings; train-test: fit on --train-embeddings, score SOURCE. Counts, genes, donors
            and splits come from the dataset the embeddings were computed on (the run's own by default), matched row
            by row. Writes expression.md, expression.csv, expression_genes.csv and expression.json into --out. Needs
            scikit-learn and scanpy (gene selection; or pass --genes)."""),
        epilog=textwrap.dedent("""\
            examples:
              hescape-eval expression runs/r1 --out runs/r1/expression                     paper protocol, image
              hescape-eval expression runs/r1 --alpha-cv --folds 5 --out reports/expr-cv
              hescape-eval embed runs/r1 datasets/lung --out lung.npz
              hescape-eval expression lung.npz --dataset datasets/lung --protocol cv --out reports/expr-lung
              hescape-eval expression runs/r1 --protocol train-test --train-embeddings train.npz --out reports/tt
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("source", metavar="SOURCE", help="run directory (embeddings/test.npz) or an embeddings .npz file")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for the four output files (existing ones "
                   "are refused unless --overwrite)")
    e.add_argument("--dataset", metavar="DIR", help="the dataset the embeddings were computed on (default: the run's, "
                   "from config.json; required for an .npz outside a run)")
    e.add_argument("--split", help="the split the embeddings file holds (default: read off the dataset's manifest)")
    e.add_argument("--protocol", choices=("paper", "cv", "train-test"), default="paper",
                   help="paper (default): CV over the test split's samples; cv: CV over all rows; train-test")
    e.add_argument("--train-embeddings", metavar="FILE.npz", help="train-test: embeddings of the training spots "
                   "(default RUN_DIR/embeddings/train.npz; make one with hescape-eval embed --split train)")
    e.add_argument("--modality", choices=("image", "gene"), default="image",
                   help="which embedding is the probe's input (default image, as HEST)")
    e.add_argument("--n-genes", type=int_range(1, example="50"), default=50,
                   help="most variable genes to predict (default 50, HEST)")
    e.add_argument("--genes", metavar="LIST|FILE", help="genes to predict instead: names A,B,C, a text file (one a "
                   "line) or HEST's var_50genes.json")
    e.add_argument("--gene-selection", choices=("all", "train"), default="all",
                   help="choose genes on every spot probed (default, HEST) or on each training fold")
    e.add_argument("--min-cells-pct", type=fraction("0.1"), default=0.10,
                   help="a gene must be counted in this share of every sample's spots (default 0.10, HEST)")
    e.add_argument("--n-components", type=int_range(1, example="64"), metavar="K",
                   help="PCA width (default min(256, d))")
    a = e.add_mutually_exclusive_group()
    a.add_argument("--alpha", type=_alpha, metavar="A", help="a fixed ridge penalty (default HEST's "
                   "100 / (K * genes))")
    a.add_argument("--alpha-cv", action="store_true", help="choose the penalty per training fold by inner grouped "
                   "cross-validation over 1e-3 .. 1e5")
    e.add_argument("--inner-folds", type=int_range(2, example="3"), default=3,
                   help="--alpha-cv: inner folds by patient (default 3)")
    e.add_argument("--folds", type=int_range(2, example="5"), metavar="K",
                   help="GroupKFold(K) by patient (default: leave one patient out)")
    e.add_argument("--seed", type=seed, default=1, help="random_state of the PCA and the ridge (default 1, HEST)")
    e.add_argument("--colour-baseline", action="store_true", help="also probe the patches' colour statistics "
                   "(loads the spots' patches into memory)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files in --out")


def run_expression(args: argparse.Namespace) -> int:
    from .expression_report import context_line, expression_report, read_gene_list

    if not str(args.out).strip():  # '' would read as the current folder: files written where nobody asked
        from .errors import HescapeEvalError

        raise HescapeEvalError.build(what="--out", expected="a folder for the outputs", found="an empty path",
                                     fix="name a folder, e.g. --out reports/expression (or --out . for this folder)")
    genes = read_gene_list(args.genes) if args.genes else None
    alpha = "cv" if args.alpha_cv else (args.alpha if args.alpha is not None else "hest")
    res = expression_report(args.source, args.out, dataset=args.dataset, split=args.split,
                            train_embeddings=args.train_embeddings, modality=args.modality, protocol=args.protocol,
                            genes=genes, n_genes=args.n_genes, gene_selection=args.gene_selection,
                            min_cells_pct=args.min_cells_pct, n_components=args.n_components, alpha=alpha,
                            inner_splits=args.inner_folds, n_splits=args.folds, seed=args.seed,
                            colour_baseline=args.colour_baseline, overwrite=args.overwrite)
    print(res["markdown"])
    print(context_line(res["result"]))
    print()
    for path in res["files"]:
        print(f"wrote {path}")
    return 0


def add_export(sub) -> None:
    x = sub.add_parser(
        "export", help="a run's embeddings and spot metadata as AnnData (.h5ad) for scanpy",
        description=textwrap.dedent("""\
            Write a run's saved test embeddings (or an embeddings .npz of `hescape-eval embed`) to AnnData:
            obsm X_hescape_img and X_hescape_gex, obsm spatial (spot centres x, y in um from the dataset), obs sample,
            donor, split, spot_id and row (the file's index), obs_names "<sample>:<spot_id>" (unique in the dataset, so
            exports of its train and test splits concatenate), uns["hescape"] the run's config.json and results.json
            (hescape.eval.export.read_params reads them back). The dataset is the run's own unless --dataset is
            given, and must match the embeddings row by row. Needs anndata (pip install 'hescape-eval[export]')."""),
        epilog=textwrap.dedent("""\
            examples:
              hescape-eval export runs/r1 runs/r1/embeddings.h5ad
              hescape-eval export lung.npz lung.h5ad --dataset datasets/lung --counts
            """), formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("source", metavar="RUN_DIR", help="run directory (embeddings/test.npz) or an embeddings .npz file")
    x.add_argument("out", metavar="OUT.h5ad", help="the AnnData file to write (refused if it exists, unless "
                   "--overwrite)")
    x.add_argument("--dataset", metavar="DIR", help="the dataset of the embeddings (default: the run's)")
    x.add_argument("--split", help="the split the embeddings file holds (default: read off the manifest)")
    x.add_argument("--counts", action="store_true", help="also store the spots' raw counts as X (genes as var)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run_export(args: argparse.Namespace) -> int:
    from .export_run import export_run

    res = export_run(args.source, args.out, dataset=args.dataset, split=args.split, counts=args.counts,
                     overwrite=args.overwrite)
    note = res["spatial_note"]
    spatial = ("obsm spatial (x, y) in µm" if note is None else
               "no obsm spatial: the dataset has no coordinates" if note == "absent" else f"obsm spatial ({note})")
    print(f"exported {res['n']} spots: obsm X_hescape_img ({res['d_img']}-d), X_hescape_gex ({res['d_gex']}-d), "
          f"{spatial}; obs_names <sample>:<spot_id>; obs sample, donor, split, spot_id, row{'; X raw counts' if args.counts else ''}; uns['hescape'] "
          "run parameters")
    print(f"wrote {res['path']}")
    return 0
