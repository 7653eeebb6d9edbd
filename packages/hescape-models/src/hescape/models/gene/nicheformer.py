"""Nicheformer (Schaar et al., "Nicheformer: a foundation model for single-cell and spatial omics", 2024), as
published in theislab/nicheformer (code BSD-3-Clause; weights on Mendeley Data).

Facts (theislab/nicheformer at 485cadb; ``../shared/reference/encoders.md``):

* Architecture (``models/_nicheformer.py``, ``config_files/_config_train.py``): token embedding
  ``Embedding(n_tokens + 5 = 20,345, 512, padding_idx=1)``, learnable positions ``Embedding(1500, 512)``, 12
  post-norm ``nn.TransformerEncoderLayer(512, 16, 1024, dropout=0, batch_first, layer_norm_eps=1e-12)`` (ReLU).
* Tokens (``data/dataset.py``, ``notebooks/tokenization/xenium_human_lung.ipynb``): each cell scaled to 10,000
  counts over the vocabulary genes (``sf_normalize``), divided by the technology mean of each gene (NaN → 0,
  then 0 → 1), the non-zero genes ranked by that value, largest first; token = vocabulary index + 30. Padding is
  token 1 (the data's 0 turned into 1 by ``complete_masking``, ``models/_utils.py``).
* Context (``on_after_batch_transfer``): ``[species, assay, modality]`` put in front, the sequence cut to 1,500.
  Ids: modality dissociated 3, spatial 4; species human 5, mouse 6; assay merfish 7, cosmx 8, Xenium 9, … (the
  tokenisation notebooks' dictionaries).
* Embedding (``get_embeddings``): the layers run with the padding as the key padding mask, the 3 context positions
  are dropped and the rest are **averaged with the padding included** (``embeddings.mean(dim=1)``, no mask) →
  512-d. ``pooling="masked_mean"`` averages the gene positions only (and skips the all-padding tail).

Differences from the original, all deliberate: ties between equal values are ranked by vocabulary index (numba's
``np.argsort`` quicksort leaves their order unspecified); the original's fast-path layers are replaced by
:class:`~hescape.models.gene._transformer.EncoderLayer` (same weights and function) so LoRA adapters apply; the
template layer ``encoder_layer.*`` that ``nn.TransformerEncoder`` copies (2,102,784 parameters never used in
forward) is not built, so the encoder has 36,418,048 parameters — the facts sheet's 38,520,832 "without heads"
counts that template.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..contracts import GeneContract
from ..errors import HescapeModelError
from ..weights import WeightsSpec
from ..zoo import EncoderEntry, register_encoder
from ._transformer import EncoderLayer
from .vocab import VocabGeneEncoder, VocabMapping, counts_in_vocab

__all__ = ["NicheformerEncoder", "nicheformer_tokenize", "technology_mean_tensor", "context_ids", "NICHEFORMER_AUX_TOKENS",
           "NICHEFORMER_CONTEXT_LENGTH", "NICHEFORMER_PAD_TOKEN", "NICHEFORMER_CONTEXT_IDS", "NICHEFORMER_VOCAB_SIZE"]

#: Token ids below this are reserved (padding, CLS, mask, context); vocabulary gene ``i`` is token ``i + 30``.
NICHEFORMER_AUX_TOKENS = 30
NICHEFORMER_CONTEXT_LENGTH = 1500
NICHEFORMER_PAD_TOKEN = 1
#: Genes of the released model's vocabulary (``data/model_means/model.h5ad``: human ENSG, then mouse ENSMUSG ids).
NICHEFORMER_VOCAB_SIZE = 20310
#: Context token ids (``notebooks/tokenization/*.ipynb``); names are matched case-insensitively.
NICHEFORMER_CONTEXT_IDS = {
    "species": {"human": 5, "homo sapiens": 5, "mouse": 6, "mus musculus": 6},
    "assay": {"merfish": 7, "cosmx": 8, "nanostring digital spatial profiling": 8, "xenium": 9, "10x 5' v2": 10,
              "10x 3' v3": 11, "10x 3' v2": 12, "10x 5' v1": 13, "10x 3' v1": 14,
              "10x 3' transcription profiling": 15, "10x transcription profiling": 15,
              "10x 5' transcription profiling": 16, "cite-seq": 17, "smart-seq v4": 18},
    "modality": {"dissociated": 3, "spatial": 4},
}
_N_CONTEXT = 3
_CONTRACT = GeneContract(preprocessing="nicheformer_tokens", target_sum=1e4,
                         vocabulary=f"nicheformer-{NICHEFORMER_VOCAB_SIZE}",
                         options={"aux_tokens": NICHEFORMER_AUX_TOKENS, "pad_token": NICHEFORMER_PAD_TOKEN})
_POOLINGS = ("mean", "masked_mean")
_WHERE = ("the 20,310 Ensembl ids of data/model_means/model.h5ad in theislab/nicheformer (or a text/CSV list of "
          "them); vocabulary='path/to/model.h5ad'")


def context_ids(species: str, assay: str, modality: str) -> list[int]:
    """``[species, assay, modality]`` token ids, in Nicheformer's order (``on_after_batch_transfer``)."""
    ids = []
    for kind, value in (("species", species), ("assay", assay), ("modality", modality)):
        table = NICHEFORMER_CONTEXT_IDS[kind]
        if str(value).lower() not in table:
            msg = f"nicheformer {kind} {value!r} is unknown: expected one of {sorted(table)}"
            raise HescapeModelError(msg)
        ids.append(table[str(value).lower()])
    return ids


