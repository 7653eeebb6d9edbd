"""Faults a new-user trial of ``hescape-eval`` found, each pinned by a test: option ranges, stale report files, messages
that name CLI flags in plain text, byte-order marks, protocol / k / unfinished-run advice, the dataset-join message,
duplicate ``--ks`` / ``--protocol``, export obs names, the report figure's layout and its variant labels.

Inputs are written here in the real layouts (hescape-data's ``DatasetWriter``, hescape-train's run directory); every
expected value is written by hand or computed here by brute force, never by the code under test.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from hescape.eval import HescapeEvalError
from hescape.eval.cli import build_parser
from hescape.eval.expression_report import read_gene_list
from hescape.eval.io import embeddings_path, save_embeddings
from hescape.eval.report import load_run, write_report

HAS_DATA = importlib.util.find_spec("hescape.data") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_ANNDATA = importlib.util.find_spec("anndata") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------------------- 1. numeric option ranges

_OUT = "OUT"  # replaced by a path in tmp_path that must not exist afterwards
_BAD_OPTIONS = [
    (["expression", "run", "--out", _OUT, "--seed", "-3", "--n-components", "16"], "--seed"),
    (["expression", "run", "--out", _OUT, "--seed", str(2**32)], "--seed"),
    (["expression", "run", "--out", _OUT, "--n-components", "0"], "--n-components"),
    (["expression", "run", "--out", _OUT, "--n-genes", "0"], "--n-genes"),
    (["expression", "run", "--out", _OUT, "--min-cells-pct", "1.5"], "--min-cells-pct"),
    (["expression", "run", "--out", _OUT, "--min-cells-pct", "nan"], "--min-cells-pct"),
    (["expression", "run", "--out", _OUT, "--folds", "1"], "--folds"),
    (["expression", "run", "--out", _OUT, "--inner-folds", "1"], "--inner-folds"),
    (["expression", "run", "--out", _OUT, "--alpha", "inf"], "--alpha"),
    (["report", "run", "--out", _OUT, "--k", "0"], "--k"),
    (["retrieval", "run", "--out", _OUT + ".json", "--ks", "0,5"], "--ks"),
    (["embed", "model", "ds", "--out", _OUT + ".npz", "--batch-size", "0"], "--batch-size"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--lr", "0"], "--lr"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--lr", "nan"], "--lr"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--weight-decay", "-1"], "--weight-decay"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--epochs", "0"], "--epochs"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--val-every", "0"], "--val-every"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--folds", "2"], "--folds"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--seed", "-1"], "--seed"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--min-tissue", "2"], "--min-tissue"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--um-per-px", "-0.5"], "--um-per-px"),
    (["mutation", "s.csv", "--encoder", "uni", "--out", _OUT, "--batch-size", "0"], "--batch-size"),
    (["batch-effects", "run", "--out", _OUT, "--max-spots", "-1"], "--max-spots"),
    (["batch-effects", "run", "--out", _OUT, "--batch-size", "0"], "--batch-size"),
    (["batch-effects", "run", "--out", _OUT, "--seed", "-7"], "--seed"),
]


@pytest.mark.parametrize(("argv", "flag"), _BAD_OPTIONS, ids=[f"{a[0]} {f} {a[a.index(f) + 1]}" for a, f in _BAD_OPTIONS])
def test_numeric_option_out_of_range_is_one_line_exit_2_and_writes_nothing(tmp_path, cli, one_line_error, argv,
                                                                           flag):
    out = tmp_path / "out"
    argv = [a.replace(_OUT, str(out)) for a in argv]
    code, stdout, err = cli(*argv)
    line = one_line_error(code, err, flag, "expected", "found", "fix")
    value = argv[argv.index(flag) + 1]
    assert f"found {value!r}" in line
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing read


def test_numeric_option_bounds_are_inclusive():
    p = build_parser()
    a = p.parse_args(["expression", "r", "--out", "o", "--seed", str(2**32 - 1), "--min-cells-pct", "1",
                      "--folds", "2", "--inner-folds", "2", "--n-components", "1"])
    assert (a.seed, a.min_cells_pct, a.folds, a.inner_folds, a.n_components) == (2**32 - 1, 1.0, 2, 2, 1)
    a = p.parse_args(["mutation", "s.csv", "--encoder", "uni", "--out", "o", "--weight-decay", "0",
                      "--min-tissue", "0", "--folds", "3", "--seed", "0"])
    assert (a.weight_decay, a.min_tissue, a.folds, a.seed) == (0.0, 0.0, 3, 0)
    assert p.parse_args(["batch-effects", "r", "--out", "o", "--max-spots", "0"]).max_spots == 0


# ------------------------------------------------------------------------------- 7. duplicate --ks and --protocol


def _pair_run(tmp_path, n=40, seed=0, name="r"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, 8))
    g = q + 0.9 * rng.standard_normal((n, 8))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    run = tmp_path / name
    save_embeddings(embeddings_path(run), image=q, gene=g, index=np.arange(n), sample=["s"] * n, donor=["d"] * n)
    return run, q, g


@pytest.mark.parametrize("argv", [["--ks", "5,5"], ["--ks", "1,5,1"], ["--protocol", "full", "--protocol", "full"],
                                  ["--protocol", "batch", "--protocol", "batch:64"]])
def test_duplicate_ks_or_protocol_is_refused(tmp_path, cli, argv, one_line_error):
    run, _, _ = _pair_run(tmp_path)
    code, stdout, err = cli("retrieval", run, *argv)
    one_line_error(code, err, argv[0], "once")
    assert stdout == ""


# ------------------------------------------------------------------------- report runs (hescape-train's layout)


def _report_run(root, name, *, seed=0, n=None, results=True, ks=(1, 5), data_path=None, resolved=None, bom=False,
                loss="clip"):
    """A run directory; with ``n`` also test embeddings, and results.json then holds their brute-force Recall@k."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    ds = root / "data" / "breast"
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "manifest.json").write_text(json.dumps({"ingest": {"kind": "xenium", "panel": "human-breast-panel"}}))
    cfg = {"format": "hescape-train-config/1", "seed": seed, "model": {"name": "demo", "image": "vit_nano",
                                                                       "gene": "mlp", "loss": loss},
           "data": {"path": data_path or str(ds), "panel": "human-breast-panel"},
           "data_resolved": resolved or data_path or str(ds)}
    enc = "utf-8-sig" if bom else "utf-8"
    (run / "config.json").write_text(json.dumps(cfg), encoding=enc)
    res = {"split": "test", "checkpoint": "best"}
    if n is not None:
        _, q, g = _pair_run(run.parent, n=n, seed=seed, name=name)
        sim = q.astype(np.float64) @ g.astype(np.float64).T
        for d, s in (("i2g", sim), ("g2i", sim.T)):
            rank = np.array([np.flatnonzero(np.argsort(-s[i], kind="stable") == i)[0] for i in range(n)])
            for k in ks:
                res.update({f"{d}_R@{k}": float(np.mean(rank < k)), f"{d}_R@{k}_chance": k / n})
            res.update({f"{d}_protocol": "full", f"{d}_pool": n})
    else:
        for d in ("i2g", "g2i"):
            for k in ks:
                res.update({f"{d}_R@{k}": 0.1 * k, f"{d}_R@{k}_chance": k / 100})
            res.update({f"{d}_protocol": "full", f"{d}_pool": 100})
    if results:
        (run / "results.json").write_text(json.dumps(res), encoding=enc)
    return run


