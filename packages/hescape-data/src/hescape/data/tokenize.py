"""Gene-expression inputs of pretrained single-cell encoders, computed from raw pseudo-spot counts.

Three pieces, all vectorised over rows (no Python loop per spot):

* :func:`map_panel_to_vocab` places the genes of a panel in an encoder's vocabulary, by Ensembl id first
  (version suffix ignored) and by symbol second, and reports the coverage (mapped / panel, missing genes).
* :func:`nicheformer_tokenize`: Nicheformer's rank tokens. Each row is scaled to 10,000 total counts,
  divided by the technology mean expression of every vocabulary gene (NaN -> 0, then 0 -> 1), and the
  genes with a non-zero value are ranked by that value, largest first. Token = vocabulary index + 30
  (30 auxiliary tokens); the sequence is cut to the context length (1,500) and padded. Nicheformer's own
  tokeniser pads with 0 and its data module turns 0 into the padding id 1; here the padding id is a
  parameter (default 1, what the embedding layer expects). Optionally the three context tokens
  ``[species, assay, modality]`` are put in front (the model prepends them itself when it embeds a batch,
  so leave ``context=None`` when you feed the original model code).
* :func:`scfoundation_input` and :func:`scfoundation_gather`: scFoundation's input. Counts are reindexed to
  the encoder's 19,264 genes (missing genes are 0), scaled to 10,000 per row and ``log1p``-ed, and two
  total-count tokens are appended: index ``n_vocab`` is **T** (target resolution; ``"t4"`` -> 4, ``"aN"`` ->
  ``log10(total) + N``, ``"fN"`` -> ``log10(total · N)``) and index ``n_vocab + 1`` is **S**
  (``log10`` of the raw total). The encoder sees only the positive values, in ascending gene order, with
  their gene indices as position ids; shorter rows are padded with the pad id (103) in both arrays.

The vocabularies themselves (Nicheformer's 20,310 Ensembl ids with technology means, scFoundation's 19,264
gene symbols) ship with the encoders' weights and are not bundled here: load them with
:func:`read_vocabulary` (a text/CSV/TSV file) or pass lists. Facts from the encoders' papers and code.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import HescapeDataError

__all__ = [
    "VocabMapping", "map_panel_to_vocab", "read_vocabulary", "reindex_to_vocab",
    "NICHEFORMER_AUX_TOKENS", "NICHEFORMER_CONTEXT_LENGTH", "NICHEFORMER_PAD_TOKEN", "NICHEFORMER_CONTEXT_IDS",
    "nicheformer_tokenize",
    "SCFOUNDATION_N_GENES", "SCFOUNDATION_PAD_TOKEN", "scfoundation_input", "scfoundation_gather",
]

#: Token ids below this are reserved (padding, CLS, mask, context tokens); gene ``i`` of the vocabulary is ``i + 30``.
NICHEFORMER_AUX_TOKENS = 30
NICHEFORMER_CONTEXT_LENGTH = 1500
NICHEFORMER_PAD_TOKEN = 1
#: Context token ids of Nicheformer (modality, species, assay), from its tokenisation notebooks.
NICHEFORMER_CONTEXT_IDS = {
    "modality": {"dissociated": 3, "spatial": 4},
    "species": {"human": 5, "mouse": 6},
    "assay": {"merfish": 7, "cosmx": 8, "xenium": 9, "10x 5' v2": 10, "10x 3' v3": 11, "10x 3' v2": 12,
              "10x 5' v1": 13, "10x 3' v1": 14, "10x 3' transcription profiling": 15,
              "10x 5' transcription profiling": 16, "cite-seq": 17, "smart-seq v4": 18},
}
SCFOUNDATION_N_GENES = 19264
SCFOUNDATION_PAD_TOKEN = 103

_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$")


def _strip_version(gene_id: str) -> str:
    m = _ENSEMBL.match(gene_id.strip())
    return m.group(1) if m else gene_id.strip()


@dataclass(frozen=True)
class VocabMapping:
    """Where each panel gene sits in an encoder vocabulary.

    ``index[i]`` is the vocabulary position of panel gene ``i``, or -1 when the gene is not in the vocabulary;
    ``matched_by[i]`` is ``"ensembl"``, ``"symbol"`` or ``""``.
    """

    index: np.ndarray
    n_vocab: int
    panel_genes: tuple[str, ...]
    matched_by: tuple[str, ...]
    missing: tuple[str, ...] = field(default=())

    @property
    def n_panel(self) -> int:
        return len(self.index)

    @property
    def n_mapped(self) -> int:
        return int((self.index >= 0).sum())

    @property
    def coverage(self) -> float:
        """Fraction of panel genes found in the vocabulary."""
        return self.n_mapped / max(self.n_panel, 1)

    def report(self) -> str:
        """One line: ``n mapped / n panel (pct), by Ensembl id / by symbol, missing: ...``."""
        n_ens = sum(m == "ensembl" for m in self.matched_by)
        n_sym = sum(m == "symbol" for m in self.matched_by)
        miss = ", ".join(self.missing[:10]) + (f", ... (+{len(self.missing) - 10})" if len(self.missing) > 10 else "")
        return (f"{self.n_mapped}/{self.n_panel} panel genes mapped ({100 * self.coverage:.1f} %): {n_ens} by "
                f"Ensembl id, {n_sym} by symbol; missing: {miss or 'none'}")


def map_panel_to_vocab(panel_genes: Sequence[str], vocab: Sequence[str] | None = None, *,
                       panel_gene_ids: Sequence[str] | None = None,
                       vocab_ids: Sequence[str] | None = None,
                       vocab_symbols: Sequence[str] | None = None,
                       min_coverage: float = 0.0) -> VocabMapping:
    """Map a panel onto an encoder vocabulary by Ensembl id (version suffix ignored), else by symbol.

    Parameters
    ----------
    panel_genes
        Panel gene symbols, in panel (= count column) order.
    vocab
        The vocabulary as one list; each entry is recognised as an Ensembl id (``ENSG...``) or a symbol.
        Alternatively give ``vocab_ids`` and/or ``vocab_symbols`` (aligned lists, same length).
    panel_gene_ids
        Ensembl ids aligned with ``panel_genes`` (optional; without them matching is by symbol only).
    min_coverage
        Raise :class:`HescapeDataError` when fewer than this fraction of the panel is mapped.

    Symbols are compared case-insensitively. When a vocabulary lists a gene twice the first entry wins.
    """
    if vocab is not None:
        if vocab_ids is not None or vocab_symbols is not None:
            msg = "give the vocabulary either as `vocab` or as `vocab_ids`/`vocab_symbols`, not both"
            raise HescapeDataError(msg)
        entries = [str(v).strip() for v in vocab]
        is_id = [bool(_ENSEMBL.match(v)) for v in entries]
        vocab_ids = [v if i else "" for v, i in zip(entries, is_id, strict=True)]
        vocab_symbols = [v if not i else "" for v, i in zip(entries, is_id, strict=True)]
    if vocab_ids is None and vocab_symbols is None:
        msg = "no vocabulary given: expected `vocab`, `vocab_ids` or `vocab_symbols`"
        raise HescapeDataError(msg)
    n_vocab = len(vocab_ids if vocab_ids is not None else vocab_symbols)
    if vocab_ids is not None and vocab_symbols is not None and len(vocab_ids) != len(vocab_symbols):
        msg = (f"vocab_ids and vocab_symbols must be aligned: expected equal lengths, found {len(vocab_ids)} and "
               f"{len(vocab_symbols)}")
        raise HescapeDataError(msg)
    if panel_gene_ids is not None and len(panel_gene_ids) != len(panel_genes):
        msg = (f"panel_gene_ids must be aligned with panel_genes: expected {len(panel_genes)} ids, found "
               f"{len(panel_gene_ids)}")
        raise HescapeDataError(msg)
    by_id: dict[str, int] = {}
    for i, v in enumerate(vocab_ids or ()):
        if v:
            by_id.setdefault(_strip_version(str(v)), i)
    by_sym: dict[str, int] = {}
    for i, v in enumerate(vocab_symbols or ()):
        if v:
            by_sym.setdefault(str(v).strip().upper(), i)
    index = np.full(len(panel_genes), -1, dtype=np.int64)
    how = [""] * len(panel_genes)
    for k, g in enumerate(panel_genes):
        gid = _strip_version(str(panel_gene_ids[k])) if panel_gene_ids is not None else ""
        if gid and gid in by_id:
            index[k], how[k] = by_id[gid], "ensembl"
        elif str(g).strip().upper() in by_sym:
            index[k], how[k] = by_sym[str(g).strip().upper()], "symbol"
    missing = tuple(str(g) for g, i in zip(panel_genes, index, strict=True) if i < 0)
    m = VocabMapping(index=index, n_vocab=n_vocab, panel_genes=tuple(map(str, panel_genes)),
                     matched_by=tuple(how), missing=missing)
    if m.coverage < min_coverage:
        msg = (f"expected at least {100 * min_coverage:.1f} % of the panel in the vocabulary, found "
               f"{m.report()}; check that the vocabulary belongs to the same species and id type")
        raise HescapeDataError(msg)
    return m


_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "id")
_SYMBOL_COLUMNS = ("gene_name", "gene_symbol", "symbol", "gene", "name")


def read_vocabulary(path: str | os.PathLike) -> tuple[list[str] | None, list[str] | None]:
    """Read an encoder vocabulary file: ``(ids, symbols)`` in vocabulary order (either may be None).

    Accepts a CSV/TSV with a header naming an id column (``gene_ids``, ``gene_id``, ``ensembl_id``, ...) and/or
    a symbol column (``gene_name``, ``symbol``, ``gene``, ...), e.g. scFoundation's
    ``OS_scRNA_gene_index.19264.tsv``; or a headerless file with one gene per line.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"vocabulary file {path} does not exist; expected a CSV/TSV or one-gene-per-line text file"
        raise HescapeDataError(msg)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        msg = f"vocabulary file {path} is empty; expected one gene per line or a CSV/TSV with a header"
        raise HescapeDataError(msg)
    delim = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    if delim is None:
        return ([s.strip() for s in lines], None) if _ENSEMBL.match(lines[0].strip()) else (None,
                                                                                             [s.strip() for s in lines])
    rows = list(csv.DictReader(lines, delimiter=delim))
    header = {h.strip().lower(): h for h in (rows[0].keys() if rows else [])}
    id_col = next((header[c] for c in _ID_COLUMNS if c in header), None)
    sym_col = next((header[c] for c in _SYMBOL_COLUMNS if c in header), None)
    if id_col is None and sym_col is None:
        msg = (f"vocabulary file {path}: expected a column among {_ID_COLUMNS + _SYMBOL_COLUMNS}, found "
               f"{list(header.values())}; rename the gene column")
        raise HescapeDataError(msg)
    ids = [r[id_col].strip() for r in rows] if id_col else None
    syms = [r[sym_col].strip() for r in rows] if sym_col else None
    return ids, syms


