"""A gene panel placed in a pretrained encoder's vocabulary: Ensembl id first, symbol second, with its coverage.

Pretrained gene encoders know a fixed gene list: Nicheformer the 20,310 Ensembl ids of ``model.h5ad``
(theislab/nicheformer ``data/model_means/model.h5ad``), scFoundation the 19,264 symbols of
``OS_scRNA_gene_index.19264.tsv`` (biomap-research/scFoundation ``model/``). A dataset's panel is mapped into that
list once, when the encoder is built; :class:`VocabMapping` records where every panel gene went and how many
were found, and :func:`compact_counts` moves ``(B, G)`` panel counts to the mapped vocabulary entries on the
counts' device. The vocabulary files ship with the encoders' weights and are not bundled: read them with
:func:`read_vocabulary` or pass the list itself.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..base import GeneEncoder
from ..contracts import GeneContract
from ..errors import HescapeModelError

__all__ = ["VocabMapping", "map_panel_to_vocab", "read_vocabulary", "load_vocabulary", "check_coverage",
           "compact_counts", "counts_in_vocab", "check_raw_counts", "VocabGeneEncoder", "LOW_COVERAGE"]

log = logging.getLogger(__name__)

#: Below this fraction of the panel found in the vocabulary an encoder warns (it refuses a coverage of 0).
LOW_COVERAGE = 0.5

_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$")
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "id")
_SYMBOL_COLUMNS = ("gene_name", "gene_symbol", "symbol", "gene", "name")


def _strip_version(gene_id: str) -> str:
    m = _ENSEMBL.match(gene_id.strip())
    return m.group(1) if m else gene_id.strip()


@dataclass(frozen=True)
class VocabMapping:
    """Where each panel gene sits in an encoder vocabulary.

    Attributes
    ----------
    index
        ``(G,)`` int64: vocabulary position of panel gene ``i``, or -1 when it is not in the vocabulary.
    n_vocab
        Size of the vocabulary.
    panel_genes
        The panel's gene names, in count-column order.
    matched_by
        ``"ensembl"``, ``"symbol"`` or ``""`` for each panel gene.
    missing
        Panel genes not found.
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
        """One line: ``n mapped / n panel (pct): by Ensembl id / by symbol; missing: …``."""
        n_ens = sum(m == "ensembl" for m in self.matched_by)
        n_sym = sum(m == "symbol" for m in self.matched_by)
        miss = ", ".join(self.missing[:10]) + (f", … (+{len(self.missing) - 10})" if len(self.missing) > 10 else "")
        return (f"{self.n_mapped}/{self.n_panel} panel genes mapped ({100 * self.coverage:.1f} %): {n_ens} by "
                f"Ensembl id, {n_sym} by symbol; missing: {miss or 'none'}")

    def compact(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(columns, slots, vocab_ids)``: panel column ``columns[k]`` adds into slot ``slots[k]``, and slot ``s``
        is vocabulary entry ``vocab_ids[s]``; slots are in ascending vocabulary order, one per distinct entry."""
        cols = np.flatnonzero(self.index >= 0)
        vocab_ids, slots = np.unique(self.index[cols], return_inverse=True)
        return cols, slots.astype(np.int64), vocab_ids.astype(np.int64)


def map_panel_to_vocab(panel_genes: Sequence[str], vocab: Sequence[str] | None = None, *,
                       panel_gene_ids: Sequence[str] | None = None, vocab_ids: Sequence[str] | None = None,
                       vocab_symbols: Sequence[str] | None = None, min_coverage: float = 0.0) -> VocabMapping:
    """Map a panel onto an encoder vocabulary by Ensembl id (version suffix ignored), else by symbol.

    Parameters
    ----------
    panel_genes
        Panel gene symbols, in count-column order.
    vocab
        The vocabulary as one list; each entry is taken as an Ensembl id (``ENSG…``) or else a symbol.
        Alternatively give ``vocab_ids`` and/or ``vocab_symbols`` (aligned lists of one length).
    panel_gene_ids
        Ensembl ids aligned with ``panel_genes`` (without them matching is by symbol only).
    min_coverage
        Raise when fewer than this fraction of the panel is mapped.

    Returns
    -------
    VocabMapping
        Symbols are compared case-insensitively; when a vocabulary lists a gene twice the first entry wins.

    Raises
    ------
    HescapeModelError
        No vocabulary, misaligned lists, or a coverage under ``min_coverage``.
    """
    if vocab is not None:
        if vocab_ids is not None or vocab_symbols is not None:
            msg = "give the vocabulary either as `vocab` or as `vocab_ids`/`vocab_symbols`, not both"
            raise HescapeModelError(msg)
        entries = [str(v).strip() for v in vocab]
        is_id = [bool(_ENSEMBL.match(v)) for v in entries]
        vocab_ids = [v if i else "" for v, i in zip(entries, is_id, strict=True)]
        vocab_symbols = [v if not i else "" for v, i in zip(entries, is_id, strict=True)]
    if vocab_ids is None and vocab_symbols is None:
        msg = "no vocabulary given: expected `vocab`, `vocab_ids` or `vocab_symbols`"
        raise HescapeModelError(msg)
    n_vocab = len(vocab_ids if vocab_ids is not None else vocab_symbols)
    if vocab_ids is not None and vocab_symbols is not None and len(vocab_ids) != len(vocab_symbols):
        msg = (f"vocab_ids and vocab_symbols must be aligned: expected equal lengths, found {len(vocab_ids)} and "
               f"{len(vocab_symbols)}")
        raise HescapeModelError(msg)
    if panel_gene_ids is not None and len(panel_gene_ids) != len(panel_genes):
        msg = (f"panel_gene_ids must be aligned with panel_genes: expected {len(panel_genes)} ids, found "
               f"{len(panel_gene_ids)}")
        raise HescapeModelError(msg)
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
        raise HescapeModelError(msg)
    return m


def _read_h5ad_index(path: Path) -> list[str]:
    try:
        import h5py
    except ImportError:
        msg = f"reading the vocabulary {path} needs h5py: pip install h5py, or give the gene list as a text file"
        raise HescapeModelError(msg) from None
    try:
        with h5py.File(path, "r") as f:
            var = f["var"]
            if isinstance(var, h5py.Dataset):  # anndata < 0.7: a structured array with an 'index' field
                raw = var["index"]
            else:
                raw = var[var.attrs.get("_index", "_index")][:]
    except (OSError, KeyError) as e:
        msg = f"vocabulary file {path}: expected an AnnData .h5ad whose var index lists the genes ({e})"
        raise HescapeModelError(msg) from None
    return [v.decode() if isinstance(v, bytes) else str(v) for v in raw]


def read_vocabulary(path: str | os.PathLike) -> tuple[list[str] | None, list[str] | None]:
    """Read an encoder vocabulary file: ``(ids, symbols)`` in vocabulary order (either may be None).

    Accepts an AnnData ``.h5ad`` whose var index lists the genes (Nicheformer's ``model.h5ad``: 20,310 Ensembl
    ids; read with h5py), a CSV/TSV with a header naming an id column (``gene_ids``, ``gene_id``,
    ``ensembl_id``, …) and/or a symbol column (``gene_name``, ``symbol``, ``gene``, …; scFoundation's
    ``OS_scRNA_gene_index.19264.tsv``), or a headerless file with one gene per line.

    Raises
    ------
    HescapeModelError
        Missing, empty or unreadable file, or a table without a gene column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"vocabulary file {path} does not exist; expected a .h5ad, a CSV/TSV or one-gene-per-line text file"
        raise HescapeModelError(msg)
    if path.suffix == ".h5ad":
        genes = _read_h5ad_index(path)
        is_id = [bool(_ENSEMBL.match(g)) for g in genes]
        if all(is_id):
            return genes, None
        return ([g if i else "" for g, i in zip(genes, is_id, strict=True)] if any(is_id) else None,
                [g if not i else "" for g, i in zip(genes, is_id, strict=True)])
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        msg = f"vocabulary file {path} is empty; expected one gene per line or a CSV/TSV with a header"
        raise HescapeModelError(msg)
    delim = "\t" if "\t" in lines[0] else "," if "," in lines[0] else None
    if delim is None and len(lines) > 1 and lines[0].strip().lower() in _ID_COLUMNS + _SYMBOL_COLUMNS:
        delim = ","  # a one-column CSV whose header names the column
    if delim is None:
        genes = [s.strip() for s in lines]
        return (genes, None) if _ENSEMBL.match(genes[0]) else (None, genes)
    rows = list(csv.DictReader(lines, delimiter=delim))
    header = {h.strip().lower(): h for h in (rows[0].keys() if rows else [])}
    id_col = next((header[c] for c in _ID_COLUMNS if c in header), None)
    sym_col = next((header[c] for c in _SYMBOL_COLUMNS if c in header), None)
    if id_col is None and sym_col is None:
        msg = (f"vocabulary file {path}: expected a column among {_ID_COLUMNS + _SYMBOL_COLUMNS}, found "
               f"{list(header.values())}; rename the gene column")
        raise HescapeModelError(msg)
    ids = [r[id_col].strip() for r in rows] if id_col else None
    syms = [r[sym_col].strip() for r in rows] if sym_col else None
    return ids, syms


def load_vocabulary(vocabulary: str | os.PathLike | Sequence[str], *, name: str,
                    where: str) -> tuple[list[str] | None, list[str] | None, str]:
    """An encoder's ``vocabulary`` option as ``(ids, symbols, label)``: a file (see :func:`read_vocabulary`) or the
    gene list itself (each entry an Ensembl id or a symbol). ``label`` names the source for messages."""
    if vocabulary is None:
        msg = f"gene encoder {name!r} needs its vocabulary: pass vocabulary=<file>, {where}"
        raise HescapeModelError(msg)
    if isinstance(vocabulary, str | os.PathLike):
        ids, syms = read_vocabulary(vocabulary)
        return ids, syms, Path(vocabulary).name
    genes = [str(v).strip() for v in vocabulary]
    if not genes:
        msg = f"gene encoder {name!r}: the vocabulary list is empty; {where}"
        raise HescapeModelError(msg)
    is_id = [bool(_ENSEMBL.match(g)) for g in genes]
    return ([g if i else "" for g, i in zip(genes, is_id, strict=True)],
            [g if not i else "" for g, i in zip(genes, is_id, strict=True)], f"a list of {len(genes)} genes")


def check_coverage(mapping: VocabMapping, *, name: str, vocab_label: str, warn_below: float = LOW_COVERAGE) -> None:
    """Log the mapping's coverage; refuse a panel with no gene in the vocabulary, warn under ``warn_below``."""
    line = f"gene encoder {name!r}, vocabulary {vocab_label}: {mapping.report()}"
    if mapping.n_mapped == 0:
        msg = (f"{line}. Expected at least one panel gene in the vocabulary: give the panel's Ensembl ids "
               "(gene_ids, the dataset manifest's) or a vocabulary of the same species and id type")
        raise HescapeModelError(msg)
    if mapping.coverage < warn_below:
        warnings.warn(f"{line}; the encoder sees only these genes", stacklevel=3)
    else:
        log.info(line)


def compact_counts(counts: torch.Tensor, columns: torch.Tensor, slots: torch.Tensor, n_slots: int,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(B, G)`` panel counts → ``(B, n_slots)``: column ``columns[k]`` added into slot ``slots[k]``.

    With :meth:`VocabMapping.compact` this is the panel reindexed to the mapped vocabulary entries (genes outside
    the vocabulary dropped, two panel genes on one entry summed), without materialising the whole vocabulary.
    """
    x = counts.to(dtype)
    out = x.new_zeros(x.shape[0], n_slots)
    return out.index_add_(1, slots, x.index_select(1, columns))


def check_raw_counts(counts: torch.Tensor) -> None:
    """Refuse counts that are not raw (NaN, inf or negative values) in one message."""
    if counts.ndim != 2:
        msg = f"expected raw counts of shape (B, genes), found {tuple(counts.shape)}"
        raise HescapeModelError(msg)
    if (~torch.isfinite(counts) | (counts < 0)).any():
        msg = "expected raw counts (finite, >= 0); found NaN, inf or negative values: pass raw counts, not log values"
        raise HescapeModelError(msg)


def counts_in_vocab(counts, mapping: VocabMapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw counts in panel order — ``(B, G)`` or ``(G,)``; torch, numpy, or anything with ``toarray()`` — as
    ``(B, U)`` float64 counts of the mapped vocabulary entries and their ``(U,)`` ascending vocabulary indices, on
    the counts' device (the standalone tokenisers' input; an encoder keeps the plan as buffers instead)."""
    if hasattr(counts, "toarray"):
        counts = counts.toarray()
    counts = torch.as_tensor(counts)
    counts = counts[None] if counts.ndim == 1 else counts
    check_raw_counts(counts)
    if counts.shape[1] != mapping.n_panel:
        msg = (f"count matrix has {counts.shape[1]} genes but the vocabulary mapping was built for {mapping.n_panel}; "
               "map the same panel the counts are in")
        raise HescapeModelError(msg)
    cols, slots, vocab_ids = (torch.from_numpy(a).to(counts.device) for a in mapping.compact())
    return compact_counts(counts, cols, slots, len(vocab_ids)), vocab_ids


class VocabGeneEncoder(GeneEncoder):
    """A gene encoder over a pretrained gene vocabulary (Nicheformer, scFoundation).

    :meth:`_map_panel` places the panel in the vocabulary once (refusing a coverage of 0, warning under 50 %) and
    keeps the compact plan of :meth:`VocabMapping.compact` as buffers (``vocab_columns``, ``vocab_slots``,
    ``vocab_ids``), so they follow the module to its device and are saved in checkpoints (published weights lack
    them: the weights specs list them in ``ignore``). The
    contract set on the encoder records the vocabulary and the encoder's own tokenisation settings
    (``_settings``), so a checkpoint's contract says how this encoder's inputs were made.
    """

    vocab_family: str = ""

    def _map_panel(self, panel, gene_ids, vocabulary, *, name: str, where: str) -> VocabMapping:
        self.panel = tuple(panel)
        ids, syms, label = load_vocabulary(vocabulary, name=name, where=where)
        mapping = map_panel_to_vocab(self.panel, panel_gene_ids=gene_ids, vocab_ids=ids, vocab_symbols=syms)
        check_coverage(mapping, name=name, vocab_label=label)
        self.vocab_mapping = mapping
        cols, slots, vocab_ids = mapping.compact()
        # Persistent: a checkpoint holds the exact panel-to-vocabulary plan it was trained with, so reloading it
        # restores that plan even if the vocabulary file on disk changed since (a changed size is refused).
        self.register_buffer("vocab_columns", torch.from_numpy(cols))
        self.register_buffer("vocab_slots", torch.from_numpy(slots))
        self.register_buffer("vocab_ids", torch.from_numpy(vocab_ids))
        self._settings = {"vocabulary_source": label, "mapped_genes": f"{mapping.n_mapped}/{mapping.n_panel}"}
        return mapping

    def _compact(self, counts: torch.Tensor) -> torch.Tensor:
        """Checked raw counts ``(B, G)`` → ``(B, U)`` float64 over the mapped vocabulary entries (ascending)."""
        check_raw_counts(counts)
        return compact_counts(counts, self.vocab_columns, self.vocab_slots, len(self.vocab_ids))

    @property
    def contract(self) -> GeneContract:
        return self._contract

    @contract.setter
    def contract(self, value: GeneContract) -> None:
        self._contract = dataclasses.replace(value, vocabulary=f"{self.vocab_family}-{self.vocab_mapping.n_vocab}",
                                             options={**value.options, **self._settings})
