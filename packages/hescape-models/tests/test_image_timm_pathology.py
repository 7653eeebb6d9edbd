"""The timm pathology encoders against their published facts.

Truth used here is not computed by the module under test: parameter counts from the facts sheet
(``shared/reference/encoders.md``) and a hand count; timm models built directly from the published constructor
arguments (UNI README, TRIDENT ``load.py``, owkin/plism-benchmark) as checkpoint sources; torchvision's own
ResNet-50 for the HEST baseline; torchvision transforms for the input contracts; peft for the LoRA targets.
Full-size models are only ever built on the meta device.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hescape.models import HescapeModelError, ImageContract, WeightsError, create_image_encoder, list_image_encoders
from hescape.models.zoo import get_encoder_entry
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn
from torchvision.transforms import v2

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # bioptimus/H-optimus-0 card


class DinoV2SwiGLU(nn.Module):
    """The SwiGLU of the DINOv2 code base as owkin/plism-benchmark builds H0-mini with it (``SwiGLUFFNFused``):
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8, ``w12`` packs gate and value, ``w3`` projects back."""

    def __init__(self, in_features, hidden_features=None, bias=True, **_):
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


_H_OPTIMUS_KW = dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5)  # TRIDENT HOptimus{0,1}
# name -> (timm architecture, published kwargs, prefix tokens, pooling, parameters on the facts sheet)
PUBLISHED = {
    "uni": ("vit_large_patch16_224",  # UNI README_old.md L69
            dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
            1, "cls", 303_350_784),
    "uni2_h": ("vit_giant_patch14_224",  # UNI README.md L362-377
               dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
                    act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True),
               9, "cls", 681_394_176),
    "gigapath": ("vit_giant_patch14_dinov2",  # TRIDENT GigaPathInferenceEncoder
                 dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                      mlp_ratio=5.33334, num_classes=0),
                 1, "cls", 1_134_953_984),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", _H_OPTIMUS_KW, 5, "cls", 1_134_774_272),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", _H_OPTIMUS_KW, 5, "cls", 1_134_774_272),
    "h0_mini": ("vit_base_patch14_reg4_dinov2",  # plism-benchmark 18a7797 (its pre-hub build of H0-mini)
                dict(img_size=224, patch_size=14, init_values=1e-5, num_classes=0, dynamic_img_size=False,
                     mlp_ratio=4, mlp_layer=DinoV2SwiGLU, act_layer=nn.SiLU),
                5, "cls", 85_739_520),  # hand count below; the paper says 86M
    "virchow2": ("vit_huge_patch14_224",  # TRIDENT Virchow2InferenceEncoder
                 dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
                      dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU),
                 5, "cls+mean", 631_239_424),
}
VITS = list(PUBLISHED)
# Tokens after the final norm at 224 px: prefix + (224 / patch)^2 (facts sheet pos_embed shapes / token counts).
TOKENS = {"uni": 197, "uni2_h": 265, "gigapath": 197, "h_optimus_0": 261, "h_optimus_1": 261, "h0_mini": 261,
          "virchow2": 261}
OUT_DIM = {"uni": 1024, "uni2_h": 1536, "gigapath": 1536, "h_optimus_0": 1536, "h_optimus_1": 1536, "h0_mini": 768,
           "virchow2": 2560, "resnet50": 1024}
PATCH = {"uni": 16, "gigapath": 16}
TINY_DIM = 48  # SwiGLU hidden sizes stay even at every published mlp_ratio


def _tiny(name: str) -> dict:
    return dict(depth=2, embed_dim=TINY_DIM, num_heads=4, img_size=2 * PATCH.get(name, 14))


def _published_vit(name: str, **overrides) -> nn.Module:
    arch, kwargs, *_ = PUBLISHED[name]
    return timm.create_model(arch, pretrained=False, **{**kwargs, **overrides})


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Every float parameter and buffer random (vectors positive: norms, LayerScale, BN variances), so a key that
    lands in the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]:
            r = torch.rand(t.shape, generator=g) * 0.4 + 0.1 if t.ndim == 1 else torch.randn(t.shape, generator=g) * 0.05
            t.copy_(r)


def _reference_embedding(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = model.forward_features(x)
    _, _, n_prefix, pooling, _ = PUBLISHED[name]
    if pooling == "cls":
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)


# --------------------------------------------------------------------------------------------- full size (meta)

_FULL: dict[str, nn.Module] = {}


def _full_size(name: str) -> nn.Module:
    """The default (full-size) encoder, built once per session on the meta device."""
    if name not in _FULL:
        with torch.device("meta"):
            _FULL[name] = create_image_encoder(name)
    return _FULL[name]


def _vit_hand_count(dim, depth, patch, n_patches, n_reg, mlp_in, mlp_hidden, pos_prefix, in_ch=3):
    """Parameters of a pre-norm ViT with LayerScale and a packed SwiGLU/GELU MLP, counted by hand."""
    block = (2 * 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + 2 * dim  # 2 norms, qkv, proj, 2 LayerScale
             + dim * mlp_in + mlp_in + mlp_hidden * dim + dim)                     # fc1, fc2
    return (in_ch * patch * patch * dim + dim + dim + n_reg * dim + (n_patches + pos_prefix) * dim
            + depth * block + 2 * dim)


def test_hand_count_reproduces_the_facts_sheet_and_gives_h0_mini():
    assert _vit_hand_count(1024, 24, 16, 196, 0, 4096, 4096, 1) == 303_350_784            # UNI
    assert _vit_hand_count(1536, 24, 14, 256, 8, 8192, 4096, 0) == 681_394_176            # UNI2-h
    assert _vit_hand_count(1536, 40, 16, 196, 0, 8192, 4096, 1) == 1_134_953_984          # GigaPath
    assert _vit_hand_count(1536, 40, 14, 256, 4, 8192, 4096, 0) == 1_134_774_272          # H-optimus-0
    assert _vit_hand_count(1280, 32, 14, 256, 4, 6832, 3416, 5) == 631_239_424            # Virchow2
    assert _vit_hand_count(768, 12, 14, 256, 4, 4096, 2048, 0) == PUBLISHED["h0_mini"][4]  # H0-mini


def test_h0_mini_rejects_the_facts_sheet_guess():
    """The UNVERIFIED guess (SwiGLUPacked at mlp_ratio 4: fc1 768->3072) has 71,571,456 parameters; its shipped
    fp32 checkpoint (343,027,735 bytes, plism-benchmark) holds ~85.7M, which only the 2048-hidden SwiGLU fits."""
    guess = _vit_hand_count(768, 12, 14, 256, 4, 3072, 1536, 0)
    assert guess == 71_571_456
    assert abs(343_027_735 / 4 - PUBLISHED["h0_mini"][4]) < 0.001 * 343_027_735 / 4 < abs(343_027_735 / 4 - guess)


@pytest.mark.parametrize("name", VITS)
def test_full_size_vit_matches_the_published_build(name):
    enc = _full_size(name)
    with torch.device("meta"):
        ref = _published_vit(name)
        x = torch.empty(2, 3, 224, 224)
        features, tokens = enc.forward_features(x), enc.forward_tokens(x)
    ours = enc.trunk.state_dict()
    theirs = ref.state_dict()
    if name == "h0_mini":  # the DINOv2 SwiGLU calls fc1/fc2 w12/w3; the hub checkpoint uses timm's names
        theirs = {k.replace(".w12.", ".fc1.").replace(".w3.", ".fc2."): v for k, v in theirs.items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    n = sum(p.numel() for p in enc.parameters())
    assert n == PUBLISHED[name][4] == get_encoder_entry(name, "image").params
    assert sum(p.numel() for p in ref.parameters()) == n
    assert features.shape == (2, OUT_DIM[name]) and get_encoder_entry(name, "image").out_dim == OUT_DIM[name]
    assert tokens.shape[:2] == (2, TOKENS[name]) and enc.num_prefix_tokens == PUBLISHED[name][2]


def test_full_size_shapes_on_the_facts_sheet():
    uni2, uni, giga, virchow = (_full_size(n).trunk for n in ("uni2_h", "uni", "gigapath", "virchow2"))
    assert uni.pos_embed.shape == (1, 197, 1024) and giga.pos_embed.shape == (1, 197, 1536)
    assert uni2.reg_token.shape == (1, 8, 1536) and uni2.pos_embed.shape == (1, 256, 1536)
    assert uni2.blocks[0].mlp.fc1.weight.shape == (8192, 1536) and uni2.blocks[0].mlp.fc2.weight.shape == (1536, 4096)
    assert virchow.pos_embed.shape == (1, 261, 1280)
    assert "blocks.0.ls1.gamma" in uni.state_dict()  # init_values (UNI README_old.md L49)


def test_resnet50_is_torchvision_cut_after_layer3():
    enc = _full_size("resnet50")
    with torch.device("meta"):
        tv = torchvision.models.resnet50()
        features = enc.forward_features(torch.empty(2, 3, 224, 224))
        tokens = enc.forward_tokens(torch.empty(2, 3, 224, 224))
    kept = nn.ModuleDict({k: getattr(tv, k) for k in ("conv1", "bn1", "layer1", "layer2", "layer3")})
    assert {k: v.shape for k, v in enc.trunk.state_dict().items()} == {k: v.shape for k, v in kept.state_dict().items()}
    n = sum(p.numel() for p in enc.parameters())
    assert n == sum(p.numel() for p in kept.parameters()) == get_encoder_entry("resnet50", "image").params
    assert features.shape == (2, 1024) and tokens.shape == (2, 196, 1024)  # 224 / 16 = 14 per side


# --------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", VITS)
def test_vit_checkpoint_round_trip(name, tmp_path):
    """A file in the published layout (un-prefixed timm keys, no wrapper) loads with no error and gives the
    source model's embedding bit for bit."""
    torch.manual_seed(0)
    ref = _published_vit(name, depth=2, embed_dim=TINY_DIM, num_heads=4, img_size=_tiny(name)["img_size"]).eval()
    _randomise(ref)
    sd = ref.state_dict()
    if name == "h0_mini":
        sd = {k.replace(".w12.", ".fc1.").replace(".w3.", ".fc2."): v for k, v in sd.items()}
    fname = "model.safetensors" if name == "virchow2" else "pytorch_model.bin"  # what each repository ships
    if fname.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / fname)
    else:
        torch.save(sd, tmp_path / fname)
    enc = create_image_encoder(name, weights=tmp_path, **_tiny(name)).eval()
    assert enc.weights_tag.startswith(fname)
    x = torch.randn(3, 3, _tiny(name)["img_size"], _tiny(name)["img_size"])
    with torch.no_grad():
        ours, theirs = enc.forward_features(x), _reference_embedding(name, ref, x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if PUBLISHED[name][3] == "cls":
        torch.testing.assert_close(ours, ref(x), rtol=0, atol=0)  # timm's own token pooling


@pytest.mark.parametrize("name", ["uni", "virchow2"])
def test_vit_checkpoint_key_errors_name_the_key(name, tmp_path):
    ref = _published_vit(name, depth=2, embed_dim=TINY_DIM, num_heads=4, img_size=_tiny(name)["img_size"])
    good = ref.state_dict()
    bad = {
        "blocks.1.attn.qkv.weight": {k: v for k, v in good.items() if k != "blocks.1.attn.qkv.weight"},
        "head.weight": {**good, "head.weight": torch.zeros(3, TINY_DIM)},
        "pos_embed": {**good, "pos_embed": good["pos_embed"][:, :-1]},
    }
    for key, sd in bad.items():
        torch.save(sd, tmp_path / "pytorch_model.bin")
        with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
            create_image_encoder(name, weights=tmp_path / "pytorch_model.bin", **_tiny(name))
    torch.save({"state_dict": good}, tmp_path / "wrapped.bin")  # the real files have no wrapper
    with pytest.raises(WeightsError, match="non-tensor"):
        create_image_encoder(name, weights=tmp_path / "wrapped.bin", **_tiny(name))


def _tv_tiny_resnet() -> torchvision.models.ResNet:
    """torchvision's own ResNet-50 layout with one block per stage (keys as in resnet50-0676ba61.pth)."""
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])