def technology_mean_tensor(technology_mean: str | os.PathLike | Sequence[float] | np.ndarray | None, n_vocab: int,
                           *, round_half_up: bool = False) -> torch.Tensor:
    """The per-gene divisor ``(n_vocab,)`` float64: a ``.npy`` file (``xenium_mean_script.npy``, …) or an array.

    NaN → 0, then 0 → 1 (no scaling), as Nicheformer's data code does. ``round_half_up`` first rounds the means to
    integers (x.5 up), as the authors' tokenisation notebooks do (``xenium_human_lung.ipynb``); means that round to
    0 then become 1. ``None`` divides by 1 everywhere.
    """
    if technology_mean is None:
        return torch.ones(n_vocab, dtype=torch.float64)
    if isinstance(technology_mean, str | os.PathLike):
        path = Path(technology_mean).expanduser()
        try:
            technology_mean = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            msg = (f"technology mean {path}: expected a .npy array of {n_vocab} per-gene means (e.g. "
                   f"data/model_means/xenium_mean_script.npy of theislab/nicheformer), found a file that cannot be "
                   f"read ({e})")
            raise HescapeModelError(msg) from None
    mean = torch.as_tensor(np.asarray(technology_mean, dtype=np.float64)).reshape(-1)
    if mean.numel() != n_vocab:
        msg = (f"technology mean has {mean.numel()} entries but the vocabulary has {n_vocab}; use the mean file that "
               "ships with the same model (data/model_means/<technology>_mean_script.npy)")
        raise HescapeModelError(msg)
    mean = torch.nan_to_num(mean, nan=0.0)
    if round_half_up:
        mean = torch.floor(mean + 0.5)
    return torch.where(mean == 0, torch.ones_like(mean), mean)


def _rank_tokens(x: torch.Tensor, slot_tokens: torch.Tensor, slot_mean: torch.Tensor, prefix: Sequence[int],
                 context_length: int, target_sum: float) -> torch.Tensor:
    """Compact counts ``(B, U)`` (slots in ascending vocabulary order) → ``(B, context_length)`` int64 tokens."""
    total = x.sum(dim=1, keepdim=True)
    scaled = torch.where(total > 0, x * (target_sum / total.clamp_min(1e-300)), torch.zeros_like(x))
    v = scaled / slot_mean
    width = min(context_length - len(prefix), x.shape[1])
    top, order = torch.sort(v, dim=1, descending=True, stable=True)  # ties: lower vocabulary index first
    top, order = top[:, :width], order[:, :width]
    pad = torch.full_like(order, NICHEFORMER_PAD_TOKEN)
    tokens = torch.where(top > 0, slot_tokens[order], pad)
    out = torch.full((x.shape[0], context_length), NICHEFORMER_PAD_TOKEN, dtype=torch.long, device=x.device)
    if prefix:
        out[:, : len(prefix)] = torch.tensor(list(prefix), dtype=torch.long, device=x.device)
    out[:, len(prefix):len(prefix) + width] = tokens
    return out


