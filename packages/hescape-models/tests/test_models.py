"""The two-tower model: presets, heads, fine-tuning modes, the logit-scale clamp, recorded contracts."""

from __future__ import annotations

import math

import pytest
import torch
from hescape.models import (
    MAX_LOGIT_SCALE,
    HescapeCLIP,
    HescapeModelError,
    TowerCfg,
    cfg_from_dict,
    cfg_to_dict,
    count_parameters,
    create_model,
    list_models,
)

PANEL = [f"G{i}" for i in range(11)]
SMALL = [n for n in list_models() if n != "paper"]  # "paper" defaults to UNI (303 M): built on meta below


def _batch(model, b=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = model.image_encoder.contract.input_size
    images = torch.randint(0, 256, (b, 3, size + 5, size + 5), dtype=torch.uint8, generator=gen)  # resized inside
    counts = torch.poisson(torch.full((b, len(model.panel)), 3.0), generator=gen)
    return images, counts


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_backward(name, loss):
    torch.manual_seed(0)
    model = create_model(name, panel=PANEL, loss=loss)
    out = model(*_batch(model, 3))
    for key in ("image_features", "gene_features"):
        assert out[key].shape == (3, model.cfg.embed_dim)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    terms = model.loss(out)
    loss_value = sum(v for k, v in terms.items() if k.endswith("_loss"))
    loss_value.backward()
    assert torch.isfinite(loss_value)
    assert model.logit_scale.grad is not None and model.gene_encoder.net[0].weight.grad.abs().sum() > 0
    assert (model.logit_bias is not None) == (loss == "siglip")


def test_gene_mlp_is_twice_the_panel_and_heads_are_capped():
    model = create_model("vit_mlp_nano", panel=[f"g{i}" for i in range(37)])
    assert model.gene_encoder.net[0].out_features == 74
    # On the 5K panel the gene tower is 10,000 wide; the reference's MLP head has hidden width 2·d, not 10,000.
    big = create_model("paper", panel=[f"g{i}" for i in range(5000)], image=TowerCfg("vit_nano"))
    head = count_parameters(big.gene_proj)["total"]
    assert head == (10_000 * 256 + 256) + 2 * 256 + (256 * 128 + 128)  # fc1, LayerNorm, fc2
    assert count_parameters(big.gene_encoder)["total"] == (5000 * 10_000 + 10_000) + 2 * 10_000 + (10_000**2 + 10_000)


def test_demo_heads_are_as_wide_as_their_encoders():
    model = create_model("vit_mlp_nano", panel=PANEL)
    assert model.gene_proj.net.fc1.out_features == 22 and model.image_proj.net.fc1.out_features == 128
    assert isinstance(model.gene_proj.net.norm, torch.nn.Identity)


def test_gene_tower_log1p_is_its_own_preprocessing():
    """The MLP's contract is log1p of raw counts: feeding raw counts equals feeding log1p to its layers."""
    model = create_model("vit_mlp_nano", panel=PANEL).eval()
    counts = torch.tensor([[0.0, 1, 5, 100, 0, 2, 3, 7, 0, 0, 1]] * 2)
    want = model.gene_proj(model.gene_encoder.net(torch.from_numpy(__import__("numpy").log1p(counts.numpy()))))
    torch.testing.assert_close(model.gene_proj(model.gene_features(counts)), want)


def test_logit_scale_clamp_after_step_keeps_its_gradient():
    model = create_model("vit_mlp_nano", panel=PANEL)
    with torch.no_grad():
        model.logit_scale.fill_(MAX_LOGIT_SCALE + 0.3)
    out = model(*_batch(model))
    # The value used is the value stored (no hidden clamp in forward) …
    assert out["logit_scale"].item() == pytest.approx(math.exp(MAX_LOGIT_SCALE + 0.3), rel=1e-6)
    loss = model.loss(out)["contrastive_loss"]
    loss.backward()
    # … so the scale keeps a gradient past the bound (a clamp in forward would make it exactly 0).
    assert model.logit_scale.grad.abs().item() > 0
    opt = torch.optim.SGD([model.logit_scale], lr=0.0)
    opt.step()
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    assert model(*_batch(model))["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def _step(model, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(*_batch(model, 8, seed))
    model.loss(out)["contrastive_loss"].backward()
    opt.step()


def test_lora_trains_only_adapters_and_heads():
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL, image={"finetune": "lora"})
    lora = {n for n, p in model.image_encoder.named_parameters() if "lora_" in n}
    assert lora and all(".attn." in n for n in lora)  # attention qkv/proj only, not the patch-embedding conv
    assert {n for n, p in model.image_encoder.named_parameters() if p.requires_grad} == lora
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n.startswith("image_encoder.") and "lora_" not in n:
            assert not changed, f"frozen weight {n} changed"
    changed_lora = [n for n in before if "lora_B" in n and not torch.equal(before[n], dict(model.named_parameters())[n])]
    assert changed_lora, "no LoRA adapter trained"
    assert not torch.equal(before["image_proj.net.fc1.weight"], model.image_proj.net.fc1.weight)
    counts = count_parameters(model.image_encoder)
    r, width, depth = 8, 128, 4  # qkv: A (r×128) + B (384×r); proj: A (r×128) + B (128×r)
    assert counts["trainable"] == depth * (r * width + 3 * width * r + r * width + width * r)


def test_frozen_tower_is_deterministic_and_untouched():
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL, gene={"finetune": "frozen"})
    model.train()
    assert not model.gene_encoder.training and model.image_encoder.training
    counts = _batch(model)[1]
    a, b = model.gene_features(counts), model.gene_features(counts)
    assert torch.equal(a, b)  # dropout off in a frozen trunk
    before = {n: p.detach().clone() for n, p in model.gene_encoder.named_parameters()}
    _step(model)
    assert all(torch.equal(before[n], p) for n, p in model.gene_encoder.named_parameters())


