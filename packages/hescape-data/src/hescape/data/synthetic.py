"""A deterministic generator of small, biologically shaped, Xenium-like paired datasets.

Each synthetic *sample* is a square section of breast-like tissue. What ties its two modalities together is
**morphology**, not stain intensity:

* **Niches.** Smooth random fields partition the section into tumour, stroma, immune aggregate, normal duct
  and adipose tissue (:data:`NICHES`), each with its own cell density and architecture.
* **Architecture.** Tumour cells form cohesive nests separated by thin stromal bands; normal epithelium lines
  round acini around white lumens; small vessels are lumens lined by flat endothelial nuclei with red cells
  inside; adipocytes are large empty vacuoles with a thin membrane and a flat nucleus at the rim; immune
  aggregates are sheets of small, round, dark lymphocytes; stroma is sparse spindle fibroblasts in fibrous
  collagen. Cells sit on a jittered 6 µm lattice thinned by the local occupancy.
* **Cell types** (:data:`CELL_TYPES`) differ in nuclear size, shape (elongation), chromatin pattern (solid or
  vesicular with a nucleolus) and cytoplasm; each has an expression program over the real gene panel: the
  panel's per-gene mean counts as baseline, up-regulation of its canonical markers (when the panel has them),
  a random type-specific log-fold-change, and a type-specific library size.
* **Cell states** (:data:`STATES`) vary smoothly in space; each has a gene program and a *morphological*
  image effect that leaves the amount of stain unchanged: proliferation enlarges nuclei (the same chromatin
  spread wider, so paler per pixel) and adds mitotic figures, hypoxic stress condenses nuclei (pyknosis:
  small and dense) and vacuolates the cytoplasm, inflammation replaces stromal and tumour cells by
  lymphocytes and macrophages.
* **Stain variation.** The amount of haematoxylin and of eosin, the section thickness, the hue of each stain
  and a faint background haze vary independently over the section (smooth fields with length scale
  ``stain_scale_um``; log-amounts with standard deviation ``stain_sd``), as uneven staining, cutting and
  mounting do; so the mean colour of a patch says little about what is in it, while nuclear size, shape,
  density and arrangement do.

Donors carry a batch effect in both modalities: a per-gene log shift and a library-size factor in expression,
and a stain-vector / brightness shift in the image. ``SyntheticConfig.batch`` (:class:`~hescape.data.batch_effects.
BatchEffects`, all dials 0 by default) adds more, each a dial, on top of them and without changing the biology:
gene-wise multiplicative and additive shifts, library size and panel dropout in expression, stain and scanner blur
in the image (:mod:`hescape.data.batch_effects`). The H&E image is a Beer–Lambert mix of haematoxylin and
eosin optical densities (colour-deconvolution vectors of Ruifrok & Johnston, 2001) with a small optical blur and
noise. Cells are pooled into pseudo-spots of the config's :class:`~hescape.data.geometry.SpotGeometry` (sum)
and a patch is cut around each spot centre.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

from .batch_effects import BatchEffects, apply_expression_effects, apply_image_effects, donor_batch_effects
from .errors import HescapeDataError
from .geometry import SpotGeometry
from .panels import GenePanel, load_panel
from .pseudospots import pool_counts

__all__ = ["CELL_TYPES", "NICHES", "STATES", "DEMO_GEOMETRY", "SyntheticConfig", "SyntheticSample",
           "generate_sample", "crop_patch"]

#: cell type -> (canonical markers, nucleus radius µm, nucleus elongation, haematoxylin density,
#: cytoplasm eosin density, cytoplasm radius µm, chromatin pattern, relative library size).
#: Elongation ``e`` keeps the nucleus area ``π r²``: semi-axes ``r·√e`` and ``r/√e``.
CELL_TYPES: dict[str, tuple[tuple[str, ...], float, float, float, float, float, str, float]] = {
    "tumour_epithelial": (("EPCAM", "KRT8", "KRT18", "KRT19", "ERBB2", "MKI67", "TOP2A", "CDH1", "ESR1", "CEACAM5"),
                          4.8, 1.25, 0.9, 0.45, 7.0, "vesicular", 1.4),
    "normal_epithelial": (("KRT5", "KRT14", "KRT17", "EPCAM", "KRT7", "MUC1", "ELF3"),
                          3.3, 1.4, 1.15, 0.4, 5.0, "solid", 1.0),
    "fibroblast": (("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "PDGFRB", "FAP", "POSTN", "SFRP4"),
                   2.6, 4.5, 1.3, 0.1, 3.0, "solid", 0.8),
    "t_cell": (("PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "CD4", "IL7R", "TRAC", "GZMK", "CCL5"),
               2.7, 1.0, 1.5, 0.05, 3.2, "solid", 0.6),
    "macrophage": (("CD68", "CD163", "LYZ", "C1QA", "C1QC", "CD14", "ITGAX", "MRC1", "FCGR3A", "APOE"),
                   3.2, 1.7, 0.95, 0.3, 7.5, "solid", 1.2),
    "endothelial": (("PECAM1", "VWF", "CDH5", "KDR", "CLDN5", "EGFL7", "ACKR1", "PLVAP"),
                    2.5, 3.5, 1.2, 0.1, 2.5, "solid", 0.7),
    "adipocyte": (("ADIPOQ", "LEP", "PLIN1", "FABP4", "LPL", "CIDEA"), 2.4, 3.5, 1.1, 0.0, 0.0, "solid", 0.8),
}

#: niche -> (occupancy of the cell lattice by its loose cells, mixture of those cells, collagen eosin density).
#: Structures come on top: tumour nests (tumour niche), acini (duct), vessels (stroma, adipose, tumour),
#: adipocytes (adipose).
NICHES: dict[str, tuple[float, dict[str, float], float]] = {
    "tumour": (0.25, {"fibroblast": 0.6, "t_cell": 0.2, "macrophage": 0.2}, 0.6),
    "stroma": (0.14, {"fibroblast": 0.8, "macrophage": 0.1, "t_cell": 0.1}, 1.0),
    "immune": (0.85, {"t_cell": 0.82, "macrophage": 0.15, "fibroblast": 0.03}, 0.3),
    "duct": (0.14, {"fibroblast": 0.7, "t_cell": 0.15, "macrophage": 0.15}, 0.75),
    "adipose": (0.03, {"fibroblast": 0.5, "macrophage": 0.3, "t_cell": 0.2}, 0.3),
}

#: continuous cell states varying smoothly in space, each with a gene program and a morphological effect.
STATES: tuple[str, ...] = ("proliferation", "hypoxia_stress", "inflammation")

# Haematoxylin and eosin optical-density colour vectors (R, G, B) (Ruifrok & Johnston, Anal Quant Cytol
# Histol 2001), as in colour-deconvolution practice.
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])

#: The demo's spot geometry: the HESCAPE preset's spots (55 µm pointy-top hexagons tiling the tissue, centres
#: 47.63 µm apart) with 64 µm patches at the generator's 1 µm/px (64 px). The patch covers the pooled hexagon
#: with a 4.5 µm margin, at full resolution and exactly the input size of the demo model (``vit_mlp_nano``, 64 px):
#: the link between the modalities runs through nuclei a few µm across, which the HESCAPE convention's 112 µm
#: field (``get_geometry("hescape")``) would shrink 1.75× on its way into a 64 px model.
DEMO_GEOMETRY = SpotGeometry(shape="hexagon", diameter_um=55.0, pitch_um=55.0 * math.sqrt(3) / 2, grid="hex",
                             fov_um=64.0, um_per_px=1.0, name="hescape")


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic dataset (all lengths in µm)."""

    panel: str = "human-breast-panel"  # vendored gene panel whose genes and mean counts are used
    n_donors: int = 8  # donors; each has its own batch effect in both modalities
    samples_per_donor: int = 1  # tissue sections per donor
    sample_size_um: float = 1000.0  # side of each square section
    pixel_size_um: float = 1.0  # µm per pixel of the rendered H&E image
    geometry: SpotGeometry = DEMO_GEOMETRY  # pseudo-spot shape, lattice and patch size (hescape.data.geometry)
    cell_spacing_um: float = 6.0  # spacing of the jittered lattice that cells occupy
    niche_scale_um: float = 150.0  # length scale of the niche fields
    state_scale_um: float = 110.0  # length scale of the continuous cell-state fields (see STATES)
    stain_scale_um: float = 60.0  # length scale of the stain amount / thickness / hue / background variation
    stain_sd: float = 0.55  # sd of the log amount of each stain (0.6× that: thickness; 0.5×: hue)
    counts_per_cell: float | None = None  # mean counts per cell; None -> panel spot mean / cells per spot
    donor_gene_shift_sd: float = 0.25  # sd of the per-donor, per-gene log shift
    donor_stain_shift_sd: float = 0.08  # sd of the per-donor stain vector perturbation
    seed: int = 0  # global seed: the same config gives the same bytes
    batch: BatchEffects = BatchEffects()  # added per-donor batch effects (hescape.data.batch_effects); 0 = none

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, SpotGeometry):
            msg = (f"SyntheticConfig.geometry: expected a hescape.data.geometry.SpotGeometry, found "
                   f"{type(self.geometry).__name__}; pass e.g. get_geometry('hescape').with_(um_per_px=1.0)")
            raise HescapeDataError(msg)
        if not isinstance(self.batch, BatchEffects):
            msg = (f"SyntheticConfig.batch: expected a hescape.data.batch_effects.BatchEffects, found "
                   f"{type(self.batch).__name__}; pass e.g. BatchEffects.at(0.5)")
            raise HescapeDataError(msg)
        if self.sample_size_um < self.geometry.fov_um:
            msg = (f"SyntheticConfig.sample_size_um: expected at least the patch field of view "
                   f"{self.geometry.fov_um} µm, found {self.sample_size_um}; enlarge the section or shrink fov_um")
            raise HescapeDataError(msg)

    @property
    def patch_px(self) -> int:
        """Side of a stored patch in pixels (``geometry.patch_px``)."""
        return self.geometry.patch_px


