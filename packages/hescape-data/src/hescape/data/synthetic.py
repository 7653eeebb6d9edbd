"""A deterministic generator of small, biologically shaped, Xenium-like paired datasets.

Each synthetic *sample* is a square of tissue. Smooth random fields partition it into niches
(tumour nest, stroma, immune aggregate, normal duct, vessel-rich / adipose); every niche has its own
cell-type composition. Cells sit on a jittered lattice; each gets a type drawn from the local niche
mixture. Every cell type has

* an expression program over the real gene panel: the panel's per-gene mean counts as baseline,
  strong up-regulation of the type's canonical markers when the panel has them, and a random
  type-specific log-fold-change over all genes;
* continuous cell states (proliferation, hypoxia/stress, inflammation) that vary smoothly in space,
  each with its own gene program and a visible effect on nuclei and cytoplasm;
* an image appearance in an H&E rendering (Beer–Lambert mix of haematoxylin and eosin optical
  densities): nucleus size, shape, darkness and cytoplasm eosin intensity.

Donors carry a batch effect in both modalities: a per-gene log shift and a library-size factor in
expression, and a stain-vector / intensity shift in the image. Cells are pooled into 55 µm
pseudo-spots (sum) and an H&E patch is cropped around each spot centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from .panels import GenePanel, load_panel
from .pseudospots import assign_cells, pool_counts, spot_grid

__all__ = ["CELL_TYPES", "NICHES", "SyntheticConfig", "SyntheticSample", "generate_sample", "crop_patch"]

#: cell type -> (canonical markers, nucleus radius µm, nucleus elongation, haematoxylin density,
#: cytoplasm eosin density, cytoplasm radius µm)
CELL_TYPES: dict[str, tuple[tuple[str, ...], float, float, float, float, float]] = {
    "tumour_epithelial": (("EPCAM", "KRT8", "KRT18", "KRT19", "ERBB2", "MKI67", "TOP2A", "CDH1", "ESR1", "CEACAM5"),
                          4.6, 1.15, 0.85, 0.55, 7.5),
    "normal_epithelial": (("KRT5", "KRT14", "KRT17", "EPCAM", "KRT7", "MUC1", "ELF3"), 3.6, 1.2, 1.05, 0.75, 6.0),
    "fibroblast": (("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "PDGFRB", "FAP", "POSTN", "SFRP4"),
                   3.2, 3.0, 1.25, 0.35, 4.0),
    "t_cell": (("PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "CD4", "IL7R", "TRAC", "GZMK", "CCL5"), 2.3, 1.0, 1.9, 0.15, 2.8),
    "macrophage": (("CD68", "CD163", "LYZ", "C1QA", "C1QC", "CD14", "ITGAX", "MRC1", "FCGR3A", "APOE"),
                   3.4, 1.3, 1.1, 0.95, 6.5),
    "endothelial": (("PECAM1", "VWF", "CDH5", "KDR", "CLDN5", "EGFL7", "ACKR1", "PLVAP"), 2.8, 2.4, 1.3, 0.5, 3.5),
    "adipocyte": (("ADIPOQ", "LEP", "PLIN1", "FABP4", "LPL", "CIDEA"), 2.6, 2.0, 1.0, 0.05, 14.0),
}

#: niche -> (cell-type mixture, cell density relative to the lattice, stroma eosin density)
NICHES: dict[str, tuple[dict[str, float], float, float]] = {
    "tumour": ({"tumour_epithelial": 0.78, "fibroblast": 0.08, "t_cell": 0.06, "macrophage": 0.08}, 1.0, 0.25),
    "stroma": ({"fibroblast": 0.7, "endothelial": 0.1, "macrophage": 0.1, "t_cell": 0.1}, 0.55, 0.95),
    "immune": ({"t_cell": 0.72, "macrophage": 0.18, "fibroblast": 0.05, "endothelial": 0.05}, 1.0, 0.35),
    "duct": ({"normal_epithelial": 0.75, "fibroblast": 0.15, "t_cell": 0.05, "endothelial": 0.05}, 0.9, 0.5),
    "adipose": ({"adipocyte": 0.6, "endothelial": 0.25, "fibroblast": 0.1, "macrophage": 0.05}, 0.3, 0.1),
}

#: continuous cell states varying smoothly in space; each has a gene program and an image effect:
#: (name, image effect on nuclei haematoxylin, on cytoplasm eosin, on nucleus size)
STATES: tuple[tuple[str, float, float, float], ...] = (
    ("proliferation", 0.9, 0.0, 0.45),  # larger, hyperchromatic nuclei
    ("hypoxia_stress", -0.4, 1.4, 0.0),  # pale nuclei, eosinophilic cytoplasm
    ("inflammation", 0.4, -0.5, -0.25),  # small dark nuclei, less cytoplasm
)

# Haematoxylin and eosin optical-density colour vectors (R, G, B), as in colour-deconvolution practice.
_H_VEC = np.array([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of a synthetic dataset (all lengths in µm)."""

    panel: str = "human-breast-panel"  # vendored gene panel whose genes and mean counts are used
    n_donors: int = 6  # donors; each has its own batch effect in both modalities
    samples_per_donor: int = 1  # tissue sections per donor
    sample_size_um: float = 1400.0  # side of each square section
    pixel_size_um: float = 1.0  # µm per pixel of the rendered H&E image
    cell_spacing_um: float = 11.0  # lattice spacing of cells before density thinning
    spot_pitch_um: float = 60.0  # centre distance of pseudo-spots
    spot_grid: str = "hex"  # "hex" or "square"
    spot_diameter_um: float = 55.0  # pseudo-spot diameter (Visium: 55 µm)
    patch_fov_um: float = 112.0  # field of view of each H&E patch
    niche_scale_um: float = 150.0  # length scale of the niche fields
    state_scale_um: float = 110.0  # length scale of the continuous cell-state fields (see STATES)
    counts_per_cell: float | None = None  # mean counts per cell; None -> panel spot mean / cells per spot
    donor_gene_shift_sd: float = 0.25  # sd of the per-donor, per-gene log shift
    donor_stain_shift_sd: float = 0.08  # sd of the per-donor stain vector perturbation
    seed: int = 0  # global seed: the same config gives the same bytes

    @property
    def patch_px(self) -> int:
        return int(round(self.patch_fov_um / self.pixel_size_um))


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
    """n smooth random fields as random Fourier features; returns a function xy -> (len(xy), n)."""
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
        genes = rng.choice(panel.n_genes, size=max(4, panel.n_genes // 20), replace=False)
        lfc[k, genes] = rng.uniform(1.5, 2.5, size=len(genes))
    return lfc


def _nucleus_stamp(radius_px: float, elong: float, angle: float) -> np.ndarray:
    """A soft elliptical disc (values 0..1) for a nucleus or a cytoplasm."""
    a, b = radius_px * np.sqrt(elong), radius_px / np.sqrt(elong)
    half = int(np.ceil(max(a, b))) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx * c + yy * s) / a, (-xx * s + yy * c) / b
    r = np.sqrt(u * u + v * v)
    return np.clip(1.5 - r * 1.1, 0.0, 1.0) ** 1.5


def _add_stamp(canvas: np.ndarray, stamp: np.ndarray, cy: float, cx: float, weight: float) -> None:
    h = stamp.shape[0] // 2
    y0, x0 = int(round(cy)) - h, int(round(cx)) - h
    y1, x1 = y0 + stamp.shape[0], x0 + stamp.shape[1]
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1 = stamp.shape[0] - max(0, y1 - canvas.shape[0])
    sx1 = stamp.shape[1] - max(0, x1 - canvas.shape[1])
    if sy1 <= sy0 or sx1 <= sx0:
        return
    canvas[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += weight * stamp[sy0:sy1, sx0:sx1]


def _render(rng, cfg: SyntheticConfig, cell_xy, cell_type, cell_state, niche_prob, donor_stain) -> np.ndarray:
    px = cfg.pixel_size_um
    n = int(round(cfg.sample_size_um / px))
    types = list(CELL_TYPES.values())
    stroma_level = np.array([v[2] for v in NICHES.values()])
    # Stroma: eosin density following the niche mixture, with fibrous anisotropic texture.
    coarse = max(1, int(round(20.0 / px)))
    gy, gx = np.mgrid[0:n:coarse, 0:n:coarse]
    grid_xy = np.column_stack([gx.ravel(), gy.ravel()]) * px
    level = (niche_prob(grid_xy) @ stroma_level).reshape(gy.shape)
    level = ndimage.zoom(level, (n / gy.shape[0], n / gy.shape[1]), order=1)[:n, :n]
    fib = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=(0.8 / px, 4.0 / px))
    fib = (fib - fib.min()) / (np.ptp(fib) + 1e-9)
    eosin = level * (0.45 + 0.9 * fib)
    haem = np.zeros((n, n))
    fx = np.array([[st[1], st[2], st[3]] for st in STATES])  # (n_states, 3)
    effect = 1.0 + cell_state @ fx  # per cell: haematoxylin, eosin, size multipliers
    for t in range(len(types)):
        sel = np.flatnonzero(cell_type == t)
        _markers, r_nuc, elong, h_dens, e_dens, r_cyt = types[t]
        for i in sel:
            ang = rng.uniform(0, np.pi)
            jitter = rng.uniform(0.9, 1.1)
            h_mul, e_mul, size_mul = np.clip(effect[i], 0.3, None)
            cy, cx = cell_xy[i, 1] / px, cell_xy[i, 0] / px
            _add_stamp(eosin, _nucleus_stamp(r_cyt * jitter / px, 1.0 + 0.3 * (elong - 1), ang), cy, cx, e_dens * e_mul)
            r = r_nuc * jitter * size_mul / px
            _add_stamp(haem, _nucleus_stamp(r, elong, ang), cy, cx, h_dens * jitter * h_mul)
    h_vec = _H_VEC + donor_stain[0]
    e_vec = _E_VEC + donor_stain[1]
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    od = haem[..., None] * h_vec + eosin[..., None] * e_vec * 0.8
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


def generate_sample(cfg: SyntheticConfig, donor_index: int, sample_index: int, panel: GenePanel | None = None):
    """Generate one section of one donor. Deterministic in ``(cfg, donor_index, sample_index)``."""
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

    # Niche fields and per-location type mixture.
    niche_names = list(NICHES)
    comp = np.zeros((len(niche_names), len(CELL_TYPES)))
    type_names = list(CELL_TYPES)
    for k, (mix, _dens, _stroma) in enumerate(NICHES.values()):
        for t, p in mix.items():
            comp[k, type_names.index(t)] = p
    density = np.array([v[1] for v in NICHES.values()])
    field_fn = _smooth_fields(rng, len(niche_names), cfg.niche_scale_um)

    def niche_prob(xy):
        z = 3.5 * field_fn(xy)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    # Cells on a jittered lattice, thinned by the local niche density.
    s = cfg.cell_spacing_um
    g = np.arange(s / 2, cfg.sample_size_um, s)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    xy = xy + rng.uniform(-0.3 * s, 0.3 * s, size=xy.shape)
    p_niche = niche_prob(xy)
    keep = rng.uniform(size=len(xy)) < p_niche @ density
    xy, p_niche = xy[keep], p_niche[keep]
    p_type = p_niche @ comp
    p_type /= p_type.sum(1, keepdims=True)
    cell_type = (rng.uniform(size=(len(xy), 1)) > np.cumsum(p_type, axis=1)).sum(1)
    cell_type = np.minimum(cell_type, len(type_names) - 1)
    state_fn = _smooth_fields(rng, len(STATES), cfg.state_scale_um)
    cell_state = 1.0 / (1.0 + np.exp(-3.0 * state_fn(xy)))  # (n_cells, n_states) in (0, 1)

    # Expression: gamma-Poisson around the type program, with the donor's shift and library factor.
    cells_per_spot = np.pi * (cfg.spot_diameter_um / 2) ** 2 / s**2 * float(density.mean())
    per_cell = cfg.counts_per_cell or float(panel.mean_counts.sum() / cells_per_spot)
    base = np.log(panel.mean_counts / panel.mean_counts.sum() + 1e-8)
    logits = base[None, :] + programs[cell_type] + cell_state @ state_programs + gene_shift[None, :]
    frac = np.exp(logits - logits.max(1, keepdims=True))
    frac /= frac.sum(1, keepdims=True)
    lib = per_cell * lib_factor * np.exp(rng.normal(0, 0.3, size=(len(xy), 1)))
    mu = frac * lib
    counts = rng.poisson(rng.gamma(shape=4.0, scale=mu / 4.0)).astype(np.float32)
    cell_counts = sp.csr_matrix(counts)

    image = _render(rng, cfg, xy, cell_type, cell_state, niche_prob, stain)

    spots = spot_grid((0, 0, cfg.sample_size_um, cfg.sample_size_um), pitch_um=cfg.spot_pitch_um,
                      kind=cfg.spot_grid, margin_um=cfg.patch_fov_um / 2)
    assign = assign_cells(xy, spots, diameter_um=cfg.spot_diameter_um)
    spot_counts = pool_counts(assign, cell_counts)
    n_cells = np.asarray(assign.sum(1)).ravel().astype(np.int32)
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
        extra={"cell_state": cell_state},
    )
