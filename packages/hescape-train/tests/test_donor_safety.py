"""The trainer refuses a dataset in which one donor sits in two splits (held-out tissue would leak into training)."""

from __future__ import annotations

import shutil

from hescape.data.arrow import read_manifest, write_manifest
from hescape.train.cli import main


def test_leaking_dataset_is_refused(tiny_dataset, tmp_path, capsys):
    ds = shutil.copytree(tiny_dataset, tmp_path / "leaky")
    m = read_manifest(ds)
    train = next(s for s in m["samples"] if s["split"] == "train")
    test = next(s for s in m["samples"] if s["split"] == "test")
    test["donor"] = train["donor"]  # two sections of one patient, one in train and one in test
    write_manifest(ds, m)
    assert main([f"data.path={ds}", "epochs=1", f"out_dir={tmp_path / 'runs'}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hescape-train: error: donor leakage") and train["donor"] in err and "\n" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
