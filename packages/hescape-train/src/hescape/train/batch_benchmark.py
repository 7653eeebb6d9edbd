"""``hescape-train batch-benchmark``: batch-robust alignment measured on data whose batch effect is a dial.

The experiment (HESCAPE paper, section 3: batch effects in the expression modality limit cross-modal alignment;
here the batch effect is set, not found):

1. **Datasets.** For each batch strength ``s`` the synthetic generator (:mod:`hescape.data.synthetic` with
   :class:`hescape.data.batch_effects.BatchEffects` ``.at(s)``) builds the same donors and the same biology, with
   per-donor expression and image effects scaled by ``s``. Splits by donor: ``n_test`` donors are held out for
   test (default 3, so that a per-sample correction and silhouette-batch have several samples to work on), one
   for validation, the rest train.
2. **Image encoder.** A ``vit_nano`` trained with plain CLIP on a *different* synthetic cohort (another generator
   seed: other donors, other tissue; strength 0) stands in for a pathology foundation model; its trunk is exported
   and used **frozen** by every run (its features are cached once per dataset), as the paper's image encoders are
   frozen or LoRA-tuned. The gene tower (MLP) and both projection heads train from scratch in every run.
3. **Methods** (:data:`METHODS`), each one ``hescape-train`` option set, trained for every strength and seed;
   and post-hoc corrections (:data:`POST_HOC`) applied to the plain CLIP runs' test embeddings. The DRVI methods
   replace the MLP gene tower by a frozen DRVI trained on each dataset's training split (``drvi_epochs``), without
   a covariate and with the sample as covariate (the HESCAPE authors' setup).
4. **Scores** on the held-out donors: Recall@5 on the full gallery and under the paper's per-batch protocol
   (``batch:64``), both directions averaged; silhouette-batch (scib-metrics, sample as batch key, the generator's
   known niche of every spot as label) of the gene and image embeddings and of the expression itself; the HEST ridge probe
   (Pearson of 50 genes, leave-one-donor-out over the test donors: the paper's Table 6 protocol) on the image
   embeddings. mean(std) over seeds, in ``OUT/results.md`` / ``results.csv`` and ``OUT/batch_benchmark.png``.

Everything is resumable: datasets, the pretrained trunk, runs (finished ones are skipped, interrupted ones
resumed) and scores (``OUT/scores/<run>.json``) are kept; a second call only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_json, atomic_write_text
from .errors import HescapeConfigError

__all__ = ["METHODS", "POST_HOC", "BenchmarkConfig", "export_tower", "run_benchmark", "main"]

#: Trained methods: ``hescape-train`` overrides on top of the plain CLIP base (``clip``).
METHODS: dict[str, dict[str, object]] = {
    "clip": {},
    "within_sample": {"data.batch_sampling": "within_sample"},
    "balanced": {"data.batch_sampling": "balanced"},
    "sample_mean": {"data.gene_normalisation": "sample_mean"},
    "stain_aug": {"data.augment": True},
    "sample_centring": {"sample_centring": True},
    "within_sample+centring": {"data.batch_sampling": "within_sample", "sample_centring": True},
    # frozen DRVI gene encoders pretrained on the training split (hescape.models.gene.drvi.pretrain_drvi), without
    # and with the sample as categorical covariate of the decoder (the HESCAPE authors' setup)
    "drvi": {"model.gene": "drvi"},
    "drvi_sample": {"model.gene": "drvi"},
}
#: The DRVI covariate of each DRVI method.
_DRVI_COVARIATE = {"drvi": None, "drvi_sample": "sample"}
#: Post-hoc corrections of the plain CLIP runs' test embeddings (hescape.eval.correction), by sample.
POST_HOC = ("harmony", "centre_post_hoc")

_METRICS = (("r5_full", "R@5 full"), ("r5_batch", "R@5 batch:64"), ("sil_gene", "silhouette-batch gene emb."),
            ("sil_image", "silhouette-batch image emb."), ("probe_r", "HEST probe Pearson"))


@dataclass
class BenchmarkConfig:
    """What ``hescape-train batch-benchmark`` runs (its command-line options)."""

    out: Path
    strengths: tuple[float, ...] = (0.0, 1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    post_hoc: tuple[str, ...] = POST_HOC
    epochs: int = 16
    pretrain_epochs: int = 8
    drvi_epochs: int = 50
    n_donors: int = 10
    n_test: int = 3
    size_um: float = 1000.0
    batch_size: int = 64
    progress: bool = True


def _log(bc: BenchmarkConfig, msg: str) -> None:
    if bc.progress:
        print(msg, flush=True)


def _check(bc: BenchmarkConfig) -> None:
    """Every option before any work (one line each: expected, found, fix)."""
    for what, values in (("--strengths", bc.strengths), ("--seeds", bc.seeds), ("--methods", bc.methods),
                         ("--post-hoc", bc.post_hoc)):
        twice = sorted({str(v) for v in values if list(values).count(v) > 1})
        if twice:
            msg = f"batch-benchmark {what}: {', '.join(twice)} listed twice; give each once (repeats are not seeds)"
            raise HescapeConfigError(msg)
    if not bc.methods:
        msg = f"batch-benchmark --methods: expected at least one method, found none; e.g. --methods {','.join(METHODS)}"
        raise HescapeConfigError(msg)
    unknown = [m for m in bc.methods if m not in METHODS]
    if unknown:
        msg = f"batch-benchmark --methods: unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}"
        raise HescapeConfigError(msg)
    bad = [p for p in bc.post_hoc if p not in POST_HOC]
    if bad:
        msg = f"batch-benchmark --post-hoc: unknown correction(s) {', '.join(bad)}; expected some of {', '.join(POST_HOC)}"
        raise HescapeConfigError(msg)
    if bc.post_hoc and "clip" not in bc.methods:
        msg = "batch-benchmark: post-hoc corrections apply to the plain CLIP runs; add clip to --methods or --post-hoc ''"
        raise HescapeConfigError(msg)
    if not bc.strengths or any(not (0 <= s <= 20) or not math.isfinite(s) for s in bc.strengths):
        found = ",".join(map(str, bc.strengths)) or "none"
        msg = f"batch-benchmark --strengths: expected values in [0, 20], found {found}; e.g. --strengths 0,1,2"
        raise HescapeConfigError(msg)
    inexact = [s for s in bc.strengths if float(f"{s:g}") != s]
    if inexact:
        msg = (f"batch-benchmark --strengths: {inexact[0]!r} has more than 6 significant digits (its dataset folder "
               "would be another strength's); round it")
        raise HescapeConfigError(msg)
    if bc.n_test < 2 or bc.n_donors < bc.n_test + 2:
        msg = (f"batch-benchmark: expected --n-test >= 2 held-out donors and --n-donors >= n_test + 2 (one val, one "
               f"train), found n_test={bc.n_test}, n_donors={bc.n_donors}")
        raise HescapeConfigError(msg)
    if not bc.seeds or min(bc.seeds) < 0 or max(bc.seeds) >= 2**32:
        msg = f"batch-benchmark --seeds: expected seeds in [0, 2**32), found {list(bc.seeds) or 'none'}; e.g. --seeds 0,1,2"
        raise HescapeConfigError(msg)
    for what, v, least in (("--epochs", bc.epochs, 1), ("--pretrain-epochs", bc.pretrain_epochs, 1),
                           ("--drvi-epochs", bc.drvi_epochs, 1), ("--batch-size", bc.batch_size, 2)):
        if v < least:
            msg = f"batch-benchmark {what}: expected an integer >= {least}, found {v}; e.g. {what} 64"
            raise HescapeConfigError(msg)
    if not (math.isfinite(bc.size_um) and bc.size_um >= 300):
        msg = (f"batch-benchmark --size-um: expected a section of at least 300 µm (several spots per side), found "
               f"{bc.size_um}; e.g. --size-um 1000")
        raise HescapeConfigError(msg)
    if bc.out.exists() and not bc.out.is_dir():
        msg = f"batch-benchmark: {bc.out} exists and is not a folder; give a new or an earlier benchmark's folder"
        raise HescapeConfigError(msg)
    import importlib.util

    needed = ["scanpy", "scib_metrics", "leidenalg", "matplotlib"] + (["harmonypy"] if "harmony" in bc.post_hoc else [])
    needed += ["drvi"] if any(m in _DRVI_COVARIATE for m in bc.methods) else []
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        msg = (f"batch-benchmark: expected {', '.join(missing)} installed, found none; pip install "
               "'hescape-train[batch]' (hescape-eval[batch] and hescape-models[drvi])")
        raise HescapeConfigError(msg)


#: The options every run, dataset and score in an output folder depend on (strengths, seeds and methods may grow).
_FIXED = ("epochs", "pretrain_epochs", "drvi_epochs", "n_donors", "n_test", "size_um", "batch_size")


def _claim(bc: BenchmarkConfig) -> None:
    """Create ``OUT`` and record the fixed options in ``OUT/benchmark.json``; an earlier benchmark there with other
    fixed options is refused (its datasets, runs and scores would be reused under the new options' name)."""
    from hescape.data.build import GENERATOR_VERSION

    record = {"format": "hescape-batch-benchmark/1", "generator_version": GENERATOR_VERSION,
              **{k: getattr(bc, k) for k in _FIXED}}
    path = bc.out / "benchmark.json"
    try:
        bc.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"batch-benchmark: cannot create {bc.out} ({e.strerror}); give a writable folder"
        raise HescapeConfigError(msg) from None
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k} {old.get(k)} -> {v}" for k, v in record.items() if old.get(k) != v]
        if diff:
            msg = (f"batch-benchmark: {bc.out} holds a benchmark made with other options ({'; '.join(diff)}); its "
                   "datasets and runs would be reused: give a new output folder, or the same options")
            raise HescapeConfigError(msg)
        return
    if any(bc.out.iterdir()):
        msg = (f"batch-benchmark: {bc.out} is not empty and holds no benchmark.json; give a new output folder")
        raise HescapeConfigError(msg)
    atomic_write_json(path, record)


