"""The encoder registry (with a plugin installed in the test), input contracts, and safe weight loading."""

from __future__ import annotations

import pickle
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hescape.models import (
    GeneContract,
    HescapeModelError,
    ImageContract,
    WeightsError,
    create_gene_encoder,
    create_image_encoder,
    describe_encoders,
    list_gene_encoders,
    list_image_encoders,
)
from hescape.models.losses.naive import clip_loss_naive, siglip_loss_naive
from hescape.models.zoo import reload_plugins
from safetensors.torch import save_file
from torchvision.transforms import v2

# --------------------------------------------------------------------------------------------------- plugins


def test_plugin_encoder_installed_in_the_test(tmp_path, monkeypatch):
    """A user package adds an encoder through the entry-point group, without editing hescape-models."""
    pkg = tmp_path / "my_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from hescape.models import EncoderEntry, ImageContract, ImageEncoder

        class Mean(ImageEncoder):
            out_dim = 3

            def __init__(self, size=32):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(3))

            def forward_features(self, x):
                return x.mean(dim=(2, 3)) * self.scale

        def entries():
            return [EncoderEntry(name="colour_mean", modality="image", builder=Mean,
                                 contract=ImageContract(input_size=32), out_dim=3, pooling="mean")]
    '''))
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hescape.image_encoders]\ncolour_mean = my_plugin:entries\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reload_plugins()
        assert "colour_mean" in list_image_encoders()
        enc = create_image_encoder("colour_mean")
        img = torch.full((2, 3, 40, 40), 255, dtype=torch.uint8)
        want = (1.0 - torch.tensor(ImageContract(32).mean)) / torch.tensor(ImageContract(32).std)
        torch.testing.assert_close(enc(img), want.expand(2, 3))
    finally:
        monkeypatch.undo()
        sys.modules.pop("my_plugin", None)
        reload_plugins()


def test_describe_lists_every_encoder_with_its_contract():
    rows = describe_encoders()
    names = {(r["modality"], r["name"]) for r in rows}
    assert {("image", n) for n in list_image_encoders()} | {("gene", n) for n in list_gene_encoders()} == names
    for r in rows:
        assert r["contract"]["kind"] == r["modality"]


# ------------------------------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_image_contract_matches_torchvision(interp):
    c = ImageContract(input_size=48, resize_size=56, interpolation=interp, mean=(0.7, 0.6, 0.7), std=(0.2, 0.25, 0.18))
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 100, 100), dtype=torch.uint8, generator=gen)
    mode = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}[interp]
    tv = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(56, interpolation=mode, antialias=True),
                     v2.CenterCrop(48), v2.Normalize(c.mean, c.std)])
    want = tv(img)
    if interp == "bicubic":  # torchvision does not clip bicubic overshoot of float images; the contract does
        raw = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(56, interpolation=mode, antialias=True),
                          v2.CenterCrop(48)])(img).clamp(0, 1)
        want = v2.Normalize(c.mean, c.std)(raw)
    torch.testing.assert_close(c(img), want, atol=1e-5, rtol=0)


def test_image_contract_scale():
    c = ImageContract(input_size=224, um_per_px=0.5)
    assert c.effective_um_per_px(0.25, 448) == pytest.approx(0.5)  # a 112 µm patch: what the encoder expects
    assert c.scale_warning(0.25, 448) is None
    msg = c.scale_warning(1.0, 64)  # 64 µm patch blown up to 224 px: 0.29 µm/px
    assert msg and "0.286" in msg and "112 µm" in msg
    with pytest.raises(HescapeModelError, match="resize_size"):
        ImageContract(input_size=224, resize_size=200)


def test_gene_contract_against_numpy():
    x = np.array([[0, 1, 3, 6], [0, 0, 0, 0], [10, 0, 0, 0]], dtype=np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(GeneContract("log1p").apply_generic(t).numpy(), np.log1p(x), rtol=1e-6)
    norm = GeneContract("normalize_total_log1p", target_sum=100.0).apply_generic(t).numpy()
    totals = x.sum(1, keepdims=True)
    want = np.log1p(np.divide(x * 100.0, totals, out=np.zeros_like(x), where=totals > 0))
    np.testing.assert_allclose(norm, want, rtol=1e-6)
    with pytest.raises(HescapeModelError, match="preprocessing"):
        GeneContract("log2")


# --------------------------------------------------------------------------------------------------- weights


def _published(enc):  # our small ViT keeps timm's keys under "backbone."; its "published" file has them bare
    return {k.removeprefix("backbone."): v.clone() for k, v in enc.state_dict().items()}


@pytest.fixture
def nano_with_spec(monkeypatch):
    """vit_nano with a WeightsSpec whose convert adds the ``backbone.`` prefix (as a published timm file needs)."""
    import dataclasses

    from hescape.models import WeightsSpec, get_encoder_entry, register_encoder

    entry = get_encoder_entry("vit_nano", "image")
    spec = WeightsSpec(files=("model.safetensors", "pytorch_model.bin"), hf_id="example/vit-nano", licence="MIT",
                       convert=lambda sd: {f"backbone.{k}": v for k, v in sd.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # replacing a registered entry warns by design
        register_encoder(dataclasses.replace(entry, weights=spec))
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        register_encoder(entry)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_weights_round_trip(tmp_path, nano_with_spec, fmt):
    torch.manual_seed(1)
    src = create_image_encoder("vit_nano").eval()
    sd = _published(src)
    path = tmp_path / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    torch.save(sd, path) if fmt == "bin" else save_file(sd, str(path))
    torch.manual_seed(2)
    for source in (path, tmp_path):  # the file, or the directory holding it
        enc = create_image_encoder("vit_nano", weights=source).eval()
        img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        assert torch.equal(enc(img), src(img))
        assert enc.weights_tag.startswith(path.name + " sha256:")


def test_weights_faults_are_named(tmp_path, nano_with_spec):
    sd = _published(create_image_encoder("vit_nano"))
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "norm.weight"}, r"missing 1 key\(s\): backbone.norm.weight"),
        "extra": ({**sd, "head.weight": torch.zeros(3)}, r"unexpected 1 key\(s\): backbone.head.weight"),
        "shape": ({**sd, "cls_token": torch.zeros(1, 1, 7)}, r"mis-shaped: backbone.cls_token \(1, 1, 7\)"),
    }
    for name, (bad, pattern) in cases.items():
        p = tmp_path / f"{name}.bin"
        torch.save(bad, p)
        with pytest.raises(WeightsError, match=pattern):
            create_image_encoder("vit_nano", weights=p)
    with pytest.raises(WeightsError, match=r"expected one of \['model.safetensors', 'pytorch_model.bin'\]"):
        create_image_encoder("vit_nano", weights=tmp_path)
    with pytest.raises(WeightsError, match="does not exist.*huggingface.co/example/vit-nano"):
        create_image_encoder("vit_nano", weights=tmp_path / "nope.bin")
    with pytest.raises(HescapeModelError, match="loads no weights file"):
        create_image_encoder("vit_tiny", weights=tmp_path / "missing.bin")


class _Boom:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_weights_never_unpickle_code(tmp_path, nano_with_spec, capsys):
    p = tmp_path / "evil.bin"
    with open(p, "wb") as f:
        pickle.dump({"cls_token": _Boom()}, f)
    with pytest.raises(WeightsError, match="weights_only=True"):
        create_image_encoder("vit_nano", weights=p)
    assert "code ran" not in capsys.readouterr().out
    for name, payload in (("truncated.bin", None), ("random.safetensors", b"\x00" * 100), ("tensor.bin", "tensor")):
        q = tmp_path / name
        if payload is None:
            torch.save(_published(create_image_encoder("vit_nano")), q)
            q.write_bytes(q.read_bytes()[:500])
        elif payload == "tensor":
            torch.save(torch.zeros(3), q)
        else:
            q.write_bytes(payload)
        with pytest.raises(WeightsError, match=name):
            create_image_encoder("vit_nano", weights=q)


def test_gene_encoder_panel_and_ids():
    enc = create_gene_encoder("mlp", panel=["A", "B"], gene_ids=["ENSG1", "ENSG2"])
    assert enc.panel == ("A", "B") and enc.out_dim == 4
    with pytest.raises(HescapeModelError, match="2 genes"):
        create_gene_encoder("mlp", panel=["A", "B"], gene_ids=["ENSG1"])
    with pytest.raises(HescapeModelError, match="gene panel"):
        create_gene_encoder("mlp", panel=None)


# ---------------------------------------------------------------------------------------------- naive losses


def test_naive_losses_equal_open_clip():
    from open_clip.loss import ClipLoss, SigLipLoss

    gen = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(9, 16, generator=gen), dim=-1)
    g = F.normalize(torch.randn(9, 16, generator=gen), dim=-1)
    s, b = torch.tensor(14.0), torch.tensor(-3.0)
    torch.testing.assert_close(clip_loss_naive(v, g, s), ClipLoss()(v, g, s))
    torch.testing.assert_close(siglip_loss_naive(v, g, s, b), SigLipLoss()(v, g, s, b))


def test_training_checkpoint_with_numpy_values_loads_safely(tmp_path):
    """A Lightning-style file whose hyper-parameters hold numpy floats (lr from np.cos) loads with weights_only."""
    import numpy as np
    from hescape.models import read_state_dict

    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "lr_schedulers": [{"_last_lr": [np.float64(1e-4) * np.cos(0.3)]}],
                "epoch": np.int64(3)}, p)
    sd = read_state_dict(p)
    assert torch.equal(sd["state_dict"]["w"], torch.ones(2)) and float(sd["epoch"]) == 3.0
