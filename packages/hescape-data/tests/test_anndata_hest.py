"""AnnData + image and HEST-1k folders -> datasets (issue 9), tested against physical truth written by the tests.

Truth: synthetic Visium arrays (spots 100 µm apart at a known µm/px, a dark disc of exactly 55 µm painted at every
spot, a green dot at one spot), synthetic cells and transcripts at known µm positions, and the vendored Space
Ranger fixture built by the independent Visium builder. Inputs are written in their real layouts: AnnData through
the anndata API (obsm['spatial'] in full-resolution pixels, as scanpy/squidpy), a tiled TIFF, and a HEST-1k folder
(st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json, transcripts/<id>_transcripts.parquet).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hescape.data.arrow import pyarrow_dataset, read_manifest, verify_dataset
from hescape.data.cli import main
from hescape.data.errors import HescapeDataError, InputFormatError
from hescape.data.ingest import PatchOptions, build_visium_dataset
from hescape.data.ingest_more import build_anndata_dataset, build_hest_dataset
from PIL import Image
from scipy import ndimage

ad = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
GREEN = (0, 255, 0)
FAST = {"progress": False, "qc": False}
#: Small patches (16 µm at 1 µm/px) where a test looks at counts and coordinates only: faster on 2 shared cores.
QUICK = {**FAST, "geometry_changes": {"fov_um": 16.0, "um_per_px": 1.0}}


# ------------------------------------------------------------------------------------------------ helpers
def _tiled_tiff(path: Path, img: np.ndarray) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img, photometric="rgb", tile=(128, 128), compression="zlib")
    return path


def _hest_wsi(path: Path, img: np.ndarray) -> Path:
    """A WSI as HEST writes it (``utils.tiff_save``, pyvips ``pyramid=True``): 256 px LZW tiles, the full image
    then reduced-resolution pages (subfiletype 1) halving down, resolution in pixels per centimetre."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression="lzw", photometric="rgb", resolution=(2e4, 2e4, "CENTIMETER"))
        k = 2
        while min(img.shape[:2]) // k >= 128:
            tw.write(np.ascontiguousarray(img[::k, ::k]), tile=(256, 256), compression="lzw", photometric="rgb",
                     subfiletype=1)
            k *= 2
    return path


def _dot(img: np.ndarray, xy_px, radius_px: float = 4.0) -> None:
    """Paint a green dot (exact pixel-centre test) centred at continuous pixel position ``xy_px``."""
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(xx + 0.5 - xy_px[0]) ** 2 + (yy + 0.5 - xy_px[1]) ** 2 <= radius_px**2] = GREEN


def _table(out: Path):
    return pyarrow_dataset(out).to_table()


def _patch(row_image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row_image["bytes"])).convert("RGB"))


def _green_centroid(patch: np.ndarray):
    m = (patch[..., 1] > 200) & (patch[..., 0] < 80) & (patch[..., 2] < 80)
    return None if not m.any() else np.array(ndimage.center_of_mass(m))[::-1]  # (x, y) in pixel-index units


def _visium_anndata(truth: dict, *, with_array: bool = True, x=None) -> ad.AnnData:
    """The in-tissue spots of a synthetic Visium array as scanpy writes them: obsm['spatial'] = (x, y) full-res px."""
    keep = np.flatnonzero(truth["in_tissue"] == 1)
    obs = pd.DataFrame(index=[truth["barcodes"][i] for i in keep])
    if with_array:
        obs["array_row"] = truth["array_rc"][keep, 0]
        obs["array_col"] = truth["array_rc"][keep, 1]
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(len(truth["genes"]))]}, index=truth["genes"])
    a = ad.AnnData(X=truth["counts"].toarray().astype(np.float32) if x is None else x, obs=obs, var=var)
    a.obsm["spatial"] = truth["px"][keep]
    return a


@pytest.fixture
def visium_truth(synth, tmp_path) -> dict:
    """A 6 × 12 Visium array at 0.8 µm/px, rewritten as a tiled TIFF with a green dot at the 10th in-tissue spot."""
    truth = synth.write_visium_outs(tmp_path / "src", um_per_px=0.8, seed=4)
    import tifffile

    img = tifffile.imread(truth["image"])
    keep = np.flatnonzero(truth["in_tissue"] == 1)
    truth["dot_spot"] = truth["barcodes"][keep[10]]
    _dot(img, truth["px"][keep[10]])
    truth["tif"] = _tiled_tiff(tmp_path / "he.tif", img)
    return truth