# -- datasets and the image trunk ----------------------------------------------------------------------------------

def _tag(s: float) -> str:
    return f"s{s:g}".replace(".", "p")


def build_dataset(path: Path, strength: float, *, n_donors: int, n_test: int, size_um: float, seed: int,
                  progress: bool) -> Path:
    """The synthetic dataset of one batch strength, with ``n_test`` test donors and one val donor (kept if built)."""
    from hescape.data import read_manifest
    from hescape.data.batch_effects import BatchEffects
    from hescape.data.build import build_synthetic_dataset
    from hescape.data.splits import apply_splits, donor_split_assignment
    from hescape.data.synthetic import SyntheticConfig

    if (path / "manifest.json").is_file():
        return path
    import os
    import shutil

    cfg = SyntheticConfig(n_donors=n_donors, sample_size_um=size_um, seed=seed, batch=BatchEffects.at(strength))
    tmp = path.with_name(f".{path.name}.building")  # built and split aside, then renamed: a kill leaves no half
    shutil.rmtree(tmp, ignore_errors=True)
    build_synthetic_dataset(tmp, cfg, overwrite=True, progress=progress, truth=True)
    samples = read_manifest(tmp)["samples"]
    apply_splits(tmp, donor_split_assignment(samples, n_val=1, n_test=n_test, seed=0))
    if path.exists():  # an empty or partial folder of an older version
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def export_tower(checkpoint: str | Path, out: str | Path, tower: str = "image") -> Path:
    """Write the ``tower`` encoder's weights of a hescape-train checkpoint (run directory or checkpoint) as a
    safetensors file of the encoder module's own state dict — what ``model.image_weights=FILE`` loads for the small
    encoders (``vit_nano``, ``cnn_tiny``, …). Atomic."""
    from safetensors.torch import save_file

    from .atomic import atomic_write
    from .checkpoint import load_model_checkpoint

    ckpt = load_model_checkpoint(checkpoint, what="export")
    prefix = f"{tower}_encoder."
    sd = {k[len(prefix):]: v.contiguous() for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not sd:
        msg = f"export: {ckpt['source']} has no {tower} encoder weights (keys {prefix}…)"
        raise HescapeConfigError(msg)
    return atomic_write(out, lambda tmp: save_file(sd, tmp))


def _train(overrides: list[str], run_dir: Path):
    """Train one run (resume it when interrupted; a finished one is left as it is)."""
    from .config import load_config, resume_config
    from .trainer import train

    if (run_dir / "results.json").is_file():
        return
    if (run_dir / "config.json").is_file():
        train(resume_config(run_dir, ["progress=false"]), resume=run_dir)
        return
    train(load_config(None, [*overrides, f"out_dir={run_dir.parent}", f"run_name={run_dir.name}"]))


def pretrain_trunk(bc: BenchmarkConfig) -> Path:
    """The frozen image trunk of every run: vit_nano trained with CLIP on another synthetic cohort (seed 1000)."""
    trunk = bc.out / "pretrain" / "image_trunk.safetensors"
    if trunk.is_file():
        return trunk
    data = build_dataset(bc.out / "data" / "pretrain", 0.0, n_donors=8, n_test=2, size_um=bc.size_um, seed=1000,
                         progress=bc.progress)
    run = bc.out / "pretrain" / "run"
    _log(bc, f"pretraining the image trunk on {data} ({bc.pretrain_epochs} epochs)")
    _train([f"data.path={data}", f"epochs={bc.pretrain_epochs}", "probe=false", "progress=false", "seed=1000"], run)
    return export_tower(run, trunk)


def pretrain_drvi_encoder(bc: BenchmarkConfig, data: Path, method: str) -> Path:
    """The DRVI of ``method`` for the dataset ``data``, trained on its training split (kept once trained)."""
    from hescape.models.gene.drvi import pretrain_drvi

    covariate = _DRVI_COVARIATE[method]
    out = bc.out / "drvi" / f"{data.name}-{covariate or 'none'}"
    if not out.is_dir():
        _log(bc, f"pretraining DRVI on {data.name} (covariate {covariate}, {bc.drvi_epochs} epochs)")
        pretrain_drvi(data, out, split="train", max_epochs=bc.drvi_epochs, covariate=covariate, seed=0,
                      accelerator="cpu", progress=False)
    return out


def run_overrides(bc: BenchmarkConfig, data: Path, trunk: Path, method: str, seed: int) -> list[str]:
    """The ``hescape-train`` overrides of one run."""
    base = {"data.path": data, "model.image": "vit_nano", "model.image_weights": trunk,
            "model.image_finetune": "frozen", "data.augment": False, "epochs": bc.epochs, "seed": seed,
            "batch_size": bc.batch_size, "probe": False, "progress": False,
            "data.feature_cache_dir": bc.out / "feature_cache"}
    base.update(METHODS[method])
    if method in _DRVI_COVARIATE:
        base["model.gene_options"] = json.dumps({"model_dir": str(pretrain_drvi_encoder(bc, data, method))})
    return [f"{k}={v}" for k, v in base.items()]


# -- scores ----------------------------------------------------------------------------------------------------------

def _test_split(data: Path) -> dict:
    """Counts, labels and the known niche of every test spot (``truth/<sample>.npz`` of the generator), and the
    expression's silhouette-batch with those niches as labels."""
    from hescape.data import PairedSpotDataset
    from hescape.eval.batch_effects import expression_clusters, silhouette_batch

    ds = PairedSpotDataset(data, "test")
    niche = np.empty(len(ds), dtype=object)
    samples, spots = np.asarray(ds.samples), np.asarray(ds.spot_ids)
    for s in np.unique(samples):
        with np.load(data / "truth" / f"{s}.npz", allow_pickle=False) as z:
            of = dict(zip(z["spot_id"].tolist(), z["niches"][z["niche"]].tolist(), strict=True))
        rows = np.flatnonzero(samples == s)
        niche[rows] = [of[str(x)] for x in spots[rows]]
    counts = ds.raw_counts()
    kept = counts.sum(axis=1) > 0  # silhouette-batch on spots with counts (scanpy's normalisation needs them)
    _, x_pca = expression_clusters(counts[kept], seed=0)
    lab, smp = niche.astype(str)[kept], samples[kept]
    perm = np.random.default_rng(0).permutation(smp)
    return {"counts": counts, "samples": samples, "donors": np.asarray(ds.donors), "niche": niche.astype(str),
            "kept": kept, "genes": list(ds.manifest["genes"]), "sil_expression": silhouette_batch(x_pca, lab, smp),
            "sil_chance": silhouette_batch(x_pca, lab, perm)}


def score_embeddings(image: np.ndarray, gene: np.ndarray, test: dict, seed: int = 0) -> dict:
    """Every score of one set of held-out-donor embeddings (module docstring, step 4).

    Silhouette-batch (scib-metrics, via :func:`hescape.eval.batch_effects.silhouette_batch`) takes the sample as
    the batch and the generator's known niche of every spot as the label: the paper used Leiden clusters of the
    expression because real data has no truth, but under a strong batch effect those clusters split by sample and
    leave nothing to score."""
    from hescape.eval.batch_effects import silhouette_batch
    from hescape.eval.expression import expression_probe
    from hescape.eval.retrieval import retrieval_reports

    full, batch = retrieval_reports(image, gene, protocols=("full", "batch:64"), ks=(5,))
    kept = test["kept"]
    _, per_donor = np.unique(test["donors"], return_counts=True)
    width = min(256, image.shape[1], len(image) - int(per_donor.max()))  # HEST: 256; no wider than a training fold
    probe = expression_probe(image, test["counts"], test["genes"], test["donors"], n_components=width).as_dict()
    return {"r5_full": float(np.mean([full["i2g"].recall[5], full["g2i"].recall[5]])),
            "r5_full_i2g": full["i2g"].recall[5], "r5_full_g2i": full["g2i"].recall[5],
            "r5_full_chance": full["i2g"].chance[5],
            "r5_batch": float(np.mean([batch["i2g"].recall[5], batch["g2i"].recall[5]])),
            "r5_batch_chance": batch["i2g"].chance[5],
            "sil_gene": silhouette_batch(gene[kept], test["niche"][kept], test["samples"][kept]),
            "sil_image": silhouette_batch(image[kept], test["niche"][kept], test["samples"][kept]),
            "sil_expression": test["sil_expression"], "sil_chance": test["sil_chance"],
            "probe_r": probe["pearson_mean"], "probe_mean_baseline_r": probe["mean_baseline_pearson_mean"],
            "n_test": len(image)}


def _score(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    rec = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, rec)
    return rec


def run_benchmark(bc: BenchmarkConfig) -> list[dict]:
    """Datasets, trunk, runs and scores (what is missing), then the table and the figure; returns the score rows."""
    from hescape.eval.correction import centre_by_sample, harmony
    from hescape.eval.io import load_embeddings

    _check(bc)
    _claim(bc)
    trunk = pretrain_trunk(bc)
    rows = []
    for s in bc.strengths:
        data = build_dataset(bc.out / "data" / _tag(s), s, n_donors=bc.n_donors, n_test=bc.n_test,
                             size_um=bc.size_um, seed=0, progress=bc.progress)
        test = _test_split(data)
        for method in bc.methods:
            for seed in bc.seeds:
                name = f"{_tag(s)}-{method}-seed{seed}"
                run = bc.out / "runs" / name
                _log(bc, f"strength {s:g}  {method:<24} seed {seed}")
                _train(run_overrides(bc, data, trunk, method, seed), run)

                def compute(run=run, seed=seed, test=test):
                    emb = load_embeddings(run)
                    return score_embeddings(emb.image, emb.gene, test, seed)

                rows.append({"strength": s, "method": method, "seed": seed,
                             **_score(bc.out / "scores" / f"{name}.json", compute)})
                if method != "clip":
                    continue
                for post in bc.post_hoc:
                    fix = harmony if post == "harmony" else centre_by_sample

                    def compute_post(run=run, seed=seed, fix=fix, test=test):
                        emb = load_embeddings(run)
                        return score_embeddings(fix(emb.image, test["samples"]), fix(emb.gene, test["samples"]),
                                                test, seed)

                    rows.append({"strength": s, "method": f"clip+{post}", "seed": seed,
                                 **_score(bc.out / "scores" / f"{name}+{post}.json", compute_post)})
    write_report(rows, bc)
    return rows


# -- the report -----------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def summarise(rows: list[dict]) -> list[dict]:
    """mean and std over seeds of every metric, one record per (method, strength)."""
    keys = sorted({(r["method"], r["strength"]) for r in rows}, key=lambda k: (k[1], k[0]))
    out = []
    for method, s in keys:
        sel = [r for r in rows if r["method"] == method and r["strength"] == s]
        rec = {"method": method, "strength": s, "n_seeds": len(sel)}
        for key in (*(k for k, _ in _METRICS), "sil_expression", "r5_full_chance", "r5_batch_chance", "sil_chance",
                    "probe_mean_baseline_r"):
            rec[f"{key}_mean"], rec[f"{key}_std"] = _mean_std([r.get(key) for r in sel])
        out.append(rec)
    return out


def write_report(rows: list[dict], bc: BenchmarkConfig) -> None:
    """``results.md`` (one table per metric: methods × strengths, best per column in bold), ``results.csv`` (every
    run), ``summary.csv`` and ``batch_benchmark.png``."""
    summ = summarise(rows)
    methods = list(dict.fromkeys(r["method"] for r in summ))
    strengths = sorted({r["strength"] for r in summ})
    get = {(r["method"], r["strength"]): r for r in summ}
    first = {s: get[(methods[0], s)] for s in strengths}
    lines = ["# Batch-robust alignment benchmark", "",
             f"Held-out donors: {bc.n_test} per dataset ({rows[0]['n_test']} test spots); mean (std) over seeds "
             f"{', '.join(map(str, bc.seeds))}; {bc.epochs} epochs per run; frozen pretrained vit_nano image trunk, "
             "MLP gene tower and both heads trained (hescape.train.batch_benchmark).", "",
             "Expression silhouette-batch of the test split (sample as batch; 1 = mixed): "
             + ", ".join(f"strength {s:g}: {first[s]['sil_expression_mean']:.3f}" for s in strengths)
             + f" (permuted-batch chance {first[strengths[0]]['sil_chance_mean']:.3f}).",
             f"Chance R@5: full gallery {first[strengths[0]]['r5_full_chance_mean']:.4f} (pool = the test split); "
             f"batch:64 {first[strengths[0]]['r5_batch_chance_mean']:.4f} (pool 64). Silhouette-batch: sample as "
             "batch, the generator's known niche as label.", ""]
    higher_better = {"r5_full": True, "r5_batch": True, "sil_gene": True, "sil_image": True, "probe_r": True}
    for key, title in _METRICS:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"strength {s:g}" for s in strengths) + " |",
                  "|---|" + "---|" * len(strengths)]
        best = {s: max((get[(m, s)][f"{key}_mean"] for m in methods if (m, s) in get
                        and math.isfinite(get[(m, s)][f"{key}_mean"])), default=math.nan) for s in strengths}
        for m in methods:
            cells = []
            for s in strengths:
                r = get.get((m, s))
                if r is None:
                    cells.append("")
                    continue
                mu, sd = r[f"{key}_mean"], r[f"{key}_std"]
                text = f"{mu:.3f} ({sd:.3f})" if r["n_seeds"] > 1 else f"{mu:.3f} (n/a)"
                cells.append(f"**{text}**" if higher_better[key] and mu == best[s] else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    atomic_write_text(bc.out / "results.md", "\n".join(lines))
    cols = ["strength", "method", "seed", *sorted({k for r in rows for k in r} - {"strength", "method", "seed"})]
    atomic_write_text(bc.out / "results.csv", "\n".join([",".join(cols)] + [",".join(
        "" if r.get(c) is None else str(r.get(c)) for c in cols) for r in rows]) + "\n")
    scols = list(summ[0])
    atomic_write_text(bc.out / "summary.csv", "\n".join([",".join(scols)] + [",".join(
        str(r[c]) for c in scols) for r in summ]) + "\n")
    plot(summ, bc.out / "batch_benchmark.png")


def plot(summ: list[dict], path: Path) -> Path:
    """Four panels against batch strength, one line per method with ±1 sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_write_bytes

    methods = list(dict.fromkeys(r["method"] for r in summ))
    panels = (("r5_full", "R@5, full gallery (held-out donors)"), ("r5_batch", "R@5, per batch of 64 (paper)"),
              ("sil_gene", "silhouette-batch, gene embedding"), ("probe_r", "HEST probe Pearson (image emb.)"))
    # the chance level of each panel (grey, dotted): a random ranking, permuted batches, the training-mean predictor
    chance = {"r5_full": "r5_full_chance", "r5_batch": "r5_batch_chance", "sil_gene": "sil_chance",
              "probe_r": "probe_mean_baseline_r"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    colours = plt.get_cmap("tab20").colors
    for ax, (key, title) in zip(axes, panels, strict=True):
        ref = sorted((r for r in summ if r["method"] == methods[0]), key=lambda r: r["strength"])
        ax.plot([r["strength"] for r in ref], [r[f"{chance[key]}_mean"] for r in ref], ls=":", color="grey", lw=1.5,
                label="chance / baseline")
        for i, m in enumerate(methods):
            rs = sorted((r for r in summ if r["method"] == m), key=lambda r: r["strength"])
            x = np.array([r["strength"] for r in rs]) + (i - len(methods) / 2) * 0.012
            sd = [r[f"{key}_std"] if math.isfinite(r[f"{key}_std"]) else 0.0 for r in rs]  # one seed: no bar
            ax.errorbar(x, [r[f"{key}_mean"] for r in rs], yerr=sd, marker="o", color=colours[(2 * i) % 20 + (i >= 10)],
                        ms=3.5, lw=1.2, capsize=2, label=m, ls="--" if m.startswith("clip+") else "-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch strength")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# -- the command ----------------------------------------------------------------------------------------------------

def _numbers(cast, noun: str):
    """An argparse type: comma-separated values of ``cast`` (``float``/``int``)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(t) for t in text.split(",") if t.strip())
        except ValueError:
            msg = f"expected comma-separated {noun}, found {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    return parse