def nicheformer_tokenize(counts: torch.Tensor | np.ndarray, mapping: VocabMapping, technology_mean=None, *,
                         context: tuple[str, str, str] | None = ("human", "xenium", "spatial"),
                         context_length: int = NICHEFORMER_CONTEXT_LENGTH, target_sum: float = 1e4,
                         round_technology_mean: bool = False) -> torch.Tensor:
    """Nicheformer tokens of raw counts: ``(B, context_length)`` int64 on the counts' device.

    Parameters
    ----------
    counts
        Raw counts ``(B, G)`` in panel order (torch, numpy, or anything with ``toarray()``).
    mapping
        The panel in Nicheformer's vocabulary (:func:`~hescape.models.gene.vocab.map_panel_to_vocab`).
    technology_mean
        Per-gene means of the technology (``xenium_mean_script.npy``), see :func:`technology_mean_tensor`.
    context
        ``(species, assay, modality)`` names put in front as ``[species, assay, modality]``; None for genes only.
    context_length
        Sequence length, context included (1,500 for the released model).
    target_sum
        Total each row is scaled to, over the genes in the vocabulary (10,000).

    Returns
    -------
    torch.Tensor
        Context ids, then the non-zero vocabulary genes by decreasing ``scaled count / technology mean`` (token =
        index + 30; ties by vocabulary index), cut to ``context_length`` and padded with 1. A row without counts
        is context plus padding.
    """
    prefix = context_ids(*context) if context is not None else []
    if context_length <= len(prefix):
        msg = f"context_length must leave room for gene tokens: expected > {len(prefix)}, found {context_length}"
        raise HescapeModelError(msg)
    mean = technology_mean_tensor(technology_mean, mapping.n_vocab, round_half_up=round_technology_mean)
    x, vocab_ids = counts_in_vocab(counts, mapping)
    return _rank_tokens(x, vocab_ids + NICHEFORMER_AUX_TOKENS, mean.to(x.device)[vocab_ids], prefix,
                        context_length, target_sum)


