"""Every config field is checked before any heavy work: one line, exit 2, nothing created, torch never imported.
A run directory is never overwritten, and a diverging run stops with a diagnostic and keeps its last good
checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hescape.train import load_config, validate_config
from hescape.train.checkpoint import read_checkpoint
from hescape.train.cli import main
from hescape.train.config import FINETUNE_MODES, LOSSES, PROJECTIONS
from hescape.train.errors import HescapeConfigError

#: (override, text the one-line message must hold)
REFUSED = [
    ("optim.lr=0", "optim.lr=0.0: expected a finite number > 0"),
    ("optim.lr=-1e-3", "optim.lr=-0.001: expected a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan: expected a finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf: expected a finite number > 0"),
    ("batch_size=0", "batch_size=0: expected a finite number > 0"),
    ("batch_size=-8", "batch_size=-8: expected"),
    ("epochs=0", "epochs=0: expected a finite number > 0"),
    ("optim.beta1=1", "optim.beta1=1.0: expected a finite number >= 0 and < 1"),
    ("optim.beta2=1.5", "optim.beta2=1.5: expected a finite number >= 0 and < 1"),
    ("optim.beta1=-0.1", "optim.beta1=-0.1: expected a finite number >= 0 and < 1"),
    ("seed=-1", "seed=-1: expected a finite number >= 0"),
    ("data.num_workers=-1", "data.num_workers=-1: expected a finite number >= 0"),
    ("model.embed_dim=0", "model.embed_dim=0: expected a finite number > 0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay=-0.01: expected a finite number >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0: expected a finite number >= 0"),
    ("data.stain_jitter=-0.1", "data.stain_jitter=-0.1: expected a finite number >= 0"),
    ("data.hed_jitter=-0.1", "data.hed_jitter=-0.1: expected a finite number >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1: expected"),
    ("checkpoint_every=-5", "checkpoint_every=-5: expected"),
    ("log_every=0", "log_every=0: expected a finite number > 0"),
    ("model.lora_rank=0", "model.lora_rank=0: expected"),
    ("run_name=../x", "run_name='../x': expected one directory name inside out_dir"),
    ("run_name=a/b", "run_name='a/b': expected one directory name"),
    ("run_name=..", "run_name='..': expected one directory name"),
    ("model.loss=triplet", "model.loss: unknown loss 'triplet'; expected one of clip, siglip"),
    ("model.loss=siglp", "(did you mean 'siglip'?)"),
    ("model.projection=conv", "model.projection: unknown projection 'conv'; expected one of linear, mlp, transformer"),
    ("model.image_projection=conv", "model.image_projection: unknown projection 'conv'"),
    ("model.image_finetune=half", "unknown finetune mode 'half'; expected one of full, frozen, lora"),
    ("model.gene_finetune=partial", "model.gene_finetune: unknown finetune mode 'partial'"),
    ("device=gpu", "device='gpu' is not a device"),
    ("recall_ks=0,5", "recall_ks must list positive k values"),
    ("recall_ks=5,5", "recall_ks lists 5 twice"),
    ("model.init_checkpoint=/nonexistent/run", "model.init_checkpoint='/nonexistent/run' does not exist"),
]


def test_refusals_are_one_line_before_any_heavy_work(tmp_path):
    """In a fresh interpreter: each refused config exits 2 with one line, creates nothing, and imports no torch
    (the default dataset is not even looked for: data.path is empty)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [*REFUSED, (f"out_dir={blocker}/runs", "is not a directory"),
             ("out_dir=/proc/hescape-runs", "out_dir='/proc/hescape-runs': /proc is not writable")]
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from hescape.train.cli import main
        out = []
        for override, _ in {cases!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main([f"out_dir={tmp_path / 'runs'}", override] if not override.startswith("out_dir")
                            else [override])
            out.append([code, err.getvalue()])
        heavy = sorted(m for m in ("torch", "hescape.data", "hescape.models", "hescape.eval") if m in sys.modules)
        print(json.dumps({{"results": out, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["heavy"] == []
    for (override, expected), (code, err) in zip(cases, got["results"], strict=True):
        assert code == 2, (override, err)
        assert err.startswith("hescape-train: error: ") and err.count("\n") == 1, (override, err)
        assert expected in err, (override, err)
    assert not (tmp_path / "runs").exists()


def test_help_imports_nothing_heavy():
    script = ("import sys\nfrom hescape.train.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'hescape.data', 'hescape.models', 'hescape.eval', 'numpy') "
              "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint_every" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


def test_choices_agree_with_hescape_models():
    """The choices written out in hescape.train.config (so that validation needs no torch) are hescape-models'."""
    from hescape.models import FINETUNE_MODES as models_finetune
    from hescape.models import PROJECTIONS as models_projections
    from hescape.models.losses._fused import _LOSSES

    assert set(FINETUNE_MODES) == set(models_finetune)
    assert set(PROJECTIONS) == set(models_projections)
    assert set(LOSSES) == set(_LOSSES)


def test_defaults_and_edges_pass():
    validate_config(load_config())
    cfg = load_config(None, ["optim.beta1=0", "optim.grad_clip=0", "data.hed_jitter=0", "seed=0",
                             "checkpoint_every=0", "optim.warmup_steps=0", "run_name=my-run.2"])
    assert cfg.optim.beta1 == 0.0 and cfg.checkpoint_every == 0
    with pytest.raises(HescapeConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=0"])
    assert load_config(None, ["optim.lr=0"], validate=False).optim.lr == 0.0


def test_existing_run_directory_is_refused_and_kept(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "mine.txt").write_text("keep me")
    code = main([f"data.path={tiny_dataset}", f"out_dir={tmp_path / 'runs'}", "run_name=r", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "run directory" in err and "already exists" in err and "--resume" in err
    assert [p.name for p in run.iterdir()] == ["mine.txt"] and (run / "mine.txt").read_text() == "keep me"


def test_diverging_lr_stops_with_diagnostic_and_keeps_good_checkpoint(tiny_dataset, tmp_path, capsys):
    """A learning rate of 1e6 with progress bars on: no crash in the bar, one diagnostic line naming the step,
    the loss terms and the logit scale, exit 2, and the last checkpoint holds finite weights."""
    code = main([f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=d", "epochs=2", "batch_size=8",
                 "recall_ks=1,5", "optim.lr=1e6", "optim.warmup_steps=0", "checkpoint_every=1", "progress=true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("hescape-train: error: training diverged at step "), err[-2000:]
    for part in ("contrastive_loss", "logit_scale", "grad norm", "last good checkpoint", "lower optim.lr"):
        assert part in line
    step = int(line.split("at step ")[1].split()[0])
    last = read_checkpoint(tmp_path / "d", "last")
    assert last["step"] == step - 1  # checkpoint_every=1: the step before the bad one
    assert all(bool(torch.isfinite(v).all()) for v in last["state_dict"].values())
    index = json.loads((tmp_path / "d" / "checkpoints" / "index.json").read_text())
    assert index["last"] == last["dir"].name