_floats, _ints = _numbers(float, "numbers"), _numbers(int, "integers")


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hescape-train batch-benchmark",
                                description="Batch-robust alignment: every method × batch strength × seed on "
                                            "synthetic data whose batch effect is a dial; writes OUT/results.md, "
                                            "results.csv, summary.csv and batch_benchmark.png. Resumable.")
    p.add_argument("out", type=Path, help="output folder (datasets, runs, scores, report)")
    p.add_argument("--strengths", type=_floats, default=(0.0, 1.0, 2.0), help="batch strengths (default 0,1,2)")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="training seeds (default 0,1,2)")
    p.add_argument("--methods", type=_names, default=tuple(METHODS), help=f"trained methods (default all: "
                                                                          f"{','.join(METHODS)})")
    p.add_argument("--post-hoc", type=_names, default=POST_HOC, help="post-hoc corrections of the clip runs "
                                                                      f"(default {','.join(POST_HOC)})")
    p.add_argument("--epochs", type=int, default=16, help="epochs per run (default 16)")
    p.add_argument("--pretrain-epochs", type=int, default=8, help="epochs of the image-trunk pretraining (default 8)")
    p.add_argument("--drvi-epochs", type=int, default=50, help="epochs of each DRVI pretraining (default 50)")
    p.add_argument("--n-donors", type=int, default=10, help="donors per dataset (default 10)")
    p.add_argument("--n-test", type=int, default=3, help="held-out test donors (default 3)")
    p.add_argument("--size-um", type=float, default=1000.0, help="side of each synthetic section in µm (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="spots per training step (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bc = BenchmarkConfig(out=args.out, strengths=args.strengths, seeds=args.seeds, methods=args.methods,
                         post_hoc=args.post_hoc, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
                         drvi_epochs=args.drvi_epochs,
                         n_donors=args.n_donors, n_test=args.n_test, size_um=args.size_um, batch_size=args.batch_size,
                         progress=not args.quiet)
    try:
        run_benchmark(bc)
    except KeyboardInterrupt:
        print(f"hescape-train batch-benchmark: interrupted; finished runs and scores in {bc.out} are kept: run the "
              "same command again to continue", file=sys.stderr)
        return 130
    except Exception as e:
        from .cli import user_error_exit

        return user_error_exit("hescape-train batch-benchmark", e)
    print((bc.out / "results.md").read_text().rstrip())
    print(f"\nfigure: {bc.out / 'batch_benchmark.png'}")
    return 0