def _as_2d(counts):
    """Counts as a 2-D numpy array or CSR matrix (rows can be sliced); torch tensors become numpy."""
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    if sp.issparse(counts):
        return counts.tocsr()
    counts = np.asarray(counts)
    return counts[None, :] if counts.ndim == 1 else counts


def _dense_rows(counts) -> np.ndarray:
    if sp.issparse(counts):
        counts = counts.toarray()
    if hasattr(counts, "detach"):  # torch tensor
        counts = counts.detach().cpu().numpy()
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        msg = f"expected counts of shape (genes,) or (rows, genes), found {x.shape}"
        raise HescapeDataError(msg)
    if not np.isfinite(x).all() or (x < 0).any():
        msg = "expected raw counts (finite, >= 0); found NaN/inf or negative values: pass raw counts, not log values"
        raise HescapeDataError(msg)
    return x


def _check_mapping(mapping: VocabMapping, n_cols: int) -> None:
    if mapping.n_panel != n_cols:
        msg = (f"count matrix has {n_cols} genes but the vocabulary mapping was built for {mapping.n_panel}; "
               "map the same panel the counts are in")
        raise HescapeDataError(msg)
    if mapping.n_mapped == 0:
        msg = f"no panel gene is in the encoder vocabulary ({mapping.report()}); check the vocabulary file"
        raise HescapeDataError(msg)