class NicheformerEncoder(VocabGeneEncoder):
    """Nicheformer's transformer over rank tokens: raw counts ``(B, G)`` → ``(B, dim_model)`` (512).

    Parameters
    ----------
    panel, gene_ids
        The dataset's gene symbols and (optional, preferred for matching) Ensembl ids, in count-column order.
    vocabulary
        The model's gene list: ``model.h5ad`` (its var index: 20,310 Ensembl ids), a text/CSV file of them, or the
        list itself. Panel genes are found by Ensembl id (version ignored), then symbol; a panel with no gene in
        it is refused, under 50 % found warns.
    technology_mean
        ``.npy`` file or array ``(n_vocab,)`` of the technology's per-gene means
        (``data/model_means/xenium_mean_script.npy`` for Xenium); None divides by 1.
    species, assay, modality
        Context token names (:data:`NICHEFORMER_CONTEXT_IDS`); HESCAPE data: human, xenium, spatial.
    context_length
        Tokens per spot, context included (1,500; the positional table has this many rows).
    pooling
        ``"mean"``: the original's mean over all 1,497 gene positions, padding included. ``"masked_mean"``: the mean
        over the gene tokens only (the padding tail is not computed).
    round_technology_mean
        Round the means to integers first, as the authors' tokenisation notebooks do.
    dim_model, nheads, dim_feedforward, nlayers, dropout
        Architecture (512, 16, 1024, 12, 0.0 for the released model; small values for tests).
    """

    vocab_family = "nicheformer"

    def __init__(self, panel: Sequence[str], gene_ids: Sequence[str] | None = None, *, vocabulary=None,
                 technology_mean=None, species: str = "human", assay: str = "xenium", modality: str = "spatial",
                 context_length: int = NICHEFORMER_CONTEXT_LENGTH, pooling: str = "mean",
                 round_technology_mean: bool = False, dim_model: int = 512, nheads: int = 16,
                 dim_feedforward: int = 1024, nlayers: int = 12, dropout: float = 0.0):
        super().__init__()
        if pooling not in _POOLINGS:
            msg = f"nicheformer pooling {pooling!r} is unknown: expected one of {_POOLINGS}"
            raise HescapeModelError(msg)
        if context_length <= _N_CONTEXT:
            msg = f"nicheformer context_length must exceed the {_N_CONTEXT} context tokens, found {context_length}"
            raise HescapeModelError(msg)
        self.prefix = context_ids(species, assay, modality)
        mapping = self._map_panel(panel, gene_ids, vocabulary, name="nicheformer", where=_WHERE)
        if technology_mean is None and mapping.n_vocab == NICHEFORMER_VOCAB_SIZE:
            warnings.warn("nicheformer: no technology_mean given, so counts are not divided by per-gene means; the "
                          "released model was trained with them (data/model_means/<technology>_mean_script.npy)",
                          stacklevel=2)
        mean = technology_mean_tensor(technology_mean, mapping.n_vocab, round_half_up=round_technology_mean)
        # float64 technology mean of each mapped slot; persistent, so a checkpoint keeps the values it trained with
        self.register_buffer("slot_mean", mean[self.vocab_ids].clone())
        self.context_length, self.pooling = context_length, pooling
        self._settings.update({"context": [species.lower(), assay.lower(), modality.lower()],
                               "context_length": context_length,
                               "technology_mean": None if technology_mean is None else (
                                   Path(technology_mean).name if isinstance(technology_mean, str | os.PathLike)
                                   else "array"), "round_technology_mean": round_technology_mean})
        # Module names are the published state-dict keys (embeddings, positional_embedding, encoder.layers.N).
        self.embeddings = nn.Embedding(mapping.n_vocab + NICHEFORMER_AUX_TOKENS + 5, dim_model,
                                       padding_idx=NICHEFORMER_PAD_TOKEN)
        self.positional_embedding = nn.Embedding(context_length, dim_model)
        self.dropout = nn.Dropout(dropout)
        layer = {"d_model": dim_model, "nhead": nheads, "dim_feedforward": dim_feedforward, "dropout": dropout,
                 "layer_norm_eps": 1e-12}
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(**layer) for _ in range(nlayers))})
        self.out_dim = dim_model
        self.lora_targets = ("self_attn.out_proj", "linear1", "linear2")
        self.contract = _CONTRACT  # create_gene_encoder sets the entry's (or a checkpoint's) contract again

    def preprocess(self, counts: torch.Tensor) -> torch.Tensor:
        """Raw counts ``(B, G)`` → tokens ``(B, context_length)`` int64 (see :func:`nicheformer_tokenize`)."""
        x = self._compact(counts)
        return _rank_tokens(x, self.vocab_ids + NICHEFORMER_AUX_TOKENS, self.slot_mean.to(x.device), self.prefix,
                            self.context_length, self.contract.target_sum)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, context_length)`` → ``(B, dim_model)`` by the encoder's ``pooling``."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            msg = f"expected tokens of shape (B, {self.context_length}), found {tuple(tokens.shape)}"
            raise HescapeModelError(msg)
        pad = tokens == NICHEFORMER_PAD_TOKEN
        if self.pooling == "masked_mean":  # tokens are context, genes, then padding: drop the all-padding tail
            n = int((~pad).sum(dim=1).max())
            tokens, pad = tokens[:, :n], pad[:, :n]
        x = self.dropout(self.embeddings(tokens) + self.positional_embedding.weight[: tokens.shape[1]])
        for layer in self.encoder["layers"]:
            x = layer(x, src_key_padding_mask=pad)
        x = x[:, _N_CONTEXT:]
        if self.pooling == "mean":
            return x.mean(dim=1)
        keep = (~pad[:, _N_CONTEXT:]).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


#: Keys of the Lightning checkpoint that the encoder does not use: the MLM/classification heads and the template
#: layer ``nn.TransformerEncoder`` copies (registered as ``encoder_layer``).
_UNUSED_PREFIXES = ("classifier_head.", "pooler_head.", "cls_head.", "encoder_layer.")


def convert_nicheformer(sd: dict) -> dict:
    """Published ``nicheformer.ckpt`` (Lightning: ``{"state_dict": …, "hyper_parameters": …, …}``) or its bare
    state dict → ours: unwrap ``state_dict``, drop the heads and the template layer named above."""
    if "state_dict" in sd:
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if not k.startswith(_UNUSED_PREFIXES)}


register_encoder(EncoderEntry(
    name="nicheformer", modality="gene", builder=NicheformerEncoder,
    contract=_CONTRACT, out_dim=512, pooling="mean over gene positions (padding included)",
    weights=WeightsSpec(files=("nicheformer.ckpt",), licence="code BSD-3-Clause; weights: see the Mendeley Data page",
                        url="https://github.com/theislab/nicheformer (README: pretraining weights on Mendeley Data)",
                        convert=convert_nicheformer,
                        ignore=(r"^vocab_(columns|slots|ids)$", r"^slot_mean$")),  # ours: the panel's mapping
    lora_targets=("self_attn.out_proj", "linear1", "linear2"),
    params=36_418_048,
    description="Nicheformer: 12-layer transformer (512-d) on rank tokens with [species, assay, modality] context "
                "(theislab/nicheformer; 38,520,832 in the facts sheet counts the unused template layer)"))
