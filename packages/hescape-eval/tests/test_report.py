"""``hescape-eval report``: paper-layout tables over fake hescape-train run directories.

Every expected number is computed by hand (or by ``statistics`` / brute-force NumPy), never by hescape.eval.report.
"""

from __future__ import annotations

import csv
import io
import json
import statistics

import numpy as np
import pytest
from hescape.eval import HescapeEvalError
from hescape.eval.io import embeddings_path, save_embeddings
from hescape.eval.report import build_table, load_run, load_runs, write_report


def _dataset(tmp_path, panel: str) -> str:
    """A dataset folder whose manifest records its panel as hescape-data's ingest does (``ingest.panel``)."""
    d = tmp_path / "data" / panel
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"ingest": {"kind": "xenium", "panel": panel}}))
    return str(d)


def _run(tmp_path, name, *, image, gene, seed, i2g, g2i, pool=1000, protocol="full", panel="human-breast-panel",
         results=True, k=5):
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    cfg = {"format": "hescape-train-config/1", "seed": seed,
           "model": {"name": "paper", "image": image, "gene": gene},
           "data": {"path": _dataset(tmp_path, panel), "panel": "human-breast-panel"}}
    (run / "config.json").write_text(json.dumps(cfg))
    if results:
        res = {"split": "test", "checkpoint": "best"}
        for d, v in (("i2g", i2g), ("g2i", g2i)):
            res.update({f"{d}_R@1": v / 2, f"{d}_R@{k}": v, f"{d}_R@{k}_chance": k / pool, f"{d}_protocol": protocol,
                        f"{d}_pool": pool, f"{d}_n": pool, f"{d}_R@{k}_probe": 0.01})
        (run / "results.json").write_text(json.dumps(res))
    return run


@pytest.fixture
def runs(tmp_path):
    """Three models on one panel: A (3 seeds), B (2 seeds), C (1 seed)."""
    vals = {("uni", "mlp"): [(0.20, 0.10), (0.30, 0.12), (0.40, 0.14)],
            ("conch", "mlp"): [(0.10, 0.50), (0.20, 0.40)],
            ("uni", "drvi"): [(0.25, 0.30)]}
    out = []
    for (image, gene), seeds in vals.items():
        for s, (a, b) in enumerate(seeds):
            out.append(_run(tmp_path, f"{gene}-{image}-s{s}", image=image, gene=gene, seed=s, i2g=a, g2i=b))
    return out


def _md_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| Model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_mean_std_marks_against_hand_values(runs):
    table = build_table(load_runs(runs))
    assert table.columns == [("human-breast-panel", "i2g"), ("human-breast-panel", "g2i")]
    a = table.cells[("mlp-uni", ("human-breast-panel", "i2g"))]
    # hand: mean(0.2, 0.3, 0.4) = 0.3; sample sd = sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert a.mean == pytest.approx(0.3) and a.std == pytest.approx(0.1) and a.n == 3 and a.seeds == [0, 1, 2]
    b = table.cells[("mlp-conch", ("human-breast-panel", "i2g"))]
    assert b.std == pytest.approx(statistics.stdev([0.10, 0.20])) and b.std == pytest.approx(0.0707107, abs=1e-6)
    md = table.to_markdown()
    rows = _md_rows(md)
    # I2G: A 0.300 best, C 0.250 second, B 0.150 unmarked; G2I: B 0.450 best, C 0.300 second, A 0.120
    assert rows["mlp-uni"] == ["**0.300(0.100)**", "0.120(0.020)"]
    assert rows["mlp-conch"] == ["0.150(0.071, n=2)", "**0.450(0.071, n=2)**"]
    assert rows["drvi-uni"] == ["<u>0.250(—, n=1)</u>", "<u>0.300(—, n=1)</u>"]
    assert rows["*chance*"] == ["0.005", "0.005"]  # 5 / 1000
    assert "| Model | Breast I2G | Breast G2I |" in md
    # paper naming: <gene encoder>-<image encoder>, rows sorted by gene encoder
    assert list(rows)[:3] == ["drvi-uni", "mlp-conch", "mlp-uni"]


def test_caption_states_protocol_pool_and_aggregation(runs):
    cap = build_table(load_runs(runs)).caption()
    for phrase in ("Test Recall@5", "Protocol `full`", "ranked against the full test gallery", "pool 1000",
                   "sample std, ddof=1", "fewer than 3 seeds", "Chance", "**bold**", "<u>underlined</u>"):
        assert phrase in cap, phrase


