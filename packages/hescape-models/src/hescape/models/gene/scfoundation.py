"""scFoundation (Hao et al., "Large-scale foundation model on single-cell transcriptomics", Nature Methods 2024),
the encoder side of its MAE-autobin model, as published in biomap-research/scFoundation (code Apache-2.0; weights
under the scFoundation Model License: non-commercial research only).

Facts (biomap-research/scFoundation at d09626a; ``../shared/reference/encoders.md``):

* Modules (``model/pretrainmodels/mae_autobin.py``, ``transformer.py``, ``select_model.py``): ``token_emb`` =
  ``AutoDiscretizationEmbedding2`` (a value v → h = LeakyReLU(0.1)(Linear(1, 100)(v)); softmax over
  ``bin_alpha·h + Linear(100, 100)(h)`` times ``emb`` = Embedding(100, 768); padding replaced by ``emb_pad``,
  masked values by ``emb_mask``); ``pos_emb`` = Embedding(19,267, 768) indexed by gene; ``encoder`` =
  ``pytorchTransformerModule``: ``transformer_encoder`` = 12 × ``nn.TransformerEncoderLayer(768, 12, 3072,
  batch_first=True, norm_first=False)`` (ReLU, dropout 0.1 in training), then ``norm`` = LayerNorm(768).
* Input (``model/get_embedding.py``, single cell, not pre-normalised): the panel reindexed to the 19,264 genes of
  ``OS_scRNA_gene_index.19264.tsv`` (missing genes 0, others dropped); ``log1p(x / sum · 1e4)``; then **T**
  (index 19,264; ``t4`` → 4, ``aN`` → log10(total) + N, ``fN`` → log10(total · N)) and **S** (index 19,265,
  log10(total)); only values > 0 kept, in ascending index order (``gatherData``), padded with 103.
* Cell embedding (``output_type cell``): ``pool_type all`` = [S, T, max over genes, mean over genes] → 3,072-d;
  ``max`` = max over all tokens → 768-d. The script embeds one cell at a time; here a batch is padded and the
  padding is masked in attention (``src_key_padding_mask``, as in training) and in pooling, so a padded batch
  gives the embeddings of one-at-a-time runs.
* Checkpoint ``models/models.ckpt``: sections ``gene``, ``cell``, ``rde``, each ``{"config", "state_dict"}`` with
  keys prefixed ``model.`` (``model/load.py``). ``get_embedding.py`` loads ``cell`` for cell embeddings
  (``--version ce``, the default; ``rde`` for read-depth enhancement) and ``gene`` for gene embeddings; HESCAPE
  (and the authors' ``finetune_model.py``) load ``gene`` and max-pool. So ``scfoundation`` uses ``cell`` (we embed
  spots as cells), and ``scfoundation_gene`` / ``scfoundation_rde`` load the other two sections.

Differences from the original, all deliberate: T and S are always kept (the original drops S when the total is
≤ 1 count, and its ``all`` pooling then reads a gene as S); a spot without counts gets S = 0 (log10 of 1) and
no gene tokens (the original divides by 0), and its max/mean parts are 0; padding is recognised by position, not
by the value 103; the layers are :class:`~hescape.models.gene._transformer.EncoderLayer` (same weights and
function) so LoRA adapters apply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contracts import GeneContract
from ..errors import HescapeModelError
from ..weights import WeightsError, WeightsSpec
from ..zoo import EncoderEntry, register_encoder
from ._transformer import EncoderLayer
from .vocab import VocabGeneEncoder, VocabMapping, counts_in_vocab

__all__ = ["ScFoundationEncoder", "AutoDiscretizationEmbedding", "scfoundation_tokenize",
           "SCFOUNDATION_VOCAB_SIZE", "SCFOUNDATION_PAD_TOKEN"]

SCFOUNDATION_VOCAB_SIZE = 19264
#: Value written at padding positions (``pad_token_id``; ``mask_token_id`` is 102).
SCFOUNDATION_PAD_TOKEN = 103
_POOLINGS = ("all", "max")
_SECTIONS = ("cell", "gene", "rde")
_CONTRACT = GeneContract(preprocessing="scfoundation_values", target_sum=1e4,
                         vocabulary=f"scfoundation-{SCFOUNDATION_VOCAB_SIZE}", options={"target_resolution": "t4"})
_WHERE = ("the 19,264 genes of OS_scRNA_gene_index.19264.tsv (column gene_name) in biomap-research/scFoundation "
          "model/; vocabulary='path/to/OS_scRNA_gene_index.19264.tsv'")


def _parse_resolution(mode: str) -> tuple[str, float]:
    m = re.fullmatch(r"([taf])(\d+(?:\.\d+)?)", str(mode))
    if m is None:
        msg = f"target resolution must be 't<N>', 'a<N>' or 'f<N>' (e.g. 't4', 'a5', 'f1'), found {mode!r}"
        raise HescapeModelError(msg)
    return m.group(1), float(m.group(2))


def _gather(x: torch.Tensor, vocab_ids: torch.Tensor, n_vocab: int, target_sum: float,
            resolution: tuple[str, float]) -> dict[str, torch.Tensor]:
    """Compact counts ``(B, U)`` (ascending vocabulary order) → the encoder's padded input."""
    total = x.sum(dim=1)
    safe = torch.where(total > 0, total, torch.ones_like(total))  # an empty spot: as if it had 1 count
    values = torch.log1p(x / safe[:, None] * target_sum)
    log_total = torch.log10(safe)
    kind, n = resolution
    t = torch.full_like(log_total, n) if kind == "t" else log_total + n if kind == "a" else torch.log10(safe * n)
    values = torch.cat([values, t[:, None], log_total[:, None]], dim=1)
    keep = torch.cat([x > 0, torch.ones_like(x[:, :2], dtype=torch.bool)], dim=1)
    ids = torch.cat([vocab_ids, torch.tensor([n_vocab, n_vocab + 1], device=x.device, dtype=vocab_ids.dtype)])
    count = keep.sum(dim=1)
    width = int(count.max())
    # kept entries first, each group in ascending index order (a stable sort of 0 = kept, 1 = dropped)
    order = torch.sort((~keep).to(torch.int32), dim=1, stable=True).indices[:, :width]
    padding = torch.arange(width, device=x.device)[None, :] >= count[:, None]
    return {
        "values": values.gather(1, order).masked_fill(padding, SCFOUNDATION_PAD_TOKEN).float(),
        "positions": ids[order].masked_fill(padding, n_vocab + 2),
        "padding": padding,
    }