@dataclass
class SyntheticSample:
    """One generated section: cells, pooled spots and the rendered image."""

    name: str
    donor: str
    cell_xy: np.ndarray  # (n_cells, 2) µm
    cell_type: np.ndarray  # (n_cells,) int index into CELL_TYPES
    cell_counts: sp.csr_matrix  # (n_cells, n_genes) raw counts
    spot_xy: np.ndarray  # (n_spots, 2) µm
    spot_counts: np.ndarray  # (n_spots, n_genes) summed raw counts
    spot_n_cells: np.ndarray  # (n_spots,)
    spot_niche: np.ndarray  # (n_spots,) int index into NICHES (dominant niche at the centre)
    image: np.ndarray  # (H, W, 3) uint8, pixel (row, col) = (y, x) / pixel_size_um
    extra: dict = field(default_factory=dict)


def _smooth_fields(rng: np.random.Generator, n: int, scale: float, n_feat: int = 48):
    """n smooth random fields (about N(0, 1) each) as random Fourier features; returns xy -> (len(xy), n)."""
    w = rng.normal(size=(n, n_feat, 2)) / scale
    b = rng.uniform(0, 2 * np.pi, size=(n, n_feat))
    a = rng.normal(size=(n, n_feat)) * np.sqrt(2.0 / n_feat)

    def f(xy: np.ndarray) -> np.ndarray:
        return np.einsum("nf,cnf->cn", a, np.cos(np.einsum("nfd,cd->cnf", w, xy) + b))

    return f


