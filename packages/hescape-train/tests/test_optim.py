"""The learning-rate schedule against a hand formula (and against what a run logged), and which parameters get
weight decay: none on biases, norms, logit_scale/logit_bias and timm's no_weight_decay() names; only parameters
that train."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hescape.models import create_model
from hescape.train.cli import main
from hescape.train.config import OptimConfig
from hescape.train.optim import build_optimizer, lr_at, param_groups

PANEL = [f"G{i}" for i in range(12)]


def hand_lr(step, total, lr, warmup):
    """Warm-up then cosine, written out (open_clip scheduler.py cosine_lr, with progress capped at 1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))) * lr


def test_lr_schedule_values():
    # hand-computed points: lr 1e-3, 4 warm-up steps, 12 steps
    assert lr_at(0, 12, 1e-3, 4) == pytest.approx(2.5e-4, rel=1e-12)
    assert lr_at(3, 12, 1e-3, 4) == pytest.approx(1e-3, rel=1e-12)  # end of warm-up: the peak
    assert lr_at(4, 12, 1e-3, 4) == pytest.approx(1e-3, rel=1e-12)  # cosine at progress 0
    assert lr_at(8, 12, 1e-3, 4) == pytest.approx(5e-4, rel=1e-12)  # half way: cos(pi/2) = 0
    assert lr_at(10, 12, 1e-3, 4) == pytest.approx(1e-3 * (1 - math.sqrt(0.5)) / 2, rel=1e-12)  # cos(3pi/4)
    assert lr_at(12, 12, 1e-3, 4) == 0.0 and lr_at(50, 12, 1e-3, 4) == 0.0  # past the end: 0, never negative
    assert lr_at(0, 10, 3e-4, 0) == pytest.approx(3e-4)  # no warm-up
    for step in range(40):
        assert lr_at(step, 40, 2e-3, 7) == pytest.approx(hand_lr(step, 40, 2e-3, 7), rel=1e-12)


def test_a_run_uses_the_schedule(tiny_dataset, tmp_path, capsys):
    """Every step's learning rate as the run logged it (steps.jsonl and steps.csv) equals the hand formula."""
    code = main([f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=r", "epochs=3", "batch_size=8",
                 "optim.lr=2e-3", "optim.warmup_steps=5", "log_every=1", "recall_ks=1,5", "probe=false",
                 "progress=false"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "r" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    for r in lines:
        assert r["lr"] == pytest.approx(hand_lr(r["step"] - 1, 12, 2e-3, 5), rel=1e-12)
    csv_lines = (tmp_path / "r" / "steps.csv").read_text().splitlines()
    header = csv_lines[0].split(",")
    assert header[:4] == ["step", "epoch", "lr", "loss"] and len(csv_lines) == 13
    assert [float(row.split(",")[header.index("lr")]) for row in csv_lines[1:]] == [r["lr"] for r in lines]
    # metrics.csv: one row per epoch, the same numbers as metrics.jsonl
    epochs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and [float(r.split(",")[2]) for r in rows[1:]] == [
        e["train_loss"] for e in epochs if "train_loss" in e]


def _groups(model):
    g = {pg["weight_decay"] > 0: set(pg["names"]) for pg in param_groups(model, 0.01)}
    return g[True], g[False]


def test_weight_decay_groups_vit_clip():
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL)
    decay, no_decay = _groups(model)
    names = dict(model.named_parameters())
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names)
    # timm VisionTransformer.no_weight_decay() = {"pos_embed", "cls_token", "dist_token"}: 3-d tensors, yet no decay
    assert {"image_encoder.backbone.pos_embed", "image_encoder.backbone.cls_token"} <= no_decay
    assert names["image_encoder.backbone.pos_embed"].ndim == 3
    assert "logit_scale" in no_decay
    # written out by hand: decayed = the matrices (2-d and up) except those two
    expected = {n for n, p in names.items() if p.ndim >= 2} - {"image_encoder.backbone.pos_embed",
                                                               "image_encoder.backbone.cls_token"}
    assert decay == expected
    assert "image_encoder.backbone.patch_embed.proj.weight" in decay  # a conv kernel (4-d) decays
    assert "image_encoder.backbone.blocks.0.attn.qkv.weight" in decay
    # the rest of the no-decay group: biases, the gains of normalisation layers, the logit scale
    modules = dict(model.named_modules())
    norms = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.GroupNorm)
    for n in no_decay - {"image_encoder.backbone.pos_embed", "image_encoder.backbone.cls_token", "logit_scale"}:
        owner, _, leaf = n.rpartition(".")
        assert leaf == "bias" or isinstance(modules[owner], norms), (n, type(modules[owner]))
    assert any(isinstance(modules[n.rpartition(".")[0]], norms) for n in no_decay if n.endswith(".weight"))


def test_weight_decay_groups_siglip_frozen_and_lora():
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL, loss="siglip", image={"finetune": "lora"},
                         gene={"finetune": "frozen"})
    decay, no_decay = _groups(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable  # frozen trunks and LoRA base weights are not in the optimiser
    assert not any(n.startswith("gene_encoder.") for n in decay | no_decay)
    image = {n for n in decay | no_decay if n.startswith("image_encoder.")}
    assert image and all("lora_" in n for n in image)
    assert {"logit_scale", "logit_bias"} <= no_decay


def test_weight_decay_groups_published_vit_names():
    """A pathology ViT (UNI's architecture, tiny) lists its no-decay names itself (encoder.no_weight_decay_names)."""
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL,
                         image={"name": "uni", "finetune": "full",
                                "options": {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}})
    _, no_decay = _groups(model)
    assert {"image_encoder.trunk.pos_embed", "image_encoder.trunk.cls_token"} <= no_decay


def test_adamw_decays_only_the_decay_group():
    """One AdamW step with zero gradients: a decayed parameter is multiplied by exactly 1 - lr·wd (decoupled
    decay, Loshchilov & Hutter 2019), a parameter of the other group does not move."""
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL)
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decay, no_decay = _groups(model)
    for n, p in model.named_parameters():
        if n in decay:
            assert torch.equal(p.detach(), before[n] * (1 - 0.1 * 0.5)), n
        else:
            assert torch.equal(p.detach(), before[n]), n
