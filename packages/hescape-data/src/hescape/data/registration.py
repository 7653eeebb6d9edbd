"""Spot-to-image registration check: do the spots lie on the tissue of the H&E image they are paired with?

A misregistration that keeps every spot on the image (a Visium ``tissue_{hires,lowres}_scalef`` halved or doubled,
x and y swapped, the image mirrored or rotated, a Xenium / AnnData µm per pixel off by 2×) builds a dataset
without any other error, with every patch cut from the wrong place. The data themselves tell: spots (cells, bins)
exist where the tissue is, so the image under the spots must look like tissue and the image where there are no
spots like glass.

The measure (:func:`measure_registration`):

* **Tissue pixels** of a thumbnail of the image, after a 3 × 3 mean (:func:`tissue_mask`): darker than the glass
  background (mean RGB below :data:`~hescape.data.ingest.BACKGROUND_LEVEL`, the definition of
  :func:`~hescape.data.ingest.tissue_fraction`) **and** coloured by the stain (max − min of R, G, B at least
  :data:`MIN_TISSUE_CHROMA`). The colour test is needed because slide glass is not always white: on the vendored
  Space Ranger 1.0.0 fixture the glass is grey (mean RGB ≈ 178, chroma ≈ 3) and every pixel is below 220, while
  its H&E-stained tissue has chroma 20–60. Fiducial frames, pen marks, black scan borders and the unstained
  glass are not tissue; neither is fat (white), which is right for this purpose.
* **Tissue score** of a point: the mean :func:`stain_score` (chroma / :data:`MIN_TISSUE_CHROMA`, capped at 1) in a
  disc of the spot's equal-area diameter centred on it (37 samples on a grid inside the disc; samples off the image
  count as glass). Graded below the mask's threshold, so a faded or over-exposed scan (the fixture's image blended
  60 % with white: tissue chroma 5–15) still ranks its tissue above glass (0.985; the binary mask scored 0.776 and
  refused it). The binary mask gives the on-tissue fraction and decides whether there is tissue and glass at all.
* **Positives**: the dataset's spots. **Background**: positions known to be off the tissue: Visium's and Visium HD's
  ``in_tissue = 0`` spots of the positions file when the reader kept them (``SpatialSample.background_um``), else
  the nodes of a square grid over the whole image (about 150 nodes a side) that lie farther than ``max(spot diameter,
  1.5 × the points' median nearest-neighbour spacing)`` from every cell, bin
  or spot (where nothing was measured, there is no tissue).
* **AUROC** (:func:`auroc`, equal to scikit-learn's ``roc_auc_score``) of positive vs background predicted by the
  tissue score, over the points whose centres fall on the image: 1 = every spot on tissue and every background point
  on glass,
  0.5 = no relation. Also the **on-tissue fraction**: spots with at least half their disc on tissue.
* The same AUROC for **alternative registrations** (:data:`ALTERNATIVES`): x and y swapped, the image mirrored
  left–right or top–bottom, rotated by 90°, 180° or 270°, the positions at 0.5–2 times their scale
  (:data:`SCALES`, down to 2 % off) or shifted by ½–2 spot spacings along x or y (:data:`SHIFTS`).

Decision (:func:`check_registration`): refused when an alternative scores at least :data:`ALTERNATIVE_MARGIN`
(:data:`ALTERNATIVE_MARGIN_KNOWN` with a known background of at least :data:`MIN_KNOWN_BACKGROUND` points), or
:data:`MARGIN_Z` standard errors of the difference (:func:`auroc_se`) where that is larger (few spots), higher
(the error names it: "the positions fit the image better with x and y swapped"), or when the AUROC is below
:data:`MIN_AUROC` (known background: Visium, Visium HD) or :data:`MIN_AUROC_INFERRED` (inferred background: tissue outside a
Xenium region, or of an AnnData or HEST sample's spots, counts as background and lowers a correct registration's AUROC, so only a
low floor is safe there). Not decided (recorded with a note) when the thumbnail has almost no tissue or almost no
glass, or fewer than :data:`MIN_POINTS` spots or background points fall on the image. Calibration on the vendored
Space Ranger 1.0.0 fixture (lowres image, 4,235 in-tissue and 757 out-of-tissue spots): correct 0.981; scale factor
×0.5 0.52, ×1.1 0.81, ×2 (80 % of the spots then fall off the image, refused as such); the image transposed (= x/y
swapped) 0.75, mirrored left–right 0.92 and top–bottom 0.79, rotated 90° 0.73 and 180° 0.81: the absolute floor
catches the gross faults, the alternative margin the left–right mirror of this nearly symmetric section (its
un-mirroring scores 0.98, +0.06), and the undoing alternative of every fault scores 0.90–0.98 (×1.1 is undone by
``scale_0.9``: 0.90). With the background inferred instead (the same fixture, its in-tissue flags ignored): correct
0.904 (best alternative 0.880); ×0.5, ×1.1, transposed, mirrored top–bottom, rotated 90° and 180° each have an
alternative ≥ 0.03 better; the left–right mirror (+0.024) passes. Small faults with the known background
(:data:`SCALES` down to 3 %, :data:`SHIFTS`): correct, best alternative −0.006; scale factor ×1.03 +0.049 (undone
by ``scale_0.97``), ×1.05 +0.077, ×0.97 +0.196; positions shifted by 150 full-resolution px (92 µm) along x +0.023,
along y +0.053: refused. Not detected: a shift of about half a spot spacing (80 px, 49 µm: +0.009), and with an
inferred background scale errors below about 5 % and shifts below about 2 spot spacings. Synthetic Xenium bundles
(:mod:`hescape.data.xenium_bundle`, the default :class:`~hescape.data.synthetic.SyntheticConfig`): 0.999–1.0
registered, 0.71–0.88 with ``pixel_size`` doubled (``scale_2`` then scores 0.97–1.0). The numbers are in the
manifest (``registration``). Calibration numbers above are those of the binary mask; with the stain score
(measured in the same way): correct 0.989 (best alternative −0.010) known, 0.911 inferred; ×1.03 +0.059,
×1.1 0.801 (undoing 0.912), shift of 150 px +0.026, mirrored left–right 0.920 (+0.069); inferred from all 4,235
in-tissue spots: ×1.03 +0.043, ×0.97 +0.014 and the 150 px shift +0.018 (not detected), every other fault refused.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MIN_AUROC", "MIN_AUROC_INFERRED", "MAX_ON_TISSUE_FOR_FLOOR", "ALTERNATIVE_MARGIN", "ALTERNATIVE_MARGIN_KNOWN",
           "MIN_KNOWN_BACKGROUND", "MARGIN_Z", "MIN_POINTS", "MIN_TISSUE_CHROMA", "ALTERNATIVES",
           "SCALES", "SHIFTS", "tissue_mask", "stain_score", "auroc", "auroc_se", "measure_registration", "check_registration"]

#: Refuse a registration whose AUROC (spots vs background, by tissue under the disc) is below this, where the
#: background is known (Visium's and Visium HD's in_tissue = 0 spots or bins). The vendored fixture scores 0.981 registered, 0.52–0.92 under
#: scale, swap, mirror and rotation faults.
MIN_AUROC = 0.85
#: The floor where the background is inferred (image away from every spot). Tissue outside the measured region (a
#: Xenium region smaller than the section) counts as background there and
#: lowers a correct registration's AUROC (about 1 − f/2 when a fraction f of the background points is tissue), so
#: this floor only refuses spots that sit on tissue hardly more than random image points do (a shifted alignment:
#: 0.59 on the synthetic Xenium bundle shifted by 900 px).
MIN_AUROC_INFERRED = 0.6
#: ... and only when fewer than this fraction of the spots sit on tissue: spots on tissue with a low AUROC mean tissue
#: around them (an image filled with tissue, spots on a part of it: 0.55 with the fixture cropped to its tissue and
#: 100 of its spots), not a misregistration; a shifted alignment puts spots on glass (the synthetic Xenium bundle
#: shifted by 900 px: 50 % on tissue).
MAX_ON_TISSUE_FOR_FLOOR = 0.7
#: Refuse when an alternative registration scores at least this much higher than the one given. Correct
#: registrations beat every alternative (the fixture's nearest, its left–right mirror, by 0.06 with the known
#: background, 0.024 with an inferred one); an alternative can only tie a correct one (a symmetric section), within
#: the AUROC's sampling error (≈0.005 for the fixture's 4,235 spots).
ALTERNATIVE_MARGIN = 0.03
#: The margin with a known background of at least :data:`MIN_KNOWN_BACKGROUND` points (Visium's in_tissue = 0
#: spots): there a correct registration beats its nearest alternative (half a spot spacing off) by 0.006 on the
#: fixture, and a shift of one spot spacing (150 full-resolution px, 92 µm) along x scores 0.023 below its undoing.
ALTERNATIVE_MARGIN_KNOWN = 0.015
MIN_KNOWN_BACKGROUND = 200
#: The margin is at least this many standard errors of the difference of two independent AUROCs
#: (:func:`auroc_se`, Hanley & McNeil 1982, times √2): with few spots an alternative beats a correct registration by
#: chance (100 spots of the fixture with an inferred background: an alternative 0.042–0.056 higher, where the
#: standard error is about 0.025), while the 0.015/0.03 margins hold for thousands of spots (standard error ≈ 0.003).
#: 2.5 is the one-sided 1/160 quantile: about a 1-in-4 chance for the worst of the 40 alternatives if they were independent
#: of the correct one (they share most pixels and spots, so fewer).
MARGIN_Z = 2.5
#: Fewest spots and fewest background points on the image for the AUROC to decide anything.
MIN_POINTS = 20
#: A tissue pixel's stain colour: max − min of its R, G, B at least this (glass: a few units; eosin ≈ 35).
MIN_TISSUE_CHROMA = 15.0
#: The tissue mask decides nothing when less than this fraction, or more than 1 − this, of the thumbnail is tissue.
MIN_MASK_FRACTION = 0.01
#: A thumbnail pixel counts as stained for that decision when its :func:`stain_score` is at least this (chroma ≥ 5:
#: glass 1–3): a faded scan (the fixture lightened to a quarter of its contrast, tissue chroma 5–15) is still
#: checked (0.0 % of it passes :func:`tissue_mask`, yet its AUROC is 0.99 and a mirrored copy is refused).
GATE_SCORE = 1.0 / 3.0
#: An alternative beating the given registration by more than this, but less than the margin, is warned about
#: (correct registrations on the fixture: best alternative 0.006–0.026 below; a 50 µm shift: 0.010 above).
SLIGHTLY_BETTER = 0.005
#: Thumbnail size: the spot disc should span about this many thumbnail pixels (at most MAX_THUMB_SIDE px a side).
DISC_THUMB_PX = 6.0
MAX_THUMB_SIDE = 4096
MIN_THUMB_SIDE = 256
#: At most this many spots and background points are scored (a fixed stride, so the result is deterministic).
MAX_SCORED = 20000

#: Alternative registrations: name -> (what it means, where it applies: "image" px or "um").
ALTERNATIVES: dict[str, str] = {
    "swap_xy": "x and y swapped (pxl_row/pxl_col or obsm['spatial'] columns exchanged, or a transposed image)",
    "mirror_lr": "the image mirrored left-right",
    "mirror_tb": "the image mirrored top-bottom",
    "rotate_90": "the image rotated by 90°",
    "rotate_180": "the image rotated by 180°",
    "rotate_270": "the image rotated by 270°",
}
#: Scale errors tested: the positions (µm) multiplied by k before the given µm→px map (a Visium
#: tissue_{hires,lowres}_scalef, a Xenium pixel_size or an AnnData µm per pixel off by that factor).
SCALES = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 1.02, 1.03, 1.05, 1.1, 1.25, 2.0)
ALTERNATIVES.update({f"scale_{k:g}": f"the positions at {k:g}× their scale (the µm→pixel scale should be {k:g}× "
                     f"what it is: check Visium tissue_hires_scalef/tissue_lowres_scalef, Xenium pixel_size, "
                     f"AnnData µm per pixel)" for k in SCALES})
#: Offsets tested, in units of the shift step (the larger of the spot diameter and the spots' median
#: nearest-neighbour spacing: 100 µm for Visium), along x and along y: an alignment that is off by a translation.
SHIFTS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)
ALTERNATIVES.update({f"shift_{axis}{k:+g}": f"the positions shifted by {k:+g} spot spacings along {axis} (an offset "
                     f"between the image and the positions: check the alignment, e.g. Xenium's he_imagealignment.csv, "
                     f"or that the image is the one the positions were registered to)"
                     for axis in "xy" for k in SHIFTS})


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """``(h, w)`` bool: stained tissue pixels of an RGB(A) ``(h, w, ≥3)`` image (uint8 scale, 0–255).

    A pixel is tissue when its mean RGB is below :data:`~hescape.data.ingest.BACKGROUND_LEVEL` (220, not white
    glass) and its chroma (max − min of R, G, B) is at least :data:`MIN_TISSUE_CHROMA` (stained, not grey glass,
    black borders or fiducials).
    """
    from .ingest import BACKGROUND_LEVEL

    a = np.asarray(rgb)[..., :3].astype(np.float32)
    return (a.mean(-1) < BACKGROUND_LEVEL) & ((a.max(-1) - a.min(-1)) >= MIN_TISSUE_CHROMA)


def stain_score(rgb: np.ndarray) -> np.ndarray:
    """``(h, w)`` float in [0, 1]: how stained each pixel of an RGB(A) ``(h, w, ≥3)`` image (uint8 scale) is.

    Its chroma (max − min of R, G, B) over :data:`MIN_TISSUE_CHROMA`, capped at 1: 1 wherever :func:`tissue_mask`
    holds, and in proportion below it, so that faintly stained tissue (a faded or over-exposed scan, chroma
    5–15) still scores above glass (chroma 1–3) instead of tying with it at 0. Not gated on brightness: pale
    tissue is brighter than :data:`~hescape.data.ingest.BACKGROUND_LEVEL`.
    """
    a = np.asarray(rgb)[..., :3].astype(np.float32)
    return np.clip((a.max(-1) - a.min(-1)) / MIN_TISSUE_CHROMA, 0.0, 1.0)


def _smooth(rgb: np.ndarray) -> np.ndarray:
    """A 3 × 3 mean of each channel: tissue and glass are told apart region by region, not by pixel noise."""
    from scipy.ndimage import uniform_filter

    a = np.asarray(rgb)[..., :3].astype(np.float32)
    return uniform_filter(a, size=(3, 3, 1), mode="nearest")


def _disc_offsets(radius: float) -> np.ndarray:
    g = np.linspace(-1.0, 1.0, 7)
    xx, yy = np.meshgrid(g, g)
    m = xx**2 + yy**2 <= 1.0 + 1e-9
    return np.column_stack([xx[m], yy[m]]) * radius  # 37 points


def _stride(points: np.ndarray, limit: int = MAX_SCORED) -> np.ndarray:
    step = max(1, math.ceil(len(points) / limit))
    return points[::step]


def _alternative_px(name: str, px: np.ndarray, um: np.ndarray, um_to_px: np.ndarray, w: int, h: int,
                    step_um: float) -> np.ndarray:
    x, y = px[:, 0], px[:, 1]
    if name == "swap_xy":
        return np.column_stack([y, x])
    if name == "mirror_lr":
        return np.column_stack([w - x, y])
    if name == "mirror_tb":
        return np.column_stack([x, h - y])
    if name == "rotate_180":
        return np.column_stack([w - x, h - y])
    if name == "rotate_90":  # the positions' frame turned a quarter clockwise onto the image
        return np.column_stack([w - y, x])
    if name == "rotate_270":
        return np.column_stack([y, h - x])
    if name.startswith("shift_"):
        k = float(name[7:]) * step_um
        return _apply(um_to_px, um + (np.array([k, 0.0]) if name[6] == "x" else np.array([0.0, k])))
    return _apply(um_to_px, um * _scale_of(name))


def _scale_of(name: str) -> float:
    return float(name.removeprefix("scale_")) if name.startswith("scale_") else 1.0


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _scores(mask: np.ndarray, px_thumb: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue fraction of each disc (off-image samples count as glass) and whether each centre is on the image."""
    h, w = mask.shape
    p = px_thumb[:, None, :] + offsets[None]
    c = np.floor(p[..., 0]).astype(np.int64)
    r = np.floor(p[..., 1]).astype(np.int64)
    ok = (c >= 0) & (c < w) & (r >= 0) & (r < h)
    hit = np.zeros(c.shape, dtype=np.float64)
    hit[ok] = mask[r[ok], c[ok]]
    x, y = px_thumb[:, 0], px_thumb[:, 1]
    on = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    return hit.mean(1), on


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of scores ``pos`` (class 1) against ``neg`` (class 0); ties count one half.

    The Mann–Whitney form, ``(Σ rank(pos) − n_pos (n_pos + 1) / 2) / (n_pos · n_neg)`` with mid-ranks for ties,
    which equals scikit-learn's ``roc_auc_score`` (scikit-learn is not a dependency of hescape-data).
    """
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    ranks = rankdata(np.r_[pos, neg])
    n_p, n_n = len(pos), len(neg)
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2.0) / (n_p * n_n))


def auroc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC ``a`` from ``n_pos`` positives and ``n_neg`` negatives (Hanley & McNeil 1982,
    Radiology 143:29–36, eq. 1: ``Q1 = a / (2 − a)``, ``Q2 = 2a² / (1 + a)``); 0 without points."""
    if n_pos < 1 or n_neg < 1:
        return 0.0
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def _nn_spacing(points: np.ndarray) -> float:
    """Median nearest-neighbour distance of ``points`` (0 for fewer than 2)."""
    from scipy.spatial import cKDTree

    if len(points) < 2:
        return 0.0
    probe = _stride(points, 5000)
    return float(np.median(cKDTree(points).query(probe, k=2)[0][:, 1]))