@pytest.mark.parametrize("projection", ["linear", "mlp", "transformer"])
def test_projection_heads(projection):
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=PANEL, projection=projection)
    out = model(*_batch(model))
    model.loss(out)["contrastive_loss"].backward()
    assert model.image_proj.kind == projection
    assert all(p.grad is not None for p in model.image_proj.parameters())
    if projection == "transformer":  # attends over the ViT's 1 + 64 tokens
        x = model.image_encoder.preprocess(_batch(model)[0])
        assert model.image_encoder.forward_tokens(x).shape[1] == 1 + (64 // 8) ** 2


def test_config_round_trip_restores_contract():
    model = create_model("vit_mlp_nano", panel=PANEL, embed_dim=16, loss="siglip",
                         image={"options": {"image_size": 48}, "contract": {"kind": "image", "input_size": 48, "resize_size": 56,
                                             "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3,
                                             "um_per_px": 0.5}})
    assert model.image_encoder.contract.input_size == 48
    cfg = cfg_from_dict(cfg_to_dict(model.recorded_cfg()))
    again = HescapeCLIP(cfg, load_weights=False)
    again.load_state_dict(model.state_dict())
    assert again.image_encoder.contract == model.image_encoder.contract
    assert again.gene_encoder.contract == model.gene_encoder.contract
    model.eval(), again.eval()
    imgs, counts = _batch(model)
    torch.testing.assert_close(again.encode_image(imgs), model.encode_image(imgs), rtol=0, atol=0)
    torch.testing.assert_close(again.encode_gene(counts), model.encode_gene(counts), rtol=0, atol=0)


def test_paper_preset_on_meta_device():
    with torch.device("meta"):
        model = create_model("paper", panel=[f"g{i}" for i in range(280)], image={"allow_random_init": True})
    d = model.describe()["towers"]
    assert d["image"]["encoder"] == "uni" and d["image"]["finetune"] == "lora"
    assert d["image"]["params"]["total"] > 303_350_784  # the trunk plus the adapters
    lora = d["image"]["params"]["trainable"]
    assert lora == 24 * (8 * 1024 + 3 * 1024 * 8 + 8 * 1024 + 1024 * 8)  # r = 8 on qkv and proj of 24 blocks


def test_errors_name_the_fix():
    with pytest.raises(HescapeModelError, match="vit_mlp_nano"):
        create_model("vit_mlp_nan", panel=PANEL)
    with pytest.raises(HescapeModelError, match="unknown model option"):
        create_model("vit_mlp_nano", panel=PANEL, embedding=3)
    with pytest.raises(HescapeModelError, match="gene panel"):
        create_model("vit_mlp_nano", panel=[])
    with pytest.raises(HescapeModelError, match="unknown image encoder 'vit_nanoo'.*vit_nano"):
        create_model("vit_mlp_nano", panel=PANEL, image="vit_nanoo")
    with pytest.raises(HescapeModelError, match="finetune mode"):
        create_model("vit_mlp_nano", panel=PANEL, image={"finetune": "partial"})
    with pytest.raises(HescapeModelError, match="match no module"):
        create_model("vit_mlp_nano", panel=PANEL, image={"finetune": "lora", "lora_targets": ("nope",)})
    with pytest.raises(HescapeModelError, match="no LoRA target"):
        create_model("vit_mlp_nano", panel=PANEL, image=TowerCfg("cnn_tiny", finetune="lora"), gene=TowerCfg("mlp"))
    model = create_model("vit_mlp_nano", panel=PANEL[:5])
    with pytest.raises(HescapeModelError, match=r"\(B, 5\)"):
        model.encode_gene(torch.rand(2, 6))
    with pytest.raises(HescapeModelError, match=r"\(B, 3, H, W\)"):
        model.encode_image(torch.rand(2, 64, 64))
    with pytest.raises(HescapeModelError, match="timm_name"):
        cfg_from_dict({"image": {"timm_name": "vit_small_patch16_224"}, "gene": {"kind": "mlp"}})