def _tv_layer3_pool(tv: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    return torch.flatten(nn.AdaptiveAvgPool2d(1)(tv.layer3(tv.layer2(tv.layer1(x)))), 1)  # HEST pooling


@pytest.mark.parametrize(("fname", "batches_tracked"), [("model.safetensors", True), ("pytorch_model.bin", False)])
def test_resnet50_checkpoint_round_trip(tmp_path, fname, batches_tracked):
    """The full torchvision checkpoint (layer4 and fc included, with or without num_batches_tracked) loads into
    the truncated network and gives torchvision's layer3 average pool."""
    tv = _tv_tiny_resnet().eval()
    _randomise(tv)
    sd = {k: v for k, v in tv.state_dict().items() if batches_tracked or not k.endswith("num_batches_tracked")}
    assert any(k.startswith("layer4.") for k in sd) and "fc.weight" in sd
    if fname.endswith(".safetensors"):
        save_file(sd, tmp_path / fname)
    else:
        torch.save(sd, tmp_path / fname)
    enc = create_image_encoder("resnet50", weights=tmp_path / fname, layers=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), _tv_layer3_pool(tv, x), rtol=1e-5, atol=1e-6)
    del sd["layer3.0.conv2.weight"]
    torch.save(sd, tmp_path / "missing.bin")
    with pytest.raises(WeightsError, match=r"layer3\.0\.conv2\.weight"):
        create_image_encoder("resnet50", weights=tmp_path / "missing.bin", layers=(1, 1, 1, 1))


