"""Nicheformer and scFoundation encoders: parameter counts, published checkpoint layouts, the original embeddings.

Truth: the facts sheet's parameter counts (``../shared/reference/encoders.md``), stock ``torch.nn`` layers loaded
with the same weights, and references written from the authors' code (theislab/nicheformer
``models/_nicheformer.py`` ``get_embeddings``; biomap-research/scFoundation ``model/get_embedding.py``,
``pretrainmodels/mae_autobin.py``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hescape.models.errors import HescapeModelError
from hescape.models.finetune import apply_finetune
from hescape.models.gene._transformer import EncoderLayer
from hescape.models.weights import WeightsError
from hescape.models.zoo import create_gene_encoder, get_encoder_entry
from torch import nn


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# A tiny vocabulary and panel: 40 Ensembl ids; the panel has 12 genes in it (by id or symbol) and 2 outside.
VOCAB = [f"ENSG{i:011d}" for i in range(40)]
PANEL = [f"G{i}" for i in range(14)]
IDS = [VOCAB[3 * i] for i in range(12)] + ["ENSG99999999998", "ENSG99999999999"]
NF_TINY = {"vocabulary": VOCAB, "technology_mean": np.linspace(0.5, 3.0, 40), "dim_model": 32, "nheads": 4,
           "dim_feedforward": 48, "nlayers": 2, "context_length": 16}
SCF_TINY = {"vocabulary": VOCAB, "dim": 32, "heads": 4, "depth": 2, "ff_mult": 2, "bin_num": 10, "dropout": 0.0}


def _counts(b=6, seed=0, zero_row=1):
    gen = torch.Generator().manual_seed(seed)
    c = torch.poisson(torch.full((b, len(PANEL)), 1.2), generator=gen) * (torch.rand(b, len(PANEL), generator=gen) < .6)
    c[:, 0] += 2  # every spot but the empty one has > 1 count in the vocabulary (S > 0, as the script needs)
    if zero_row is not None:
        c[zero_row] = 0
    return c


def _nf(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return create_gene_encoder("nicheformer", panel=PANEL, gene_ids=IDS, **{**NF_TINY, **kw}).eval()


def _scf(name="scfoundation", **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return create_gene_encoder(name, panel=PANEL, gene_ids=IDS, **{**SCF_TINY, **kw}).eval()


# ---------------------------------------------------------------- parameter counts (full size, meta device)


def test_nicheformer_param_count_is_the_facts_sheets_without_the_template_layer():
    vocab = [f"ENSG{i:011d}" for i in range(20310)]
    with torch.device("meta"):
        enc = create_gene_encoder("nicheformer", panel=["A", "B"], gene_ids=vocab[:2], vocabulary=vocab,
                                  technology_mean=np.ones(20310))
        template = nn.TransformerEncoderLayer(512, 16, 1024, dropout=0.0, batch_first=True, layer_norm_eps=1e-12)
        heads = [nn.Linear(512, 20340), nn.Linear(512, 512), nn.Linear(512, 164)]  # classifier, pooler, cls
    # facts sheet: 38,520,832 without heads (the template layer included), 49,302,040 with heads and template
    assert _n(enc) == 38_520_832 - _n(template) == get_encoder_entry("nicheformer", "gene").params == 36_418_048
    assert _n(enc) + _n(template) + sum(_n(h) for h in heads) == 49_302_040
    assert enc.embeddings.weight.shape == (20345, 512) and enc.positional_embedding.weight.shape == (1500, 512)
    assert enc.out_dim == 512 and len(enc.encoder["layers"]) == 12


def test_scfoundation_param_count_is_the_facts_sheets():
    vocab = [f"S{i}" for i in range(19262)] + ["A", "B"]
    with torch.device("meta"):
        enc = create_gene_encoder("scfoundation", panel=["A", "B"], vocabulary=vocab)
    assert _n(enc) == 99_941_692 == get_encoder_entry("scfoundation", "gene").params
    assert (_n(enc.token_emb), _n(enc.pos_emb), _n(enc.encoder)) == (88_636, 14_797_056, 85_056_000)
    assert enc.out_dim == 3072
    with torch.device("meta"):
        assert create_gene_encoder("scfoundation", panel=["A"], vocabulary=vocab, pooling="max").out_dim == 768


def test_published_vocabulary_without_technology_mean_warns():
    vocab = [f"ENSG{i:011d}" for i in range(20310)]
    with torch.device("meta"), pytest.warns(UserWarning, match="no technology_mean"):
        create_gene_encoder("nicheformer", panel=["A"], gene_ids=vocab[:1], vocabulary=vocab)


# ---------------------------------------------------------------- the layer: stock function, LoRA-visible


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_equals_the_stock_layer(norm_first):
    kw = {"d_model": 32, "nhead": 4, "dim_feedforward": 48, "dropout": 0.0, "norm_first": norm_first,
          "layer_norm_eps": 1e-12}
    ours, stock = EncoderLayer(**kw), nn.TransformerEncoderLayer(batch_first=True, **kw)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 5:], pad[2, 2:] = True, True
    for mode in ("eval", "train"):  # eval: torch's fused fast path; train: its module path
        ours.train(mode == "train"), stock.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(ours(x, src_key_padding_mask=pad), stock(x, src_key_padding_mask=pad),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["nicheformer", "scfoundation"])
def test_lora_adapters_change_the_output_in_eval_mode(name):
    enc = _nf() if name == "nicheformer" else _scf()
    counts = _counts()
    with torch.no_grad():
        before = enc(counts)
    apply_finetune(enc, "lora", rank=2, alpha=4.0, dropout=0.0)
    enc.eval()
    for target in ("self_attn.out_proj", "linear1", "linear2"):  # each target alone moves the output
        lora_b = [p for n, p in enc.named_parameters() if "lora_B" in n and f"{target}.lora_B" in n]
        assert lora_b, target
        with torch.no_grad():
            for p in lora_b:
                p.normal_()
            moved = (enc(counts) - before).abs().max().item()
            for p in lora_b:
                p.zero_()
        assert moved > 1e-3, f"LoRA on {target} has no effect"
    assert all(p.requires_grad == ("lora_" in n) for n, p in enc.named_parameters())


# ---------------------------------------------------------------- Nicheformer


def _nicheformer_reference(enc, tokens):
    """get_embeddings(batch, layer=-1, with_context=False) of the original, with stock layers: token + learnable
    position embedding, the padding as key padding mask, context dropped, plain mean over positions."""
    layers = []
    for ours in enc.encoder["layers"]:
        stock = nn.TransformerEncoderLayer(enc.out_dim, ours.self_attn.num_heads, ours.linear1.out_features,
                                           dropout=0.0, batch_first=True, layer_norm_eps=1e-12).eval()
        stock.load_state_dict(ours.state_dict())
        layers.append(stock)
    x = enc.embeddings(tokens) + enc.positional_embedding(torch.arange(tokens.shape[1]))
    for layer in layers:
        x = layer(x, src_key_padding_mask=tokens == 1)
    return x[:, 3:, :].mean(dim=1)


def test_nicheformer_embedding_is_the_originals_plain_mean():
    enc, counts = _nf(), _counts()
    tokens = enc.preprocess(counts)
    assert tokens.shape == (6, 16) and (tokens[:, :3] == torch.tensor([5, 9, 4])).all()
    assert (tokens[1, 3:] == 1).all()  # the empty spot: context and padding
    with torch.no_grad():
        got = enc(counts)
        torch.testing.assert_close(got, _nicheformer_reference(enc, tokens), rtol=1e-5, atol=1e-5)
        # the padding counts: a masked mean over the gene tokens differs wherever a spot has padding
        masked = _nf(pooling="masked_mean")(counts)
    pad_rows = (tokens[:, 3:] == 1).any(dim=1)
    assert pad_rows.all() and not torch.allclose(got[pad_rows], masked[pad_rows], atol=1e-3)


def test_nicheformer_masked_mean_by_hand_and_batch_invariant():
    enc, counts = _nf(pooling="masked_mean"), _counts()
    tokens = enc.preprocess(counts)
    full = _nf()  # same seed: same weights, plain mean
    with torch.no_grad():
        got = enc(counts)
        x = full.embeddings(tokens) + full.positional_embedding.weight
        for layer in full.encoder["layers"]:
            x = layer(x, src_key_padding_mask=tokens == 1)
        keep = (tokens[:, 3:] != 1).unsqueeze(-1).float()
        want = (x[:, 3:] * keep).sum(1) / keep.sum(1).clamp_min(1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        one_by_one = torch.cat([enc(counts[i:i + 1]) for i in range(len(counts))])
    torch.testing.assert_close(got, one_by_one, rtol=1e-5, atol=1e-5)
    assert got[1].abs().max() == 0  # the empty spot has no gene token


def test_nicheformer_contract_records_its_settings(tmp_path):
    np.save(tmp_path / "cosmx_mean_script.npy", np.linspace(0.5, 3.0, 40))
    enc = _nf(assay="CosMx", technology_mean=str(tmp_path / "cosmx_mean_script.npy"))
    assert enc.contract.preprocessing == "nicheformer_tokens" and enc.contract.vocabulary == "nicheformer-40"
    o = enc.contract.options
    assert o["context"] == ["human", "cosmx", "spatial"] and o["technology_mean"] == "cosmx_mean_script.npy"
    assert o["mapped_genes"] == "12/14" and o["context_length"] == 16
    assert enc.preprocess(_counts())[0, :3].tolist() == [5, 8, 4]


def _lightning(enc: nn.Module, gen: torch.Generator) -> dict:
    """A checkpoint shaped as Lightning writes Nicheformer: the module's state dict under "state_dict" with the
    template layer and heads, and hyper-parameters, optimiser, scheduler, callback and loop states of plain values."""
    sd = dict(enc.state_dict())
    d, n_tokens = enc.out_dim, enc.embeddings.num_embeddings - 5
    for k, v in enc.encoder["layers"][0].state_dict().items():
        sd[f"encoder_layer.{k}"] = torch.randn(v.shape, generator=gen)
    sd |= {"classifier_head.weight": torch.randn(n_tokens, d, generator=gen), "classifier_head.bias": torch.zeros(
        n_tokens), "pooler_head.weight": torch.randn(d, d, generator=gen), "pooler_head.bias": torch.zeros(d),
        "cls_head.weight": torch.randn(164, d, generator=gen), "cls_head.bias": torch.zeros(164)}
    return {
        "epoch": 11, "global_step": 120_000, "pytorch-lightning_version": "2.1.3", "state_dict": sd,
        "hparams_name": "kwargs",
        "hyper_parameters": {"dim_model": d, "nheads": 4, "dim_feedforward": 48, "nlayers": 2, "dropout": 0.0,
                             "batch_first": True, "masking_p": 0.15, "n_tokens": n_tokens, "context_length": 16,
                             "lr": 1e-3, "warmup": 1, "batch_size": 9, "max_epochs": 3, "cls_classes": 164,
                             "supervised_task": None, "learnable_pe": True, "specie": True, "assay": True,
                             "modality": True, "contrastive": False},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.1,
                                                "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": 7, "_step_count": 8, "warmup": 1, "max_num_epochs": 3,
                           "_last_lr": [1e-4]}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {"best_model_score": torch.tensor(2.5),
                                                                                  "best_model_path": "/x/last.ckpt"}},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 11, "completed": 11}}}},
    }


def test_nicheformer_lightning_checkpoint_round_trip(tmp_path):
    src, counts = _nf(seed=1), _counts()
    torch.save(_lightning(src, torch.Generator().manual_seed(2)), tmp_path / "nicheformer.ckpt")
    for weights in (tmp_path / "nicheformer.ckpt", tmp_path):  # the file, or a directory holding it
        dst = create_gene_encoder("nicheformer", weights=str(weights), panel=PANEL, gene_ids=IDS, **NF_TINY).eval()
        assert dst.weights_tag.startswith("nicheformer.ckpt sha256:")
        with torch.no_grad():
            assert torch.equal(dst(counts), src(counts))


@pytest.mark.parametrize("damage,key", [
    ("missing", "positional_embedding.weight"),
    ("extra", "encoder.layers.0.linear3.weight"),
    ("shape", "embeddings.weight"),
])
def test_nicheformer_damaged_checkpoint_names_the_key(tmp_path, damage, key):
    ckpt = _lightning(_nf(), torch.Generator().manual_seed(2))
    sd = ckpt["state_dict"]
    if damage == "missing":
        del sd[key]
    elif damage == "extra":
        sd[key] = torch.zeros(2)
    else:
        sd[key] = sd[key][:-1]
    torch.save(ckpt, tmp_path / "nicheformer.ckpt")
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        create_gene_encoder("nicheformer", weights=str(tmp_path / "nicheformer.ckpt"), panel=PANEL, gene_ids=IDS,
                            **NF_TINY)


def test_nicheformer_forward_backward_tiny():
    enc = _nf().train()
    out = enc(_counts())
    assert out.shape == (6, 32) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert enc.embeddings.weight.grad.abs().sum() > 0 and enc.positional_embedding.weight.grad.abs().sum() > 0
    for layer in enc.encoder["layers"]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert enc.embeddings.weight.grad[1].abs().sum() == 0  # padding_idx=1 gets no gradient


def test_coverage_refused_at_zero_and_warned_under_half():
    with pytest.raises(HescapeModelError, match="Expected at least one panel gene"):
        create_gene_encoder("nicheformer", panel=PANEL, **NF_TINY)  # symbols against an Ensembl-id vocabulary
    ids = IDS[:5] + [f"ENSG9999999{i:04d}" for i in range(9)]
    with pytest.warns(UserWarning, match=r"5/14 panel genes mapped \(35.7 %\)"):
        create_gene_encoder("scfoundation", panel=PANEL, gene_ids=ids, **SCF_TINY)
    with pytest.raises(HescapeModelError, match="needs its vocabulary"):
        create_gene_encoder("scfoundation", panel=PANEL)


# ---------------------------------------------------------------- scFoundation


class _OriginalAutoBin(nn.Module):
    """mae_autobin.AutoDiscretizationEmbedding2.forward, as published: padding found by the value 103."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours

    def forward(self, x):  # x: (B, N, 1)
        o = self.ours
        h = F.leaky_relu(o.mlp(x), 0.1)
        emb = torch.softmax(o.bin_alpha * h + o.mlp2(h), dim=-1) @ o.emb(torch.arange(o.emb.num_embeddings))
        pad = (x[..., 0] == 103).nonzero()
        emb[pad[:, 0], pad[:, 1], :] = o.emb_pad(torch.tensor(0))
        return emb


