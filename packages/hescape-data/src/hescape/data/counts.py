"""Generic checks and utilities for raw count matrices (used by every reader of expression data).

HESCAPE datasets store **raw counts** (the published HESCAPE dataset's ``gexp`` is raw; every encoder applies its
own normalisation). A matrix of log-normalised or scaled values written into a dataset would be silently
normalised twice, so every count input is checked here: finite, non-negative, integer-valued.
"""

from __future__ import annotations

import numpy as np

from .errors import InputFormatError

__all__ = ["check_counts"]


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
        With the number of offending values, examples and how to pass raw counts.
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
    if v.dtype.kind == "f" and not allow_non_integer:
        frac = v != np.floor(v)
        if frac.any():
            ex = [round(float(x), 4) for x in np.unique(v[frac])[:3]]
            msg = (f"{where}: expected raw integer counts, found {int(frac.sum())} non-integer values (e.g. {ex}; "
                   "log-normalised or scaled data?); pass the raw count matrix as written by Space Ranger / XOA "
                   "(or an AnnData's layers['counts']), or --allow-non-integer-counts if the values are counts "
                   "by design")
            raise InputFormatError(msg)
