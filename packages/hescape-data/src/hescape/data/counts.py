"""Generic checks and utilities for raw count matrices (used by every reader of expression data).

HESCAPE datasets store **raw counts** (the published HESCAPE dataset's ``gexp`` is raw; every encoder applies its
own normalisation). A matrix of log-normalised or scaled values written into a dataset would be silently
normalised twice, so every count input is checked here: finite, non-negative, integer-valued, and at most
:data:`MAX_COUNT` (exact in the dataset's float32).
"""

from __future__ import annotations

import numpy as np

from .errors import InputFormatError

__all__ = ["check_counts", "check_feature_names", "MAX_COUNT"]

#: Largest count accepted in one matrix entry: 2**24 = 16,777,216, the largest integer up to which every integer is
#: exact in float32, the dtype of a dataset's ``gexp`` (IEEE 754 binary32: 24-bit significand). A real entry is far
#: below it (a Visium spot holds ~10**3-10**5 UMIs in all, a Xenium cell ~10**2-10**3 transcripts); a larger value
#: is a corrupt file or data scaled by a large factor, and would be stored rounded.
MAX_COUNT = 2**24


def check_counts(values: np.ndarray, where: str, *, allow_non_integer: bool = False) -> None:
    """Refuse non-finite, negative or (unless allowed) non-integer values of a count matrix.

    Parameters
    ----------
    values
        The stored values of a (sparse) count matrix, any shape; only non-zeros need be given.
    where
        The file or matrix named in the error message.
    allow_non_integer
        Accept fractional values (for users who know their matrix holds counts that are not integers, e.g.
        ambient-RNA-corrected counts). Negative and non-finite values are refused regardless.

    Raises
    ------
    InputFormatError
        With the number of offending values (non-finite, negative, above :data:`MAX_COUNT`, or non-integer
        unless allowed), examples and how to pass raw counts.
    """
    v = np.asarray(values)
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v)
        if bad.any():
            msg = f"{where}: expected finite counts, found {int(bad.sum())} NaN/inf values; the file is corrupt"
            raise InputFormatError(msg)
    if v.dtype.kind in "iuf" and v.size and (v < 0).any():
        msg = (f"{where}: expected counts >= 0, found {int((v < 0).sum())} negative values (e.g. "
               f"{np.unique(v[v < 0])[:3].tolist()}); this is not a raw count matrix: pass the raw counts")
        raise InputFormatError(msg)
    if v.dtype.kind in "iuf" and v.size and (v > MAX_COUNT).any():
        big = v[v > MAX_COUNT]
        msg = (f"{where}: expected counts of at most {MAX_COUNT:,} per entry (real counts are far smaller; larger "
               f"integers are not exact in the dataset's float32), found {big.size} larger values (largest "
               f"{float(big.max()):.4g}); the file is corrupt or the values are scaled: pass the raw counts")
        raise InputFormatError(msg)
    if v.dtype.kind == "f" and not allow_non_integer:
        frac = v != np.floor(v)
        if frac.any():
            ex = [round(float(x), 4) for x in np.unique(v[frac])[:3]]
            msg = (f"{where}: expected raw integer counts, found {int(frac.sum())} non-integer values (e.g. {ex}; "
                   "log-normalised or scaled data?); pass the raw count matrix as written by Space Ranger / XOA "
                   "(or an AnnData's layers['counts']), or --allow-non-integer-counts if the values are counts "
                   "by design")
            raise InputFormatError(msg)


def _bad_name(v, empty_ok: bool = False) -> bool:
    if isinstance(v, str) and v == "" and empty_ok:
        return False
    return not isinstance(v, str) or not v.strip() or v != v.strip() or not v.isprintable()


def check_feature_names(genes, gene_ids, where: str, *, empty_ids: bool = False) -> None:
    """Refuse gene names or ids that are empty, padded with spaces or hold control characters.

    Such a name (``""``, ``" TP53 "``, ``"A\\x00B"``, a line break) never matches a panel or a gene encoder's
    vocabulary, and would be written into the manifest as it is: a damaged feature table (10x ``features/name`` and
    ``features/id``, MEX ``features.tsv``, AnnData ``var``) is refused instead, with examples.

    Parameters
    ----------
    genes, gene_ids
        Feature names and ids, one per matrix column.
    where
        The file or sample named in the error.
    empty_ids
        Accept ``""`` as an id (readers of formats without ids use it for "unknown"); 10x matrices always have ids.

    Raises
    ------
    InputFormatError
        Naming how many names and ids are bad, with up to three examples of each.
    """
    bad_names = [g for g in genes if _bad_name(g)]
    bad_ids = [g for g in gene_ids if _bad_name(g, empty_ids)]
    if bad_names or bad_ids:
        msg = (f"{where}: expected gene names and ids as non-empty printable text without surrounding spaces, found "
               f"{len(bad_names)} names (e.g. {[str(g) for g in bad_names[:3]]}) and {len(bad_ids)} ids (e.g. "
               f"{[str(g) for g in bad_ids[:3]]}) that are not; the feature table is damaged: take the matrix "
               "unmodified from Space Ranger / XOA, or fix the AnnData's var_names / var['gene_ids']")
        raise InputFormatError(msg)
