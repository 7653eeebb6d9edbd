"""CTransPath and CONCH image encoders: architecture against the published numbers and keys, checkpoints in the
authors' layouts (timm 0.5.4 Swin; CONCH's whole CoCa model), forward/backward, input contracts.

Truth used here is not computed by the code under test: parameter counts and shapes from the facts sheet
(``shared/reference/encoders.md``) and hand arithmetic, key lists written out from the authors' code (TransPath
``ctran.py``, CONCH ``vision_tower.py``/``transformer.py``), TRIDENT's list of attention masks, the standard Swin
relative-position formula, a sequence-first re-implementation of CONCH's pooler, PIL bicubic resizing.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import timm.models.swin_transformer as timm_swin
import torch
import torch.nn.functional as F
from hescape.models.errors import HescapeModelError
from hescape.models.image.conch import convert_conch
from hescape.models.image.ctranspath import convert_ctranspath
from hescape.models.weights import WeightsError
from hescape.models.zoo import create_image_encoder, get_encoder_entry, list_image_encoders
from PIL import Image
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import nn
from torchvision.transforms import v2 as T

CTP_TINY = {"image_size": 64, "embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 4}
CONCH_TINY = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "embed_dim": 16,
              "pooler_heads": 2}


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and BatchNorm statistic random, so a key loaded into the wrong place changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return module


def test_both_are_registered():
    assert {"ctranspath", "conch"} <= set(list_image_encoders())


# --------------------------------------------------------------------------------------------------- CTransPath


def test_ctranspath_full_size_matches_facts_sheet():
    with torch.device("meta"):
        enc = create_image_encoder("ctranspath")
    assert _n_params(enc) == 27_520_038 == get_encoder_entry("ctranspath", "image").params
    assert enc.out_dim == 768
    # The stem's keys and shapes (facts sheet; TransPath ctran.py): conv 3→12, BN, conv 12→24, BN, conv1×1 24→96.
    stem = {k.removeprefix("trunk.patch_embed."): tuple(v.shape) for k, v in enc.state_dict().items()
            if k.startswith("trunk.patch_embed.")}
    bn = lambda i, c: {f"proj.{i}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {  # noqa: E731
        f"proj.{i}.num_batches_tracked": ()}
    assert stem == {"proj.0.weight": (12, 3, 3, 3), **bn(1, 12), "proj.3.weight": (24, 12, 3, 3), **bn(4, 24),
                    "proj.6.weight": (96, 24, 1, 1), "proj.6.bias": (96,), "norm.weight": (96,), "norm.bias": (96,)}
    # Shifted-window blocks carry an attention mask: exactly the keys TRIDENT finds missing after dropping them.
    masked = sorted(n.removeprefix("trunk.") for n, b in enc.named_buffers() if n.endswith("attn_mask") and b is not None)
    assert masked == ["layers.0.blocks.1.attn_mask", "layers.1.blocks.1.attn_mask", "layers.2.blocks.1.attn_mask",
                      "layers.2.blocks.3.attn_mask", "layers.2.blocks.5.attn_mask"]
    # Stage widths 96·2^i; merging at the start of stages 1–3 (timm ≥ 0.9), Linear(4C → 2C) without bias.
    sd = enc.state_dict()
    for i, c in ((1, 96), (2, 192), (3, 384)):
        assert tuple(sd[f"trunk.layers.{i}.downsample.reduction.weight"].shape) == (2 * c, 4 * c)
    assert "trunk.layers.0.downsample.reduction.weight" not in sd
    assert not any(k.startswith("trunk.head.") and "weight" in k for k in sd)  # no classifier
    # The full-size file in the authors' layout (merges at the end of stages 0–2) converts onto exactly our keys.
    published = _to_timm054(enc)["model"]
    for i, c in ((0, 96), (1, 192), (2, 384)):
        assert tuple(published[f"layers.{i}.downsample.reduction.weight"].shape) == (2 * c, 4 * c)
    assert {k: tuple(v.shape) for k, v in convert_ctranspath({"model": published}).items()} == {
        k: tuple(v.shape) for k, v in sd.items()}


def _rel_index(wh: int, ww: int) -> torch.Tensor:
    """Swin's relative position index (Liu et al. 2021), written out independently."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def _to_timm054(enc) -> dict:
    """Our CTransPath as the authors' file: timm 0.5.4 keys (merge at the end of stage i), the persistent
    ``relative_position_index`` and ``attn_mask`` buffers, wrapped in ``{'model': …}``, no head."""
    old = {}
    for k, v in enc.state_dict().items():
        k = k.removeprefix("trunk.")
        m = re.match(r"layers\.(\d+)\.downsample\.(.+)", k)
        old[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v.clone()
    for name, mod in enc.trunk.named_modules():
        if isinstance(mod, WindowAttention):
            old[f"{name}.relative_position_index"] = _rel_index(*mod.window_size)
        if isinstance(mod, SwinTransformerBlock) and mod.attn_mask is not None:
            old[f"{name}.attn_mask"] = mod.attn_mask.clone()
    return {"model": old}


@pytest.fixture(scope="module")
def ctp_source():
    torch.manual_seed(0)
    enc = _randomise(create_image_encoder("ctranspath", **CTP_TINY)).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return enc, x, enc.forward_features(x)


@pytest.mark.parametrize("fname", ["ctranspath.pth", "CHIEF_CTransPath.pth"])
def test_ctranspath_round_trip_from_timm054_layout(tmp_path, ctp_source, fname):
    enc, x, ref = ctp_source
    published = _to_timm054(enc)
    keys = published["model"]
    assert "layers.0.downsample.reduction.weight" in keys and "layers.3.downsample.reduction.weight" not in keys
    assert "layers.0.blocks.0.attn.relative_position_index" in keys and "layers.0.blocks.1.attn_mask" in keys
    torch.save(published, tmp_path / fname)
    loaded = create_image_encoder("ctranspath", weights=tmp_path, **CTP_TINY).eval()  # a directory holding the file
    assert loaded.weights_tag.startswith(f"{fname} sha256:")
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), ref)
    # The recomputed buffers equal the ones the file carried (what convert drops is really redundant).
    for name, b in loaded.named_buffers():
        key = name.removeprefix("trunk.")
        if b is not None and key.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(b, keys[key]), key