def _write_h5ad(a, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(path)
    return path


# ------------------------------------------------------------------------------------------------ AnnData
def test_anndata_visium_spots(synth, visium_truth, tmp_path):
    t = visium_truth
    h5 = _write_h5ad(_visium_anndata(t), tmp_path / "v.h5ad")
    out = build_anndata_dataset(h5, tmp_path / "ds", image=t["tif"], donor="P1", progress=False)
    m = verify_dataset(out)
    assert m["samples"][0]["source_um_per_px"] == pytest.approx(0.8, rel=1e-4)  # measured from the lattice
    assert m["geometry"]["name"] == "visium" and m["ingest"]["metadata"]["level"] == "spots"
    assert (out / "qc" / "v.png").stat().st_size > 5_000
    tab = _table(out)
    ids = tab.column("spot_id").to_pylist()
    keep = np.flatnonzero(t["in_tissue"] == 1)
    assert ids == [t["barcodes"][i] for i in keep]  # every row keeps its obs name, in obs order
    gexp = np.asarray(tab.column("gexp").to_pylist(), dtype=np.float64)
    np.testing.assert_array_equal(gexp, t["counts"].toarray())
    coords = np.asarray(tab.column("cell_coords").to_pylist())
    pairs = np.linalg.norm(coords[:, None] - coords[None], axis=-1)[np.triu_indices(len(coords), 1)]
    np.testing.assert_allclose(pairs[pairs < 150], 100.0, atol=0.5)  # neighbours 100 µm apart
    images = tab.column("image").to_pylist()
    for sid, img in zip(ids, images, strict=True):
        p = _patch(img)
        c = _green_centroid(p)
        if sid == t["dot_spot"]:  # the dot planted at this spot is at its patch's centre (111.5 in index units)
            np.testing.assert_allclose(c, [111.5, 111.5], atol=0.6)
        else:
            assert c is None
            assert synth.dark_disc_diameter_um(p, 0.5) == pytest.approx(55.0, abs=1.5)  # a 55 µm disc measures 55 µm


def test_anndata_given_scale_warns_when_it_disagrees(visium_truth, tmp_path, capsys):
    t = visium_truth
    h5 = _write_h5ad(_visium_anndata(t), tmp_path / "v.h5ad")
    argv = ["build", "anndata", str(h5), "--image", str(t["tif"]), "--image-um-per-px", "0.84", "--out",
            str(tmp_path / "ds"), "--quiet", "--no-qc", "--fov-um", "16", "--um-per-px", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "hescape-data: warning:" in err and "disagrees with the spot lattice" in err and "+5.0%" in err
    assert read_manifest(tmp_path / "ds")["samples"][0]["source_um_per_px"] == pytest.approx(0.84)
    # without array_row/array_col the spacing of the spots (100 µm) is the lattice
    h5b = _write_h5ad(_visium_anndata(t, with_array=False), tmp_path / "nb.h5ad")
    with pytest.warns(UserWarning, match="nearest-neighbour"):
        build_anndata_dataset(h5b, tmp_path / "ds2", image=t["tif"], image_um_per_px=0.76, level="spots", **QUICK)
    out = build_anndata_dataset(h5b, tmp_path / "ds3", image=t["tif"], level="spots", **QUICK)
    assert read_manifest(out)["samples"][0]["source_um_per_px"] == pytest.approx(0.8, rel=2e-3)


def test_anndata_scale_factors_cross_checked(visium_truth, tmp_path):
    from hescape.data.readers.anndata import read_anndata

    t = visium_truth

    def read(uns, **kw):
        a = _visium_anndata(t)
        a.uns["spatial"] = uns
        s = read_anndata(_write_h5ad(a, tmp_path / "s.h5ad"), image=t["tif"], **kw)
        s.close()
        return s.metadata

    # Space Ranger's spot_diameter_fullres is a 65 µm spot; 10 % off: the lattice wins, with a warning
    with pytest.warns(UserWarning, match="using the lattice"):
        meta = read({"lib": {"scalefactors": {"spot_diameter_fullres": 65.0 / 0.8 * 1.10}}})
    assert meta["um_per_px"] == pytest.approx(0.8, rel=1e-4)
    assert meta["um_per_px_scalefactors"] == pytest.approx(0.8 / 1.10, rel=1e-6)
    # HEST-1k writes a 55 µm spot there (with tissue_downscaled_fullres_scalef): read as such, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta = read({"ST": {"scalefactors": {"spot_diameter_fullres": 55.0 / 0.8,
                                             "tissue_downscaled_fullres_scalef": 0.1}}})
    assert meta["um_per_px_scalefactors"] == pytest.approx(0.8)
    # 40 % off: scale factors of another run or image, refused
    with pytest.raises(InputFormatError, match="different runs"):
        read({"lib": {"scalefactors": {"spot_diameter_fullres": 65.0 / 0.8 * 1.4}}})
    # spots read as cells are 100 µm apart: warned
    with pytest.warns(UserWarning, match="more like spots"):
        meta = read({}, level="cells", image_um_per_px=0.8)
    assert meta["level"] == "cells"


