"""Every registered image encoder trains against every registered gene encoder (tiny configurations of the same
architectures): one CLIP step through HescapeCLIP, LoRA where the encoder declares targets, and the checkpoint
(config + state dict) restores the model exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hescape.models import (
    HescapeCLIP,
    cfg_from_dict,
    cfg_to_dict,
    create_model,
    list_gene_encoders,
    list_image_encoders,
)

VOCAB = [f"ENSG{i:011d}" for i in range(40)]
PANEL = [f"G{i}" for i in range(14)]
IDS = [VOCAB[3 * i] for i in range(12)] + ["ENSG99999999998", "ENSG99999999999"]

_VIT = {"depth": 1, "embed_dim": 48, "num_heads": 4}
TINY_IMAGE = {
    "vit_nano": {"depth": 1}, "vit_tiny": {"depth": 1, "image_size": 32}, "vit_small": {"depth": 1, "image_size": 32},
    "cnn_tiny": {"image_size": 32},
    "uni": {**_VIT, "img_size": 32}, "gigapath": {**_VIT, "img_size": 32}, "uni2_h": {**_VIT, "img_size": 28},
    "h_optimus_0": {**_VIT, "img_size": 28}, "h_optimus_1": {**_VIT, "img_size": 28},
    "h0_mini": {**_VIT, "img_size": 28, "pooling": "cls+mean"}, "virchow2": {**_VIT, "img_size": 28},
    "resnet50": {"layers": (1, 1, 1)},
    "ctranspath": {"image_size": 64, "embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4),
                   "window_size": 4},
    "conch": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2, "embed_dim": 16,
              "pooler_heads": 2},
}
TINY_GENE = {
    "mlp": {}, "mlp_small": {"width": 16, "layers": 1},
    "nicheformer": {"vocabulary": VOCAB, "technology_mean": np.linspace(0.5, 3.0, 40), "dim_model": 32, "nheads": 4,
                    "dim_feedforward": 48, "nlayers": 1, "context_length": 16},
    "drvi": {"random_init": True, "n_latent": 8, "encoder_dims": (16,)},
    **{n: {"vocabulary": VOCAB, "dim": 32, "heads": 4, "depth": 1, "ff_mult": 2, "bin_num": 10}
       for n in ("scfoundation", "scfoundation_gene", "scfoundation_rde")},
}


def test_every_encoder_has_a_tiny_configuration_here():
    assert set(list_image_encoders()) <= set(TINY_IMAGE), "add the new image encoder to TINY_IMAGE"
    assert set(list_gene_encoders()) <= set(TINY_GENE), "add the new gene encoder to TINY_GENE"


def _train_and_reload(image: str, gene: str):
    torch.manual_seed(0)
    finetune = {"image": "full", "gene": "full"}
    model = create_model("vit_mlp_nano", panel=PANEL, gene_ids=IDS, embed_dim=8,
                         image={"name": image, "options": TINY_IMAGE[image], "finetune": "full"},
                         gene={"name": gene, "options": TINY_GENE[gene], "finetune": "full"})
    for key, enc in (("image", model.image_encoder), ("gene", model.gene_encoder)):
        if enc.lora_targets:  # rebuild that tower with LoRA: only the adapters of the trunk train
            finetune[key] = "lora"
    if "lora" in finetune.values():
        torch.manual_seed(0)
        model = create_model("vit_mlp_nano", panel=PANEL, gene_ids=IDS, embed_dim=8,
                             image={"name": image, "options": TINY_IMAGE[image], "finetune": finetune["image"],
                                    "allow_random_init": True},
                             gene={"name": gene, "options": TINY_GENE[gene], "finetune": finetune["gene"],
                                   "allow_random_init": True})
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=gen)
    counts = torch.poisson(torch.full((6, len(PANEL)), 2.0), generator=gen)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model.loss(model(images, counts))["contrastive_loss"]
    loss.backward()
    assert torch.isfinite(loss)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("image_proj.") for n in trained) and any(n.startswith("gene_proj.") for n in trained)
    for key in ("image", "gene"):
        enc = getattr(model, f"{key}_encoder")
        if finetune[key] == "lora":
            assert all("lora_" in n for n in trained if n.startswith(f"{key}_encoder."))
            assert any("lora_" in n for n in trained if n.startswith(f"{key}_encoder."))
        elif not getattr(enc, "finetune_mode", "full") == "frozen" and any(p.requires_grad for p in enc.parameters()):
            assert any(n.startswith(f"{key}_encoder.") for n in trained), f"no gradient reached the {key} tower"
    opt.step()
    model.clamp_logit_scale()
    model.eval()
    again = HescapeCLIP(cfg_from_dict(cfg_to_dict(model.recorded_cfg())), load_weights=False)
    again.load_state_dict(model.state_dict())
    again.eval()
    assert torch.equal(again.encode_image(images), model.encode_image(images))
    assert torch.equal(again.encode_gene(counts), model.encode_gene(counts))


def _needs(gene: str):
    if gene == "drvi" and importlib.util.find_spec("drvi") is None:
        pytest.skip("drvi-py is not installed (pip install 'hescape-models[drvi]')")


@pytest.mark.parametrize("image", sorted(TINY_IMAGE))
def test_each_image_encoder_against_the_mlp(image):
    _train_and_reload(image, "mlp")


@pytest.mark.parametrize("gene", sorted(TINY_GENE))
def test_each_gene_encoder_against_the_demo_vit(gene):
    _needs(gene)
    _train_and_reload("vit_nano", gene)


def test_pathology_vit_against_a_token_gene_model():
    _train_and_reload("conch", "nicheformer")
