"""Every registered model builds, runs forward/backward at a tiny batch, and gives unit-norm embeddings."""

from __future__ import annotations

import pytest
import torch
from hescape.models import HescapeCLIP, HescapeModelError, cfg_from_dict, cfg_to_dict, create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_backward(name, loss):
    torch.manual_seed(0)
    model = create_model(name, n_genes=11, loss=loss)
    size = model.cfg.image.image_size
    images = torch.randint(0, 256, (3, 3, size + 5, size + 5), dtype=torch.uint8)  # resized inside
    out = model(images, torch.rand(3, 11))
    for key in ("image_features", "gene_features"):
        assert out[key].shape == (3, model.cfg.embed_dim)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    terms = model.loss(out)
    loss_value = sum(v for k, v in terms.items() if k.endswith("_loss"))
    loss_value.backward()
    assert torch.isfinite(loss_value)
    assert model.logit_scale.grad is not None and model.gene_encoder.net[0].weight.grad.abs().sum() > 0
    assert (model.logit_bias is not None) == (loss == "siglip")


def test_gene_mlp_is_twice_the_panel():
    model = create_model("vit_mlp_nano", n_genes=37)
    assert model.gene_encoder.net[0].out_features == 74


def test_config_round_trip():
    model = create_model("vit_mlp_nano", n_genes=5, embed_dim=16, loss="siglip")
    again = HescapeCLIP(cfg_from_dict(cfg_to_dict(model.cfg)))
    again.load_state_dict(model.state_dict())
    assert again.cfg == model.cfg


def test_errors_name_the_fix():
    with pytest.raises(HescapeModelError, match="vit_mlp_nano"):
        create_model("vit_mlp_nan", n_genes=5)
    with pytest.raises(HescapeModelError, match="unknown model option"):
        create_model("vit_mlp_nano", n_genes=5, embedding=3)
    with pytest.raises(HescapeModelError, match="n_genes > 0"):
        create_model("vit_mlp_nano", n_genes=0)
    model = create_model("vit_mlp_nano", n_genes=5)
    with pytest.raises(HescapeModelError, match=r"\(B, 5\)"):
        model.encode_gene(torch.rand(2, 6))
    with pytest.raises(HescapeModelError, match=r"\(B, 3, H, W\)"):
        model.encode_image(torch.rand(2, 64, 64))