def _grid_background(pos_thumb: np.ndarray, shape: tuple[int, int], gap: float) -> np.ndarray:
    """Nodes of a grid over the thumbnail (at most ~150 a side) farther than ``gap`` thumbnail px from every spot."""
    from scipy.spatial import cKDTree

    th, tw = shape
    step = max(1.0, max(th, tw) / 150.0)
    xs, ys = np.arange(step / 2, tw, step), np.arange(step / 2, th, step)
    grid = np.column_stack([g.ravel() for g in np.meshgrid(xs, ys)])
    if not len(pos_thumb):
        return grid
    return grid[cKDTree(pos_thumb).query(grid, k=1)[0] > gap]


def measure_registration(sample, spots_um: np.ndarray, diameter_um: float) -> dict:
    """Registration statistics of ``spots_um`` (µm, ``(n, 2)``) on ``sample.image`` through ``sample.um_to_px``.

    Parameters
    ----------
    sample
        A :class:`~hescape.data.readers.xenium.SpatialSample` with an image. Its ``tissue_um`` and
        ``background_um`` (positions known to be on / off the tissue, µm: Visium's and Visium HD's ``in_tissue``) are used when
        set; else the spots are the positives and the background is the image away from every spot (grid nodes
        of the thumbnail farther than ``max(diameter_um, 1.5 × the spots' median nearest-neighbour distance)``
        from every spot centre, under each registration tested).
    spots_um
        The dataset's spot centres, µm.
    diameter_um
        The spot's equal-area diameter (µm): the disc whose tissue is scored.

    Returns
    -------
    dict
        ``auroc`` (None when not decidable, with ``note``), ``on_tissue_fraction`` (spots with ≥ half their disc
        on tissue, among those on the image), ``image_tissue_fraction`` (of the thumbnail), ``n_spots`` and
        ``n_background`` (scored, on the image), ``background`` (where the background points come from),
        ``alternatives`` (``{name: auroc or None}``) and ``best_alternative`` (name or None).
    """
    img = sample.image
    h0, w0 = img.shape
    m = np.asarray(sample.um_to_px, dtype=np.float64)
    src_mpp = 1.0 / math.sqrt(abs(np.linalg.det(m[:2, :2])))
    d_px0 = diameter_um / src_mpp
    side = int(np.clip(max(h0, w0) * DISC_THUMB_PX / max(d_px0, 1e-9), MIN_THUMB_SIDE, MAX_THUMB_SIDE))
    thumb, (fx, fy) = img.thumbnail(side)
    smooth = _smooth(thumb)
    mask = tissue_mask(smooth)
    score = stain_score(smooth)
    th, tw = mask.shape
    to_thumb = np.diag([1.0 / fx, 1.0 / fy, 1.0])
    thumb_per_px0 = 1.0 / math.sqrt(fx * fy)
    offsets = _disc_offsets(d_px0 / 2.0 * thumb_per_px0)
    fg, bg = getattr(sample, "tissue_um", None), getattr(sample, "background_um", None)
    known = bg is not None and len(bg) > 0
    pos_um = _stride(np.asarray(fg if known and fg is not None and len(fg) else spots_um,
                                dtype=np.float64).reshape(-1, 2))
    neg_um = _stride(np.asarray(bg, dtype=np.float64).reshape(-1, 2)) if known else None
    step_um = max(float(diameter_um), _nn_spacing(pos_um))
    gap_um = max(float(diameter_um), 1.5 * _nn_spacing(pos_um))
    bg_kind = ("in_tissue = 0 spots of the positions file" if known
               else f"image points over {gap_um:.0f} µm from every spot")
    frac = float((score >= GATE_SCORE).mean()) if score.size else 0.0
    rec = {"auroc": None, "on_tissue_fraction": None, "image_tissue_fraction": round(frac, 4), "n_spots": 0,
           "n_background": 0, "background": bg_kind, "background_known": bool(known),
           "spot_disc_um": round(float(diameter_um), 3),
           "thumbnail_px": [int(tw), int(th)], "alternatives": {}, "best_alternative": None}

    def evaluate(pos_px0: np.ndarray, neg_px0: np.ndarray | None, scale: float):
        pos_t = _apply(to_thumb, pos_px0)
        sp_, on_p = _scores(score, pos_t, offsets)
        if neg_px0 is not None:
            sn_, on_n = _scores(score, _apply(to_thumb, neg_px0), offsets)
            sn_ = sn_[on_n]
        else:
            gap = gap_um / src_mpp * thumb_per_px0 * scale
            sn_ = _scores(score, _grid_background(pos_t[on_p], mask.shape, gap), offsets)[0]
        n_p, n_n = int(on_p.sum()), len(sn_)
        if n_p < MIN_POINTS or n_n < MIN_POINTS or on_p.mean() < 0.5:
            return None, n_p, n_n, None
        on_tissue = float((_scores(mask, pos_t[on_p], offsets)[0] >= 0.5).mean())
        return auroc(sp_[on_p], sn_), n_p, n_n, on_tissue

    if not MIN_MASK_FRACTION <= frac <= 1 - MIN_MASK_FRACTION:
        rec["note"] = (f"not checked: {frac:.1%} of the image is stained (chroma >= 5; need between "
                       f"{MIN_MASK_FRACTION:.0%} and {1 - MIN_MASK_FRACTION:.0%}: tissue and glass to tell apart)")
        return rec
    pos_px = _apply(m, pos_um)
    neg_px = None if neg_um is None else _apply(m, neg_um)
    auc, n_p, n_n, on_tissue = evaluate(pos_px, neg_px, 1.0)
    rec.update(n_spots=n_p, n_background=n_n,
               on_tissue_fraction=None if on_tissue is None else round(on_tissue, 4))
    if auc is None:
        rec["note"] = (f"not checked: {n_p} spots and {n_n} background points ({bg_kind}) on the image; at least "
                       f"{MIN_POINTS} of each are needed")
        return rec
    rec["auroc"] = round(auc, 4)
    for name in ALTERNATIVES:
        scale = _scale_of(name)
        a_neg = None if neg_px is None else _alternative_px(name, neg_px, neg_um, m, w0, h0, step_um)
        a_auc = evaluate(_alternative_px(name, pos_px, pos_um, m, w0, h0, step_um), a_neg, scale)[0]
        rec["alternatives"][name] = None if a_auc is None else round(a_auc, 4)
    scored = {k: v for k, v in rec["alternatives"].items() if v is not None}
    if scored:
        rec["best_alternative"] = max(scored, key=scored.get)
    return rec