def scfoundation_tokenize(counts: torch.Tensor | np.ndarray, mapping: VocabMapping, *, target_sum: float = 1e4,
                          target_resolution: str = "t4") -> dict[str, torch.Tensor]:
    """scFoundation's input of raw counts, batched: a dict of ``(B, L)`` tensors on the counts' device.

    Parameters
    ----------
    counts
        Raw counts ``(B, G)`` in panel order (torch, numpy, or anything with ``toarray()``).
    mapping
        The panel in scFoundation's 19,264 genes (:func:`~hescape.models.gene.vocab.map_panel_to_vocab`).
    target_sum
        Row total of the scaling before ``log1p`` (10,000), over the genes in the vocabulary.
    target_resolution
        T token: ``"t<N>"`` → N, ``"a<N>"`` → log10(total) + N, ``"f<N>"`` → log10(total · N).

    Returns
    -------
    dict
        ``values`` float32 (the positive ``log1p`` values in ascending gene order, then T, then S, then 103 as
        padding), ``positions`` int64 (gene index, ``n_vocab`` for T, ``n_vocab + 1`` for S, ``n_vocab + 2`` for
        padding) and ``padding`` bool; ``L`` = the most genes in a row + 2.
    """
    x, vocab_ids = counts_in_vocab(counts, mapping)
    return _gather(x, vocab_ids, mapping.n_vocab, target_sum, _parse_resolution(target_resolution))