# ------------------------------------------------------------------------------------ 2. stale report outputs


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.skipif(not HAS_MPL, reason="the figure needs matplotlib")
def test_overwrite_removes_report_outputs_not_written_again(tmp_path, cli, one_line_error):
    runs = [_report_run(tmp_path, f"s{s}", seed=s) for s in range(2)]
    out = tmp_path / "rep"
    (out / "notes").mkdir(parents=True)
    (out / "my_notes.txt").write_text("mine")  # not a report output: never touched
    (out / "recall_at_5.png.bak").write_text("mine")
    assert cli("report", *runs, "--out", out)[0] == 0
    assert _names(out) == ["my_notes.txt", "notes", "recall_at_5.png", "recall_at_5.png.bak", "report.csv",
                           "report.md", "report_long.csv"]
    code, _, err = cli("report", *runs, "--out", out, "--overwrite", "--no-figures")
    assert code == 0, err
    assert _names(out) == ["my_notes.txt", "notes", "recall_at_5.png.bak", "report.csv", "report.md",
                           "report_long.csv"]
    code, _, err = cli("report", *runs, "--out", out, "--overwrite", "--k", "1")
    assert code == 0, err
    assert "recall_at_1.png" in _names(out) and "Recall@1" in (out / "report.md").read_text()
    code, _, err = cli("report", *runs, "--out", out, "--overwrite", "--k", "5")
    assert code == 0, err
    assert "recall_at_1.png" not in _names(out) and "recall_at_5.png" in _names(out)
    # without --overwrite, a previous report output of another k is refused too (it would be left stale)
    (out / "report.md").unlink()
    (out / "report.csv").unlink()
    (out / "report_long.csv").unlink()
    code, _, err = cli("report", *runs, "--out", out, "--k", "1")
    one_line_error(code, err, "recall_at_5.png", "--overwrite")


