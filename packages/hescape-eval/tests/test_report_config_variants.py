"""``hescape-eval report`` on runs of one model that differ in a setting other than the encoders (a sweep over the
loss, the learning rate): each setting gets its own row, worked out from the runs' ``config.json``, never a mean
over "seeds" that are really different experiments. Expected numbers are computed by hand."""

from __future__ import annotations

import csv
import io

import pytest
from hescape.eval.cli import main
from hescape.eval.report import build_table, config_variants, load_runs


@pytest.fixture
def make_run(tmp_path, train_run):
    """``make_run(name, *, seed, i2g, g2i, ...)``: a run directory as hescape-train writes it (the keys the report
    reads, plus the ones a sweep varies)."""

    def make(name, *, seed, i2g, g2i, loss="clip", lr=1e-3, workers=0, pool=100):
        cfg = {"format": "hescape-train-config/1", "seed": seed, "out_dir": str(tmp_path / "runs"), "run_name": name,
               "progress": False,
               "model": {"name": "vit_mlp_nano", "image": "uni", "gene": "mlp", "loss": loss},
               "optim": {"lr": lr, "weight_decay": 0.01},
               "data": {"path": None, "panel": "human-breast-panel", "num_workers": workers}}
        return train_run(tmp_path / "runs" / name, cfg, i2g=i2g, g2i=g2i, pool=pool)

    return make


def test_runs_differing_in_the_loss_are_not_averaged_as_seeds(make_run):
    # one CLIP run (seed 0) and one SigLIP run (seed 1): before, one row "mlp-uni" with mean 0.3 over "2 seeds"
    runs = [make_run("a", seed=0, i2g=0.1, g2i=0.2, loss="clip"),
            make_run("b", seed=1, i2g=0.5, g2i=0.6, loss="siglip")]
    table = build_table(load_runs(runs))
    assert table.rows == ["mlp-uni [loss=clip]", "mlp-uni [loss=siglip]"]
    col = ("human-breast-panel", "i2g")
    assert table.cells[("mlp-uni [loss=clip]", col)].values == [0.1]
    assert table.cells[("mlp-uni [loss=siglip]", col)].values == [0.5]
    assert "Rows marked [key=value]" in table.to_markdown()


def test_sweep_of_two_keys_over_seeds(make_run):
    runs = [make_run("c0", seed=0, i2g=0.10, g2i=0.1), make_run("c1", seed=1, i2g=0.30, g2i=0.1),
            make_run("s0", seed=0, i2g=0.50, g2i=0.1, loss="siglip"),
            make_run("s1", seed=1, i2g=0.70, g2i=0.1, loss="siglip"),
            make_run("l0", seed=0, i2g=0.20, g2i=0.1, lr=3e-4)]
    records = load_runs(runs)
    assert config_variants(records) == ["loss=clip, lr=0.001"] * 2 + ["loss=siglip, lr=0.001"] * 2 + [
        "loss=clip, lr=0.0003"]
    table = build_table(records)
    col = ("human-breast-panel", "i2g")
    # hand: mean(0.1, 0.3) = 0.2, sample sd |0.3 - 0.1| / sqrt(2) = 0.1414214; mean(0.5, 0.7) = 0.6
    clip = table.cells[("mlp-uni [loss=clip, lr=0.001]", col)]
    assert clip.mean == pytest.approx(0.2) and clip.std == pytest.approx(0.1414214, abs=1e-7) and clip.seeds == [0, 1]
    assert table.cells[("mlp-uni [loss=siglip, lr=0.001]", col)].mean == pytest.approx(0.6)
    assert table.cells[("mlp-uni [loss=clip, lr=0.0003]", col)].values == [0.2]


def test_settings_that_do_not_change_results_do_not_split_rows(make_run):
    # data.num_workers, run_name, out_dir: hescape-train documents them as not changing results
    runs = [make_run("w0", seed=0, i2g=0.1, g2i=0.2, workers=0),
            make_run("w4", seed=1, i2g=0.3, g2i=0.4, workers=4)]
    table = build_table(load_runs(runs))
    assert table.rows == ["mlp-uni"]
    assert table.cells[("mlp-uni", ("human-breast-panel", "i2g"))].values == [0.1, 0.3]


def test_same_settings_and_seed_is_still_a_duplicate(tmp_path, capsys, make_run):
    runs = [make_run("a", seed=0, i2g=0.1, g2i=0.2), make_run("a-copy", seed=0, i2g=0.1, g2i=0.2)]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "out"), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "one run per (model, panel, seed)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_report_shows_each_setting_as_its_own_row(tmp_path, capsys, make_run):
    runs = [make_run("a", seed=0, i2g=0.1, g2i=0.2), make_run("b", seed=0, i2g=0.5, g2i=0.6, loss="siglip")]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "report_long.csv").read_text())))
    assert {(r["model"], r["direction"], r["mean"], r["n"]) for r in rows} == {
        ("mlp-uni [loss=clip]", "i2g", repr(0.1), "1"), ("mlp-uni [loss=clip]", "g2i", repr(0.2), "1"),
        ("mlp-uni [loss=siglip]", "i2g", repr(0.5), "1"), ("mlp-uni [loss=siglip]", "g2i", repr(0.6), "1")}
