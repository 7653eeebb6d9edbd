"""Donor-level splits: a donor never crosses splits.

Split assignments live only in a dataset's ``manifest.json`` (the shards carry no split column), so
re-splitting a dataset rewrites that one file, atomically (:func:`apply_splits`). Assignments come from
whole donors drawn at random (:func:`donor_split_assignment`) or from the reference split presets of the
HESCAPE panels (:func:`preset_split_assignment`).
"""

from __future__ import annotations

import difflib
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import HescapeDataError, SplitLeakageError

__all__ = ["check_no_donor_leakage", "donor_split_assignment", "preset_split_assignment", "apply_splits",
           "preset_donors", "known_sample_donor"]

SPLITS = ("train", "val", "test")


def check_no_donor_leakage(samples: Iterable[dict]) -> None:
    """Raise :class:`SplitLeakageError` if any donor has samples in more than one split.

    ``samples`` are dicts with ``name``, ``donor`` and ``split`` (the manifest's sample table).
    """
    where: dict[str, set[str]] = defaultdict(set)
    names: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        where[s["donor"]].add(s["split"])
        names[s["donor"]].append(f"{s['name']}:{s['split']}")
    leaks = {d: sorted(v) for d, v in where.items() if len(v) > 1}
    if leaks:
        detail = "; ".join(f"{d} in {v} ({', '.join(names[d])})" for d, v in sorted(leaks.items()))
        msg = f"donor leakage: expected each donor in exactly one split, found {detail}; move all of a donor's samples to one split"
        raise SplitLeakageError(msg)


def donor_split_assignment(samples: list[dict], *, n_val: int = 1, n_test: int = 1, seed: int = 0) -> dict[str, str]:
    """``{sample name: split}`` with whole donors drawn at random: ``n_test`` donors to test, ``n_val`` to val.

    Donors are sorted, then shuffled with ``numpy.random.default_rng(seed)``, so the result depends only on the
    set of donors and the seed. At least one donor is left for train.
    """
    if n_val < 0 or n_test < 0:
        msg = f"--val and --test must be >= 0, found {n_val} and {n_test}"
        raise HescapeDataError(msg)
    donors = sorted({s["donor"] for s in samples})
    if len(donors) < n_val + n_test + 1:
        msg = (f"expected at least {n_val + n_test + 1} donors for {n_val} val + {n_test} test donors and one train "
               f"donor, found {len(donors)} ({donors}); lower --val/--test")
        raise HescapeDataError(msg)
    order = [donors[i] for i in np.random.default_rng(seed).permutation(len(donors))]
    split_of = {d: "test" for d in order[:n_test]}
    split_of.update({d: "val" for d in order[n_test:n_test + n_val]})
    split_of.update({d: "train" for d in order[n_test + n_val:]})
    return {s["name"]: split_of[s["donor"]] for s in samples}