def test_anndata_normalised_counts_refused(visium_truth, tmp_path):
    t = visium_truth
    raw = t["counts"].toarray().astype(np.float32)
    norm = np.log1p(raw / raw.sum(1, keepdims=True) * 1e4).astype(np.float32)
    h5 = _write_h5ad(_visium_anndata(t, x=norm), tmp_path / "n.h5ad")
    with pytest.raises(InputFormatError, match=r"layers\['counts'\]") as e:
        build_anndata_dataset(h5, tmp_path / "ds", image=t["tif"], **FAST)
    assert "\n" not in str(e.value) and "non-integer" in str(e.value)
    assert not (tmp_path / "ds").exists()
    a = _visium_anndata(t, x=norm)
    a.layers["counts"] = raw  # the usual scanpy layout: X normalised, raw counts in a layer
    out = build_anndata_dataset(_write_h5ad(a, tmp_path / "c.h5ad"), tmp_path / "ds", image=t["tif"], **QUICK)
    np.testing.assert_array_equal(np.asarray(_table(out).column("gexp").to_pylist()), raw)
    assert read_manifest(out)["ingest"]["metadata"]["counts_from"] == "layers['counts']"


def test_anndata_without_spatial_refused(visium_truth, tmp_path, capsys):
    a = _visium_anndata(visium_truth)
    del a.obsm["spatial"]
    h5 = _write_h5ad(a, tmp_path / "x.h5ad")
    argv = ["build", "anndata", str(h5), "--image", str(visium_truth["tif"]), "--out", str(tmp_path / "ds"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hescape-data: error: ") and "\n" not in err and "obsm['spatial']" in err
    assert not (tmp_path / "ds").exists()


def test_anndata_positions_off_the_image_refused(visium_truth, tmp_path):
    import tifffile

    h5 = _write_h5ad(_visium_anndata(visium_truth), tmp_path / "v.h5ad")
    small = _tiled_tiff(tmp_path / "half.tif", tifffile.imread(visium_truth["tif"])[::2, ::2].copy())
    with pytest.raises(InputFormatError, match=r"obsm\['spatial'\] in pixels of half\.tif") as e:
        build_anndata_dataset(h5, tmp_path / "ds", image=small, **FAST)
    assert "\n" not in str(e.value) and not (tmp_path / "ds").exists()


def _cells(n: int, seed: int, extent_um: float = 400.0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(60.0, extent_um - 60.0, size=(n, 2))
    counts = rng.poisson(1.5, size=(n, 5)).astype(np.float32)
    return xy, counts


def test_anndata_cells_pooled(synth, tmp_path):
    mpp = 0.5
    xy_um, counts = _cells(400, seed=0)
    img = synth.he_image((800, 800), np.zeros((0, 2)), 10.0, seed=1)
    _dot(img, xy_um[7] / mpp, radius_px=3)
    tif = _tiled_tiff(tmp_path / "he.tif", img)
    a = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(xy_um))]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(5)]))
    a.obsm["spatial"] = xy_um / mpp
    h5 = _write_h5ad(a, tmp_path / "cells.h5ad")
    with pytest.raises(InputFormatError, match="--image-um-per-px"):  # no scale anywhere: refused, named
        build_anndata_dataset(h5, tmp_path / "ds", image=tif, **FAST)
    assert not (tmp_path / "ds").exists()
    out = build_anndata_dataset(h5, tmp_path / "ds", image=tif, image_um_per_px=mpp, geometry="visium", **FAST)
    m = read_manifest(out)
    assert m["ingest"]["metadata"]["level"] == "cells" and m["geometry"]["name"] == "visium"
    tab = _table(out)
    centres = np.asarray(tab.column("cell_coords").to_pylist())
    gexp = np.asarray(tab.column("gexp").to_pylist())
    inside = np.linalg.norm(centres[:, None] - xy_um[None], axis=-1) <= 27.5  # brute force, 55 µm discs
    np.testing.assert_allclose(gexp, inside.astype(np.float64) @ counts, rtol=1e-6)
    np.testing.assert_array_equal(tab.column("n_cells").to_numpy(), inside.sum(1))
    ids = tab.column("spot_id").to_pylist()
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"hex_r\d{4}_c\d{4}", i) for i in ids)
    # the spot ids are lattice positions from the cells' lower-left corner: rows 100·√3/2 µm apart, columns
    # 100 µm apart, odd rows shifted by 50 µm (Visium's hex lattice)
    rc = np.array([[int(v) for v in re.findall(r"\d+", i)] for i in ids])
    expect = np.column_stack([rc[:, 1] * 100.0 + (rc[:, 0] % 2) * 50.0, rc[:, 0] * 50.0 * math.sqrt(3)])
    np.testing.assert_allclose(centres - xy_um.min(0), expect, atol=1e-6)
    rec = m["samples"][0]["spot_ids"]
    assert rec["kind"] == "lattice" and rec["origin_um"] == pytest.approx(xy_um.min(0).tolist())
    # the green dot at cell 7 is where its spot's patch says it is
    k = int(np.argmin(np.linalg.norm(centres - xy_um[7], axis=1)))
    c = _green_centroid(_patch(tab.column("image")[k].as_py()))
    np.testing.assert_allclose(c, [111.5, 111.5] + (xy_um[7] - centres[k]) / 0.5, atol=0.6)