def test_ties_share_the_mark_and_next_value_is_second(tmp_path):
    r = [_run(tmp_path, "a", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.3),
         _run(tmp_path, "b", image="conch", gene="mlp", seed=0, i2g=0.3, g2i=0.2),
         _run(tmp_path, "c", image="h0mini", gene="mlp", seed=0, i2g=0.1, g2i=0.1)]
    t = build_table(load_runs(r))
    col = ("human-breast-panel", "i2g")
    assert t.marks[("mlp-uni", col)] == t.marks[("mlp-conch", col)] == "best"
    assert t.marks[("mlp-h0mini", col)] == "second"
    col = ("human-breast-panel", "g2i")
    # 0.3 best, 0.2 second, 0.1 unmarked
    assert [t.marks.get((m, col)) for m in ("mlp-uni", "mlp-conch", "mlp-h0mini")] == ["best", "second", None]


def test_panels_become_column_groups_in_paper_order(tmp_path):
    r = [_run(tmp_path, "a", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.2, panel="human-breast-panel"),
         _run(tmp_path, "b", image="uni", gene="mlp", seed=0, i2g=0.4, g2i=0.1, panel="human-5k-panel", pool=800),
         _run(tmp_path, "c", image="uni", gene="drvi", seed=0, i2g=0.5, g2i=0.6, panel="human-5k-panel", pool=800)]
    t = build_table(load_runs(r))
    assert [t.column_label(c) for c in t.columns] == ["5K I2G", "5K G2I", "Breast I2G", "Breast G2I"]
    rows = _md_rows(t.to_markdown())
    assert rows["mlp-uni"][2] == "**0.300(—, n=1)**" and rows["drvi-uni"][2:] == ["—", "—"]  # missing run: a dash
    assert rows["*chance*"] == ["0.006", "0.006", "0.005", "0.005"]  # 5/800 rounds to 0.006, 5/1000
    assert "pool 5K 800, Breast 1000" in t.caption()


def test_refuses_to_mix_protocols_in_a_column(tmp_path):
    r = [_run(tmp_path, "a", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.2),
         _run(tmp_path, "b", image="uni", gene="mlp", seed=1, i2g=0.6, g2i=0.5, protocol="batch:64", pool=64)]
    with pytest.raises(HescapeEvalError) as e:
        build_table(load_runs(r))
    msg = str(e.value)
    assert "one retrieval protocol and pool size" in msg and "batch:64" in msg and "full" in msg
    assert str(r[0]) in msg and str(r[1]) in msg and "not comparable" in msg


def test_refuses_to_mix_pool_sizes_in_a_column(tmp_path):
    r = [_run(tmp_path, "a", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.2, pool=1000),
         _run(tmp_path, "b", image="uni", gene="mlp", seed=1, i2g=0.3, g2i=0.2, pool=500)]
    with pytest.raises(HescapeEvalError, match="pool 500"):
        build_table(load_runs(r))


def test_duplicate_seed_is_refused(tmp_path):
    r = [_run(tmp_path, "a", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.2),
         _run(tmp_path, "a-copy", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.2)]
    with pytest.raises(HescapeEvalError, match="one run per"):
        build_table(load_runs(r))


