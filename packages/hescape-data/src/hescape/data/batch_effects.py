"""Batch effects as dials: per-donor technical variation added to the synthetic generator, biology unchanged.

:class:`BatchEffects` holds six dials, each ``0`` = none. Four act on the expression of a donor's cells, two on
the H&E image of its sections:

============== ================================================================================ ==========
dial           what a donor gets                                                                 reference
============== ================================================================================ ==========
gene_scale     per-gene multiplicative factor ``exp(gene_scale · z_g)``, ``z_g ~ N(0, 1)``       0.5
gene_shift     per-gene additive background ``gene_shift · e_g · m_g`` expected counts per cell,  0.2
               ``e_g ~ Exp(1)``, ``m_g`` the gene's mean count per cell (panel mean)
library_size   one library-size factor ``exp(library_size · z)``, ``z ~ N(0, 1)``               0.3
dropout        ``round(dropout · n_genes)`` panel genes lost by the donor's chemistry: their      0.1
               expected counts × :data:`DROPOUT_RESIDUAL` (0.05)
stain          stain amounts ``exp(stain · z)`` (haematoxylin, eosin) and stain colour vectors    0.2
               perturbed by ``N(0, (stain/2)²)`` per component, as one 3 × 3 matrix on the
               optical density (OD) of every pixel
blur           scanner blur: a Gaussian of sigma ``blur · u`` µm, ``u ~ U(0.5, 1.5)``             1.0 µm
============== ================================================================================ ==========

:meth:`BatchEffects.at` scales the reference column (strength 1) linearly: ``at(0)`` is no added effect,
``at(0.5)`` half of every dial, ``at(2)`` twice (``dropout`` capped at 1).

Where the reference magnitudes come from
----------------------------------------
They are **chosen** to span from no added effect to an effect stronger than the generator's own, not
fitted to measured Xenium data (this repository holds no per-sample Xenium statistics to fit them to):

* ``gene_scale`` 0.5 is twice the generator's built-in per-donor gene shift (``SyntheticConfig.donor_gene_shift_sd``
  0.25); a per-gene sd of 0.5 in log space moves a gene by ×1.65 (one sd) between donors.
* ``library_size`` 0.3 is 1.5× the generator's built-in per-donor library factor (sd 0.2 in log space): donors'
  median counts per cell differ by ×1.35 (one sd).
* ``gene_shift`` 0.2: on average 20 % of a gene's mean count per cell added as background to every cell (the
  non-negative part of a batch effect: off-target probe binding, ambient or mis-assigned transcripts; nothing is
  subtracted), which flattens the low end of every gene.
* ``dropout`` 0.1: 28 of the 280 breast-panel genes fail in each donor at strength 1.
* ``stain`` 0.2 follows the strongest of the stain augmentations of Tellez et al. (Med Image Anal 58:101544, 2019,
  "HED-strong": stain amounts scaled by U(0.8, 1.2)); an sd of 0.2 in log amount is wider than that uniform
  range (sd 0.12), so strength 1 is stronger than the augmentation.
* ``blur`` 1 µm: at the generator's 1 µm/px this smears chromatin texture (vesicular rims, nucleoli, a few µm
  and less) while nuclei (2.5-5 µm radius, :data:`hescape.data.synthetic.CELL_TYPES`) stay visible; the
  generator's own optics blur is 0.4 µm.

How the effects are applied
---------------------------
Every draw comes from ``numpy.random.default_rng([seed, 11, donor])`` in a fixed order that does not depend on
the dial values (:func:`donor_batch_effects`), so one donor's effects at ``at(0.5)`` and ``at(1)`` point the same
way and differ only in size, and the shared biology (cells, types, states, layout) comes from the generator's
own streams, untouched.

*Expression.* A cell's counts in the generator are ``X ~ Poisson(Λ)`` with ``Λ`` its gamma-mixed rate. The
batch target rate is ``Λ' = L · D_g · (S_g · Λ + a_g)`` (library factor, dropout factor, gene factor, background).
:func:`apply_expression_effects` draws the new counts from ``X`` itself: where ``Λ' <= Λ`` it keeps each count
with probability ``Λ'/Λ`` (binomial thinning), elsewhere it adds ``Poisson(Λ' - Λ)``. Given ``Λ``, the result is
exactly ``Poisson(Λ')``, the same law as applying the effects to the expected counts before the Poisson draw,
and it is coupled to the effect-free counts, so the counts of a dial-0 build are the ones the dials act on and
measured ratios between builds of one seed show the effects with little noise. It uses its own stream
``[seed, 12, donor, sample]``, so the generator's stream (and with it the image) is the same at every strength.

*Image.* :func:`apply_image_effects` converts the rendered RGB to optical density, ``OD = -ln((I + 1) / 256)``,
applies the donor's stain matrix ``M = W⁻¹ · diag(α_H, α_E, 1) · W'`` (rows of ``W``: the haematoxylin and eosin
vectors of Ruifrok & Johnston 2001, as the generator renders with, and their unit normal; ``W'``: the perturbed
vectors), converts back, then blurs with ``scipy.ndimage.gaussian_filter`` (sigma in px = µm / (µm per px)) as a
scanner out of focus would, after the staining.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage

from .errors import HescapeDataError

__all__ = ["BatchEffects", "DonorBatch", "REFERENCE", "DROPOUT_RESIDUAL", "donor_batch_effects",
           "apply_expression_effects", "apply_image_effects", "rgb_to_od", "od_to_rgb"]

#: Fraction of its expected counts a dropped gene keeps (probes that fail still catch a little).
DROPOUT_RESIDUAL = 0.05

# Haematoxylin and eosin optical-density vectors (R, G, B) of Ruifrok & Johnston (Anal Quant Cytol Histol 2001),
# the ones hescape.data.synthetic renders with; the third row of the stain basis is their unit normal.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])

_EXPRESSION = ("gene_scale", "gene_shift", "library_size", "dropout")
_IMAGE = ("stain", "blur")


@dataclass(frozen=True)
class BatchEffects:
    """Per-donor batch-effect dials of the synthetic generator (module docstring); every dial ``0`` = none.

    Parameters
    ----------
    gene_scale
        sd of the per-donor, per-gene log-multiplicative factor (natural log).
    gene_shift
        Mean per-donor, per-gene additive background, as a fraction of the gene's mean count per cell
        (``Exp(1)``-distributed across genes and donors).
    library_size
        sd of the per-donor log library-size factor (natural log).
    dropout
        Fraction (0..1) of the panel's genes each donor loses (expected counts × :data:`DROPOUT_RESIDUAL`).
    stain
        sd of the per-donor log stain amounts (haematoxylin, eosin); the stain vectors are perturbed by half of it.
    blur
        Mean per-donor scanner blur, Gaussian sigma in µm (each donor: ``blur · U(0.5, 1.5)``).

    Raises
    ------
    HescapeDataError
        A dial that is negative, not finite, or ``dropout > 1``.
    """

    gene_scale: float = 0.0
    gene_shift: float = 0.0
    library_size: float = 0.0
    dropout: float = 0.0
    stain: float = 0.0
    blur: float = 0.0

    DIALS: ClassVar[tuple[str, ...]] = _EXPRESSION + _IMAGE

    def __post_init__(self) -> None:
        for name in self.DIALS:
            v = getattr(self, name)
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = float("nan")
            if isinstance(v, bool) or not math.isfinite(f) or f < 0:
                msg = (f"BatchEffects.{name}: expected a finite number >= 0 (0 = no effect), found {v!r}; "
                       f"use BatchEffects.at(strength) for the documented reference scaled by a strength")
                raise HescapeDataError(msg)
            object.__setattr__(self, name, f)  # 1 and 1.0 are one config (one cache key)
        if self.dropout > 1.0:
            msg = (f"BatchEffects.dropout: expected a fraction of the panel's genes in [0, 1], found {self.dropout}; "
                   f"lower it")
            raise HescapeDataError(msg)

    @classmethod
    def at(cls, strength: float) -> BatchEffects:
        """The reference setting (:data:`REFERENCE`, module docstring) scaled by ``strength``.

        Parameters
        ----------
        strength
            ``0`` = no added batch effect, ``1`` = the reference, above 1 stronger (``dropout`` capped at 1).

        Raises
        ------
        HescapeDataError
            ``strength`` negative or not finite.
        """
        try:
            s = float(strength)
        except (TypeError, ValueError):
            s = float("nan")
        if isinstance(strength, bool) or not math.isfinite(s) or s < 0 or s > MAX_STRENGTH:
            msg = (f"batch strength: expected a number from 0 to {MAX_STRENGTH:g} (0 = none, 1 = reference; beyond "
                   f"{MAX_STRENGTH:g} the count model's rates overflow), found {strength!r}")
            raise HescapeDataError(msg)
        vals = {k: s * getattr(REFERENCE, k) for k in cls.DIALS}
        vals["dropout"] = min(vals["dropout"], 1.0)
        return cls(**vals)

    @property
    def active(self) -> bool:
        """Whether any dial is above 0."""
        return self.expression_active or self.image_active

    @property
    def expression_active(self) -> bool:
        """Whether any expression dial (``gene_scale``, ``gene_shift``, ``library_size``, ``dropout``) is above 0."""
        return any(getattr(self, k) > 0 for k in _EXPRESSION)

    @property
    def image_active(self) -> bool:
        """Whether any image dial (``stain``, ``blur``) is above 0."""
        return any(getattr(self, k) > 0 for k in _IMAGE)

    def to_dict(self) -> dict[str, float]:
        """The dials as a plain dict (as recorded in a dataset's manifest)."""
        return dataclasses.asdict(self)


#: Strength 1 of :meth:`BatchEffects.at` (module docstring: where these magnitudes come from).
#: Largest strength :meth:`BatchEffects.at` accepts: 20× the reference (at 40× the Poisson rates overflow).
MAX_STRENGTH = 20.0

REFERENCE = BatchEffects(gene_scale=0.5, gene_shift=0.2, library_size=0.3, dropout=0.1, stain=0.2, blur=1.0)


@dataclass(frozen=True)
class DonorBatch:
    """The effects one donor gets, drawn by :func:`donor_batch_effects` (all 1 / 0 / identity when no dial is on).

    Attributes
    ----------
    library_factor
        Multiplier of every expected count.
    gene_factor
        ``(n_genes,)`` per-gene multiplier.
    gene_background
        ``(n_genes,)`` additive background per cell, in units of the gene's mean count per cell.
    dropped
        ``(n_genes,)`` bool, the genes this donor's chemistry loses.
    stain_amounts
        ``(2,)`` haematoxylin and eosin amount factors.
    stain_matrix
        ``(3, 3)`` OD row-vector map, ``od' = od @ stain_matrix``.
    blur_um
        Gaussian sigma of the scanner blur, µm.
    """

    library_factor: float
    gene_factor: np.ndarray
    gene_background: np.ndarray
    dropped: np.ndarray
    stain_amounts: np.ndarray
    stain_matrix: np.ndarray
    blur_um: float

    def expression_factor(self) -> np.ndarray:
        """``(n_genes,)`` factor on everything a gene's counts get: library factor × dropout factor."""
        return self.library_factor * np.where(self.dropped, DROPOUT_RESIDUAL, 1.0)

    def arrays(self) -> dict[str, np.ndarray]:
        """The effects as named arrays (for ``np.savez``)."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def donor_batch_effects(effects: BatchEffects, seed: int, donor: int, n_genes: int) -> DonorBatch:
    """Draw one donor's effects (module docstring, "How the effects are applied").

    Parameters
    ----------
    effects
        The dials.
    seed
        The dataset seed (``SyntheticConfig.seed``).
    donor
        The donor index.
    n_genes
        Genes of the panel.

    Returns
    -------
    DonorBatch
        Deterministic in ``(seed, donor, n_genes)`` and the dials; the standard draws behind it do not depend on
        the dials, so scaling every dial scales every effect's log (or amount) by the same factor.
    """
    if not isinstance(effects, BatchEffects):
        msg = f"donor_batch_effects: expected a BatchEffects, found {type(effects).__name__}"
        raise HescapeDataError(msg)
    rng = np.random.default_rng([int(seed), 11, int(donor)])
    z_lib = rng.normal()
    z_gene = rng.normal(size=n_genes)
    e_bg = rng.exponential(size=n_genes)
    order = rng.permutation(n_genes)
    z_amount = rng.normal(size=2)
    z_vec = rng.normal(size=(2, 3))
    u_blur = rng.uniform(0.5, 1.5)

    dropped = np.zeros(n_genes, dtype=bool)
    dropped[order[: int(round(effects.dropout * n_genes))]] = True
    amounts = np.exp(effects.stain * z_amount)
    h, e = _unit(_H), _unit(_E)
    basis = np.stack([h, e, _unit(np.cross(h, e))])
    moved = np.stack([_unit(h + 0.5 * effects.stain * z_vec[0]), _unit(e + 0.5 * effects.stain * z_vec[1]), basis[2]])
    matrix = np.linalg.inv(basis) @ np.diag([amounts[0], amounts[1], 1.0]) @ moved
    return DonorBatch(library_factor=float(np.exp(effects.library_size * z_lib)),
                      gene_factor=np.exp(effects.gene_scale * z_gene), gene_background=effects.gene_shift * e_bg,
                      dropped=dropped, stain_amounts=amounts, stain_matrix=matrix,
                      blur_um=float(effects.blur * u_blur))


def apply_expression_effects(batch: DonorBatch, counts: np.ndarray, rate: np.ndarray, gene_mean: np.ndarray,
                             rng: np.random.Generator) -> np.ndarray:
    """Counts under the donor's expression effects, drawn from the effect-free counts (module docstring).

    Parameters
    ----------
    batch
        The donor's effects.
    counts
        ``(n_cells, n_genes)`` effect-free counts, ``Poisson(rate)``.
    rate
        ``(n_cells, n_genes)`` the Poisson rate they were drawn with (expected counts per cell), >= 0.
    gene_mean
        ``(n_genes,)`` each gene's mean count per cell, the unit of ``batch.gene_background``.
    rng
        The stream of the resampling.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_genes)`` float32 counts, given ``rate`` distributed as
        ``Poisson(L · D_g · (S_g · rate + a_g · gene_mean_g))``.
    """
    target = batch.expression_factor()[None, :] * (batch.gene_factor[None, :] * rate
                                                   + (batch.gene_background * gene_mean)[None, :])
    up = target > rate
    keep = np.divide(target, rate, out=np.ones_like(target), where=~up & (rate > 0))
    out = rng.binomial(np.asarray(counts, dtype=np.int64), np.clip(keep, 0.0, 1.0))
    out += rng.poisson(np.where(up, target - rate, 0.0))
    return out.astype(np.float32)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln((I + 1) / 256)`` of 8-bit RGB (0 for white, ``ln 256`` for black)."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, as float (not yet rounded or clipped)."""
    return 256.0 * np.exp(-np.asarray(od, dtype=np.float64)) - 1.0


def apply_image_effects(batch: DonorBatch, image: np.ndarray, um_per_px: float) -> np.ndarray:
    """The rendered H&E under the donor's stain change, then its scanner blur (module docstring).

    Parameters
    ----------
    batch
        The donor's effects.
    image
        ``(H, W, 3)`` uint8 RGB.
    um_per_px
        Pixel size of ``image`` (µm), to turn ``batch.blur_um`` into pixels.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8; ``image`` itself when the stain matrix is the identity and the blur 0.
    """
    stained = not np.allclose(batch.stain_matrix, np.eye(3), rtol=0, atol=1e-12)
    if not stained and batch.blur_um <= 0:
        return image
    out = np.asarray(image, dtype=np.float64)
    if stained:
        out = od_to_rgb(rgb_to_od(out) @ batch.stain_matrix)
    if batch.blur_um > 0:
        s = batch.blur_um / float(um_per_px)
        out = ndimage.gaussian_filter(out, sigma=(s, s, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