# --------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", [*VITS, "resnet50"])
def test_forward_backward_tiny(name):
    torch.manual_seed(0)
    if name == "resnet50":  # any input size: a 64 px contract keeps the test fast
        enc = create_image_encoder(name, layers=(1, 1, 1, 1), contract=ImageContract(input_size=64))
    else:
        enc = create_image_encoder(name, **_tiny(name))
    size = enc.contract.input_size + 7  # patches are resized by the contract
    out = enc(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    expected = OUT_DIM["resnet50"] if name == "resnet50" else TINY_DIM * (2 if PUBLISHED[name][3] == "cls+mean" else 1)
    assert out.shape == (2, expected) == (2, enc.out_dim) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    first = "trunk.conv1.weight" if name == "resnet50" else "trunk.patch_embed.proj.weight"
    assert grads[first].abs().sum() > 0


def test_h0_mini_pooling_option():
    default = create_image_encoder("h0_mini", **_tiny("h0_mini"))
    both = create_image_encoder("h0_mini", pooling="cls+mean", **_tiny("h0_mini"))
    both.load_state_dict(default.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a, b, tokens = default.forward_features(x), both.forward_features(x), default.forward_tokens(x)
    assert a.shape == (2, TINY_DIM) and b.shape == (2, 2 * TINY_DIM)
    torch.testing.assert_close(b, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1), rtol=0, atol=0)
    with pytest.raises(HescapeModelError, match="cls\\+mean"):
        create_image_encoder("h0_mini", pooling="avg")


def test_lora_targets_are_attention_only():
    """peft wraps exactly qkv and proj of every block; the reference's ("qkv", "proj") also catches the patch
    embedding conv, which is why the entries name ``attn.*``."""
    for name in VITS:
        assert get_encoder_entry(name, "image").lora_targets == ("attn.qkv", "attn.proj")

    def wrapped(targets):
        enc = create_image_encoder("uni2_h", **_tiny("uni2_h"))
        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=list(targets)), enc)
        return sorted(n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A"))

    assert wrapped(get_encoder_entry("uni2_h", "image").lora_targets) == [
        f"trunk.blocks.{i}.attn.{m}" for i in range(2) for m in ("proj", "qkv")]
    assert "trunk.patch_embed.proj" in wrapped(("qkv", "proj"))


# --------------------------------------------------------------------------------------------- input contracts

# name -> the published torchvision transform on a PIL tile, and the µm/px the card or paper gives
PUBLISHED_TRANSFORMS = {
    "uni": ([v2.Resize(224), v2.CenterCrop(224)], IMAGENET, 0.5),                     # UNI README L415-418
    "uni2_h": ([v2.Resize(224), v2.CenterCrop(224)], IMAGENET, 0.5),
    "gigapath": ([v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224)], IMAGENET, 0.5),
    "h_optimus_0": ([v2.Resize(224)], H_OPTIMUS, 0.5),                                # TRIDENT; card at 224 px
    "h_optimus_1": ([v2.Resize(224)], H_OPTIMUS, 0.5),
    "h0_mini": ([v2.Resize(224)], H_OPTIMUS, 0.5),
    "virchow2": ([v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC)], IMAGENET, 0.5),
    "resnet50": ([v2.Resize(224), v2.CenterCrop(224)], IMAGENET, None),              # TRIDENT; HEST at 224 px
}