def _fixture_as_anndata(outs: Path) -> ad.AnnData:
    """The vendored Space Ranger 1.0 output read with h5py/csv into scanpy's layout (uns['spatial'] included)."""
    import scipy.sparse as sp

    with h5py.File(outs / "filtered_feature_bc_matrix.h5") as f:
        g = f["matrix"]
        n_feat, n_bc = (int(v) for v in g["shape"][:])
        x = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_feat, n_bc)).T.tocsr()
        barcodes = [b.decode() for b in g["barcodes"][:]]
        names = [b.decode() for b in g["features/name"][:]]
        ids = [b.decode() for b in g["features/id"][:]]
        types = [b.decode() for b in g["features/feature_type"][:]]
    with open(outs / "spatial" / "tissue_positions_list.csv", newline="") as fh:
        pos = {r[0]: r for r in csv.reader(fh)}
    obs = pd.DataFrame({"array_row": [int(pos[b][2]) for b in barcodes],
                        "array_col": [int(pos[b][3]) for b in barcodes]}, index=barcodes)
    var = pd.DataFrame({"gene_ids": ids, "feature_types": types}, index=names)
    a = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    a.obsm["spatial"] = np.array([[float(pos[b][5]), float(pos[b][4])] for b in barcodes])  # x = col, y = row
    sf = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    lowres = np.asarray(Image.open(outs / "spatial" / "tissue_lowres_image.png").convert("RGB"))
    a.uns["spatial"] = {"lib": {"images": {"lowres": lowres.astype(np.float32) / 255.0}, "scalefactors": sf}}
    return a