def _type_programs(rng: np.random.Generator, panel: GenePanel) -> np.ndarray:
    """Log-fold-change of every cell type over the panel genes, shape (n_types, n_genes)."""
    g = panel.n_genes
    index = {name: i for i, name in enumerate(panel.genes)}
    lfc = rng.normal(0.0, 0.35, size=(len(CELL_TYPES), g))
    for t, (markers, *_rest) in enumerate(CELL_TYPES.values()):
        present = [index[m] for m in markers if m in index]
        # Types whose markers the panel lacks get random markers, so every type stays identifiable.
        extra = rng.choice(g, size=max(3, g // 40), replace=False)
        lfc[t, present] += rng.uniform(2.0, 3.0, size=len(present))
        lfc[t, extra] += rng.uniform(1.2, 2.2, size=len(extra))
    return lfc


def _state_programs(rng: np.random.Generator, panel: GenePanel) -> np.ndarray:
    """Log-fold-change of each continuous state at full activation, shape (n_states, n_genes)."""
    lfc = np.zeros((len(STATES), panel.n_genes))
    for k in range(len(STATES)):
        genes = rng.choice(panel.n_genes, size=max(4, panel.n_genes // 12), replace=False)
        lfc[k, genes] = rng.uniform(1.5, 2.5, size=len(genes))
    return lfc


# ------------------------------------------------------------------------------------------------ stamps


@functools.lru_cache(maxsize=8192)
def _stamp(kind: str, r4: int, e4: int, a16: int) -> np.ndarray:
    """A nucleus / cytoplasm / membrane stamp (values 0..~1), cached on quantised radius (px/4), elongation
    (/4) and angle (π/16 steps). Kinds: ``solid`` soft ellipse, ``vesicular`` ellipse with a dark rim and a
    nucleolus, ``mitotic`` a condensed jagged bar, ``disc`` a flat disc with a 1 px edge, ``ring`` a thin
    membrane ring."""
    r, e, ang = r4 / 4.0, max(e4 / 4.0, 1.0), a16 * np.pi / 16
    a, b = r * np.sqrt(e), r / np.sqrt(e)
    half = int(np.ceil(max(a, b) * 1.4)) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    c, s = np.cos(ang), np.sin(ang)
    u, v = (xx * c + yy * s) / a, (-xx * s + yy * c) / b
    rr = np.sqrt(u * u + v * v)
    if kind == "disc":
        return np.clip(r - np.sqrt(xx * xx + yy * yy) + 0.5, 0.0, 1.0)
    if kind == "ring":
        d = np.sqrt(xx * xx + yy * yy) - r
        return np.exp(-0.5 * (d / 0.7) ** 2)
    base = np.clip(1.5 - rr * 1.1, 0.0, 1.0) ** 1.5
    if kind == "vesicular":  # pale centre, chromatin at the rim, one nucleolus
        nucleolus = np.exp(-0.5 * (xx * xx + yy * yy) / max(0.18 * r, 0.5) ** 2)
        return base * (0.35 + 0.65 * np.clip(rr / 0.75, 0.0, 1.0) ** 2) + 0.9 * nucleolus
    if kind == "mitotic":  # metaphase plate: a condensed bar with ragged chromosome arms
        rag = 0.75 + 0.25 * np.cos(7.0 * np.arctan2(v, u))
        return base * rag
    return base


def _q(r_px: float, e: float, ang: float) -> tuple[int, int, int]:
    return int(round(r_px * 4)), int(round(e * 4)), int(round((ang % np.pi) / (np.pi / 16))) % 16


def _add(canvas: np.ndarray, stamp: np.ndarray, cy: float, cx: float, weight: float) -> None:
    h = stamp.shape[0] // 2
    y0, x0 = int(round(cy)) - h, int(round(cx)) - h
    y1, x1 = y0 + stamp.shape[0], x0 + stamp.shape[1]
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1 = stamp.shape[0] - max(0, y1 - canvas.shape[0])
    sx1 = stamp.shape[1] - max(0, x1 - canvas.shape[1])
    if sy1 <= sy0 or sx1 <= sx0:
        return
    canvas[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += weight * stamp[sy0:sy1, sx0:sx1]


# --------------------------------------------------------------------------------------------- structures


def _lattice(rng: np.random.Generator, size: float, spacing: float, jitter: float) -> np.ndarray:
    """Points ``(n, 2)`` µm on a square lattice of ``spacing`` over ``[0, size)²``, each jittered by up to
    ``±jitter·spacing`` per axis."""
    g = np.arange(spacing / 2, size, spacing)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    return xy + rng.uniform(-jitter * spacing, jitter * spacing, size=xy.shape)


def _nearest(centres: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest centre of each point (inf / -1 when there is none)."""
    if len(centres) == 0:
        return np.full(len(xy), np.inf), np.full(len(xy), -1)
    d, i = cKDTree(centres).query(xy)
    return d, i


def _lumen_lining(lumens: np.ndarray, xy: np.ndarray, thickness_um: float):
    """For round lumens ``(n, 3)`` (x, y, radius in µm): which points ``(m, 2)`` lie in a lumen, which in the lining
    ``thickness_um`` thick around it, and the angle tangential to the lumen at each point (radians)."""
    d, i = _nearest(lumens[:, :2], xy)
    if len(lumens) == 0:
        none = np.zeros(len(xy), dtype=bool)
        return none, none.copy(), np.zeros(len(xy))
    r = lumens[i, 2]
    off = xy - lumens[i, :2]
    return d < r, (d >= r) & (d < r + thickness_um), np.arctan2(off[:, 1], off[:, 0]) + np.pi / 2


@dataclass
class _Tissue:
    """Cells and the structures the renderer draws besides them."""

    xy: np.ndarray  # (n, 2) µm
    cell_type: np.ndarray  # (n,)
    angle: np.ndarray  # (n,) nucleus orientation, radians
    lumens: np.ndarray  # (m, 3) x, y, radius µm of acinar and vascular lumens
    vessels: np.ndarray  # (v, 3) vascular lumens (red cells inside)
    adipocytes: np.ndarray  # (a, 3) x, y, radius µm of fat vacuoles


def _layout(rng: np.random.Generator, cfg: SyntheticConfig, niche_prob, nest_fn, state_fn) -> _Tissue:
    """Place cells and structures (see the module docstring)."""
    size = cfg.sample_size_um
    names, types = list(NICHES), list(CELL_TYPES)
    ni = {n: k for k, n in enumerate(names)}
    ti = {t: k for k, t in enumerate(types)}

    # structures, from their own jittered lattices, kept where their niche dominates
    ac = _lattice(rng, size, 46.0, 0.2)
    keep = niche_prob(ac)[:, ni["duct"]] > 0.45
    acini = np.column_stack([ac[keep], rng.uniform(5.0, 11.0, int(keep.sum()))])
    ve = _lattice(rng, size, 75.0, 0.3)
    pv = niche_prob(ve) @ np.array([0.25 if n == "tumour" else 0.7 if n in ("stroma", "adipose") else 0.0
                                    for n in names])
    keep = rng.uniform(size=len(ve)) < pv
    vessels = np.column_stack([ve[keep], rng.uniform(4.0, 8.0, int(keep.sum()))])
    fat = _lattice(rng, size, 44.0, 0.15)
    fat = fat[niche_prob(fat)[:, ni["adipose"]] > 0.45]
    # each vacuole reaches half-way to its nearest neighbour: neighbouring membranes touch
    nn = cKDTree(fat).query(fat, k=2)[0][:, 1] if len(fat) > 1 else np.full(len(fat), 44.0)
    adipo = np.column_stack([fat, 0.5 * nn + 0.5])

    # loose cells on the jittered lattice
    s = cfg.cell_spacing_um
    xy = _lattice(rng, size, s, 0.35)
    p = niche_prob(xy)
    niche = np.minimum((rng.uniform(size=(len(xy), 1)) > np.cumsum(p, 1)).sum(1), len(names) - 1)
    state = 1.0 / (1.0 + np.exp(-3.0 * state_fn(xy)))
    infl = state[:, STATES.index("inflammation")]
    occ = np.array([NICHES[n][0] for n in names])[niche]
    mix = np.zeros((len(names), len(types)))
    for k, n in enumerate(names):
        for t, w in NICHES[n][1].items():
            mix[k, ti[t]] = w
    w = mix[niche]
    w[:, ti["t_cell"]] += 1.2 * infl * (niche != ni["immune"])
    w[:, ti["macrophage"]] += 0.4 * infl * (niche != ni["immune"])
    w /= w.sum(1, keepdims=True)
    ctype = np.minimum((rng.uniform(size=(len(xy), 1)) > np.cumsum(w, 1)).sum(1), len(types) - 1)
    angle = rng.uniform(0, np.pi, len(xy))

    # tumour nests: cohesive sheets of tumour cells where the nest field is positive (lymphocytes infiltrate)
    nest = (niche == ni["tumour"]) & (nest_fn(xy)[:, 0] > -0.25)
    occ = np.where(nest, 0.72, occ)
    til = rng.uniform(size=len(xy)) < 0.3 * infl
    ctype = np.where(nest, np.where(til, ti["t_cell"], ti["tumour_epithelial"]), ctype)

    # acini: a lumen, then a two-cell-thick epithelial ring with nuclei tangential to it
    in_lumen, ring, tangent = _lumen_lining(acini, xy, 10.0)
    occ = np.where(ring, 0.9, occ)
    ctype = np.where(ring, ti["normal_epithelial"], ctype)
    angle = np.where(ring, tangent, angle)

    # vessels: a lumen lined by flat endothelial nuclei
    in_vessel, wall, tangent = _lumen_lining(vessels, xy, 3.5)
    in_lumen |= in_vessel
    wall &= ~ring
    occ = np.where(wall, 0.95, occ)
    ctype = np.where(wall, ti["endothelial"], ctype)
    angle = np.where(wall, tangent, angle)

    # fat vacuoles hold no other cells
    df, idf = _nearest(adipo[:, :2], xy)
    in_fat = df < adipo[idf, 2] - 2.0 if len(adipo) else np.zeros(len(xy), dtype=bool)

    # fibroblasts follow the collagen (the fibres run along x), within ±20°
    fib = ctype == ti["fibroblast"]
    angle = np.where(fib & ~ring & ~wall, rng.normal(0.0, 0.35, len(xy)), angle)

    keep = (rng.uniform(size=len(xy)) < occ) & ~in_lumen & ~in_fat
    xy, ctype, angle = xy[keep], ctype[keep], angle[keep]

    # one flat nucleus at the rim of every adipocyte
    if len(adipo):
        phi = rng.uniform(0, 2 * np.pi, len(adipo))
        rim = adipo[:, :2] + (adipo[:, 2:3] - 1.5) * np.column_stack([np.cos(phi), np.sin(phi)])
        inside = (rim >= 0).all(1) & (rim < size).all(1)
        xy = np.concatenate([xy, rim[inside]])
        ctype = np.concatenate([ctype, np.full(int(inside.sum()), ti["adipocyte"])])
        angle = np.concatenate([angle, phi[inside] + np.pi / 2])
    return _Tissue(xy=xy, cell_type=ctype, angle=angle, lumens=np.concatenate([acini, vessels]),
                   vessels=vessels, adipocytes=adipo)


# ---------------------------------------------------------------------------------------------- rendering


def _field_image(fn, n: int, px: float, step_um: float) -> np.ndarray:
    """Evaluate ``fn`` (xy µm -> (m, k)) on a coarse grid of ``step_um`` and zoom it to ``(n, n, k)`` pixels."""
    step = max(1, int(round(step_um / px)))
    g = (np.arange(0, n + step, step) + 0.5) * px
    gy, gx = np.meshgrid(g, g, indexing="ij")
    vals = fn(np.column_stack([gx.ravel(), gy.ravel()])).reshape(len(g), len(g), -1)
    out = np.empty((n, n, vals.shape[-1]))
    coords = (np.arange(n) + 0.5) / step - 0.5
    cy, cx = np.meshgrid(coords, coords, indexing="ij")
    for k in range(vals.shape[-1]):
        out[..., k] = ndimage.map_coordinates(vals[..., k], [cy, cx], order=1, mode="nearest")
    return out


def _render(rng, cfg: SyntheticConfig, tissue: _Tissue, cell_state, niche_prob, nest_fn, stain_fn,
            donor_stain) -> np.ndarray:
    px = cfg.pixel_size_um
    n = int(round(cfg.sample_size_um / px))
    names, types, looks = list(NICHES), list(CELL_TYPES), list(CELL_TYPES.values())
    # collagen: niche level (thinner inside tumour nests) × fibrous texture along x
    ecm_level = np.array([NICHES[k][2] for k in names])

    def ecm_fn(xy):
        p = niche_prob(xy)
        nest = 1.0 / (1.0 + np.exp(-6.0 * (nest_fn(xy)[:, 0] + 0.25)))
        lvl = p @ ecm_level - 0.45 * p[:, names.index("tumour")] * nest
        return np.column_stack([lvl])

    level = _field_image(ecm_fn, n, px, 6.0)[..., 0]
    fib = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=(0.7 / px, 5.0 / px))
    fib = (fib - fib.min()) / (np.ptp(fib) + 1e-9)
    holes = np.zeros((n, n))
    for x, y, r in np.concatenate([tissue.lumens, tissue.adipocytes]):
        _add(holes, _stamp("disc", *_q(r / px, 1.0, 0.0)), y / px, x / px, 1.0)
    eosin = level * (0.3 + 1.1 * fib) * np.clip(1.0 - holes, 0.0, 1.0)
    haem = np.zeros((n, n))
    for x, y, r in tissue.adipocytes:  # fat-cell membranes
        _add(eosin, _stamp("ring", *_q(r / px, 1.0, 0.0)), y / px, x / px, 0.55)
    for x, y, r in tissue.vessels:  # red cells in the lumen
        for _ in range(int(rng.integers(1, 4))):
            rho, phi = rng.uniform(0, max(r - 3.0, 0.5)), rng.uniform(0, 2 * np.pi)
            _add(eosin, _stamp("solid", *_q(3.2 / px, 1.1, phi)), (y + rho * np.sin(phi)) / px,
                 (x + rho * np.cos(phi)) / px, 1.4)

    prolif = cell_state[:, STATES.index("proliferation")]
    hyp = cell_state[:, STATES.index("hypoxia_stress")]
    u = rng.uniform(size=(len(tissue.xy), 4))
    jitter = 0.85 + 0.3 * u[:, 0]
    epithelial_types = {types.index("tumour_epithelial"), types.index("normal_epithelial")}
    for i in range(len(tissue.xy)):
        _markers, r_nuc, elong, h_dens, e_dens, r_cyt, kind, _lib = looks[tissue.cell_type[i]]
        cx, cy, ang = tissue.xy[i, 0] / px, tissue.xy[i, 1] / px, tissue.angle[i]
        # Proliferating cells have larger nuclei holding the same chromatin (paler per pixel), so the state
        # changes texture, not the amount of haematoxylin in a patch.
        grow = 1.0 + 0.7 * prolif[i]
        size, h = jitter[i] * grow, h_dens / grow**2
        if u[i, 1] < 0.7 * hyp[i] ** 1.5:  # pyknosis: the chromatin condensed in a small round nucleus
            kind, size, elong, h = "solid", 0.55, 1.0, h_dens / 0.55**2
            if r_cyt > 0:  # and a vacuolated cytoplasm
                _add(eosin, _stamp("disc", *_q(0.45 * r_cyt / px, 1.0, 0.0)), cy, cx, -0.5 * e_dens)
        elif tissue.cell_type[i] in epithelial_types and u[i, 2] < 0.1 * prolif[i]:  # mitotic figure
            kind, size, elong, h = "mitotic", 0.8, 3.5, 1.6
        if r_cyt > 0 and e_dens > 0:
            _add(eosin, _stamp("solid", *_q(r_cyt * jitter[i] / px, 1.0 + 0.3 * (elong - 1), ang)), cy, cx, e_dens)
        _add(haem, _stamp(kind, *_q(r_nuc * size / px, elong, ang)), cy, cx, h * (0.9 + 0.2 * u[i, 3]))

    # uneven staining and thickness, then the donor's stain vectors and brightness (Beer–Lambert)
    # fields: log H amount, log E amount, log thickness, H hue, E hue, background haze (each about N(0, 1))
    f = _field_image(stain_fn, n, px, 8.0)
    haem *= np.exp(cfg.stain_sd * (f[..., 0] + 0.6 * f[..., 2]))
    eosin = np.clip(eosin, 0.0, None) * np.exp(cfg.stain_sd * (f[..., 1] + 0.6 * f[..., 2]))
    h_vec = _H_VEC + donor_stain[0]
    e_vec = _E_VEC + donor_stain[1]
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    # regional hue: haematoxylin from blue-purple towards red-purple, eosin from pink towards orange-red
    hue = 0.5 * cfg.stain_sd
    h_map = h_vec + hue * f[..., 3:4] * np.array([-0.25, 0.05, 0.3])
    e_map = e_vec + hue * f[..., 4:5] * np.array([-0.05, 0.1, 0.35])
    h_map /= np.linalg.norm(h_map, axis=-1, keepdims=True)
    e_map /= np.linalg.norm(e_map, axis=-1, keepdims=True)
    od = haem[..., None] * h_map + eosin[..., None] * e_map * 0.8
    # uneven background (mounting medium, illumination): a faint, varying haze over tissue and glass alike
    od += (0.04 * np.exp(cfg.stain_sd * f[..., 5]))[..., None] * np.array([0.25, 0.35, 0.2])
    od = ndimage.gaussian_filter(od, sigma=(0.4 / px, 0.4 / px, 0))  # optics
    od += rng.normal(0, 0.02, size=od.shape)
    rgb = 255.0 * np.exp(-od) * donor_stain[2]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def crop_patch(image: np.ndarray, center_px: tuple[float, float], size_px: int, fill: int = 255) -> np.ndarray:
    """Crop a ``size_px`` square centred on ``(row, col)``; parts outside the image are filled with ``fill``."""
    h, w = image.shape[:2]
    r0 = int(round(center_px[0] - size_px / 2))
    c0 = int(round(center_px[1] - size_px / 2))
    out = np.full((size_px, size_px, *image.shape[2:]), fill, dtype=image.dtype)
    rs, cs = max(0, r0), max(0, c0)
    re, ce = min(h, r0 + size_px), min(w, c0 + size_px)
    if re > rs and ce > cs:
        out[rs - r0 : re - r0, cs - c0 : ce - c0] = image[rs:re, cs:ce]
    return out


def spot_centres(cfg: SyntheticConfig) -> np.ndarray:
    """Spot centres ``(n, 2)`` µm of a section: ``cfg.geometry``'s lattice, at least half a patch inside."""
    s = cfg.sample_size_um
    return cfg.geometry.centres((0.0, 0.0, s, s), margin_um=cfg.geometry.fov_um / 2)


def generate_sample(cfg: SyntheticConfig, donor_index: int, sample_index: int,
                    panel: GenePanel | None = None, *, render: bool = True) -> SyntheticSample:
    """Generate one section of one donor. Deterministic in ``(cfg, donor_index, sample_index)``.

    ``render=False`` skips the H&E (``image`` is then ``(0, 0, 3)``); cells, counts and spots are the same.
    ``extra`` holds the per-cell ``cell_state`` ``(n_cells, n_states)``, the known biology of each spot,
    ``spot_type_counts`` ``(n_spots, n_types)`` (cells of each :data:`CELL_TYPES` type) and ``spot_state``
    ``(n_spots, n_states)`` (mean :data:`STATES` activation of its cells, 0 for an empty spot), which
    ``cfg.batch`` never changes, and with an active ``cfg.batch`` the donor's drawn effects ``batch``
    (:class:`~hescape.data.batch_effects.DonorBatch`) and ``gene_mean_per_cell`` ``(n_genes,)`` (the unit of its
    additive background).
    """
    panel = panel or load_panel(cfg.panel)
    # Shared biology (same for every donor): type programs. Donor effects: from the donor's stream.
    bio_rng = np.random.default_rng([cfg.seed, 0])
    programs = _type_programs(bio_rng, panel)
    state_programs = _state_programs(bio_rng, panel)
    donor_rng = np.random.default_rng([cfg.seed, 1, donor_index])
    gene_shift = donor_rng.normal(0.0, cfg.donor_gene_shift_sd, size=panel.n_genes)
    lib_factor = float(np.exp(donor_rng.normal(0.0, 0.2)))
    stain = (
        donor_rng.normal(0, cfg.donor_stain_shift_sd, size=3),
        donor_rng.normal(0, cfg.donor_stain_shift_sd, size=3),
        float(np.clip(1.0 + donor_rng.normal(0, 0.04), 0.85, 1.05)),
    )
    rng = np.random.default_rng([cfg.seed, 2, donor_index, sample_index])

    field_fn = _smooth_fields(rng, len(NICHES), cfg.niche_scale_um)

    def niche_prob(xy):
        z = 3.5 * field_fn(xy)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    nest_fn = _smooth_fields(rng, 1, 22.0)
    state_fn = _smooth_fields(rng, len(STATES), cfg.state_scale_um)
    stain_fn = _smooth_fields(rng, 6, cfg.stain_scale_um)
    tissue = _layout(rng, cfg, niche_prob, nest_fn, state_fn)
    xy, cell_type = tissue.xy, tissue.cell_type
    cell_state = 1.0 / (1.0 + np.exp(-3.0 * state_fn(xy)))  # (n_cells, n_states) in (0, 1)

    # Expression: gamma-Poisson around the type program, with the donor's shift and library factor.
    spots = spot_centres(cfg)
    cells_per_spot = len(xy) / cfg.sample_size_um**2 * cfg.geometry.area_um2
    per_cell = cfg.counts_per_cell or float(panel.mean_counts.sum() / max(cells_per_spot, 1e-9))
    base = np.log(panel.mean_counts / panel.mean_counts.sum() + 1e-8)
    logits = base[None, :] + programs[cell_type] + cell_state @ state_programs + gene_shift[None, :]
    frac = np.exp(logits - logits.max(1, keepdims=True))
    frac /= frac.sum(1, keepdims=True)
    type_lib = np.array([v[7] for v in CELL_TYPES.values()])[cell_type][:, None]
    lib = per_cell * lib_factor * type_lib * np.exp(rng.normal(0, 0.3, size=(len(xy), 1)))
    mu = frac * lib
    rate = rng.gamma(shape=4.0, scale=mu / 4.0)  # each cell's gamma-mixed Poisson rate
    counts = rng.poisson(rate).astype(np.float32)
    extra: dict = {"cell_state": cell_state}
    batch = donor_batch_effects(cfg.batch, cfg.seed, donor_index, panel.n_genes) if cfg.batch.active else None
    if batch is not None:
        # Added batch effects: their own streams, so the generator's stream (hence the image) is unchanged.
        gene_mean = per_cell * panel.mean_counts / panel.mean_counts.sum()
        extra.update(batch=batch, gene_mean_per_cell=gene_mean)
        if cfg.batch.expression_active:
            counts = apply_expression_effects(batch, counts, rate, gene_mean,
                                              np.random.default_rng([cfg.seed, 12, donor_index, sample_index]))
    del rate
    cell_counts = sp.csr_matrix(counts)

    if render:
        image = _render(rng, cfg, tissue, cell_state, niche_prob, nest_fn, stain_fn, stain)
        if batch is not None and cfg.batch.image_active:
            image = apply_image_effects(batch, image, cfg.pixel_size_um)
    else:
        image = np.zeros((0, 0, 3), dtype=np.uint8)

    assign = cfg.geometry.assign(xy, spots)
    spot_counts = pool_counts(assign, cell_counts)
    n_cells = np.asarray(assign.sum(1)).ravel().astype(np.int32)
    # the known biology of each spot: its cells' types and mean state
    onehot = sp.csr_matrix((np.ones(len(cell_type)), (np.arange(len(cell_type)), cell_type)),
                           shape=(len(cell_type), len(CELL_TYPES)))
    extra["spot_type_counts"] = np.asarray((assign @ onehot).todense()).astype(np.int32)
    extra["spot_state"] = np.asarray(assign @ cell_state) / np.maximum(n_cells, 1)[:, None]
    return SyntheticSample(
        name=f"SYN-D{donor_index:02d}-S{sample_index}",
        donor=f"donor_{donor_index:02d}",
        cell_xy=xy,
        cell_type=cell_type,
        cell_counts=cell_counts,
        spot_xy=spots,
        spot_counts=spot_counts,
        spot_n_cells=n_cells,
        spot_niche=niche_prob(spots).argmax(1) if len(spots) else np.zeros(0, dtype=int),
        image=image,
        extra=extra,
    )