def _scfoundation_reference(enc, row: torch.Tensor, pooling: str) -> torch.Tensor:
    """get_embedding.py for one cell (--output_type cell): dense 19,264 + 2 input, values > 0 gathered, token and
    position embeddings, stock layers, final norm, then the pooling."""
    n_vocab = enc.n_vocab
    dense = torch.zeros(n_vocab, dtype=torch.float64)
    dense.index_add_(0, enc.vocab_ids[enc.vocab_slots], row.double()[enc.vocab_columns])
    total = dense.sum()
    x = torch.cat([torch.log1p(dense / total * 1e4), torch.tensor([4.0, torch.log10(total)], dtype=torch.float64)])
    keep = torch.nonzero(x > 0)[:, 0]
    values, positions = x[keep].float()[None], keep[None]
    layers = []
    for ours in enc.encoder["transformer_encoder"]:
        stock = nn.TransformerEncoderLayer(ours.linear1.in_features, ours.self_attn.num_heads,
                                           ours.linear1.out_features, batch_first=True).eval()
        stock.load_state_dict(ours.state_dict())
        layers.append(stock)
    h = _OriginalAutoBin(enc.token_emb)(values.unsqueeze(2)) + enc.pos_emb(positions)
    for layer in layers:
        h = layer(h, src_key_padding_mask=torch.zeros_like(values, dtype=torch.bool))
    h = enc.encoder["norm"](h)
    if pooling == "max":
        return h.max(dim=1).values[0]
    return torch.cat([h[:, -1], h[:, -2], h[:, :-2].max(dim=1).values, h[:, :-2].mean(dim=1)], dim=1)[0]