def test_anndata_of_the_visium_fixture_equals_the_visium_builder(visium_outs, tmp_path):
    kw = {"image": "lowres", "patch": PatchOptions(max_upsample=40), **FAST}
    ref = build_visium_dataset(visium_outs, tmp_path / "ref", **kw)
    h5 = _write_h5ad(_fixture_as_anndata(visium_outs), tmp_path / "fx.h5ad")
    ref_mpp = read_manifest(ref)["ingest"]["metadata"]["um_per_fullres_px"]
    # the same pixel size: the same dataset, row for row (counts, µm coordinates, patch bytes)
    got = build_anndata_dataset(h5, tmp_path / "got", image_um_per_px=ref_mpp, **kw)
    a, b = _table(ref), _table(got)
    assert a.column("gexp").to_pylist() == b.column("gexp").to_pylist()
    np.testing.assert_allclose(np.asarray(b.column("cell_coords").to_pylist()),
                               np.asarray(a.column("cell_coords").to_pylist()), rtol=1e-12)
    assert [r["bytes"] for r in a.column("image").to_pylist()] == [r["bytes"] for r in b.column("image").to_pylist()]
    assert b.column("spot_id").to_pylist() == list(ad.read_h5ad(h5).obs_names)
    # measured here from the in-tissue spots' lattice: within 0.2 % of the builder's (all positions rows)
    from hescape.data.readers.anndata import read_anndata

    own = read_anndata(h5, image="lowres")
    own.close()
    assert own.metadata["um_per_px"] == pytest.approx(ref_mpp, rel=2e-3)
    assert own.metadata["um_per_px_source"].startswith("obs array_row/array_col")


def test_anndata_missing_package_named(monkeypatch, visium_truth, tmp_path):
    monkeypatch.setitem(sys.modules, "anndata", None)  # `import anndata` raises ImportError
    with pytest.raises(HescapeDataError, match=re.escape('pip install "hescape-data[anndata]"')):
        build_anndata_dataset(tmp_path / "x.h5ad", tmp_path / "ds", image=visium_truth["tif"], **FAST)
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------------------ HEST-1k
GENES = ["ERBB2", "ESR1", "KRT8", "PTPRC", "ACTA2", "EPCAM"]
CONTROLS = ["NegControlProbe_00042", "BLANK_0006"]


def _hest_meta(root: Path, sid: str, tech: str, mpp: float) -> None:
    meta = {"dataset_title": f"Synthetic {tech}", "id": sid, "image_filename": f"{sid}.tif", "organ": "Breast",
            "disease_state": "Cancer", "oncotree_code": "IDC", "species": "Homo sapiens", "patient": "patient 1",
            "st_technology": tech, "inter_spot_dist": 100.0 if tech == "Visium" else float("nan"),
            "spot_diameter": 55.0 if tech == "Visium" else float("nan"), "spots_under_tissue": 10,
            "pixel_size_um_embedded": float("nan"), "pixel_size_um_estimated": mpp, "magnification": "20x"}
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta, indent=3))  # NaN written as HEST does


def _hest_visium(synth, root: Path, sid: str, *, meta_mpp: float, seed: int) -> dict:
    t = synth.write_visium_outs(root.parent / f"src_{sid}", um_per_px=0.8, n_genes=len(GENES), seed=seed)
    keep = np.flatnonzero(t["in_tissue"] == 1)
    obs = pd.DataFrame({"in_tissue": 1, "array_row": t["array_rc"][keep, 0], "array_col": t["array_rc"][keep, 1],
                        "pxl_col_in_fullres": t["px"][keep, 0], "pxl_row_in_fullres": t["px"][keep, 1]},
                       index=[t["barcodes"][i] for i in keep])
    a = ad.AnnData(X=t["counts"].toarray().astype(np.float32), obs=obs,
                   var=pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(len(GENES))]}, index=GENES))
    a.obsm["spatial"] = t["px"][keep]
    a.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": np.zeros((4, 4, 3), np.uint8)},
                               "scalefactors": {"spot_diameter_fullres": 55.0 / 0.8,
                                                "tissue_downscaled_fullres_scalef": 0.1}}}
    _write_h5ad(a, root / "st" / f"{sid}.h5ad")
    import tifffile

    _hest_wsi(root / "wsis" / f"{sid}.tif", tifffile.imread(t["image"]))
    _hest_meta(root, sid, "Visium", meta_mpp)
    return {**t, "ids": [t["barcodes"][i] for i in keep]}


