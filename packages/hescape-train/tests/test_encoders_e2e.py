"""A pretrained-encoder run end to end through the CLI: UNI from local weights in its published layout (LoRA)
against Nicheformer with its vocabulary and technology mean, both in tiny configurations of the real architectures."""

from __future__ import annotations

import json

import numpy as np
import torch
from hescape.data import read_manifest
from hescape.models import create_image_encoder
from hescape.train import main
from hescape.train.checkpoint import read_checkpoint

UNI_TINY = {"depth": 2, "embed_dim": 48, "num_heads": 4, "img_size": 32}


def test_uni_lora_against_nicheformer(tiny_dataset, tmp_path, capsys):
    # UNI's published file: timm keys with no prefix, in pytorch_model.bin (HF MahmoodLab/UNI).
    torch.manual_seed(3)
    src = create_image_encoder("uni", **UNI_TINY)
    weights = tmp_path / "uni"
    weights.mkdir()
    torch.save({k.removeprefix("trunk."): v for k, v in src.state_dict().items()}, weights / "pytorch_model.bin")
    # Nicheformer's vocabulary (Ensembl ids) and Xenium technology mean, as its release ships them.
    ids = read_manifest(tiny_dataset)["gene_ids"]
    vocab = [f"ENSG{9 * 10**10 + i:011d}" for i in range(50)] + list(ids)  # the panel sits after 50 other genes
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    mean = np.linspace(0.5, 4.0, len(vocab))
    mean[::7] = np.nan  # genes the technology never measured (NaN -> 0 -> 1, as Nicheformer does)
    np.save(tmp_path / "xenium_mean.npy", mean)
    gene_options = {"vocabulary": str(tmp_path / "vocab.txt"), "technology_mean": str(tmp_path / "xenium_mean.npy"),
                    "dim_model": 32, "nheads": 4, "dim_feedforward": 48, "nlayers": 1, "context_length": 64}
    code = main([f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=r", "epochs=1", "batch_size=16",
                 "progress=false", "recall_ks=1,5", "probe=false",
                 "model.image=uni", f"model.image_weights={weights}", f"model.image_options={json.dumps(UNI_TINY)}",
                 "model.image_finetune=lora", "model.gene=nicheformer", "model.gene_finetune=full", f"model.gene_options={json.dumps(gene_options)}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    # 112 µm patches squeezed into 32 px reach UNI at 3.5 µm/px: the run warns that UNI expects 0.5 µm/px.
    assert "trained at 0.5 µm/px" in out.out + out.err
    ckpt = read_checkpoint(tmp_path / "r")  # the best checkpoint: model.safetensors + state.pt
    towers = ckpt["encoders"]["towers"]
    assert towers["image"]["weights"].startswith("pytorch_model.bin sha256:")
    assert towers["image"]["contract"]["um_per_px"] == 0.5 and towers["image"]["finetune"] == "lora"
    assert towers["gene"]["contract"]["preprocessing"] == "nicheformer_tokens"
    # LoRA left UNI's weights as loaded: every non-adapter trunk tensor equals the published file's
    sd = ckpt["state_dict"]
    for k, v in src.state_dict().items():
        ours = sd.get(f"image_encoder.{k}", sd.get(f"image_encoder.{k.replace('.weight', '.base_layer.weight')}"))
        if ours is None:
            ours = sd[f"image_encoder.{k.replace('.bias', '.base_layer.bias')}"]
        assert torch.equal(ours, v), k


def test_drvi_pretrained_on_held_out_samples_is_refused(tiny_dataset, tmp_path, capsys):
    """A frozen DRVI pretrained on the training split trains; one pretrained on the test split is refused."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("drvi") is None:
        pytest.skip("drvi-py is not installed (pip install 'hescape-models[drvi]')")
    from hescape.models.gene.drvi import pretrain_drvi

    tiny = {"n_latent": 8, "layers": (16, 16), "max_epochs": 2, "progress": False, "seed": 0}
    args = [f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "epochs=1", "batch_size=16", "progress=false",
            "recall_ks=1,5", "probe=false", "model.gene=drvi"]
    for split, code_wanted in (("test", 2), ("train", 0)):
        model_dir = pretrain_drvi(tiny_dataset, tmp_path / f"drvi-{split}", split=split, **tiny)
        code = main([*args, f"run_name={split}", f'model.gene_options={json.dumps({"model_dir": str(model_dir)})}'])
        err = capsys.readouterr().err
        assert code == code_wanted, err
        if code_wanted == 2:
            assert "holds out for validation/test" in err and not (tmp_path / split).exists()
    ckpt_towers = json.loads((tmp_path / "train" / "config.json").read_text())
    assert ckpt_towers["model"]["gene"] == "drvi"