def reindex_to_vocab(counts, mapping: VocabMapping) -> np.ndarray:
    """``(rows, n_vocab)`` float32: panel columns moved to their vocabulary positions, zeros elsewhere.

    Panel genes outside the vocabulary are dropped; two panel genes mapped to one vocabulary entry are summed.
    """
    x = _dense_rows(counts)
    _check_mapping(mapping, x.shape[1])
    out = np.zeros((x.shape[0], mapping.n_vocab), dtype=np.float32)
    keep = np.flatnonzero(mapping.index >= 0)
    dst = mapping.index[keep]
    if len(np.unique(dst)) == len(dst):
        out[:, dst] = x[:, keep]
    else:
        np.add.at(out.T, dst, x[:, keep].T)
    return out


def nicheformer_tokenize(counts, mapping: VocabMapping, technology_mean, *,
                         context_length: int = NICHEFORMER_CONTEXT_LENGTH, target_sum: float = 1e4,
                         aux_tokens: int = NICHEFORMER_AUX_TOKENS, pad_token: int = NICHEFORMER_PAD_TOKEN,
                         context: tuple[str, str, str] | None = None, chunk_rows: int = 1024) -> np.ndarray:
    """Nicheformer rank tokens of raw counts, ``(rows, context_length)`` int64.

    Parameters
    ----------
    counts
        Raw counts in panel order, ``(rows, genes)`` or ``(genes,)`` (numpy, scipy sparse or torch).
    mapping
        The panel's place in Nicheformer's vocabulary (:func:`map_panel_to_vocab` on the model's Ensembl ids).
    technology_mean
        Mean expression of every vocabulary gene for the technology (``xenium_mean_script.npy``),
        ``(n_vocab,)``; NaN is treated as 0 and 0 as 1 (no scaling), as Nicheformer does.
    context_length
        Sequence length, context tokens included (1,500 for the released model).
    context
        ``(species, assay, modality)`` names (see :data:`NICHEFORMER_CONTEXT_IDS`), e.g.
        ``("human", "xenium", "spatial")``, to put ``[species, assay, modality]`` in front; None for genes only.

    Ties between equal values are broken by vocabulary index (smallest first); the row's total is taken over
    the panel genes (all counts of the spot) before genes outside the vocabulary are dropped.
    """
    mean = np.asarray(technology_mean, dtype=np.float64).ravel()
    if len(mean) != mapping.n_vocab:
        msg = (f"technology mean has {len(mean)} entries but the vocabulary has {mapping.n_vocab}; use the mean "
               "file that ships with the same model")
        raise HescapeDataError(msg)
    prefix: list[int] = []
    if context is not None:
        try:
            sp_, assay, mod = context
            prefix = [NICHEFORMER_CONTEXT_IDS["species"][sp_.lower()], NICHEFORMER_CONTEXT_IDS["assay"][assay.lower()],
                      NICHEFORMER_CONTEXT_IDS["modality"][mod.lower()]]
        except (KeyError, ValueError, AttributeError):
            msg = (f"context must be (species, assay, modality) with names from NICHEFORMER_CONTEXT_IDS, found "
                   f"{context!r}; e.g. ('human', 'xenium', 'spatial')")
            raise HescapeDataError(msg) from None
    n_genes_out = context_length - len(prefix)
    if n_genes_out < 1:
        msg = f"context_length must leave room for gene tokens: expected > {len(prefix)}, found {context_length}"
        raise HescapeDataError(msg)
    mean = np.nan_to_num(mean, nan=0.0)
    mean[mean == 0] = 1.0
    keep = np.flatnonzero(mapping.index >= 0)
    # Columns in vocabulary order, so that a stable sort breaks ties by vocabulary index.
    order = keep[np.argsort(mapping.index[keep], kind="stable")]
    vocab_idx = mapping.index[order]
    counts = _as_2d(counts)
    n_rows = counts.shape[0]
    out = np.full((n_rows, context_length), pad_token, dtype=np.int64)
    if prefix:
        out[:, : len(prefix)] = prefix
    width = min(n_genes_out, len(order))
    for start in range(0, n_rows, chunk_rows):
        x = _dense_rows(counts[start:start + chunk_rows])
        if start == 0:
            _check_mapping(mapping, x.shape[1])
        total = x.sum(axis=1, keepdims=True)
        scaled = np.divide(x, total, out=np.zeros_like(x), where=total > 0) * target_sum
        v = scaled[:, order] / mean[vocab_idx]
        rank = np.argsort(-v, axis=1, kind="stable")[:, :width]
        top = np.take_along_axis(v, rank, axis=1)
        tok = vocab_idx[rank] + aux_tokens
        out[start:start + len(x), len(prefix):len(prefix) + width] = np.where(top > 0, tok, pad_token)
    return out


