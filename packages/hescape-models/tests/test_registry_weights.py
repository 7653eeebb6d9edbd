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
    with pytest.raises(HescapeModelError, match="loads no weights file"):  # a from-scratch gene MLP takes none
        create_gene_encoder("mlp", weights=tmp_path / "missing.bin", panel=["A", "B", "C"])


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


def test_weights_directory_ambiguity_and_prefix_hint(tmp_path, nano_with_spec):
    sd = _published(create_image_encoder("vit_nano"))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="several weights files.*pass the file you mean"):
        create_image_encoder("vit_nano", weights=tmp_path)
    wrapped = tmp_path / "wrapped.bin"
    torch.save({f"module.{k}": v for k, v in sd.items()}, wrapped)
    with pytest.raises(WeightsError, match="extra 'module.'.*strip it"):
        create_image_encoder("vit_nano", weights=wrapped)
    inner = tmp_path / "inner.bin"
    torch.save({"state_dict": sd}, inner)
    with pytest.raises(WeightsError, match="wrapped in 'state_dict'"):
        create_image_encoder("vit_nano", weights=inner)


def test_every_pretrained_encoder_accepts_either_standard_file(tmp_path):
    from hescape.models import get_encoder_entry
    from hescape.models.weights import STANDARD_FILES, resolve_weights

    spec = get_encoder_entry("uni", "image").weights
    for name in STANDARD_FILES:
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_bytes(b"x")
        assert resolve_weights(d, spec, "uni") == d / name


def test_inputs_prepared_for_another_encoder_are_refused():
    uni = ImageContract(input_size=32, um_per_px=0.5)
    x = torch.rand(2, 3, 40, 40)
    uni(x)  # float in [0, 1] is raw
    with pytest.raises(HescapeModelError, match=r"found float values in \[-"):
        uni(ImageContract(input_size=40)(x))  # already normalised by another contract
    with pytest.raises(HescapeModelError, match="uint8 0–255"):
        uni(x * 255)
    gene = create_gene_encoder("mlp", panel=["A", "B"])
    gene(torch.tensor([[0.0, 3.0]]))
    for bad in (torch.log1p(torch.tensor([[2.0, 3.0]])), torch.tensor([[-1.0, 2.0]]), torch.tensor([[float("nan"), 1]])):
        with pytest.raises(HescapeModelError, match="raw counts"):
            gene(bad)


def test_pretrained_encoders_default_to_frozen_and_refuse_a_random_trunk():
    from hescape.models import create_model, get_encoder_entry

    assert get_encoder_entry("uni", "image").default_finetune == "frozen"
    assert get_encoder_entry("drvi", "gene").default_finetune == "frozen"
    assert get_encoder_entry("mlp", "gene").default_finetune == "full"
    tiny = {"depth": 1, "embed_dim": 48, "num_heads": 4, "img_size": 32}
    for finetune in (None, "lora"):
        with pytest.raises(HescapeModelError, match="no weights were given"):
            create_model("vit_mlp_nano", panel=["A", "B"], image={"name": "uni", "options": tiny, "finetune": finetune})
    model = create_model("vit_mlp_nano", panel=["A", "B"], image={"name": "uni", "options": tiny, "finetune": "full"})
    assert model.image_encoder.finetune_mode == "full"  # training the architecture from scratch is allowed


def test_checkpoint_keeps_the_vocabulary_plan_and_technology_means(tmp_path):
    """A Nicheformer checkpoint restores the mapping and means it trained with, even if the files changed since."""
    from hescape.models import HescapeCLIP, cfg_from_dict, cfg_to_dict, create_model

    vocab = [f"ENSG{i:011d}" for i in range(30)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    np.save(tmp_path / "mean.npy", np.linspace(0.5, 3.0, 30))
    opts = {"vocabulary": str(tmp_path / "vocab.txt"), "technology_mean": str(tmp_path / "mean.npy"), "dim_model": 16,
            "nheads": 2, "dim_feedforward": 16, "nlayers": 1, "context_length": 16}
    panel, ids = [f"G{i}" for i in range(8)], [vocab[3 * i] for i in range(8)]
    torch.manual_seed(0)
    model = create_model("vit_mlp_nano", panel=panel, gene_ids=ids,
                         gene={"name": "nicheformer", "options": opts, "finetune": "full"}).eval()
    counts = torch.poisson(torch.full((4, 8), 3.0), generator=torch.Generator().manual_seed(1))
    want = model.encode_gene(counts)
    cfg, state = cfg_to_dict(model.recorded_cfg()), model.state_dict()
    np.save(tmp_path / "mean.npy", np.linspace(5.0, 0.1, 30))  # the files change after training
    (tmp_path / "vocab.txt").write_text("\n".join(reversed(vocab)) + "\n")
    again = HescapeCLIP(cfg_from_dict(cfg), load_weights=False)
    assert not torch.equal(again.gene_encoder.slot_mean, model.gene_encoder.slot_mean)  # rebuilt from the new files
    again.load_state_dict(state)
    assert torch.equal(again.eval().encode_gene(counts), want)


def test_one_column_vocabulary_with_a_header(tmp_path):
    vocab = [f"ENSG{i:011d}" for i in range(12)]
    (tmp_path / "v.csv").write_text("gene_ids\n" + "\n".join(vocab) + "\n")
    enc = create_gene_encoder("nicheformer", panel=["A", "B"], gene_ids=[vocab[0], vocab[5]],
                              vocabulary=str(tmp_path / "v.csv"), dim_model=16, nheads=2, dim_feedforward=16,
                              nlayers=1, context_length=8)
    assert enc.vocab_ids.tolist() == [0, 5]