def test_ctranspath_unwrapped_new_layout_and_classifier_files_load(ctp_source):
    enc, x, ref = ctp_source
    new_layout = {k.removeprefix("trunk."): v for k, v in enc.state_dict().items()}  # a timm ≥ 0.9 re-save
    with_head = dict(_to_timm054(enc)["model"], **{"head.weight": torch.zeros(1000, 128), "head.bias": torch.zeros(1000)})
    for sd in (new_layout, {"model": with_head}):
        loaded = create_image_encoder("ctranspath", weights=sd, **CTP_TINY).eval()
        with torch.no_grad():
            assert torch.equal(loaded.forward_features(x), ref)


@pytest.mark.parametrize("damage, named", [
    ("missing", "trunk.layers.1.blocks.0.attn.qkv.weight"),
    ("extra", "trunk.layers.0.blocks.0.attn.extra"),
    ("shape", "trunk.norm.weight"),
])
def test_ctranspath_damaged_file_names_the_key(tmp_path, ctp_source, damage, named):
    sd = _to_timm054(ctp_source[0])["model"]
    if damage == "missing":
        del sd["layers.1.blocks.0.attn.qkv.weight"]
    elif damage == "extra":
        sd["layers.0.blocks.0.attn.extra"] = torch.zeros(3)
    else:
        sd["norm.weight"] = torch.zeros(7)
    torch.save({"model": sd}, tmp_path / "ctranspath.pth")
    with pytest.raises(WeightsError, match=re.escape(named)):
        create_image_encoder("ctranspath", weights=tmp_path / "ctranspath.pth", **CTP_TINY)


def test_ctranspath_convert_agrees_with_timms_own_filter(ctp_source):
    """timm's swin_transformer.checkpoint_filter_fn (its converter for the original Swin layout) maps the authors'
    file onto the same keys and tensors."""
    enc = ctp_source[0]
    published = _to_timm054(enc)
    ours = convert_ctranspath(published)
    timms = timm_swin.checkpoint_filter_fn(published, enc.trunk)
    assert ours.keys() == {f"trunk.{k}" for k in timms}
    assert all(torch.equal(ours[f"trunk.{k}"], v) for k, v in timms.items())


def test_patch_merging_order_is_swin_v1s(ctp_source):
    """The moved merge weights mean the same thing: timm's PatchMerging concatenates the 2×2 neighbours in the
    original Swin order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (as ported in peng-lab/hescape
    _ctranspath.py L349–353)."""
    merge = ctp_source[0].trunk.layers[1].downsample
    x = torch.randn(2, 8, 8, 16)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)), atol=0, rtol=0)