def _tile(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth pink-purple uint8 tile (H&E-like colours, structure at several scales)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, 9, 9, generator=g), size=(size, size), mode="bicubic")
    fine = torch.rand(1, 3, size, size, generator=g)
    base = torch.tensor([0.85, 0.55, 0.75]).view(1, 3, 1, 1)
    return ((base + 0.25 * (coarse - 0.5) + 0.1 * (fine - 0.5)).clamp(0, 1) * 255).round().to(torch.uint8)[0]


@pytest.mark.parametrize("name", list(PUBLISHED_TRANSFORMS))
def test_contract_matches_the_published_transform(name):
    assert _full_size(name).contract == get_encoder_entry(name, "image").contract  # the default build's
    contract = get_encoder_entry(name, "image").contract
    steps, (mean, std), um_per_px = PUBLISHED_TRANSFORMS[name]
    assert contract.mean == mean and contract.std == std and contract.um_per_px == um_per_px
    tile = _tile(300)
    pil = v2.ToPILImage()(tile)  # the published pipelines run on PIL images
    published = v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ours = contract(tile[None])[0]
    theirs = published(pil)
    assert ours.shape == theirs.shape == (3, 224, 224)
    # PIL resamples and rounds in uint8: on average within half a grey level, at most two (the other
    # interpolation, bilinear for bicubic or back, is off by ~1.4 levels on average on this tile)
    level = 1 / 255 / min(std)
    assert (ours - theirs).abs().mean() < 0.5 * level and (ours - theirs).abs().max() < 2 * level
    # at the native size there is no resampling: centre crop, then (x / 255 - mean) / std exactly
    native = _tile(256 if name == "gigapath" else 224, seed=1)
    o = (native.shape[-1] - 224) // 2
    hand = (native[:, o:o + 224, o:o + 224].float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std).view(3, 1, 1)
    torch.testing.assert_close(contract(native[None])[0], hand)