def check_registration(sample, spots_um: np.ndarray, geometry, *, enabled: bool = True, cause: str = "") -> dict:
    """Measure the registration of ``spots_um`` on the sample's image and refuse a misregistered one.

    Parameters
    ----------
    sample
        The :class:`~hescape.data.readers.xenium.SpatialSample` (image, ``um_to_px``, ``xy_um``, optional
        ``background_um``).
    spots_um
        ``(n, 2)`` the spot centres the dataset will hold (µm).
    geometry
        The :class:`~hescape.data.geometry.SpotGeometry` (spot area and pitch).
    enabled
        False (``--skip-registration-check``): measure and record, never refuse.
    cause
        What to check for this input, ending the error message.

    Returns
    -------
    dict
        :func:`measure_registration`'s record plus ``thresholds``, ``verdict`` (``"ok"``, ``"refused"``,
        ``"not checked"``, or ``"skipped by the user (would refuse)"`` / ``"skipped by the user"``) and
        ``checked`` (bool); written to the manifest.

    Raises
    ------
    RegistrationError
        The AUROC is below :data:`MIN_AUROC`, or an alternative registration scores :data:`ALTERNATIVE_MARGIN`
        higher (named in the message), and ``enabled``.
    """
    from .errors import RegistrationError

    diameter = 2.0 * math.sqrt(geometry.area_um2 / math.pi)
    rec = measure_registration(sample, spots_um, diameter)
    known = rec["background_known"]
    floor = MIN_AUROC if known else MIN_AUROC_INFERRED
    margin = ALTERNATIVE_MARGIN_KNOWN if known and rec["n_background"] >= MIN_KNOWN_BACKGROUND else ALTERNATIVE_MARGIN
    auc = rec["auroc"]
    best = rec["best_alternative"]
    best_auc = rec["alternatives"].get(best) if best else None
    if auc is not None and best_auc is not None:  # the standard error of their difference, as if independent
        n_p, n_n = rec["n_spots"], rec["n_background"]
        noise = MARGIN_Z * math.hypot(auroc_se(auc, n_p, n_n), auroc_se(best_auc, n_p, n_n))
        margin = round(max(margin, noise), 4)
    rec["thresholds"] = {"min_auroc": floor, "alternative_margin": margin, "min_points": MIN_POINTS,
                         "min_tissue_chroma": MIN_TISSUE_CHROMA, "margin_z": MARGIN_Z}
    better = best_auc is not None and auc is not None and best_auc >= auc + margin
    on_tissue = rec["on_tissue_fraction"]
    below = auc is not None and auc < floor and (known or on_tissue is None or on_tissue < MAX_ON_TISSUE_FOR_FLOOR)
    bad = auc is not None and (below or better)
    rec["checked"] = auc is not None
    if auc is None:
        rec["verdict"] = "not checked"
    elif not enabled:
        rec["verdict"] = "skipped by the user (would refuse)" if bad else "skipped by the user"
    else:
        rec["verdict"] = "refused" if bad else "ok"
    if bad and enabled:
        hint = (f"; the positions fit the image better with {ALTERNATIVES[best]} (AUROC {best_auc:.3f})"
                if better or (best_auc is not None and best_auc >= MIN_AUROC) else "")
        want = f"registration AUROC >= {floor:g} and no alternative better by {margin:g}"
        msg = (f"sample {sample.name}: expected the spots on the tissue of the H&E image and the {rec['background']} "
               f"on glass ({want}), found "
               f"AUROC {auc:.3f} ({rec['n_spots']} spots, {rec['n_background']} background points; "
               f"{rec['on_tissue_fraction']:.0%} of the spots on tissue){hint}; "
               f"{cause or 'check the image and positions'}"
               "; look at the QC figure of a build with --skip-registration-check (recorded in the manifest) if you "
               "are sure the registration is right")
        raise RegistrationError(msg)
    _warn_unless_clear(sample.name, rec, auc, best, best_auc)
    return rec


def _warn_unless_clear(name: str, rec: dict, auc, best, best_auc) -> None:
    """A warning (printed by the hescape-data CLI) for every outcome short of a clear pass: not checked, skipped
    although it would refuse, or an alternative that fits better than the registration given, by less than the
    margin (a shift of about half a spot spacing: +0.010 on the fixture)."""
    import warnings

    if rec["verdict"] == "not checked":
        msg = f"sample {name}: registration not checked ({rec.get('note', 'undecidable')})"
    elif rec["verdict"] == "skipped by the user (would refuse)":
        msg = (f"sample {name}: --skip-registration-check: the registration check would have refused this sample "
               f"(AUROC {auc:.3f}; best alternative {best}: {best_auc:.3f}); built anyway, recorded in the manifest")
    elif best_auc is not None and auc is not None and best_auc > auc + SLIGHTLY_BETTER:
        msg = (f"sample {name}: registration accepted, but {ALTERNATIVES[best]} fits slightly better (AUROC "
               f"{best_auc:.3f} vs {auc:.3f}, under the {rec['thresholds']['alternative_margin']:g} margin); if "
               "patches look off-centre, check the alignment")
    else:
        return
    warnings.warn(msg, UserWarning, stacklevel=3)