def test_ctranspath_convert_drops_only_what_it_names():
    sd = {"model": {"layers.0.downsample.norm.weight": 1, "layers.2.downsample.reduction.weight": 2,
                    "layers.0.blocks.1.attn_mask": 3, "layers.0.blocks.0.attn.relative_position_index": 4,
                    "head.weight": 5, "head.bias": 6, "norm.weight": 7, "foo": 8}}
    assert convert_ctranspath(sd) == {"trunk.layers.1.downsample.norm.weight": 1,
                                      "trunk.layers.3.downsample.reduction.weight": 2, "trunk.norm.weight": 7,
                                      "trunk.foo": 8}


def test_ctranspath_forward_backward_tiny():
    torch.manual_seed(0)
    enc = create_image_encoder("ctranspath", **CTP_TINY).train()
    out = enc.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, enc.out_dim) == (2, 128) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name in ("trunk.patch_embed.proj.0.weight", "trunk.layers.0.blocks.1.attn.relative_position_bias_table",
                 "trunk.layers.3.downsample.reduction.weight", "trunk.norm.weight"):
        g = enc.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    # Tokens for a transformer head: the last stage's 2×2 grid after the final norm; their mean is the feature.
    enc.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        tokens = enc.forward_tokens(x)
        assert tokens.shape == (2, 4, 128)
        torch.testing.assert_close(tokens.mean(1), enc.forward_features(x))
    with pytest.raises(HescapeModelError, match="64×64 input"):
        enc.forward_features(torch.randn(1, 3, 60, 60))