class AutoDiscretizationEmbedding(nn.Module):
    """scFoundation's value embedding (``AutoDiscretizationEmbedding2``): a soft assignment of each scalar to
    ``bin_num`` learned bins. ``(B, L)`` values and padding mask → ``(B, L, dim)``.

    Submodule names are the published keys: ``mlp``, ``mlp2``, ``emb``, ``emb_mask`` (the MAE's mask token;
    unused by the encoder, kept so the weights load), ``emb_pad``.
    """

    def __init__(self, dim: int, bin_num: int = 100, bin_alpha: float = 1.0):
        super().__init__()
        self.bin_alpha = bin_alpha
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def forward(self, values: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        weight = torch.softmax(self.bin_alpha * h + self.mlp2(h), dim=-1)
        return torch.where(padding.unsqueeze(-1), self.emb_pad.weight[0], weight @ self.emb.weight)


class ScFoundationEncoder(VocabGeneEncoder):
    """scFoundation's encoder: raw counts ``(B, G)`` → ``(B, 4 · dim)`` (``pooling="all"``, 3,072) or ``(B, dim)``.

    Parameters
    ----------
    panel, gene_ids
        The dataset's gene symbols and (optional) Ensembl ids, in count-column order.
    vocabulary
        The model's gene list: ``OS_scRNA_gene_index.19264.tsv`` (column ``gene_name``), another text/CSV file, or
        the list itself. Its length sets the position table (``n_vocab + 3`` rows). A panel with no gene in it is
        refused, under 50 % found warns.
    target_resolution
        The T token (``"t4"``, the script's default; ``"a<N>"``, ``"f<N>"``).
    pooling
        ``"all"``: [S, T, max over genes, mean over genes] (the script's default, 3,072-d); ``"max"``: max over all
        tokens (768-d; HESCAPE's choice).
    dim, depth, heads, ff_mult, bin_num, bin_alpha, dropout
        Architecture (768, 12, 12, 4, 100, 1.0, 0.1 for the released model; small values for tests).
    """

    vocab_family = "scfoundation"

    def __init__(self, panel: Sequence[str], gene_ids: Sequence[str] | None = None, *, vocabulary=None,
                 target_resolution: str = "t4", pooling: str = "all", dim: int = 768, depth: int = 12,
                 heads: int = 12, ff_mult: int = 4, bin_num: int = 100, bin_alpha: float = 1.0, dropout: float = 0.1):
        super().__init__()
        if pooling not in _POOLINGS:
            msg = f"scfoundation pooling {pooling!r} is unknown: expected one of {_POOLINGS}"
            raise HescapeModelError(msg)
        self.resolution = _parse_resolution(target_resolution)
        mapping = self._map_panel(panel, gene_ids, vocabulary, name="scfoundation", where=_WHERE)
        self.n_vocab, self.pooling = mapping.n_vocab, pooling
        self._settings["target_resolution"] = target_resolution
        # Module names are the published keys after the "model." prefix.
        self.token_emb = AutoDiscretizationEmbedding(dim, bin_num, bin_alpha)
        self.pos_emb = nn.Embedding(mapping.n_vocab + 3, dim)  # genes, T, S, and a row for padding positions
        layer = {"d_model": dim, "nhead": heads, "dim_feedforward": dim * ff_mult, "dropout": dropout}
        self.encoder = nn.ModuleDict({
            "transformer_encoder": nn.ModuleList(EncoderLayer(**layer) for _ in range(depth)),
            "norm": nn.LayerNorm(dim)})
        self.out_dim = 4 * dim if pooling == "all" else dim
        self.lora_targets = ("self_attn.out_proj", "linear1", "linear2")
        self.contract = _CONTRACT  # create_gene_encoder sets the entry's (or a checkpoint's) contract again

    def preprocess(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw counts ``(B, G)`` → ``{"values", "positions", "padding"}`` (see :func:`scfoundation_tokenize`)."""
        return _gather(self._compact(counts), self.vocab_ids, self.n_vocab, self.contract.target_sum, self.resolution)

    def forward_tokens(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, L, dim)`` token features after the final LayerNorm (padding rows included)."""
        pad = inputs["padding"]
        x = self.token_emb(inputs["values"], pad) + self.pos_emb(inputs["positions"])
        for layer in self.encoder["transformer_encoder"]:
            x = layer(x, src_key_padding_mask=pad)
        return self.encoder["norm"](x)

    def forward_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x, pad = self.forward_tokens(inputs), inputs["padding"]
        if self.pooling == "max":
            return x.masked_fill(pad.unsqueeze(-1), float("-inf")).amax(dim=1)
        count = (~pad).sum(dim=1)  # tokens: genes, T, S, padding
        rows = torch.arange(x.shape[0], device=x.device)
        s, t = x[rows, count - 1], x[rows, count - 2]
        genes = (torch.arange(x.shape[1], device=x.device)[None, :] < (count - 2)[:, None]).unsqueeze(-1)
        has = genes.any(dim=1)
        top = torch.where(has, x.masked_fill(~genes, float("-inf")).amax(dim=1), torch.zeros_like(s))
        mean = (x * genes).sum(dim=1) / genes.sum(dim=1).clamp_min(1)
        return torch.cat([s, t, top, mean], dim=1)


#: Top-level modules of the MAE that the encoder does not use: the decoder and its projection, norm and output.
_DECODER = ("decoder", "decoder_embed", "norm", "to_final")


def _converter(section: str):
    def convert(sd: dict) -> dict:
        if section in sd:  # the published sections file
            sd = sd[section]
        elif any(s in sd for s in _SECTIONS):
            msg = (f"scFoundation checkpoint: expected the section {section!r}, found sections "
                   f"{sorted(s for s in _SECTIONS if s in sd)}; use the encoder named after the section you have")
            raise WeightsError(msg)
        if "state_dict" in sd:  # one section: {"config", "state_dict"}
            sd = sd["state_dict"]
        if sd and all(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items()}
        return {k: v for k, v in sd.items() if k.split(".", 1)[0] not in _DECODER}

    convert.__doc__ = (f"``models.ckpt`` (sections ``gene``/``cell``/``rde`` of ``{{config, state_dict}}``, keys "
                       f"``model.…``) → ours: section {section!r}, prefix stripped, decoder keys {_DECODER} dropped.")
    return convert


_DESCRIPTIONS = {
    "cell": "the 'cell' section, which get_embedding.py uses for cell embeddings (--version ce)",
    "gene": "the 'gene' section, which HESCAPE and finetune_model.py use",
    "rde": "the 'rde' section, for read-depth enhancement (--version rde)",
}
for _section in _SECTIONS:
    register_encoder(EncoderEntry(
        name="scfoundation" if _section == "cell" else f"scfoundation_{_section}", modality="gene",
        builder=ScFoundationEncoder, contract=_CONTRACT, out_dim=3072,
        pooling="all: [S, T, max, mean] over genes (max: 768-d)",
        weights=WeightsSpec(files=("models.ckpt",), licence="scFoundation Model License (non-commercial research only)",
                            url="https://github.com/biomap-research/scFoundation (model/models/download.txt)",
                            convert=_converter(_section),
                            ignore=(r"^vocab_(columns|slots|ids)$",)),  # ours: the panel's vocabulary mapping
        lora_targets=("self_attn.out_proj", "linear1", "linear2"),
        params=99_941_692,
        description=f"scFoundation MAE-autobin encoder, 12 layers × 768 (biomap-research/scFoundation); "
                    f"weights: {_DESCRIPTIONS[_section]}"))
