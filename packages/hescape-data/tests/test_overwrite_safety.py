"""--overwrite replaces a dataset only when the folder holds nothing but that dataset; no dataset inside another."""

from __future__ import annotations

import shutil

from hescape.data.cli import main

V = ["--image", "lowres", "--max-upsample", "40", "--quiet", "--no-qc"]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_keeps_user_files_and_nested_datasets(visium_outs, tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["build", "visium", str(visium_outs), "--out", str(ds), *V]) == 0
    (ds / "my_analysis.ipynb").write_text("{}")
    before = _tree(tmp_path)
    assert main(["build", "visium", str(visium_outs), "--out", str(ds), "--overwrite", *V]) == 2
    err = capsys.readouterr().err
    assert "my_analysis.ipynb" in err and err.count("\n") == 1
    assert _tree(tmp_path) == before and (ds / "my_analysis.ipynb").read_text() == "{}"
    # a dataset may not be written inside another one (a replace of the outer would delete it)
    assert main(["build", "visium", str(visium_outs), "--out", str(ds / "inner"), *V]) == 2
    assert "inside the dataset" in capsys.readouterr().err and _tree(tmp_path) == before
    # with only its own files the dataset is replaced
    (ds / "my_analysis.ipynb").unlink()
    shutil.rmtree(tmp_path / "ds" / "qc", ignore_errors=True)
    assert main(["build", "visium", str(visium_outs), "--out", str(ds), "--overwrite", *V]) == 0