def test_ctranspath_contract_is_transpath_preprocessing():
    c = get_encoder_entry("ctranspath", "image").contract
    assert (c.input_size, c.resize_size, c.interpolation, c.um_per_px) == (224, None, "bilinear", 1.0)
    assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)
    assert create_image_encoder("ctranspath", **CTP_TINY).contract == dataclasses.replace(c, input_size=64)
    img = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = T.Compose([T.ToDtype(torch.float32, scale=True), T.Resize(224, antialias=True),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    torch.testing.assert_close(c(img), ref, atol=1e-5, rtol=0)
    assert c.scale_warning(1.0, 224) is None and "1 µm/px" in c.scale_warning(0.5, 224)


def test_ctranspath_lora_targets_are_linear_layers():
    enc = create_image_encoder("ctranspath", **CTP_TINY)
    for t in get_encoder_entry("ctranspath", "image").lora_targets:
        hits = [m for n, m in enc.named_modules() if n.endswith("." + t)]
        assert hits and all(isinstance(m, nn.Linear) for m in hits), t


# -------------------------------------------------------------------------------------------------------- CONCH


def _conch_visual_keys(depth: int) -> set[str]:
    """The visual tower's keys, written out from CONCH's code (coca_model.py _build_vision_tower: timm
    VisionTransformer, no LayerScale; vision_tower.py VisualModel; transformer.py AttentionalPooler), without the
    caption pooler."""
    trunk = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        trunk |= {f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for p in ("weight", "bias")}
    pool = {"query", "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.in_proj_bias",
            "attn.out_proj.weight", "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias"}
    return ({f"visual.trunk.{k}" for k in trunk} | {f"visual.attn_pool_contrast.{k}" for k in pool}
            | {"visual.ln_contrast.weight", "visual.ln_contrast.bias", "visual.proj_contrast"})


def test_conch_full_size_matches_facts_sheet_and_conch_keys():
    with torch.device("meta"):
        enc = create_image_encoder("conch")
    assert _n_params(enc.trunk) == 86_250_240  # facts sheet
    d, c = 512, 768  # hand count of the contrastive head: pooler (query, q, k, v, in-proj bias, out-proj, ln_q, ln_k)
    pooler = d + d * d + 2 * c * d + 3 * d + (d * d + d) + 2 * d + 2 * c
    assert pooler == 1_315_840
    assert _n_params(enc) == 86_250_240 + pooler + 2 * d + d * d == 87_829_248 == get_encoder_entry("conch", "image").params
    assert enc.out_dim == 512
    sd = enc.state_dict()
    assert {f"visual.{k}" for k in sd} == _conch_visual_keys(12)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["trunk.pos_embed"] == (1, 785, 768) and shapes["trunk.patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["attn_pool_contrast.query"] == (1, 512)
    assert shapes["attn_pool_contrast.attn.k_proj_weight"] == shapes["attn_pool_contrast.attn.v_proj_weight"] == (512, 768)
    assert shapes["attn_pool_contrast.attn.in_proj_bias"] == (1536,) and shapes["proj_contrast"] == (512, 512)
    with torch.device("meta"):
        cls = create_image_encoder("conch", pooling="cls")
    assert cls.out_dim == 768 and _n_params(cls) == _n_params(enc)  # same file loads; the head is only frozen


def _to_conch_checkpoint(enc, *, wrap: bool = False, decoder: bool = False) -> dict:
    """Our tower as CONCH's whole CoCa checkpoint: ``visual.`` keys, the caption pooler and its norm, a text tower,
    ``logit_scale`` (and the captioning decoder, which the public release omits); optionally DDP-wrapped."""
    gen = torch.Generator().manual_seed(5)
    width, d = enc.trunk.embed_dim, enc.ln_contrast.normalized_shape[0]
    sd = {f"visual.{k}": v.clone() for k, v in enc.state_dict().items()}
    cap = {"query": (8, width), "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
           "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,), "ln_q.weight": (width,),
           "ln_q.bias": (width,), "ln_k.weight": (width,), "ln_k.bias": (width,)}
    sd |= {f"visual.attn_pool_caption.{k}": torch.randn(s, generator=gen) for k, s in cap.items()}
    sd |= {"visual.ln_caption.weight": torch.ones(width), "visual.ln_caption.bias": torch.zeros(width)}
    text = {"token_embedding.weight": (50, width), "positional_embedding": (10, width), "cls_emb": (width,),
            "transformer.resblocks.0.attn.in_proj_weight": (3 * width, width), "ln_final.weight": (width,),
            "text_projection": (width, d)}
    sd |= {f"text.{k}": torch.randn(s, generator=gen) for k, s in text.items()}
    sd["logit_scale"] = torch.tensor(4.6052)
    if decoder:
        sd["text_decoder.resblocks.0.ln_1.weight"] = torch.ones(width)
    if wrap:
        return {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": torch.tensor(10)}
    return sd


@pytest.fixture(scope="module")
def conch_sources():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    src = _randomise(create_image_encoder("conch", **CONCH_TINY)).eval()
    return src, x


@pytest.mark.parametrize("layout, variant", [
    ("plain", {}), ("wrapped", {}), ("decoder", {}), ("plain", {"proj_contrast": True}), ("plain", {"pooling": "cls"}),
])
def test_conch_round_trip_from_coca_checkpoint(tmp_path, conch_sources, layout, variant):
    src, x = conch_sources
    ckpt = _to_conch_checkpoint(src, wrap=layout == "wrapped", decoder=layout == "decoder")
    torch.save(ckpt, tmp_path / "pytorch_model.bin")
    loaded = create_image_encoder("conch", weights=tmp_path, **CONCH_TINY, **variant).eval()
    ref_enc = create_image_encoder("conch", **CONCH_TINY, **variant).eval()
    ref_enc.load_state_dict(src.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), ref_enc.forward_features(x))


def test_conch_forward_is_conchs_forward_no_head(conch_sources):
    """The pooled vector equals CONCH's VisualModel.forward_no_head / encode_image re-implemented sequence-first
    (transformer.py AttentionalPooler: ln_k, NLD→LND, ln_q(query) repeated, MultiheadAttention, LND→NLD)."""
    src, x = conch_sources
    pool = src.attn_pool_contrast
    mha = nn.MultiheadAttention(16, 2, kdim=32, vdim=32)  # CONCH's module: sequence-first
    mha.load_state_dict(pool.attn.state_dict())  # same parameter names
    with torch.no_grad():
        tokens = src.trunk.forward_features(x)
        kv = F.layer_norm(tokens, (32,), pool.ln_k.weight, pool.ln_k.bias).permute(1, 0, 2)
        q = F.layer_norm(pool.query, (16,), pool.ln_q.weight, pool.ln_q.bias)
        out = mha(q.unsqueeze(1).repeat(1, kv.shape[1], 1), kv, kv, need_weights=False)[0].permute(1, 0, 2)
        pooled = F.layer_norm(out[:, 0], (16,), src.ln_contrast.weight, src.ln_contrast.bias)
        torch.testing.assert_close(src.forward_features(x), pooled, atol=1e-6, rtol=1e-5)
        proj = create_image_encoder("conch", **CONCH_TINY, proj_contrast=True).eval()
        proj.load_state_dict(src.state_dict())
        torch.testing.assert_close(proj.forward_features(x), pooled @ src.proj_contrast, atol=1e-6, rtol=1e-5)
        cls = create_image_encoder("conch", **CONCH_TINY, pooling="cls").eval()
        cls.load_state_dict(src.state_dict())
        assert torch.equal(cls.forward_features(x), tokens[:, 0])  # the HESCAPE reference's feature


@pytest.mark.parametrize("damage, named", [
    ("missing", "trunk.blocks.1.mlp.fc2.weight"),
    ("extra", "trunk.extra"),
    ("shape", "proj_contrast"),
    ("unnamed", "text_extra"),  # not under a dropped prefix: refused, never silently dropped
])
def test_conch_damaged_file_names_the_key(tmp_path, conch_sources, damage, named):
    sd = _to_conch_checkpoint(conch_sources[0])
    if damage == "missing":
        del sd["visual.trunk.blocks.1.mlp.fc2.weight"]
    elif damage == "extra":
        sd["visual.trunk.extra"] = torch.zeros(2)
    elif damage == "shape":
        sd["visual.proj_contrast"] = torch.zeros(16, 8)
    else:
        sd["text_extra"] = torch.zeros(2)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=re.escape(named)):
        create_image_encoder("conch", weights=tmp_path / "pytorch_model.bin", **CONCH_TINY)


def test_conch_convert_keys():
    sd = {"state_dict": {"module.visual.trunk.cls_token": 1, "module.visual.attn_pool_caption.query": 2,
                         "module.visual.ln_caption.weight": 3, "module.text.cls_emb": 4,
                         "module.text_decoder.x": 5, "module.logit_scale": 6, "module.visual.proj_contrast": 7}}
    assert convert_conch(sd) == {"trunk.cls_token": 1, "proj_contrast": 7}


def test_conch_forward_backward_tiny():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    enc = create_image_encoder("conch", **CONCH_TINY).train()
    out = enc.forward_features(x)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name in ("trunk.patch_embed.proj.weight", "trunk.blocks.1.attn.qkv.weight", "attn_pool_contrast.query",
                 "attn_pool_contrast.attn.k_proj_weight", "ln_contrast.weight"):
        g = enc.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert enc.proj_contrast.grad is None and not enc.proj_contrast.requires_grad  # unused unless proj_contrast=True
    assert enc.forward_tokens(x).shape == (2, 1, 16)
    proj = create_image_encoder("conch", **CONCH_TINY, proj_contrast=True)
    proj.forward_features(x).sum().backward()
    assert proj.proj_contrast.grad is not None
    cls = create_image_encoder("conch", **CONCH_TINY, pooling="cls")
    assert cls.forward_tokens(x).shape == (2, 17, 32)
    cls.forward_features(x).sum().backward()
    assert cls.trunk.cls_token.grad is not None
    assert not any(p.requires_grad for p in cls.attn_pool_contrast.parameters())
    with pytest.raises(HescapeModelError, match="proj_contrast"):
        create_image_encoder("conch", **CONCH_TINY, pooling="cls", proj_contrast=True)


def test_conch_contract_is_conchs_transform():
    c = get_encoder_entry("conch", "image").contract
    assert (c.input_size, c.resize_size, c.interpolation, c.um_per_px) == (448, 448, "bicubic", 0.5)
    tiny = create_image_encoder("conch", **CONCH_TINY).contract
    assert tiny == dataclasses.replace(c, input_size=32, resize_size=32)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    assert c.mean == mean and c.std == std
    gen = torch.Generator().manual_seed(0)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    # A 448-px patch is only normalised.
    img = torch.randint(0, 256, (1, 3, 448, 448), dtype=torch.uint8, generator=gen)
    torch.testing.assert_close(c(img)[0], (img[0].float() / 255 - m) / s, atol=1e-6, rtol=0)
    # A 512-px patch: CONCH resizes the PIL image (bicubic, 8-bit result) to 448, centre-crops 448, normalises.
    # The image is smooth, like tissue at this scale: on white noise PIL's 8-bit intermediate pass dominates.
    low = torch.rand(1, 3, 32, 32, generator=gen)
    img = (F.interpolate(low, size=(512, 512), mode="bilinear") * 255).round().to(torch.uint8)
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy()).resize((448, 448), Image.BICUBIC)
    ref = (torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255 - m) / s
    diff = (c(img)[0] - ref).abs() * s * 255  # in 8-bit levels
    # PIL rounds to 8 bits (≈1.1 levels at most, 0.32 on average); bilinear or a non-antialiased bicubic, the wrong
    # choices, are off by ≥ 2.4 levels at most and ≥ 0.42 on average on this image.
    assert diff.max() <= 1.5 and diff.mean() <= 0.36
    assert c.scale_warning(0.5, 448) is None and c.scale_warning(0.5, 224) is not None


def test_conch_lora_targets_match_attention_and_patch_projection():
    enc = create_image_encoder("conch", **CONCH_TINY)
    for t in get_encoder_entry("conch", "image").lora_targets:
        hits = {n: m for n, m in enc.named_modules() if n.endswith("." + t)}
        assert hits and all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in hits.values()), t