def test_closed_stdout_pipe_is_quiet_exit_141(tmp_path):
    """`hescape-eval report ... | head -0`: the reader closed the pipe; exit 141 (128 + SIGPIPE) and nothing on
    stderr, not an "error: check the path" line (the pipe is not a file problem)."""
    import subprocess
    import sys

    runs = [_report_run(tmp_path, f"s{s}", seed=s) for s in range(2)]
    code = ("import sys, hescape.eval.cli as c; sys.stdout = open(sys.stdout.fileno(), 'w', buffering=1); "
            "sys.exit(c.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "report", *map(str, runs), "--out", str(tmp_path / "r"),
                             "--no-figures"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the report is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "error" not in err and "Traceback" not in err


@pytest.mark.skipif(not HAS_MPL, reason="the figure needs matplotlib")
def test_a_failed_report_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    runs = [_report_run(tmp_path, f"s{s}", seed=s) for s in range(2)]
    out = tmp_path / "rep"
    write_report(runs, out, k=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(table, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hescape.eval.report.plot_recall", broken)
    with pytest.raises(OSError):
        write_report(runs[:1], out, k=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old set, no temporary file left


# ------------------------------------------------------------------------- 5, 10. report advice and unfinished runs


def test_pool_mismatch_under_one_protocol_suggests_a_smaller_batch(tmp_path, cli, one_line_error):
    a = _report_run(tmp_path, "a", seed=0, n=90)
    b = _report_run(tmp_path, "b", seed=1, n=39)
    code, _, err = cli("report", a, b, "--out", tmp_path / "r", "--protocol", "batch:64")
    line = one_line_error(code, err, "pool 64", "pool 39", "batch:B with B <= 39", "report the runs separately")
    assert "pass --protocol to recompute" not in line
    assert not (tmp_path / "r").exists()
    # B = 39 makes them comparable: every pool is 39
    code, stdout, err = cli("report", a, b, "--out", tmp_path / "r", "--protocol", "batch:39")
    assert code == 0, err
    assert "pool 39" in stdout


def test_missing_k_suggests_protocol_full_which_recomputes_results_json(tmp_path, cli, one_line_error):
    run = _report_run(tmp_path, "a", n=60, ks=(1, 5))
    code, _, err = cli("report", run, "--out", tmp_path / "r", "--k", "10")
    one_line_error(code, err, "--k among [1, 5]", "--protocol full", "retrain")
    # the advice is true: --protocol full reproduces results.json's numbers (brute force, written above)
    rec = load_run(run, k=5, protocol="full")
    res = json.loads((run / "results.json").read_text())
    assert rec.recall == pytest.approx({"i2g": res["i2g_R@5"], "g2i": res["g2i_R@5"]}, abs=1e-12)
    assert rec.pool == 60 and load_run(run, k=10, protocol="full").k == 10
    # without saved embeddings the advice is only to retrain or choose another k
    bare = _report_run(tmp_path, "bare", ks=(1, 5))
    code, _, err = cli("report", bare, "--out", tmp_path / "r", "--k", "10")
    assert "--protocol full" not in one_line_error(code, err, "retrain")


@pytest.mark.parametrize("protocol", [[], ["--protocol", "full"], ["--protocol", "batch:16"]])
def test_unfinished_run_is_refused_in_every_mode(tmp_path, cli, protocol, one_line_error):
    done = _report_run(tmp_path, "done", seed=0, n=40)
    unfinished = _report_run(tmp_path, "unfinished", seed=1, n=40, results=False)
    code, _, err = cli("report", done, unfinished, "--out", tmp_path / "r", *protocol)
    one_line_error(code, err, f"run {unfinished}", "found no results.json", "let the run finish")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------- 9. figure and labels


@pytest.mark.skipif(not HAS_MPL, reason="the figure needs matplotlib")
def test_figure_keeps_labels_inside_and_chance_off_the_bars(tmp_path, monkeypatch):
    import matplotlib.image
    import matplotlib.pyplot as plt

    runs = [_report_run(tmp_path, f"{loss}{s}", seed=s, n=40, loss=loss) for s in range(2)
            for loss in ("clip", "siglip_with_a_long_name")]
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    res = write_report(runs, tmp_path / "rep", k=5, protocol="full")
    img = matplotlib.image.imread(res["figure"])[..., :3]
    for edge in (img[0], img[-1], img[:, 0], img[:, -1]):  # a white margin on all four sides: nothing is cut off
        assert (edge > 0.99).all()
    ax = figs[0].axes[0]
    assert len(ax.texts) == 0  # no label drawn inside the axes, over the bars
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"chance {5 / 40:.3f}" in legend  # 5/40 = 0.125


def test_variant_label_uses_data_path_not_the_resolved_path(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"ingest": {"panel": "human-breast-panel"}}))
    breast, other = str(tmp_path / "data" / "breast"), str(tmp_path / "other")
    # hescape-train writes data_resolved beside data.path (here the same absolute paths, as in the trial)
    a = _report_run(tmp_path, "a", seed=0, data_path=breast, resolved=breast)
    b = _report_run(tmp_path, "b", seed=0, data_path=other, resolved=other)
    rows = write_report([a, b], tmp_path / "rep", figures=False)["table"].rows
    assert rows == [f"mlp-vit_nano [data.path={breast}]", f"mlp-vit_nano [data.path={other}]"]
    # a relative data.path: the panel is found through data_resolved wherever the report runs; the label is the user's
    c = _report_run(tmp_path / "rel", "c", seed=0, data_path="data/breast", resolved=breast)
    d = _report_run(tmp_path / "rel", "d", seed=0, data_path="other", resolved=other)
    table = write_report([c, d], tmp_path / "rep2", figures=False)["table"]
    assert table.rows == ["mlp-vit_nano [data.path=data/breast]", "mlp-vit_nano [data.path=other]"]
    assert table.columns == [("human-breast-panel", "i2g"), ("human-breast-panel", "g2i")]


# --------------------------------------------------------------------------------------------- 4. byte-order marks


def test_text_inputs_with_a_byte_order_mark(tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("ESR1\r\nCD4 \r\n\r\nERBB2\r\n", encoding="utf-8-sig")  # as Excel / Notepad save it
    assert genes.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_gene_list(str(genes)) == ["ESR1", "CD4", "ERBB2"]
    js = tmp_path / "var_3genes.json"
    js.write_text(json.dumps({"genes": ["ESR1", "CD4", "ERBB2"]}), encoding="utf-8-sig")
    assert read_gene_list(str(js)) == ["ESR1", "CD4", "ERBB2"]
    run = _report_run(tmp_path, "bom", bom=True)  # config.json and results.json with a BOM
    rec = load_run(run, k=5)
    assert (rec.image, rec.gene, rec.recall["i2g"]) == ("vit_nano", "mlp", pytest.approx(0.5))


# ------------------------------------------------------------------- expression / export over a hescape-data dataset

SPLITS = {"donor_0": "train", "donor_1": "train", "donor_3": "test", "donor_4": "test", "donor_5": "test"}
N_PER, G, D = 30, 8, 12
GENES = [f"GENE{j}" for j in range(G)]


def _write_dataset(path, splits):
    from hescape.data.arrow import DatasetWriter, SpotRecords, encode_png

    rng = np.random.default_rng(0)
    with DatasetWriter(path, genes=GENES, gene_ids=[f"ENSG{j:05d}" for j in range(G)], rows_per_shard=50) as w:
        for k, (donor, split) in enumerate(splits.items()):
            counts = rng.poisson(5.0, size=(N_PER, G)).astype(np.float32)
            images = [encode_png(np.full((8, 8, 3), 100 + k, np.uint8)) for _ in range(N_PER)]
            w.add(SpotRecords(name=f"S_{donor}", donor=donor, tissue="t", source="test", images=images, gexp=counts,
                              coords_um=rng.uniform(0, 1000, size=(N_PER, 2)), n_cells=np.ones(N_PER, np.int32),
                              spot_ids=[f"hex_{i:03d}" for i in range(N_PER)]), split=split)
    return path


def _save_split(path, donors):
    rng = np.random.default_rng(1)
    n = len(donors) * N_PER
    x = rng.standard_normal((n, D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return save_embeddings(path, image=x, gene=x[:, ::-1].copy(), index=np.arange(n),
                           sample=np.repeat([f"S_{d}" for d in donors], N_PER), donor=np.repeat(donors, N_PER),
                           spot_id=np.tile([f"hex_{i:03d}" for i in range(N_PER)], len(donors)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not (HAS_DATA and HAS_SKLEARN):
        pytest.skip("needs hescape-data and scikit-learn")
    root = tmp_path_factory.mktemp("trial")
    ds = _write_dataset(root / "ds", SPLITS)
    run = root / "run"
    test = ["donor_3", "donor_4", "donor_5"]
    _save_split(embeddings_path(run), test)
    _save_split(root / "train.npz", ["donor_0", "donor_1"])
    cfg = {"format": "hescape-train-config/1", "seed": 0, "data_resolved": str(ds), "data": {"path": str(ds)},
           "model": {"name": "vit_mlp_nano"}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "results.json").write_text(json.dumps({"i2g_R@5": 0.2, "g2i_R@5": 0.2}))
    return {"root": root, "ds": ds, "run": run}


def test_expression_messages_name_flags_in_plain_text(world, tmp_path, cli, one_line_error):
    out = tmp_path / "x"
    # 3 test donors of 30 spots: leaving one out trains on 60 spots, so PCA(12) fits but PCA(61) cannot
    code, _, err = cli("expression", world["run"], "--out", out, "--genes", "GENE1,GENE2", "--n-components",
                       13)
    one_line_error(code, err, "--n-components 13", "--n-components 12")  # the embedding width, d = 12
    code, _, err = cli("expression", world["run"], "--out", out, "--genes", "GENE1,FOO")
    one_line_error(code, err, "1 missing: FOO", "--genes")
    code, _, err = cli("expression", world["run"], "--out", out, "--genes", "GENE1,GENE1")
    one_line_error(code, err, "--genes", "duplicate")
    code, _, err = cli("expression", world["run"], "--out", out, "--genes", "GENE1", "--folds", 4)
    one_line_error(code, err, "--folds")
    assert not out.exists()


def test_expression_fold_too_small_names_the_flag_and_plain_donors(world):
    from hescape.eval.expression import expression_probe

    rng = np.random.default_rng(0)
    donors = np.repeat(np.array(["donor_a", "donor_b", "donor_c"]), [10, 20, 30])  # numpy strings, as loaded
    x = rng.standard_normal((60, 64))
    counts = rng.poisson(3.0, size=(60, 4)).astype(np.float32)
    with pytest.raises(HescapeEvalError) as exc:
        expression_probe(x, counts, ["A", "B", "C", "D"], donors, genes=["A", "B"], n_components=45)
    msg = str(exc.value)
    # leave-one-out folds in donor order train on 50, 40 and 30 spots: donor_b's fold is the first too small for 45,
    # and 30, the smallest, is the largest PCA width every fold can fit
    assert "found 40 (held out: donor_b)" in msg and "--n-components 30" in msg and "np.str_" not in msg


def test_gene_list_with_bom_runs_the_probe(world, tmp_path, cli):
    genes = tmp_path / "genes.txt"
    genes.write_text("GENE1\nGENE2\nGENE3\n", encoding="utf-8-sig")
    code, _, err = cli("expression", world["run"], "--out", tmp_path / "x", "--genes", genes,
                       "--n-components", 4)
    assert code == 0, err
    assert json.loads((tmp_path / "x" / "expression.json").read_text())["genes"] == ["GENE1", "GENE2", "GENE3"]


def test_resplit_dataset_message_says_the_splits_may_have_changed(world, tmp_path, cli, one_line_error):
    # the same samples, re-split: donor_3 (test at embedding time) is now train, so the file's samples span 2 splits
    moved = dict(SPLITS, donor_3="train")
    ds2 = _write_dataset(tmp_path / "resplit", moved)
    for cmd in (["expression", world["run"], "--out", tmp_path / "x"], ["export", world["run"], tmp_path / "x.h5ad"]):
        code, _, err = cli(*cmd, "--dataset", ds2)
        line = one_line_error(code, err, "no split of the dataset holds all 3 samples", "splits test, train",
                              "splits may have changed")
        assert "counts the rows" not in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.h5ad").exists()


def test_moved_dataset_is_named_once(world, tmp_path, cli, one_line_error):
    run = tmp_path / "run"
    _save_split(embeddings_path(run), ["donor_3", "donor_4", "donor_5"])
    gone = str(tmp_path / "moved_away")
    (run / "config.json").write_text(json.dumps({"seed": 0, "data": {"path": gone}, "data_resolved": gone}))
    code, _, err = cli("expression", run, "--out", tmp_path / "x")
    line = one_line_error(code, err, gone, "--dataset")
    assert line.count(gone) == 1


@pytest.mark.skipif(not HAS_ANNDATA, reason="needs anndata")
def test_exports_of_two_splits_concatenate_with_unique_obs_names(world, tmp_path, cli):
    import anndata

    assert cli("export", world["run"], tmp_path / "test.h5ad")[0] == 0
    code, _, err = cli("export", world["root"] / "train.npz", tmp_path / "train.h5ad", "--dataset",
                       world["ds"])
    assert code == 0, err
    te, tr = anndata.read_h5ad(tmp_path / "test.h5ad"), anndata.read_h5ad(tmp_path / "train.h5ad")
    assert list(te.obs_names[:2]) == ["S_donor_3:hex_000", "S_donor_3:hex_001"]
    assert list(tr.obs_names[-1:]) == ["S_donor_1:hex_029"]
    assert te.obs["row"].tolist() == list(range(90)) and tr.obs["row"].tolist() == list(range(60))
    both = anndata.concat([tr, te])
    assert both.n_obs == 150 and both.obs_names.is_unique


def test_missing_split_embeddings_point_to_embed(tmp_path, cli, one_line_error):
    """hescape-train saves only the test split's embeddings: asking a run for another split names the
    `hescape-eval embed ... --split train --out train.npz` command that makes them (not "rerun training")."""
    run = tmp_path / "run"
    (run / "embeddings").mkdir(parents=True)
    code, _, err = cli("retrieval", run, "--split", "train")
    line = one_line_error(code, err, "embed", "--split train", "--out train.npz")
    assert "rerun training" not in line


def test_expression_empty_out_refused(tmp_path, cli, one_line_error, monkeypatch):
    """`--out ''` read as the current folder and wrote four files there: refused before any work, nothing written."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("expression", tmp_path / "no-run", "--out", "")
    one_line_error(code, err, "--out", "empty path")
    assert list(tmp_path.iterdir()) == []
