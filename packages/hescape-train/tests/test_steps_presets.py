"""Presets (demo, paper), step-based schedules with evaluation every N steps, bf16 autocast, trackers."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from hescape.train import load_config, main
from hescape.train.config import PRESETS, TrainConfig, config_from_dict, config_to_dict
from hescape.train.errors import HescapeConfigError
from hescape.train.trainer import autocast_dtype, per_process_batch


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_paper_preset_is_section_8_1():
    """The numbers of the paper's section 8.1, written out here from the text (not read from PRESETS)."""
    cfg = load_config(None, ["preset=paper"])
    assert cfg.model.embed_dim == 128 and cfg.global_batch_size == 256 and cfg.max_steps == 20_000
    assert cfg.optim.warmup_steps == 780 and (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.95)
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 5.0
    assert cfg.model.loss == "clip" and cfg.model.projection == "mlp" and cfg.model.name == "paper"
    # the paper model preset: LoRA image encoder, MLP gene encoder trained from scratch
    from hescape.models import get_model_cfg

    m = get_model_cfg("paper")
    assert m.image.finetune == "lora" and m.gene.name == "mlp"
    # every ablation is one override, applied after the preset
    cfg = load_config(None, ["preset=paper", "model.loss=siglip", "model.image_projection=linear",
                             "model.image_finetune=frozen", "optim.lr=3e-5"])
    assert (cfg.model.loss, cfg.model.image_projection, cfg.model.image_finetune, cfg.optim.lr) == (
        "siglip", "linear", "frozen", 3e-5)
    assert cfg.max_steps == 20_000  # the rest of the preset stays
    # demo = today's defaults
    assert config_to_dict(load_config(None, [])) == config_to_dict(TrainConfig()) and PRESETS["demo"] == {}
    # a run's config.json round-trips to the same configuration (resume)
    d = config_to_dict(cfg)
    assert config_to_dict(config_from_dict(d)) == d


def test_preset_refusals():
    with pytest.raises(HescapeConfigError, match="unknown preset 'papr'.*did you mean 'paper'"):
        load_config(None, ["preset=papr"])
    with pytest.raises(HescapeConfigError, match="max_steps=-1"):
        load_config(None, ["max_steps=-1"])
    with pytest.raises(HescapeConfigError, match="eval_every"):
        load_config(None, ["eval_every=-5"])
    with pytest.raises(HescapeConfigError, match="unknown precision 'fp16'"):
        load_config(None, ["precision=fp16"])
    cfg = load_config(None, ["global_batch_size=250"])
    assert per_process_batch(cfg, 2) == 125 and per_process_batch(load_config(None, ["batch_size=7"]), 4) == 7
    with pytest.raises(HescapeConfigError, match="does not split evenly over 4 processes"):
        per_process_batch(cfg, 4)


def test_autocast_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("bf16", cpu) is torch.bfloat16


def _cosine(step, total, lr, warmup):
    """The warm-up + cosine schedule written from open_clip's description (scheduler.py, cosine_lr)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    e, es = step - warmup, total - warmup
    return 0.5 * (1 + math.cos(math.pi * e / es)) * lr


def test_step_based_run_with_evaluation_every_n_steps(tiny_dataset, tmp_path, capsys):
    """max_steps is not a whole number of epochs (4 batches per epoch): training stops at step 10 exactly,
    validation comes at steps 4 and 8 and at the last step, the schedule follows max_steps, and the best of those
    evaluations is the one scored on the test split."""
    code, out, err = _run(capsys, f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=s",
                          "preset=paper", "model.image=vit_nano", "model.image_finetune=full",
                          "max_steps=10", "eval_every=4", "checkpoint_every=3", "global_batch_size=8",
                          "optim.warmup_steps=3", "optim.lr=1e-3", "log_every=3", "recall_ks=1,5", "probe=false",
                          "progress=false")
    assert code == 0, err
    run = tmp_path / "s"
    steps = _lines(run / "steps.jsonl")
    assert [r["step"] for r in steps] == [3, 6, 9, 10]  # every log_every steps and the last one
    for r in steps:
        assert r["lr"] == pytest.approx(_cosine(r["step"] - 1, 10, 1e-3, 3), rel=1e-12)
    assert [r["epoch"] for r in steps] == [1, 2, 3, 3]
    metrics = _lines(run / "metrics.jsonl")
    evals = [r for r in metrics if "split" not in r]
    assert [r["step"] for r in evals] == [4, 8, 10] and all("val_i2g_R@5" in r for r in evals)
    best = min(evals, key=lambda r: (r["val_i2g_mean_rank"] + r["val_g2i_mean_rank"], -r["step"]))
    res = json.loads((run / "results.json").read_text())
    assert res["step"] == best["step"] and res["last"]["step"] == 10
    assert f"best step {best['step']}/10" in out
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    assert index["step"] == 10
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "paper" and cfg["max_steps"] == 10


def test_short_run_logs_its_last_step(tiny_dataset, tmp_path, capsys):
    """Fewer steps than log_every still leaves a steps line (the last step), so steps.csv is never empty."""
    code, _, err = _run(capsys, f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=t", "epochs=1",
                        "batch_size=16", "log_every=100", "recall_ks=1", "probe=false", "progress=false")
    assert code == 0, err
    steps = _lines(tmp_path / "t" / "steps.jsonl")
    assert len(steps) == 1 and steps[0]["step"] == 2
    assert len((tmp_path / "t" / "steps.csv").read_text().splitlines()) == 2  # header + the line


def test_bf16_autocast_trains_with_fp32_loss(tiny_dataset, tmp_path, capsys):
    code, _, err = _run(capsys, f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=b", "epochs=1",
                        "batch_size=16", "precision=bf16", "log_every=1", "recall_ks=1", "probe=false",
                        "progress=false")
    assert code == 0, err
    steps = _lines(tmp_path / "b" / "steps.jsonl")
    assert all(math.isfinite(r["loss"]) for r in steps)
    # the loss is accumulated in fp32: a bf16 loss would be a multiple of bf16's step near 4.1 (2**-5)
    assert any(abs(r["loss"] * 32 - round(r["loss"] * 32)) > 1e-3 for r in steps)


def test_tensorboard_and_wandb(tiny_dataset, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    logged, inits = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, dict(values)))

        def finish(self):
            logged.append(("finished", {}))

    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    fake.init = lambda **kw: inits.append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else
                        __import__("importlib.machinery").machinery.PathFinder.find_spec(name))
    code, _, err = _run(capsys, f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=tb", "epochs=2",
                        "batch_size=16", "log_every=1", "log.tensorboard=true", "log.wandb=true", "recall_ks=1,5",
                        "probe=false", "progress=false")
    assert code == 0, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    steps = _lines(tmp_path / "tb" / "steps.jsonl")
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in losses] == [r["step"] for r in steps]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in steps], rel=1e-6)  # float32 events
    assert len(acc.Scalars("val/val_i2g_R@5")) == 2
    assert inits[0]["name"] == "tb" and inits[0]["config"]["log"]["wandb"] is True
    assert [s for s, v in logged if "train/loss" in v] == [r["step"] for r in steps]
    assert logged[-1][0] == "finished"


def test_missing_tracker_is_refused_before_anything(tiny_dataset, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = _run(capsys, f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=x", "log.wandb=true")
    assert code == 2 and "needs the wandb package" in err and 'hescape-train[wandb]' in err
    assert not (tmp_path / "x").exists()
