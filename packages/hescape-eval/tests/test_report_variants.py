"""``variant``: runs of the same encoders, panel and seed that differ in another setting (a sweep over the loss) get
rows of their own, each aggregated over its own seeds. Expected numbers are worked out by hand."""

from __future__ import annotations

import csv
import io

import pytest
from hescape.eval import HescapeEvalError
from hescape.eval.report import build_table, load_runs, write_report


@pytest.fixture
def make_run(tmp_path, train_run):
    """``make_run(name, *, seed, i2g, g2i, pool=100)``: a finished mlp-uni run directory."""

    def make(name, *, seed, i2g, g2i, pool=100):
        cfg = {"format": "hescape-train-config/1", "seed": seed,
               "model": {"name": "paper", "image": "uni", "gene": "mlp"},
               "data": {"path": None, "panel": "human-breast-panel"}}
        return train_run(tmp_path / "runs" / name, cfg, i2g=i2g, g2i=g2i, pool=pool)

    return make


@pytest.fixture
def sweep(make_run):
    """mlp-uni trained with two losses, two seeds each: (i2g, g2i) recall per run."""
    vals = {"clip": [(0.10, 0.20), (0.30, 0.40)], "siglip": [(0.50, 0.05), (0.70, 0.15)]}
    runs, variants = [], []
    for loss, seeds in vals.items():
        for s, (a, b) in enumerate(seeds):
            runs.append(make_run(f"{loss}-s{s}", seed=s, i2g=a, g2i=b))
            variants.append(f"loss={loss}")
    return runs, variants


def test_variants_become_rows_each_over_its_seeds(sweep):
    runs, variants = sweep
    with pytest.raises(HescapeEvalError, match="one run per"):  # the same model, panel and seed, twice
        build_table(load_runs(runs))
    table = build_table(load_runs(runs, variants=variants))
    assert table.rows == ["mlp-uni [loss=clip]", "mlp-uni [loss=siglip]"]
    col = ("human-breast-panel", "i2g")
    clip, siglip = table.cells[("mlp-uni [loss=clip]", col)], table.cells[("mlp-uni [loss=siglip]", col)]
    # hand: mean(0.1, 0.3) = 0.2, sample sd = |0.3 - 0.1| / sqrt(2) = 0.141421; mean(0.5, 0.7) = 0.6, same sd
    assert clip.mean == pytest.approx(0.2) and clip.std == pytest.approx(0.1414214, abs=1e-7) and clip.seeds == [0, 1]
    assert siglip.mean == pytest.approx(0.6) and siglip.std == pytest.approx(0.1414214, abs=1e-7)
    assert table.marks[("mlp-uni [loss=siglip]", col)] == "best"
    assert table.encoders["mlp-uni [loss=clip]"] == ("uni", "mlp")
    md = table.to_markdown()
    # two rows: the better mean of a column is bold, the other underlined (second-best)
    assert "| mlp-uni [loss=clip] | <u>0.200(0.141, n=2)</u> | **0.300(0.141, n=2)** |" in md
    assert "| mlp-uni [loss=siglip] | **0.600(0.141, n=2)** | <u>0.100(0.071, n=2)</u> |" in md


def test_write_report_with_variants(sweep, tmp_path):
    runs, variants = sweep
    res = write_report(runs, tmp_path / "out", figures=False, variants=variants)
    rows = list(csv.DictReader(io.StringIO(res["long_csv"].read_text())))
    assert {(r["model"], r["direction"], r["mean"]) for r in rows if r["model"].endswith("[loss=clip]")} == {
        ("mlp-uni [loss=clip]", "i2g", repr(0.2)), ("mlp-uni [loss=clip]", "g2i", repr(0.30000000000000004))}
    with pytest.raises(HescapeEvalError, match="one per run directory"):
        write_report(runs, tmp_path / "bad", figures=False, variants=variants[:3])
    assert not (tmp_path / "bad").exists()
