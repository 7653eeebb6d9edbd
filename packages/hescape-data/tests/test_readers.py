"""Readers: 10x matrices, TIFF regions, Visium outs/, Xenium bundles, and their bad-input errors."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from hescape.data.errors import AlignmentError, InputFormatError
from hescape.data.panels import load_panel
from hescape.data.readers import ArrayImage, TiffImage, read_10x_h5
from hescape.data.readers.visium import read_visium
from hescape.data.readers.xenium import read_alignment, read_xenium
from hescape.data.synthetic import generate_sample
from hescape.data.xenium_bundle import _write_h5, encode_cell_id

# ---------------------------------------------------------------- images


@pytest.mark.parametrize(("compression", "axes", "tile"), [("zlib", "YXS", 64), (None, "YXS", None),
                                                           ("zlib", "CYX", 64), ("jpeg", "YXS", 64)])
def test_tiff_region_matches_array(tmp_path, compression, axes, tile):
    rng = np.random.default_rng(0)
    img = ndimage_smooth(rng.integers(0, 255, (300, 410, 3)).astype(np.uint8))
    data = img if axes == "YXS" else np.ascontiguousarray(np.moveaxis(img, -1, 0))
    path = tmp_path / "x.ome.tif"
    kw = {"tile": (tile, tile) if tile else None, "compression": compression,
          "photometric": "rgb" if axes == "YXS" else "minisblack"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(data, subifds=1, metadata={"axes": axes}, **kw)
        half = data[::2, ::2] if axes == "YXS" else data[:, ::2, ::2]
        tw.write(np.ascontiguousarray(half), subfiletype=1, metadata=None, **kw)
    with TiffImage(path) as im:
        assert im.level_shapes == [(300, 410), (150, 205)]
        got = im.read_region(0, -7, 100, 90, 330)  # partly above and right of the image
        ref = np.full((90, 330, 3), 255, np.uint8)
        ref[7:, :310] = img[:83, 100:]
        tol = 6 if compression == "jpeg" else 0
        assert np.abs(got.astype(int) - ref).mean() <= tol
        lvl1 = im.read_region(1, 10, 20, 30, 40)
        assert np.abs(lvl1.astype(int) - img[::2, ::2][10:40, 20:60]).mean() <= tol


def ndimage_smooth(a):
    from scipy import ndimage

    return ndimage.uniform_filter(a, size=(9, 9, 1))


@pytest.mark.parametrize("shape", [(64, 80), (2, 64, 80), (64, 80, 2)])
def test_tiff_wrong_axes_or_channels(tmp_path, shape):
    path = tmp_path / "bad.ome.tif"
    axes = {2: "YX", 3: "CYX" if shape[0] == 2 else "YXS"}[len(shape)]
    extra = {"photometric": "minisblack", "planarconfig": "contig"} if axes == "YXS" else {}
    tifffile.imwrite(path, np.zeros(shape, np.uint8), ome=True, metadata={"axes": axes}, **extra)
    with pytest.raises(InputFormatError, match="expected an RGB H&E image"):
        TiffImage(path)


def test_tiff_16bit_refused(tmp_path):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint16), photometric="rgb")
    with pytest.raises(InputFormatError, match="8-bit"):
        TiffImage(path)


def test_array_image_grayscale_refused():
    with pytest.raises(InputFormatError, match="RGB"):
        ArrayImage(np.zeros((10, 10), np.uint8))


# ---------------------------------------------------------------- Visium


def test_visium_fixture_lowres(visium_outs):
    s = read_visium(visium_outs, image="lowres")
    sf = json.loads((visium_outs / "spatial" / "scalefactors_json.json").read_text())
    assert s.counts.shape == (100, 100) and len(s.genes) == 100
    rows = {r.split(",")[0]: r.strip().split(",") for r in
            (visium_outs / "spatial" / "tissue_positions_list.csv").read_text().splitlines()}
    b = s.obs_ids[0]
    mpp = s.metadata["um_per_fullres_px"]  # from the spot lattice (test_visium_scale.py checks it against physics)
    assert s.metadata["um_per_fullres_px_spot_diameter"] == pytest.approx(65.0 / sf["spot_diameter_fullres"])
    np.testing.assert_allclose(s.xy_um[0], [float(rows[b][5]) * mpp, float(rows[b][4]) * mpp])
    px = s.um_to_px @ [*s.xy_um[0], 1.0]
    np.testing.assert_allclose(px[:2], [float(rows[b][5]) * sf["tissue_lowres_scalef"],
                                        float(rows[b][4]) * sf["tissue_lowres_scalef"]])
    with h5py.File(visium_outs / "filtered_feature_bc_matrix.h5") as f:
        total = float(f["matrix/data"][:].sum())
    assert s.counts.sum() == pytest.approx(total)  # all 100 barcodes are in tissue


def test_visium_header_positions_and_errors(visium_outs, tmp_path):
    outs = shutil.copytree(visium_outs, tmp_path / "outs")
    old = outs / "spatial" / "tissue_positions_list.csv"
    text = old.read_text()
    (outs / "spatial" / "tissue_positions.csv").write_text(
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n" + text)
    old.unlink()
    s = read_visium(outs, image="lowres")
    assert len(s.obs_ids) == 100
    with pytest.raises(InputFormatError, match="uniform"):  # the vendored hires is a black placeholder
        read_visium(outs, image="hires")
    with pytest.raises(InputFormatError, match="no image given"):
        read_visium(outs, image=None)
    with pytest.raises(InputFormatError, match="full-resolution"):  # a downsampled PNG passed as full-res
        read_visium(outs, image=outs / "spatial" / "tissue_lowres_image.png")
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputFormatError, match="scalefactors_json.json"):
        read_visium(outs, image="lowres")


# ---------------------------------------------------------------- 10x matrices and Xenium bundles


def test_xenium_reads_generator_truth(xenium_bundle, small_cfg):
    s = read_xenium(xenium_bundle)
    smp = generate_sample(small_cfg, 0, 0)
    panel = load_panel(small_cfg.panel)
    assert s.genes == list(panel.genes)  # negative controls and codewords dropped
    np.testing.assert_allclose(s.xy_um, smp.cell_xy)
    np.testing.assert_array_equal(s.counts.toarray(), smp.cell_counts.toarray())
    assert s.metadata["he_um_per_px"] == pytest.approx(0.3638, rel=1e-6)
    s.close()


def test_xenium_variant_formats_agree(xenium_bundle, xenium_bundle_variant):
    a, b = read_xenium(xenium_bundle), read_xenium(xenium_bundle_variant)
    assert b.obs_ids[0] == encode_cell_id(1) and b.obs_ids[0].endswith("-1") and len(b.obs_ids[0]) == 10
    np.testing.assert_allclose(a.xy_um, b.xy_um)
    np.testing.assert_array_equal(a.counts.toarray(), b.counts.toarray())
    assert a.genes == b.genes
    tx = pq.read_table(xenium_bundle_variant / "transcripts.parquet", columns=["qv", "cell_id"])
    qv = tx.column("qv").to_numpy()
    assert int((qv >= 20).sum()) == int(a.counts.sum())  # matrix counts = transcripts with QV >= 20
    a.close()
    b.close()


def test_encode_cell_id():
    assert encode_cell_id(0x0001004F) == "aaabaaep-1"
    assert encode_cell_id(0) == "aaaaaaaa-1"


def test_missing_files(bundle_copy):
    (bundle_copy / "cells.parquet").unlink()
    with pytest.raises(InputFormatError, match=r"cells\.parquet or cells\.csv\.gz"):
        read_xenium(bundle_copy)


def test_missing_matrix_and_experiment(bundle_copy):
    (bundle_copy / "cell_feature_matrix.h5").unlink()
    with pytest.raises(InputFormatError, match="cell_feature_matrix"):
        read_xenium(bundle_copy)
    (bundle_copy / "experiment.xenium").unlink()
    with pytest.raises(InputFormatError, match="experiment.xenium"):
        read_xenium(bundle_copy)


def test_no_he_image(bundle_copy):
    for p in bundle_copy.glob("*he_image*"):
        p.unlink()
    with pytest.raises(InputFormatError, match="expected a post-Xenium H&E image.*--he-image"):
        read_xenium(bundle_copy)
    s = read_xenium(bundle_copy, require_image=False)
    assert s.image is None and s.counts.shape[0] > 0


def test_he_image_without_alignment(bundle_copy):
    for p in bundle_copy.glob("*imagealignment.csv"):
        p.unlink()
    with pytest.raises(InputFormatError, match="no alignment CSV"):
        read_xenium(bundle_copy)


def test_cell_ids_do_not_match_matrix(bundle_copy):
    t = pq.read_table(bundle_copy / "cells.parquet")
    ids = t.column("cell_id").to_numpy().copy()
    ids[:2] += 10**6
    pq.write_table(t.set_column(0, "cell_id", __import__("pyarrow").array(ids)), bundle_copy / "cells.parquet")
    with pytest.raises(InputFormatError, match=r"same cell ids.*2 cells absent from the matrix"):
        read_xenium(bundle_copy)


def _rewrite_h5(bundle, mutate):
    fm = read_10x_h5(bundle / "cell_feature_matrix.h5")
    counts, names = mutate(fm.counts.copy(), fm.feature_names.copy())
    _write_h5(bundle / "cell_feature_matrix.h5", counts, fm.barcodes, fm.feature_ids, names, fm.feature_types)


def test_nan_and_negative_counts(bundle_copy):
    import h5py as h5

    for bad in (np.nan, -3.0):
        with h5.File(bundle_copy / "cell_feature_matrix.h5", "r+") as f:
            data = f["matrix/data"][:].astype(np.float64)
            data[5] = bad
            del f["matrix/data"]
            f["matrix/data"] = data
        with pytest.raises(InputFormatError, match="NaN" if np.isnan(bad) else "negative"):
            read_xenium(bundle_copy)


def test_duplicated_genes(bundle_copy):
    from hescape.data.ingest import harmonise_genes

    def dup(counts, names):
        names[1] = names[0]
        return counts, names

    _rewrite_h5(bundle_copy, dup)
    s = read_xenium(bundle_copy)
    with pytest.raises(InputFormatError, match="duplicated"):
        harmonise_genes(s)
    counts, genes, _ids = harmonise_genes(s, duplicate_genes="sum")
    assert len(genes) == len(s.genes) - 1 and len(set(genes)) == len(genes)
    np.testing.assert_allclose(counts[:, 0].toarray().ravel(), s.counts[:, :2].sum(1).A.ravel())
    assert counts.sum() == pytest.approx(s.counts.sum())
    s.close()


def test_panel_reorder(xenium_bundle):
    from hescape.data.errors import PanelMismatchError
    from hescape.data.ingest import harmonise_genes

    s = read_xenium(xenium_bundle)
    counts, genes, _ = harmonise_genes(s, panel="human-breast-panel")
    assert genes == s.genes
    with pytest.raises(PanelMismatchError, match="absent from the data"):
        harmonise_genes(s, panel="human-colon-panel")
    with pytest.raises(PanelMismatchError, match="zero-filled"):  # most of the colon panel is absent
        harmonise_genes(s, panel="human-colon-panel", missing_genes="zero")
    counts, genes, _ = harmonise_genes(s, panel="human-colon-panel", missing_genes="zero", max_missing=1.0)
    assert genes == list(load_panel("human-colon-panel").genes)
    s.close()


@pytest.mark.parametrize(("matrix", "match"), [
    ([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], "3×3"),
    ([[1, 2, 0], [2, 4, 0], [0, 0, 1]], "singular"),
    ([[1, 0, 0], [0, 1, 0], [0.001, 0, 1]], "projective"),
    ([[1, 0, 0], [0, 1, 0], [0, 0, 0]], "affine"),
])
def test_bad_alignment(tmp_path, matrix, match):
    path = tmp_path / "x_he_imagealignment.csv"
    path.write_text("\n".join(",".join(str(v) for v in r) for r in matrix))
    with pytest.raises(AlignmentError, match=match):
        read_alignment(path)


def test_alignment_keypoints(tmp_path):
    m = np.array([[0.5, -1.2, 30.0], [1.2, 0.5, -7.0], [0, 0, 1]])
    src = np.array([[0, 0], [100, 0], [0, 50], [40, 70]], float)
    dst = (m @ np.column_stack([src, np.ones(4)]).T)[:2].T
    path = tmp_path / "kp.csv"
    rows = ["fixedX,fixedY,alignmentX,alignmentY"] + [f"{d[0]},{d[1]},{s[0]},{s[1]}" for d, s in zip(dst, src, strict=True)]
    path.write_text("\n".join(rows))
    np.testing.assert_allclose(read_alignment(path), m, atol=1e-9)


def test_singular_alignment_in_bundle(bundle_copy):
    csv = next(bundle_copy.glob("*imagealignment.csv"))
    csv.write_text("1,1,0\n1,1,0\n0,0,1\n")
    with pytest.raises(AlignmentError, match="singular"):
        read_xenium(bundle_copy)


def test_wrong_axes_he_in_bundle(bundle_copy):
    img = next(bundle_copy.glob("*he_image.ome.tif"))
    tifffile.imwrite(img, np.zeros((50, 60), np.uint8), ome=True, metadata={"axes": "YX"})
    with pytest.raises(InputFormatError, match="axes"):
        read_xenium(bundle_copy)