def test_bad_inputs_one_clear_error_each(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HescapeEvalError, match="run directory .* holding config.json, found no config.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(HescapeEvalError, match="found no such directory"):
        load_run(tmp_path / "nope")
    unfinished = _run(tmp_path, "u", image="uni", gene="mlp", seed=0, i2g=0, g2i=0, results=False)
    with pytest.raises(HescapeEvalError, match="expected results.json .* found no results.json; fix: let the run"):
        load_run(unfinished)
    done = _run(tmp_path, "d", image="uni", gene="mlp", seed=0, i2g=0.3, g2i=0.2)
    with pytest.raises(HescapeEvalError, match=r"'i2g_R@10'.*k in \[1, 5\]"):
        load_run(done, k=10)


def test_cli_errors_are_one_line(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, out, err = cli("report", tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("hescape-eval: error: ")
    assert "config.json" in err
    unfinished = _run(tmp_path, "u", image="uni", gene="mlp", seed=0, i2g=0, g2i=0, results=False)
    code, out, err = cli("report", unfinished, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "results.json" in err


def test_cli_writes_markdown_csv_and_figure(runs, tmp_path, cli):
    out = tmp_path / "rep"
    code, stdout, err = cli("report", *runs, "--out", out)
    assert code == 0, err
    assert "**0.300(0.100)**" in stdout and (out / "report.md").read_text().count("**0.300(0.100)**") == 1
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    a = next(r for r in rows if r["model"] == "mlp-uni")
    assert (a["image_encoder"], a["gene_encoder"]) == ("uni", "mlp")
    assert float(a["Breast I2G mean"]) == pytest.approx(0.3) and float(a["Breast I2G std"]) == pytest.approx(0.1)
    assert a["Breast I2G n"] == "3" and a["Breast I2G mark"] == "best"
    assert float(rows[-1]["Breast G2I mean"]) == pytest.approx(0.005) and rows[-1]["model"] == "chance"
    long = list(csv.DictReader(io.StringIO((out / "report_long.csv").read_text())))
    assert len(long) == 6 and {r["protocol"] for r in long} == {"full"} and {r["pool"] for r in long} == {"1000"}
    png = out / "recall_at_5.png"
    if pytest.importorskip("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _brute_batch_recall(q, g, b, k):
    """Recall@k inside consecutive batches of b (last kept), by explicit sorting: (i2g, g2i)."""
    hits_i, hits_g = [], []
    for s in range(0, len(q), b):
        sim = q[s:s + b].astype(np.float64) @ g[s:s + b].astype(np.float64).T
        for i in range(sim.shape[0]):
            hits_i.append(i in np.argsort(-sim[i], kind="stable")[:k])
            hits_g.append(i in np.argsort(-sim[:, i], kind="stable")[:k])
    return float(np.mean(hits_i)), float(np.mean(hits_g))


def _with_embeddings(run, n=150, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, 8))
    g = q + 0.9 * rng.standard_normal((n, 8))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    save_embeddings(embeddings_path(run), image=q, gene=g, index=np.arange(n), sample=["s"] * n, donor=["d"] * n)
    return q, g


def test_protocol_recomputes_from_embeddings(tmp_path):
    r = [_run(tmp_path, f"s{s}", image="uni", gene="mlp", seed=s, i2g=0.9, g2i=0.9) for s in range(2)]
    truth = [_brute_batch_recall(*_with_embeddings(run, seed=s), 64, 5) for s, run in enumerate(r)]
    t = build_table(load_runs(r, protocol="batch:64"))
    cell = t.cells[("mlp-uni", ("human-breast-panel", "i2g"))]
    assert cell.values == pytest.approx([x[0] for x in truth])
    assert t.cells[("mlp-uni", ("human-breast-panel", "g2i"))].values == pytest.approx([x[1] for x in truth])
    col = ("human-breast-panel", "i2g")
    assert t.protocol[col] == "batch:64" and t.pool[col] == 64
    # chance: 128 queries in batches of 64 (5/64) and 22 in the last one (5/22)
    assert t.chance[col] == pytest.approx((128 * 5 / 64 + 22 * 5 / 22) / 150)
    assert "Protocol `batch:64`" in t.caption() and "pool 64" in t.caption()


def test_protocol_with_a_run_lacking_embeddings_is_refused(tmp_path):
    r = [_run(tmp_path, f"s{s}", image="uni", gene="mlp", seed=s, i2g=0.3, g2i=0.3) for s in range(2)]
    _with_embeddings(r[0])
    with pytest.raises(HescapeEvalError, match="embeddings: protocol batch:64.*results.json: protocol full"):
        build_table(load_runs(r, protocol="batch:64"))


def test_write_report_without_figures(runs, tmp_path):
    res = write_report(runs, tmp_path / "o", figures=False)
    assert "figure" not in res and not list((tmp_path / "o").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.csv", "report.md", "report_long.csv"]


def test_preset_encoders_are_filled_from_hescape_models(tmp_path):
    pytest.importorskip("hescape.models", reason="hescape-models not installed: preset names cannot be resolved")
    run = _run(tmp_path, "p", image=None, gene=None, seed=0, i2g=0.3, g2i=0.2)
    # hescape-models registry.py: the "paper" preset is UNI (LoRA) + the MLP gene tower
    rec = load_run(run)
    assert (rec.image, rec.gene, rec.model) == ("uni", "mlp", "mlp-uni")


def test_rows_come_from_the_checkpoint_the_run_trained(tmp_path):
    """A run started from model.init_checkpoint leaves the model section of config.json at its defaults: its row is
    named from the model its own checkpoint records (with the fine-tuning mode), never from config.json's defaults."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import numpy as np

    base = _run(tmp_path, "base", image=None, gene=None, seed=0, i2g=0.2, g2i=0.2)
    init = _run(tmp_path, "init", image=None, gene=None, seed=1, i2g=0.3, g2i=0.3)
    cfg = json.loads((init / "config.json").read_text())
    cfg["model"]["init_checkpoint"] = str(base)
    (init / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HescapeEvalError, match="init_checkpoint"):  # no readable checkpoint: refuse, never guess
        load_run(init)
    ck = init / "checkpoints" / "step-00000010"
    ck.mkdir(parents=True)
    (init / "checkpoints" / "index.json").write_text(json.dumps({"best": ck.name, "last": ck.name}))
    model_cfg = {"image": {"name": "cnn_tiny", "finetune": "lora"}, "gene": {"name": "mlp_small", "finetune": "full"}}
    safetensors_numpy.save_file({"w": np.zeros(1, np.float32)}, str(ck / "model.safetensors"),
                                metadata={"model_cfg": json.dumps(model_cfg)})
    rec = load_run(init)
    assert (rec.image, rec.gene) == ("cnn_tiny:lora", "mlp_small")