def _hest_xenium(synth, root: Path, sid: str, *, mpp: float, meta_mpp: float, seed: int,
                 transcripts: bool = True) -> dict:
    """Cells with transcripts at known µm positions; he_x/he_y = µm / mpp + offset; HEST's 100 µm pseudo-spots."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_cells, offset = 300, np.array([40.0, 60.0])
    cell_xy = rng.uniform(50.0, 450.0, size=(n_cells, 2))
    per_cell = rng.poisson(6, n_cells)
    owner = np.repeat(np.arange(n_cells), per_cell)
    xy = cell_xy[owner] + rng.normal(0, 2.0, size=(len(owner), 2))
    feats = rng.choice(GENES, size=len(owner))
    cell_ids = np.array([f"cell{c:04d}-1" for c in owner], dtype=object)
    n_free = 400  # unassigned transcripts and control probes
    xy = np.vstack([xy, rng.uniform(50.0, 450.0, size=(n_free, 2))])
    feats = np.concatenate([feats, rng.choice(GENES + CONTROLS, size=n_free)])
    cell_ids = np.concatenate([cell_ids, np.array(["UNASSIGNED"] * n_free, dtype=object)])
    qv = rng.choice([10.0, 25.0, 40.0], size=len(xy), p=[0.15, 0.35, 0.5]).astype(np.float32)
    he = xy / mpp + offset
    root.mkdir(parents=True, exist_ok=True)
    if transcripts:
        (root / "transcripts").mkdir(exist_ok=True)
        pq.write_table(pa.table({"transcript_id": np.arange(len(xy), dtype=np.uint64), "cell_id": cell_ids.tolist(),
                                 "overlaps_nucleus": np.zeros(len(xy), np.uint8), "feature_name": feats.tolist(),
                                 "x_location": xy[:, 0], "y_location": xy[:, 1], "z_location": np.zeros(len(xy)),
                                 "qv": qv, "he_x": he[:, 0], "he_y": he[:, 1]}),
                       root / "transcripts" / f"{sid}_transcripts.parquet")
    # HEST's st/<id>.h5ad: every transcript pooled in 100 µm squares at the metadata pixel size (readers.py)
    step = 100.0 / meta_mpp
    lo = he.min(0)
    col = np.floor((he[:, 0] - lo[0]) / step).astype(int)
    row = np.floor((he[:, 1] - lo[1]) / step).astype(int)
    feats_all = GENES + CONTROLS
    key = row * 1000 + col
    uniq = np.unique(key)
    x = np.zeros((len(uniq), len(feats_all)), np.float32)
    np.add.at(x, (np.searchsorted(uniq, key), [feats_all.index(f) for f in feats]), 1)
    r, c = uniq // 1000, uniq % 1000
    obs = pd.DataFrame({"in_tissue": True, "array_row": r, "array_col": c},
                       index=[f"{a:03d}x{b:03d}" for a, b in zip(r, c, strict=True)])
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=feats_all))
    a.obsm["spatial"] = np.column_stack([lo[0] + (c + 0.5) * step, lo[1] + (r + 0.5) * step])
    _write_h5ad(a, root / "st" / f"{sid}.h5ad")
    shape = (int(he[:, 1].max() + 240), int(he[:, 0].max() + 240))  # the WSI covers every pseudo-spot centre
    img = synth.he_image(shape, cell_xy / mpp + offset, 8.0 / mpp, seed=seed)
    _hest_wsi(root / "wsis" / f"{sid}.tif", img)
    _hest_meta(root, sid, "Xenium", meta_mpp)
    good = (qv >= 20) & np.isin(feats, GENES)
    return {"he": he, "feats": feats, "good": good, "cell_ids": cell_ids, "st": a, "mpp": mpp}


@pytest.fixture
def hest_dir(synth, tmp_path) -> tuple[Path, dict, dict]:
    root = tmp_path / "hest"
    v = _hest_visium(synth, root, "V1", meta_mpp=0.8, seed=5)
    x = _hest_xenium(synth, root, "X1", mpp=0.5, meta_mpp=0.5 * 1.05, seed=6)  # HEST's estimate 5 % off
    return root, v, x


def test_hest_visium_and_xenium_into_one_dataset(synth, hest_dir, tmp_path):
    root, v, x = hest_dir
    warned = r"X1: metadata pixel_size_um_estimated is 0\.525 µm/px, measured 0\.5 µm/px .*-4\.8%"
    with pytest.warns(UserWarning, match=warned) as rec:
        out = build_hest_dataset(root, tmp_path / "ds", ids="V1,X1", pixel_size="lattice", progress=False)
    # the Visium metadata agrees with its lattice: no pixel-size warning names V1 (its registration is "not
    # checked" on this all-tissue synthetic image, which is warned about separately)
    assert not any("V1" in str(w.message) and "pixel_size" in str(w.message) for w in rec)
    m = verify_dataset(out)
    assert [s["name"] for s in m["samples"]] == ["V1", "X1"] and m["genes"] == GENES
    assert m["geometry"]["name"] == "visium"  # a Visium sample fixes 55 µm discs, 100 µm apart, for both
    assert m["gene_ids"][0] == "ENSG00000000000"  # the Ensembl id the Visium sample gives
    assert {s["donor"] for s in m["samples"]} == {"Synthetic Visium / patient 1", "Synthetic Xenium / patient 1"}
    assert {s["tissue"] for s in m["samples"]} == {"breast"}
    assert m["ingest"]["counts_from"] == {"V1": "spots", "X1": "transcripts"}
    assert (out / "qc" / "X1.png").is_file()
    tab = _table(out)
    names = np.array(tab.column("name").to_pylist())
    gexp = np.asarray(tab.column("gexp").to_pylist())
    ids = np.array(tab.column("spot_id").to_pylist())
    coords = np.asarray(tab.column("cell_coords").to_pylist())
    # Visium: spots as they are, barcodes kept, counts equal
    assert ids[names == "V1"].tolist() == v["ids"]
    np.testing.assert_array_equal(gexp[names == "V1"], v["counts"].toarray())
    for img in np.array(tab.column("image").to_pylist(), dtype=object)[names == "V1"]:  # read from the pyramid
        assert synth.dark_disc_diameter_um(_patch(img), 0.5) == pytest.approx(55.0, abs=1.5)
    # Xenium: transcripts with qv >= 20 of real genes within 27.5 µm of each centre (µm = WSI px × 0.5, measured)
    xs = names == "X1"
    tx_um = x["he"][x["good"]] * 0.5
    onehot = (x["feats"][x["good"]][:, None] == np.array(GENES)[None]).astype(np.float64)
    inside = np.linalg.norm(coords[xs][:, None] - tx_um[None], axis=-1) <= 27.5
    np.testing.assert_allclose(gexp[xs], inside.astype(np.float64) @ onehot)
    assert all(re.fullmatch(r"hex_r\d{4}_c\d{4}", i) for i in ids[xs])
    sm = next(s for s in m["samples"] if s["name"] == "X1")
    assert sm["source_um_per_px"] == pytest.approx(0.5, rel=1e-6)
    assert sm["pixel_size"]["disagreement"] == pytest.approx(1 / 1.05 - 1, abs=1e-4)


def test_hest_missing_id_refused(hest_dir, tmp_path, capsys):
    root, _, _ = hest_dir
    with pytest.raises(InputFormatError, match=r"\['TENX95'\].*available ids: V1, X1") as e:
        build_hest_dataset(root, tmp_path / "ds", ids=["V1", "TENX95"], **FAST)
    assert "\n" not in str(e.value)
    assert main(["build", "hest", str(root), "--ids", "V1,TENX95", "--out", str(tmp_path / "ds"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hescape-data: error: ") and "\n" not in err and "TENX95" in err and "V1, X1" in err
    assert not (tmp_path / "ds").exists()


def test_hest_visium_pixel_size_off_by_5_percent_warned(synth, tmp_path, capsys):
    root = tmp_path / "hest"
    _hest_visium(synth, root, "V2", meta_mpp=0.84, seed=7)  # the metadata says 0.84, the spots say 0.8
    assert main(["build", "hest", str(root), "--ids", "all", "--out", str(tmp_path / "ds"), "--quiet",
                 "--no-qc", "--fov-um", "16", "--um-per-px", "1"]) == 0
    err = capsys.readouterr().err
    assert "hescape-data: warning: HEST sample V2" in err and "-4.8%" in err and "--pixel-size lattice" in err
    assert read_manifest(tmp_path / "ds")["samples"][0]["source_um_per_px"] == pytest.approx(0.84)  # HEST's own
    out = build_hest_dataset(root, tmp_path / "ds2", ids="all", pixel_size="lattice", **QUICK)
    coords = np.asarray(_table(out).column("cell_coords").to_pylist())
    pairs = np.linalg.norm(coords[:, None] - coords[None], axis=-1)[np.triu_indices(len(coords), 1)]
    np.testing.assert_allclose(pairs[pairs < 150], 100.0, atol=0.5)  # spots 100 µm apart with the lattice


def test_hest_xenium_pseudo_spots_cells_and_missing_transcripts(synth, tmp_path):
    root = tmp_path / "hest"
    x = _hest_xenium(synth, root, "X2", mpp=0.5, meta_mpp=0.5, seed=8)
    # --geometry hest: HEST's own 100 µm pseudo-spots, kept as they are (control probes left out)
    out = build_hest_dataset(root, tmp_path / "spots", ids="X2", geometry="hest", **QUICK)
    tab = _table(out)
    st = x["st"]
    keep_rows = np.asarray(st.X[:, : len(GENES)].sum(1)).ravel() >= 1
    assert tab.column("spot_id").to_pylist() == list(st.obs_names[keep_rows])
    np.testing.assert_array_equal(np.asarray(tab.column("gexp").to_pylist()), st.X[keep_rows][:, : len(GENES)])
    # cells: transcripts grouped by cell_id (unassigned dropped), each cell at its transcripts' mean position
    out = build_hest_dataset(root, tmp_path / "cells", ids="X2", counts_from="cells", geometry="visium", min_qv=0,
                             **QUICK)
    tab = _table(out)
    assigned = (x["cell_ids"] != "UNASSIGNED") & np.isin(x["feats"], GENES)
    cells = np.unique(x["cell_ids"][x["cell_ids"] != "UNASSIGNED"])
    cell_um = np.array([x["he"][x["cell_ids"] == c].mean(0) * 0.5 for c in cells])
    cell_counts = np.array([[np.sum(assigned & (x["cell_ids"] == c) & (x["feats"] == g)) for g in GENES]
                            for c in cells], dtype=np.float64)
    centres = np.asarray(tab.column("cell_coords").to_pylist())
    inside = np.linalg.norm(centres[:, None] - cell_um[None], axis=-1) <= 27.5
    np.testing.assert_allclose(np.asarray(tab.column("gexp").to_pylist()), inside @ cell_counts)
    np.testing.assert_array_equal(tab.column("n_cells").to_numpy(), inside.sum(1))
    # no transcripts table: the default hescape geometry cannot be pooled; refused, naming both ways out
    (root / "transcripts" / "X2_transcripts.parquet").unlink()
    with pytest.raises(InputFormatError, match=r"X2_transcripts\.parquet.*--geometry hest"):
        build_hest_dataset(root, tmp_path / "none", ids="X2", **FAST)
    assert not (tmp_path / "none").exists()


def test_hest_unknown_technology_and_mixed_genes_refused(synth, hest_dir, tmp_path):
    root, _, _ = hest_dir
    meta = json.loads((root / "metadata" / "V1.json").read_text())
    meta["st_technology"] = "Spatial Transcriptomics"
    (root / "metadata" / "V1.json").write_text(json.dumps(meta))
    with pytest.raises(InputFormatError, match="Spatial Transcriptomics"):
        build_hest_dataset(root, tmp_path / "ds", ids="V1", **FAST)
    with pytest.warns(UserWarning) as rec:  # also X1's pixel-size warning (its metadata is 5 % off)
        out = build_hest_dataset(root, tmp_path / "all", ids="all", **QUICK)
    assert any(re.search(r"--ids all: leaving out 1 sample\(s\) of st_technology \['Spatial", str(w.message))
               for w in rec)
    m = read_manifest(out)
    assert [s["name"] for s in m["samples"]] == ["X1"] and m["geometry"]["name"] == "hescape"
    _hest_xenium(synth, root, "X3", mpp=0.5, meta_mpp=0.5, seed=9)
    a = ad.read_h5ad(root / "st" / "X3.h5ad")
    a.var_names = [f"{g}_v2" if g in GENES[:2] else g for g in a.var_names]
    a.write_h5ad(root / "st" / "X3.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputFormatError, match="same genes.*--panel"):
            build_hest_dataset(root, tmp_path / "ds", ids="X1,X3", **FAST)
    assert not (tmp_path / "ds").exists()
