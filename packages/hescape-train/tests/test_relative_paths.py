"""Relative paths in a grid file or a --config file are read from the current directory, as on the command line
(documented in hescape.train.sweep and the package README); a missing one is one line naming the file and the path
resolved against the current directory, and saying so when the path exists beside the file instead.

The expected absolute paths are built here from the test's own folders, never by the code under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hescape.train.cli import main
from hescape.train.sweep import load_sweep


def _project(tmp_path: Path, dataset: Path) -> Path:
    """project/data/tiny (the tiny dataset), project/elsewhere/ (an empty folder to start from)."""
    project = tmp_path.resolve() / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "tiny").symlink_to(dataset, target_is_directory=True)
    (project / "elsewhere").mkdir()
    return project


def _grid(project: Path, paths: list[str]) -> Path:
    grid = project / "grid.yaml"
    base = {"epochs": 1, "batch_size": 16, "probe": False, "progress": False}
    if len(paths) == 1:
        base["data.path"] = paths[0]
        points = {"seed": [0, 1]}
    else:
        points = {"data.path": paths}
    grid.write_text(json.dumps({"out_dir": "sweeps/enc", "base": base, "grid": points}))
    return grid


def _run(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    err = capsys.readouterr().err
    return code, err


def test_grid_paths_are_read_from_the_current_directory(tiny_dataset, tmp_path, monkeypatch):
    project = _project(tmp_path, tiny_dataset)
    grid = _grid(project, ["data/tiny"])
    monkeypatch.chdir(project)
    sweep = load_sweep(grid)
    assert [[o for o in r.overrides if o.startswith("data.path=")] for r in sweep.runs] == [["data.path=data/tiny"]] * 2
    assert [Path(os.path.abspath(r.run_dir)) for r in sweep.runs] == [project / "sweeps" / "enc" / f"seed={s}"
                                                                      for s in (0, 1)]


def test_missing_grid_path_names_the_file_and_the_resolved_path(tiny_dataset, tmp_path, monkeypatch, capsys):
    project = _project(tmp_path, tiny_dataset)
    grid = _grid(project, ["data/tiny"])
    monkeypatch.chdir(project / "elsewhere")
    code, err = _run(capsys, "sweep", grid, "--list")
    assert code == 2 and err.count("\n") == 1
    resolved = project / "elsewhere" / "data" / "tiny"
    assert err.startswith(f"hescape-train sweep: error: grid file {grid}, base: data.path='data/tiny' does not exist "
                          f"(resolved against the current directory: {resolved}); ")
    assert (f"relative paths in a grid file are read from the current directory ({project / 'elsewhere'}), not from "
            f"the grid file's folder, where {project / 'data' / 'tiny'} exists: run from {project} or give an "
            "absolute path") in err
    assert sorted(p.name for p in (project / "elsewhere").iterdir()) == []  # nothing created

    # a grid value: the run is named; no hint when the path is beside neither
    grid = _grid(project, ["data/tiny", "data/missing"])
    monkeypatch.chdir(project)
    code, err = _run(capsys, "sweep", grid, "--list")
    assert code == 2
    assert err == (f"hescape-train sweep: error: grid file {grid}, run 1 (data.path=data/missing): "
                   f"data.path='data/missing' does not exist (resolved against the current directory: "
                   f"{project / 'data' / 'missing'}); give the directory of a HESCAPE dataset (it holds manifest.json), "
                   "or leave data.path empty to use the embedded synthetic default\n")


def test_missing_config_file_path_names_the_file(tiny_dataset, tmp_path, monkeypatch, capsys):
    project = _project(tmp_path, tiny_dataset)
    cfg = project / "run.yaml"
    cfg.write_text("data:\n  path: data/tiny\nepochs: 1\n")
    monkeypatch.chdir(project / "elsewhere")
    code, err = _run(capsys, "--config", cfg, "--print-config")
    resolved = project / "elsewhere" / "data" / "tiny"
    assert code == 2
    assert err.startswith(f"hescape-train: error: config file {cfg}: data.path='data/tiny' does not exist (resolved "
                          f"against the current directory: {resolved}); ")
    assert f"not from the config file's folder, where {project / 'data' / 'tiny'} exists: run from {project}" in err
    # an override's mistake is the override's, not the file's; an absolute path is shown as given
    code, err = _run(capsys, "--config", cfg, f"data.path={project / 'nope'}", "--print-config")
    assert code == 2 and err == (f"hescape-train: error: data.path='{project / 'nope'}' does not exist; give the "
                                 "directory of a HESCAPE dataset (it holds manifest.json), or leave data.path empty to "
                                 "use the embedded synthetic default\n")
    monkeypatch.chdir(project)  # from the folder the paths are relative to, the file is taken as it is
    code, err = _run(capsys, "--config", cfg, "--print-config")
    assert code == 0 and err == ""
