"""``hescape-train sweep GRID.yaml``: a grid of tiny runs on the tiny dataset, skipped when finished, resumed when
interrupted, refused whole when one point is bad, and summarised as mean(std) over seeds.

Expected values come from each run's own files (config.json, results.json read here with NumPy), from hand-written
names and from the uninterrupted run of the same grid point; never from hescape.train.sweep itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hescape.train import faults
from hescape.train.checkpoint import read_checkpoint
from hescape.train.cli import main
from hescape.train.sweep import _file_safe, _short_names, load_sweep

NAMES = ["loss=clip__seed=0", "loss=clip__seed=1", "loss=siglip__seed=0", "loss=siglip__seed=1"]


def _base(dataset) -> dict:
    return {"data.path": str(dataset), "epochs": 2, "batch_size": 16, "recall_ks": [1, 5], "probe": False,
            "progress": False, "checkpoint_every": 3, "log_every": 1}


def _grid_file(path: Path, out: Path, base: dict, grid: dict, **extra) -> Path:
    path.write_text(json.dumps({"out_dir": str(out), "base": base, "grid": grid, **extra}))  # JSON is YAML
    return path


def _run(capsys, *args):
    code = main(["sweep", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """The 2 losses × 2 seeds sweep, run once, uninterrupted (the reference of the other tests)."""
    tmp = tmp_path_factory.mktemp("sweep-ref")
    grid = _grid_file(tmp / "grid.yaml", tmp / "sweep", _base(tiny_dataset),
                      {"model": {"loss": ["clip", "siglip"]}, "seed": [0, 1]})
    code = main(["sweep", str(grid)])
    assert code == 0
    return grid, tmp / "sweep"


def _cells(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith(("| Model", "| *chance*")):
            cells = [re.sub(r"\*\*|</?u>", "", c).strip() for c in line.strip("|").split("|")]  # marks off
            rows[cells[0]] = cells[1:]
    return rows


def test_sweep_runs_each_point_once_and_reports_mean_std(reference, capsys):
    grid, sweep = reference
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == NAMES
    index = json.loads((sweep / "sweep.json").read_text())
    assert [r["index"] for r in index["runs"]] == [0, 1, 2, 3]
    assert [r["name"] for r in index["runs"]] == NAMES  # grid order: the last key varies fastest
    assert [r["overrides"] for r in index["runs"]][1] == ["model.loss=clip", "seed=1"]
    assert {r["status"] for r in index["runs"]} == {"finished"} and index["counts"] == {"finished": 4}
    for r in index["runs"]:  # each directory holds the run of its grid point
        cfg = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        loss, seed = r["name"].split("__")
        assert cfg["model"]["loss"] == loss.split("=")[1] and cfg["seed"] == int(seed.split("=")[1])
        assert cfg["epochs"] == 2 and cfg["run_name"] == r["name"]

    # the table: one row per loss (the grid's other key), mean(sample std) of the two seeds, computed here
    rows = _cells((sweep / "report.md").read_text())
    assert set(rows) == {"mlp-vit_nano [loss=clip]", "mlp-vit_nano [loss=siglip]"}
    for loss in ("clip", "siglip"):
        res = [json.loads((sweep / f"loss={loss}__seed={s}" / "results.json").read_text()) for s in (0, 1)]
        want = []
        for d in ("i2g", "g2i"):
            v = np.array([r[f"{d}_R@5"] for r in res])
            want.append(f"{v.mean():.3f}({v.std(ddof=1):.3f}, n=2)")
        assert rows[f"mlp-vit_nano [loss={loss}]"] == want
    assert (sweep / "report.csv").is_file() and (sweep / "recall_at_5.png").is_file()

    # again: every run is finished, nothing is retrained or rewritten
    before = _files(sweep)
    before_runs = {k: v for k, v in before.items() if k.split("/")[0] in NAMES}
    code, out, err = _run(capsys, grid, "--no-figures")
    assert code == 0, err
    assert out.count("finished, skipped") == 4 and "resuming" not in out and "training" not in out
    after = _files(sweep)
    assert {k: v for k, v in after.items() if k.split("/")[0] in NAMES} == before_runs
    code, out, _ = _run(capsys, grid, "--list")
    assert code == 0 and "4 runs (4 finished)" in out
    assert [line.split()[:3] for line in out.splitlines()[1:]] == [[str(i), "finished", n] for i, n in enumerate(NAMES)]
    code, out, _ = _run(capsys, grid, "--emit")
    assert code == 0 and out == ""  # nothing left to run


class _Killed(BaseException):
    """Stands for the SIGKILL of hescape.train.faults (this process must survive it)."""


def test_interrupted_run_resumes_to_the_uninterrupted_result(reference, tmp_path, capsys, monkeypatch, tiny_dataset):
    grid_ref, ref = reference
    grid = _grid_file(tmp_path / "grid.yaml", tmp_path / "sweep", _base(tiny_dataset),
                      {"model": {"loss": ["clip", "siglip"]}, "seed": [0, 1]})
    sweep = tmp_path / "sweep"

    def kill(pid, sig):
        raise _Killed(f"fault point reached (signal {sig})")

    # the fault-injection point of the crash tests, after optimiser step 3 of 4, past the checkpoint of step 2
    monkeypatch.setattr(faults, "os", types.SimpleNamespace(environ=faults.os.environ, getpid=faults.os.getpid,
                                                            kill=kill))
    monkeypatch.setenv("HESCAPE_TRAIN_FAULT", "step:3")
    with pytest.raises(_Killed):
        main(["sweep", str(grid), "--index", "2"])
    monkeypatch.delenv("HESCAPE_TRAIN_FAULT")
    capsys.readouterr()
    run = sweep / NAMES[2]
    assert [p.name for p in sweep.iterdir() if p.is_dir()] == [NAMES[2]]  # --index trained that run alone
    assert (run / "config.json").is_file() and not (run / "results.json").exists()
    assert json.loads((run / "checkpoints" / "index.json").read_text())["step"] == 2
    code, out, _ = _run(capsys, grid, "--list")
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["pending", "pending", "interrupted", "pending"]

    code, out, err = _run(capsys, grid, "--emit")
    assert code == 0, err
    cmds = out.splitlines()  # every run not finished, the interrupted one included
    assert cmds == [f"hescape-train sweep {shlex.quote(str(grid))} --index {i}" for i in range(4)]

    code, out, err = _run(capsys, grid, "--index", "2")
    assert code == 0, err
    assert "resuming" in out and "report" not in out  # one array task writes no table
    want = ref / NAMES[2]
    for f in ("results.json", "results.csv", "results.md", "metrics.jsonl", "metrics.csv", "steps.jsonl",
              "steps.csv", "checkpoints/index.json"):
        assert (run / f).read_bytes() == (want / f).read_bytes(), f
    for which in ("best", "last"):  # the weights bit for bit (the safetensors header's key order may differ)
        a, b = read_checkpoint(run, which), read_checkpoint(want, which)
        assert a["dir"].name == b["dir"].name and a["state_dict"].keys() == b["state_dict"].keys()
        for k, v in a["state_dict"].items():
            assert torch.equal(v.view(-1).view(torch.uint8), b["state_dict"][k].view(-1).view(torch.uint8)), k

    # an emitted command runs its own run and nothing else
    code, out, _ = _run(capsys, grid, "--emit")
    assert out.splitlines() == [cmds[i] for i in (0, 1, 3)]
    argv = shlex.split(cmds[1])
    assert argv[:2] == ["hescape-train", "sweep"]
    assert main(argv[1:]) == 0
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [NAMES[1], NAMES[2]]
    assert (sweep / NAMES[1] / "results.json").read_bytes() == (ref / NAMES[1] / "results.json").read_bytes()
    statuses = [r["status"] for r in json.loads((sweep / "sweep.json").read_text())["runs"]]
    assert statuses == ["pending", "finished", "finished", "pending"]

    # the reference grid, now with other base options: its runs are not this grid's runs and are left alone
    changed = _grid_file(tmp_path / "changed.yaml", ref, {**_base(tiny_dataset), "epochs": 3},
                         {"model.loss": ["clip", "siglip"], "seed": [0, 1]})
    before = _files(ref)
    code, out, err = _run(capsys, changed, "--no-figures")
    assert code == 2 and out.count("conflict, left alone") == 4 and "epochs is 2 there, 3 in the grid" in out
    assert _files(ref) == before


def test_failed_run_is_recorded_and_the_sweep_goes_on(tiny_dataset, tmp_path, capsys):
    base = {k: v for k, v in _base(tiny_dataset).items() if k != "recall_ks"}
    grid = _grid_file(tmp_path / "grid.yaml", tmp_path / "sweep", base, {"recall_ks": [[1, 5], [1, 500]]})
    sweep = tmp_path / "sweep"
    code, out, err = _run(capsys, grid, "--no-figures")
    assert code == 2, err
    runs = json.loads((sweep / "sweep.json").read_text())["runs"]
    # a value changed to be file-safe keeps a hash of the original, so "1,5" and "1-5" never share a directory
    assert [r["name"] for r in runs] == [f"recall_ks=1-5-{hashlib.sha1(b'1,5').hexdigest()[:8]}",
                                         f"recall_ks=1-500-{hashlib.sha1(b'1,500').hexdigest()[:8]}"]
    assert [r["status"] for r in runs] == ["finished", "failed"]
    assert "asks for Recall@500 but the test split has" in runs[1]["error"]
    assert not (sweep / runs[1]["name"]).exists()  # refused before its directory was made
    assert "failed: " in out and "1 failed or in conflict" in out
    assert len(_cells((sweep / "report.md").read_text())) == 1  # the finished run alone
    code, out, _ = _run(capsys, grid, "--no-figures")  # a failed run is tried again, the finished one skipped
    assert code == 2 and "finished, skipped" in out and out.count("failed: ") == 1


@pytest.mark.parametrize(
    ("grid", "extra", "expected"),
    [
        ({"model.loss": ["clip", "clp"], "seed": [0]}, {}, "run 1 (model.loss=clp, seed=0): model.loss: unknown loss"),
        ({"model.los": ["clip"]}, {}, "unknown config key 'model.los'. Did you mean 'model.loss'?"),
        ({"seed": [0, 0]}, {}, "grid 'seed' lists '0' more than once"),
        ({"seed": 0}, {}, "grid 'seed': expected a non-empty list"),
        ({"model": ["a"]}, {}, "grid 'model' is a section of options"),
        ({"run_name": ["a"]}, {}, "'run_name' is set by the sweep"),
        ({"epochs": [1, 2]}, {}, "'epochs' is in both base and grid"),
        ({"seed": [0, 1], "model.loss": ["clip", "siglip"]}, {"name": "s{seed}"}, "would both be named 's0'"),
        ({"seed": [0]}, {"name": "{sed}"}, "uses {sed}, which is no grid or base key (did you mean {seed}?)"),
        ({"seed": [0]}, {"outdir": "x"}, "unknown top-level key 'outdir' (did you mean 'out_dir'?)"),
        ({}, {}, "expected grid: a mapping of options to lists of values"),
    ],
)
def test_bad_grid_is_refused_before_anything_is_created(grid, extra, expected, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "sweep"
    f = _grid_file(tmp_path / "grid.yaml", out, _base(tiny_dataset), grid, **extra)
    code, stdout, err = _run(capsys, f)
    assert code == 2 and expected in err, err
    assert err.startswith("hescape-train sweep: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and stdout == ""


def test_names_and_nested_grid_keys(tiny_dataset, tmp_path):
    assert _file_safe("uni") == "uni" and _file_safe("1e-05") == "1e-05"
    digest = hashlib.sha1(b"datasets/breast").hexdigest()[:8]
    assert _file_safe("datasets/breast") == f"datasets-breast-{digest}"
    assert _file_safe("x" * 41) == "x" * 24 + "-" + hashlib.sha1(b"x" * 41).hexdigest()[:8]
    assert _short_names(["model.image", "data.path", "a.seed", "b.seed"]) == {
        "model.image": "image", "data.path": "path", "a.seed": "a.seed", "b.seed": "b.seed"}
    # sections as nested mappings in base and grid; the template takes short names and dotted base keys
    f = _grid_file(tmp_path / "grid.yaml", tmp_path / "sweep", {"model": {"embed_dim": 32}, "data.augment": False},
                   {"optim": {"lr": [0.001, 0.0003]}, "seed": [2, 1]}, name="lr{lr}-s{seed}-d{model.embed_dim}")
    sweep = load_sweep(f)
    assert [r.name for r in sweep.runs] == ["lr0.001-s2-d32", "lr0.001-s1-d32", "lr0.0003-s2-d32", "lr0.0003-s1-d32"]
    assert sweep.runs[2].overrides == ("model.embed_dim=32", "data.augment=false", "optim.lr=0.0003", "seed=2",
                                       f"out_dir={tmp_path / 'sweep'}", "run_name=lr0.0003-s2-d32")
    assert not (tmp_path / "sweep").exists()


def test_help_list_and_emit_load_no_torch(tiny_dataset, tmp_path):
    f = _grid_file(tmp_path / "grid.yaml", tmp_path / "sweep", _base(tiny_dataset), {"seed": [0, 1]})
    code = ("import sys, contextlib, io\n"
            "from hescape.train.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['sweep', '--help'])\n"
            f"assert main(['sweep', {str(f)!r}, '--list']) == 0\n"
            f"assert main(['sweep', {str(f)!r}, '--emit']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["sweep " + str(tmp_path / "sweep") + ": 2 runs (2 pending)",
                                        "   0  pending      seed=0", "   1  pending      seed=1",
                                        f"hescape-train sweep {f} --index 0", f"hescape-train sweep {f} --index 1"]
    assert not (tmp_path / "sweep").exists()


def _fake_finished_run(run, recall: float) -> None:
    """A finished run directory as hescape-train leaves it (config.json of its grid point, results.json)."""
    from hescape.train.config import config_to_dict, load_config

    run.run_dir.mkdir(parents=True)
    cfg = config_to_dict(load_config(None, list(run.overrides)))
    (run.run_dir / "config.json").write_text(json.dumps({**cfg, "format": "hescape-train-config/1"}))
    res = {f"{d}_{m}": v for d in ("i2g", "g2i") for m, v in (("R@5", recall), ("R@5_chance", 0.05),
                                                               ("protocol", "full"), ("pool", 100))}
    (run.run_dir / "results.json").write_text(json.dumps(res))


@pytest.mark.parametrize("panels", [("human-breast-panel", "human-lung-healthy-panel"),
                                    ("human-breast-panel", "human-breast-panel")])
def test_report_rows_group_everything_but_the_seed(panels, tmp_path):
    """Two datasets × 2 seeds: datasets of two panels are two column groups of one row; two datasets of one panel
    are two rows (named by their data.path), never one cell of four runs."""
    datasets = []
    for i, panel in enumerate(panels):
        d = tmp_path / f"ds{i}"
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"ingest": {"panel": panel}}))
        datasets.append(str(d))
    f = _grid_file(tmp_path / "grid.yaml", tmp_path / "sweep", {"progress": False},
                   {"data.path": datasets, "seed": [0, 1]})
    sweep = load_sweep(f)
    recalls = [0.10, 0.30, 0.20, 0.60]  # ds0 seeds 0, 1; ds1 seeds 0, 1
    for run, r in zip(sweep.runs, recalls, strict=True):
        _fake_finished_run(run, r)
    assert main(["sweep", str(f), "--report", "--no-figures"]) == 0
    md = (tmp_path / "sweep" / "report.md").read_text()
    rows = _cells(md)
    # hand: mean(0.1, 0.3) = 0.2, sd = 0.2 / sqrt(2) = 0.141; mean(0.2, 0.6) = 0.4, sd = 0.4 / sqrt(2) = 0.283
    a, b = "0.200(0.141, n=2)", "0.400(0.283, n=2)"
    if panels[0] != panels[1]:
        assert rows == {"mlp-vit_nano": [a, a, b, b]}  # Breast I2G, G2I, then Lung I2G, G2I
    else:
        assert rows == {f"mlp-vit_nano [path={datasets[0]}]": [a, a], f"mlp-vit_nano [path={datasets[1]}]": [b, b]}
    assert "4 of 4 runs finished" in md
