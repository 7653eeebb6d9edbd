"""hescape-train refuses what would make a run wrong or unsafe: donor leakage, unsafe or corrupt checkpoints."""

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


def test_unsafe_or_corrupt_init_checkpoint_is_one_line(tiny_dataset, tmp_path, capsys):
    """A checkpoint that would run code on load (a pickled object) or a corrupt file: refused in one line."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    ckdir = tmp_path / "step-00000001"  # a checkpoint directory whose weights are not safetensors
    ckdir.mkdir()
    (ckdir / "model.safetensors").write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    for p in (bad, junk, ckdir, ckdir / "model.safetensors"):
        assert main([f"data.path={tiny_dataset}", "epochs=1", f"model.init_checkpoint={p}",
                     f"out_dir={tmp_path / 'runs'}", "progress=false"]) == 2
        out = capsys.readouterr()
        assert "code ran" not in out.out and out.err.count("\n") == 1 and "cannot load safely" in out.err