def test_contract_scale_story():
    """The default input covers input_size x µm/px; GigaPath's resize to 256 px means a 112 µm patch at 0.5
    µm/px reaches the network at 0.4375 µm/px (within tolerance), and 2x off is flagged."""
    giga = get_encoder_entry("gigapath", "image").contract
    assert giga.effective_um_per_px(0.5, 224) == pytest.approx(0.4375)
    assert giga.scale_warning(0.5, 256) is None and giga.scale_warning(0.5, 224) is None
    assert "0.5 µm/px" in get_encoder_entry("uni", "image").contract.scale_warning(1.0, 224)
    assert get_encoder_entry("resnet50", "image").contract.scale_warning(1.0, 224) is None  # no physical scale
    tiny = create_image_encoder("gigapath", **_tiny("gigapath")).contract  # builder keeps the resize ratio
    assert (tiny.input_size, tiny.resize_size, tiny.um_per_px) == (32, 37, 0.5)


def test_registry_and_weights_specs():
    names = {"uni", "uni2_h", "gigapath", "h_optimus_0", "h_optimus_1", "h0_mini", "virchow2", "resnet50"}
    assert names <= set(list_image_encoders())
    hf = {"uni": "MahmoodLab/UNI", "uni2_h": "MahmoodLab/UNI2-h", "gigapath": "prov-gigapath/prov-gigapath",
          "h_optimus_0": "bioptimus/H-optimus-0", "h_optimus_1": "bioptimus/H-optimus-1",
          "h0_mini": "bioptimus/H0-mini", "virchow2": "paige-ai/Virchow2", "resnet50": "timm/resnet50.tv_in1k"}
    for name in names:
        spec = get_encoder_entry(name, "image").weights
        assert spec.hf_id == hf[name] and spec.url.endswith(hf[name]) and spec.licence
        assert spec.gated == (name != "resnet50")
        published = {"conv1.weight": torch.zeros(1), "layer4.0.conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
        expected = {"trunk.conv1.weight"} if name == "resnet50" else {f"trunk.{k}" for k in published}
        assert set(spec.convert(published)) == expected