def _target_resolution(total: np.ndarray, mode: str) -> np.ndarray:
    m = re.fullmatch(r"([taf])(\d+(?:\.\d+)?)", mode)
    if m is None:
        msg = f"target resolution must be 't<N>', 'a<N>' or 'f<N>' (e.g. 't4', 'a5', 'f1'), found {mode!r}"
        raise HescapeDataError(msg)
    kind, n = m.group(1), float(m.group(2))
    with np.errstate(divide="ignore"):
        log_total = np.log10(total)
    if kind == "t":
        return np.full_like(total, n)
    if kind == "a":
        return log_total + n
    with np.errstate(divide="ignore"):
        return np.log10(total * n)


def scfoundation_input(counts, mapping: VocabMapping, *, target_sum: float = 1e4,
                       target_resolution: str = "t4") -> np.ndarray:
    """scFoundation's dense input ``(rows, n_vocab + 2)`` float32: ``log1p`` values, then **T**, then **S**.

    ``counts`` are raw, in panel order; ``mapping`` places the panel in the encoder's gene list (19,264 genes
    for the released model: :func:`map_panel_to_vocab` on its ``gene_name`` column). The row total (for the
    scaling and for S = log10(total)) is taken over all panel genes. A row of zeros gives zeros and
    T/S of ``-inf`` for ``"a"``/``"f"`` modes and S; drop empty spots before encoding.
    """
    x = _dense_rows(counts)
    total = x.sum(axis=1)
    v = reindex_to_vocab(x, mapping).astype(np.float64)
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    out = np.empty((x.shape[0], mapping.n_vocab + 2), dtype=np.float32)
    out[:, : mapping.n_vocab] = np.log1p(v * scale[:, None])
    with np.errstate(divide="ignore"):
        out[:, mapping.n_vocab] = _target_resolution(total, target_resolution)
        out[:, mapping.n_vocab + 1] = np.log10(total)
    return out


def scfoundation_gather(values: np.ndarray, *, pad_token: int = SCFOUNDATION_PAD_TOKEN
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the positive entries of each row, in ascending index order, padded to the longest row.

    Returns ``(values, position_ids, padding_mask)``, each ``(rows, L)`` with ``L`` the largest number of
    positive entries in a row; padding positions hold ``pad_token`` in both ``values`` and ``position_ids``
    (as scFoundation does) and True in ``padding_mask``.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        msg = f"expected a (rows, n_vocab + 2) matrix from scfoundation_input, found shape {values.shape}"
        raise HescapeDataError(msg)
    pos = values > 0
    n = pos.sum(axis=1)
    width = int(n.max()) if len(n) else 0
    # Positive entries first (False < True after negation), ascending index within each group: stable sort.
    idx = np.argsort(~pos, axis=1, kind="stable")[:, :width]
    pad = np.arange(width)[None, :] >= n[:, None]
    vals = np.where(pad, np.float32(pad_token), np.take_along_axis(values, idx, axis=1)).astype(np.float32)
    ids = np.where(pad, pad_token, idx).astype(np.int64)
    return vals, ids, pad