def preset_split_assignment(samples: list[dict], preset: str, *, match: str = "name",
                            conflict: str | None = None) -> tuple[dict[str, str], list[str]]:
    """``({sample name: split}, preset ids absent from the dataset)`` from a panel's reference split preset.

    Each preset row's ``id`` (e.g. ``TENX95``) is matched against the dataset's ``name`` column (``match="name"``)
    or ``donor`` column (``match="donor"``). Every dataset sample must be matched; preset ids that the dataset
    lacks are returned (a dataset may hold a subset of the reference samples).

    A reference preset may list one id in two splits (``human-skin-panel`` has ``TENX117`` in val and test);
    such a sample can only be in one split here: pass ``conflict="train"|"val"|"test"`` to choose, else the
    call is refused.
    """
    from .panels import load_split_preset

    if match not in ("name", "donor"):
        msg = f"match must be 'name' or 'donor', found {match!r}"
        raise HescapeDataError(msg)
    if conflict is not None and conflict not in SPLITS:
        msg = f"conflict must be one of {list(SPLITS)} or None, found {conflict!r}"
        raise HescapeDataError(msg)
    table = load_split_preset(preset)
    splits_of_id: dict[str, list[str]] = defaultdict(list)
    for split, rows in table.items():
        for r in rows:
            splits_of_id[r["id"]].append(split)
    dup = {i: v for i, v in splits_of_id.items() if len(v) > 1}
    if dup and conflict is None:
        detail = "; ".join(f"{i} in {v}" for i, v in sorted(dup.items()))
        msg = (f"preset {preset!r} lists samples in more than one split ({detail}); expected each sample in one "
               f"split: choose one with conflict='test' (CLI: --conflict test), or split with --by donor")
        raise HescapeDataError(msg)
    split_of_id = {i: (conflict if len(v) > 1 else v[0]) for i, v in splits_of_id.items()}
    out, unmatched = {}, []
    for s in samples:
        key = s[match]
        if key in split_of_id:
            out[s["name"]] = split_of_id[key]
        else:
            unmatched.append(key)
    if unmatched:
        ids = sorted(split_of_id)
        hints = {u: difflib.get_close_matches(u, ids, n=1) for u in unmatched}
        shown = ", ".join(f"{u!r}" + (f" (close: {h[0]!r})" if h else "") for u, h in hints.items())
        msg = (f"preset {preset!r}: expected every dataset {match} to be one of its sample ids, found "
               f"{len(unmatched)} unmatched: {shown}; the preset's ids are {ids}; rename the samples, use "
               f"--match {'donor' if match == 'name' else 'name'}, or split with --by donor")
        raise HescapeDataError(msg)
    absent = sorted(set(split_of_id) - {s[match] for s in samples})
    return out, absent


def _donor_key(row: dict[str, str]) -> str:
    """Donor id of a preset row: ``<study> / <patient>``, or the sample id when the patient is not given.

    The presets' ``patient`` labels are numbered within each study (``dataset_title``): "patient 1" of two studies
    are two people, while two sections of one study's "Patient 1" are one donor.
    """
    patient = " ".join(str(row.get("patient") or "").split())
    if not patient:
        return row["id"]
    return f"{' '.join(row.get('dataset_title', '').split())} / {patient.lower().replace('patient', 'patient ').strip()}"


def preset_donors(preset: str) -> dict[str, str]:
    """``{sample id: donor id}`` from a panel preset's ``patient`` column (see :func:`_donor_key`)."""
    from .panels import load_split_preset

    return {r["id"]: " ".join(_donor_key(r).split()) for rows in load_split_preset(preset).values() for r in rows}


def known_sample_donor(sample: str) -> str | None:
    """The donor of a reference HESCAPE sample id (``TENX95``, ``NCBI783``, ...) in any vendored preset, else None."""
    from .panels import list_panels

    for panel in list_panels():
        donors = preset_donors(panel)
        if sample in donors:
            return donors[sample]
    return None


def apply_splits(path: str | os.PathLike, assignment: dict[str, str], donors: dict[str, str] | None = None) -> dict:
    """Rewrite the split (and optionally the donor) of every sample in ``path/manifest.json``. Returns the manifest.

    ``donors`` maps sample names to new donor ids (e.g. from a preset's ``patient`` column); samples absent
    from it keep theirs. The new assignment is checked first (every sample assigned, known split names, no
    donor leakage) and the manifest is replaced atomically, so a refused or interrupted call leaves the old
    one intact.
    """
    from .arrow import read_manifest, write_manifest

    path = Path(path)
    manifest = read_manifest(path)
    names = [s["name"] for s in manifest["samples"]]
    missing = [n for n in names if n not in assignment]
    if missing:
        msg = f"expected a split for every sample, found none for {missing}; assign them too"
        raise HescapeDataError(msg)
    bad = sorted({v for v in assignment.values() if v not in SPLITS})
    if bad:
        msg = f"expected split names among {list(SPLITS)}, found {bad}"
        raise HescapeDataError(msg)
    donors = donors or {}
    new_samples = [{**s, "split": assignment[s["name"]], "donor": donors.get(s["name"], s["donor"])}
                   for s in manifest["samples"]]
    check_no_donor_leakage(new_samples)
    manifest = {**manifest, "samples": new_samples}
    write_manifest(path, manifest)
    return manifest