@pytest.mark.parametrize("pooling", ["all", "max"])
def test_scfoundation_padded_batch_equals_one_cell_at_a_time(pooling):
    enc = _scf(pooling=pooling)
    counts = _counts(b=7, seed=3, zero_row=None)
    counts[2, 1:] = 0  # a spot with one gene: much shorter than the longest sequence
    with torch.no_grad():
        batch = enc(counts)
        assert enc.preprocess(counts)["padding"].any()
        for i in range(len(counts)):
            torch.testing.assert_close(batch[i], enc(counts[i:i + 1])[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch[i], _scfoundation_reference(enc, counts[i], pooling), rtol=1e-5,
                                       atol=1e-5)
    assert batch.shape == (7, 128 if pooling == "all" else 32)


def test_scfoundation_empty_spot_is_finite():
    enc = _scf()
    counts = _counts()
    with torch.no_grad():
        out = enc(counts)
    assert torch.isfinite(out).all() and out[1, 64:].abs().max() == 0  # no gene: max and mean parts are 0


def _sections(encoders: dict[str, nn.Module], gen: torch.Generator) -> dict:
    """models.ckpt as published: {section: {"config", "state_dict" with keys "model.…" incl. the decoder}}."""
    out = {}
    for section, enc in encoders.items():
        sd = {f"model.{k}": v for k, v in enc.state_dict().items()}
        sd |= {"model.decoder_embed.weight": torch.randn(16, 32, generator=gen), "model.decoder_embed.bias":
               torch.zeros(16), "model.norm.weight": torch.ones(16), "model.norm.bias": torch.zeros(16),
               "model.to_final.weight": torch.randn(1, 16, generator=gen), "model.to_final.bias": torch.zeros(1),
               "model.decoder.net.layers.0.0.fn.fn.to_q.weight": torch.randn(16, 16, generator=gen),
               "model.decoder.norm.weight": torch.ones(16)}
        config = {"model": "mae_autobin", "model_config": {"mae_autobin": {
            "encoder": {"hidden_dim": 32, "depth": 2, "heads": 4, "dim_head": 8, "module_type": "transformer"},
            "decoder": {"hidden_dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "module_type": "performer"},
            "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": 10, "bin_alpha": 1.0}},
            "dataset_config": {"rnaseq": {"seq_len": 42}}}
        out[section] = {"config": config, "state_dict": sd}
    return out


def test_scfoundation_sections_checkpoint_round_trip(tmp_path):
    sources = {s: _scf(seed=i + 1) for i, s in enumerate(("gene", "cell", "rde"))}
    torch.save(_sections(sources, torch.Generator().manual_seed(5)), tmp_path / "models.ckpt")
    counts = _counts()
    for name, section in (("scfoundation", "cell"), ("scfoundation_gene", "gene"), ("scfoundation_rde", "rde")):
        dst = create_gene_encoder(name, weights=str(tmp_path / "models.ckpt"), panel=PANEL, gene_ids=IDS,
                                  **SCF_TINY).eval()
        with torch.no_grad():
            assert torch.equal(dst(counts), sources[section](counts)), name
    torch.save(_sections({"gene": sources["gene"]}, torch.Generator().manual_seed(5)), tmp_path / "gene_only.ckpt")
    with pytest.raises(WeightsError, match=r"expected the section 'cell', found sections \['gene'\]"):
        create_gene_encoder("scfoundation", weights=str(tmp_path / "gene_only.ckpt"), panel=PANEL, gene_ids=IDS,
                            **SCF_TINY)


@pytest.mark.parametrize("damage,key", [
    ("missing", "model.token_emb.emb_pad.weight"),
    ("extra", "model.encoder.transformer_encoder.2.linear1.weight"),
    ("shape", "model.pos_emb.weight"),
])
def test_scfoundation_damaged_checkpoint_names_the_key(tmp_path, damage, key):
    ckpt = _sections({"cell": _scf()}, torch.Generator().manual_seed(5))
    sd = ckpt["cell"]["state_dict"]
    if damage == "missing":
        del sd[key]
    elif damage == "extra":
        sd[key] = torch.zeros(2)
    else:
        sd[key] = sd[key][:-1]
    torch.save(ckpt, tmp_path / "models.ckpt")
    with pytest.raises(WeightsError, match=key[len("model."):].replace(".", r"\.")):
        create_gene_encoder("scfoundation", weights=str(tmp_path / "models.ckpt"), panel=PANEL, gene_ids=IDS,
                            **SCF_TINY)


def test_scfoundation_forward_backward_tiny():
    enc = _scf(dropout=0.1).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = enc(_counts())
    assert out.shape == (6, 128) and torch.isfinite(out).all()
    out.square().sum().backward()
    te = enc.token_emb
    assert all(p.grad.abs().sum() > 0 for p in (te.mlp.weight, te.mlp2.weight, te.emb.weight, enc.pos_emb.weight))
    assert te.emb_pad.weight.grad.abs().sum() == 0  # padding reaches no output: masked in attention and pooling
    for layer in enc.encoder["transformer_encoder"]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert enc.contract.options["target_resolution"] == "t4" and enc.contract.vocabulary == "scfoundation-40"
