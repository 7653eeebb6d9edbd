"""``hescape-eval embed``: a trained model (hescape-train's model.safetensors layout) embeds a dataset's split."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
models = pytest.importorskip("hescape.models", reason="hescape-eval embed needs hescape-models")
data = pytest.importorskip("hescape.data", reason="hescape-eval embed needs hescape-data")

from hescape.eval.cli import main  # noqa: E402
from hescape.eval.io import load_embeddings  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from hescape.data.geometry import get_geometry

    cfg = data.SyntheticConfig(sample_size_um=300.0, n_donors=3, pixel_size_um=2.0,
                               geometry=get_geometry("hescape").with_(um_per_px=2.0))
    return data.build_synthetic_dataset(tmp_path_factory.mktemp("embed") / "ds", cfg, progress=False)


def _write_run(run, model, genes):
    """The files hescape-train writes: checkpoints/index.json naming step dirs holding model.safetensors."""
    from safetensors.torch import save_file

    ck = run / "checkpoints" / "step-00000010"
    ck.mkdir(parents=True)
    meta = {"format": "hescape-train-checkpoint/1", "model_cfg": json.dumps(models.cfg_to_dict(model.recorded_cfg())),
            "genes": json.dumps(list(genes))}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"), metadata=meta)
    (run / "checkpoints" / "index.json").write_text(json.dumps({"best": "step-00000010", "last": "step-00000010"}))


def test_embed_then_retrieval(dataset, tmp_path, capsys):
    genes = data.read_manifest(dataset)["genes"]
    torch.manual_seed(0)
    model = models.create_model("vit_mlp_nano", panel=genes).eval()
    _write_run(tmp_path / "run", model, genes)
    out = tmp_path / "e.npz"
    assert main(["embed", str(tmp_path / "run"), str(dataset), "--out", str(out)]) == 0
    emb = load_embeddings(out)
    ds = data.PairedSpotDataset(dataset, "test")
    assert emb.image.shape == (len(ds), 128) and list(emb.sample) == ds.samples
    # the same model applied by hand to the same rows (its contracts prepare raw patches and counts)
    with torch.no_grad():
        items = [ds[i] for i in range(len(ds))]
        img = model.encode_image(torch.stack([i["image"] for i in items])).numpy()
        gex = model.encode_gene(torch.stack([i["gexp"] for i in items])).numpy()
    np.testing.assert_allclose(emb.image, img, atol=1e-5)
    np.testing.assert_allclose(emb.gene, gex, atol=1e-5)
    capsys.readouterr()
    assert main(["retrieval", str(out), "--ks", "1,5"]) == 0
    assert f"{len(ds)}" in capsys.readouterr().out


def test_embed_refusals(dataset, tmp_path, capsys):
    model = models.create_model("vit_mlp_nano", panel=["A", "B", "C"]).eval()
    _write_run(tmp_path / "run", model, ["A", "B", "C"])
    cases = [
        ([str(tmp_path / "run"), str(dataset), "--out", str(tmp_path / "x.npz")], "panel"),
        ([str(tmp_path / "nope"), str(dataset), "--out", str(tmp_path / "x.npz")], "expected a hescape-train run"),
        ([str(tmp_path / "run"), str(dataset), "--out", str(tmp_path / "x.txt")], "ending in .npz"),
    ]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    cases.append(([str(bad), str(dataset), "--out", str(tmp_path / "x.npz")], "cannot be read"))
    for args, pattern in cases:
        assert main(["embed", *args]) == 2
        err = capsys.readouterr().err
        assert pattern in err and err.startswith("hescape-eval: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "x.npz").exists()
