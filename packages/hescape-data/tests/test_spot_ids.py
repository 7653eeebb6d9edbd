"""Every row keeps its source identity (``spot_id``): Visium barcodes, pseudo-spot lattice ids (issue 9).

Truth is read independently of the code under test: Space Ranger's ``tissue_positions_list.csv`` with pandas,
the Xenium cells with pyarrow, the lattice spacing from the hexagon's own geometry (55 µm vertex to vertex, so
neighbours in a row are 55·√3/2 µm apart and rows 3/4 · 55 µm apart).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from hescape.data import PairedSpotDataset
from hescape.data.arrow import SpotRecords, pyarrow_dataset, read_manifest, write_manifest
from hescape.data.errors import DatasetFormatError, HescapeDataError
from hescape.data.geometry import GEOMETRY_PRESETS, parse_grid_id
from hescape.data.ingest import PatchOptions, SpotOptions, build_visium_dataset, build_xenium_dataset

HEX_D = 55.0  # the hescape preset's hexagon, vertex to vertex (µm)
PITCH = HEX_D * math.sqrt(3) / 2  # flat-to-flat width = distance between neighbours in a row
ROW_STEP = 0.75 * HEX_D  # pointy-top hexagons tiling the plane: rows 3/4 of the diameter apart


def _rows(out: Path) -> tuple[list[str], np.ndarray, list[bytes]]:
    t = pyarrow_dataset(out).to_table()
    return (t.column("spot_id").to_pylist(), np.asarray(t.column("cell_coords").to_pylist()),
            [r["bytes"] for r in t.column("image").to_pylist()])


# ----------------------------------------------------------------------------------------------- Visium


def test_visium_spot_id_is_the_barcode_at_those_coordinates(visium_outs, tmp_path):
    out = build_visium_dataset(visium_outs, tmp_path / "ds", image="lowres", progress=False, qc=False,
                               patch=PatchOptions(max_upsample=40))
    ids, xy_um, _ = _rows(out)
    # tissue_positions_list.csv, read here with the csv module: barcode, in_tissue, array_row, array_col, pxl_row, pxl_col
    with open(visium_outs / "spatial" / "tissue_positions_list.csv", newline="") as f:
        pos = {r[0]: (int(r[1]), float(r[5]), float(r[4])) for r in csv.reader(f) if r}
    assert len(ids) == 100 and len(set(ids)) == 100
    assert set(ids) <= set(pos) and all(pos[i][0] == 1 for i in ids)
    px = np.array([pos[i][1:] for i in ids], np.float64)  # x = pxl_col, y = pxl_row (Space Ranger)
    scale = float((xy_um * px).sum() / (px * px).sum())  # one µm per full-resolution pixel for every spot
    np.testing.assert_allclose(xy_um, px * scale, rtol=1e-9, atol=1e-9)
    m = read_manifest(out)
    assert scale == pytest.approx(m["ingest"]["metadata"]["um_per_fullres_px"], rel=1e-9)
    assert m["samples"][0]["spot_ids"]["kind"] == "barcode"
    # the check has power: the same coordinates under another spot's barcode are ~100 µm (a pitch) off or more
    wrong = np.array([pos[i][1:] for i in np.roll(ids, 1)], np.float64) * scale
    assert np.linalg.norm(wrong - xy_um, axis=1).min() > 50.0
    assert PairedSpotDataset(out).spot_ids == ids


# ----------------------------------------------------------------------------------------------- Xenium


@pytest.fixture(scope="module")
def xenium_ds(xenium_bundle, tmp_path_factory):
    return build_xenium_dataset(xenium_bundle, tmp_path_factory.mktemp("x") / "ds", progress=False, qc=False)


def test_xenium_ids_decode_to_the_lattice_position(xenium_ds, xenium_bundle):
    ids, xy, _ = _rows(xenium_ds)
    assert len(ids) > 10 and len(set(ids)) == len(ids)
    parsed = [parse_grid_id(i) for i in ids]
    assert {g for g, _, _ in parsed} == {"hex"}
    rows = np.array([r for _, r, _ in parsed])
    cols = np.array([c for _, _, c in parsed])
    # physical spacing: neighbours in a row are one hexagon width apart, rows 3/4 of a diameter apart, odd rows
    # shifted by half a width
    key = {(r, c): p for r, c, p in zip(rows.tolist(), cols.tolist(), xy, strict=True)}
    n_row = n_col = 0
    for (r, c), p in key.items():
        if (r, c + 1) in key:
            np.testing.assert_allclose(key[r, c + 1] - p, [PITCH, 0.0], atol=1e-9)
            n_col += 1
        if (r + 1, c) in key:
            np.testing.assert_allclose(key[r + 1, c] - p, [PITCH / 2 if r % 2 == 0 else -PITCH / 2, ROW_STEP],
                                       atol=1e-9)
            n_row += 1
    assert n_col >= 5 and n_row >= 5
    # the lattice starts at the smallest cell centroid (read here with pyarrow): id -> centre with no other input
    cells = pq.read_table(xenium_bundle / "cells.parquet", columns=["x_centroid", "y_centroid"])
    origin = (min(cells.column("x_centroid").to_pylist()), min(cells.column("y_centroid").to_pylist()))
    want = np.column_stack([origin[0] + cols * PITCH + (rows % 2) * PITCH / 2, origin[1] + rows * ROW_STEP])
    np.testing.assert_allclose(xy, want, atol=1e-9)
    rec = read_manifest(xenium_ds)["samples"][0]["spot_ids"]
    assert rec["kind"] == "lattice" and rec["origin_um"] == pytest.approx(origin, abs=1e-12)
    np.testing.assert_allclose(GEOMETRY_PRESETS["hescape"].lattice_centres(rows, cols, rec["origin_um"]), xy,
                               atol=1e-9)
    assert PairedSpotDataset(xenium_ds)[0]["spot_id"] == ids[0]


def _crop_he(bundle: Path, keep_fraction: float) -> None:
    """Replace the bundle's H&E by its left part (one level): the alignment is unchanged, so spots on the right
    fall off the image."""
    he = next(bundle.glob("*he_image.ome.tif"))
    img = tifffile.imread(he, level=0)
    img = np.ascontiguousarray(img[:, : int(img.shape[1] * keep_fraction)])
    he.unlink()
    tifffile.imwrite(he, img, tile=(128, 128), compression="zlib", photometric="rgb", ome=True,
                     metadata={"axes": "YXS"})


def test_ids_survive_dropped_spots(xenium_ds, bundle_copy, tmp_path):
    full_ids, full_xy, full_img = _rows(xenium_ds)
    by_id = {i: (p, b) for i, p, b in zip(full_ids, full_xy, full_img, strict=True)}
    totals = {i: g for i, g in zip(full_ids, PairedSpotDataset(xenium_ds).raw_counts().sum(1), strict=True)}
    cut = float(np.median(list(totals.values())))
    few = build_xenium_dataset(bundle_copy, tmp_path / "few", progress=False, qc=False,
                               spots=SpotOptions(min_counts=cut), patch=PatchOptions(min_tissue_fraction=0.3))
    _crop_he(bundle_copy, 0.75)
    part = build_xenium_dataset(bundle_copy, tmp_path / "part", progress=False, qc=False,
                                patch=PatchOptions(outside_spots="drop"))
    for ds, filt in ((few, "kept"), (part, "outside_image")):
        ids, xy, img = _rows(ds)
        assert 0 < len(ids) < len(full_ids) and set(ids) < set(full_ids), filt
        for i, p in zip(ids, xy, strict=True):
            np.testing.assert_array_equal(p, by_id[i][0])  # the same spot under the same id
        assert read_manifest(ds)["samples"][0]["spot_ids"] == read_manifest(xenium_ds)["samples"][0]["spot_ids"]
    ids, _, img = _rows(few)
    assert all(totals[i] >= cut for i in ids)
    assert [by_id[i][1] for i in ids] == img  # same id, same patch bytes
    assert read_manifest(part)["filters"]["outside_image"] > 0


def test_visium_hd_pseudo_spots_have_lattice_ids(tmp_path, synth):
    from hescape.data.ingest import build_visium_hd_dataset

    truth = synth.write_visium_hd_outs(tmp_path / "outs", bin_um=8, n_bins=40)
    out = build_visium_hd_dataset(tmp_path / "outs", tmp_path / "ds", image=truth["image"], progress=False, qc=False)
    ids, xy, _ = _rows(out)
    rec = read_manifest(out)["samples"][0]["spot_ids"]
    rows, cols = (np.array(v) for v in zip(*[parse_grid_id(i)[1:] for i in ids], strict=True))
    assert len(set(ids)) == len(ids) > 10 and rec["kind"] == "lattice"
    # in the dataset's µm (bins' pixel centres × its µm/px), the lattice starts at the smallest bin centre
    mpp = read_manifest(out)["samples"][0]["source_um_per_px"]
    np.testing.assert_allclose(rec["origin_um"], (truth["bin_px"] * mpp).min(0), rtol=1e-9)  # in-tissue bins
    want = np.column_stack([rec["origin_um"][0] + cols * PITCH + (rows % 2) * PITCH / 2,
                            rec["origin_um"][1] + rows * ROW_STEP])
    np.testing.assert_allclose(xy, want, atol=1e-9)


def test_synthetic_rows_have_lattice_ids(tmp_path):
    from hescape.data import SyntheticConfig, build_synthetic_dataset
    from hescape.data.geometry import get_geometry

    cfg = SyntheticConfig(sample_size_um=240.0, n_donors=3, pixel_size_um=2.0,
                          geometry=get_geometry("hescape").with_(um_per_px=2.0))
    out = build_synthetic_dataset(tmp_path / "syn", cfg, progress=False, via_bundle=False)
    t = pyarrow_dataset(out).to_table()
    names, ids = t.column("name").to_pylist(), t.column("spot_id").to_pylist()
    xy = np.asarray(t.column("cell_coords").to_pylist())
    per = {n: [i for i, m in zip(ids, names, strict=True) if m == n] for n in dict.fromkeys(names)}
    assert len(per) == 3 and len({tuple(v) for v in per.values()}) == 1  # the same lattice in every section
    rows, cols = (np.array(v) for v in zip(*[parse_grid_id(i)[1:] for i in ids], strict=True))
    half = cfg.geometry.fov_um / 2  # the lattice starts half a patch inside the section's corner
    want = np.column_stack([half + cols * PITCH + (rows % 2) * PITCH / 2, half + rows * ROW_STEP])
    np.testing.assert_allclose(xy, want, atol=1e-9)
    assert all(smp["spot_ids"]["origin_um"] == [half, half] for smp in read_manifest(out)["samples"])


# ----------------------------------------------------------------------------------------------- reading side


def test_dataset_without_spot_id_column_opens_with_row_indices(xenium_ds, tmp_path):
    old = Path(shutil.copytree(xenium_ds, tmp_path / "old"))
    m = read_manifest(old)
    for s in m["shards"]:
        f = old / s["file"]
        t = pa.ipc.open_stream(pa.BufferReader(f.read_bytes())).read_all().drop_columns(["spot_id"])  # in memory
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        s["sha256"] = None
    write_manifest(old, m)
    ds = PairedSpotDataset(old)
    assert ds.spot_ids == [str(i) for i in range(len(ds))]  # one sample: the row index within it
    assert ds[3]["spot_id"] == "3"


def test_spot_ids_per_sample_in_dataset_order(tmp_path):
    from hescape.data import DatasetWriter
    from hescape.data.arrow import encode_png

    png = encode_png(np.zeros((8, 8, 3), np.uint8))

    def rec(name, donor, n, ids):
        return SpotRecords(name=name, donor=donor, tissue="t", source="s", images=[png] * n,
                           gexp=np.ones((n, 2), np.float32), coords_um=np.zeros((n, 2)), n_cells=np.ones(n),
                           spot_ids=ids)

    with DatasetWriter(tmp_path / "ds", genes=["a", "b"], gene_ids=["A", "B"], rows_per_shard=3) as w:
        w.add(rec("A", "d1", 4, ["AAAC-1", "AAAG-1", "AAAT-1", "AACA-1"]), split="train")
        w.add(rec("B", "d2", 3, None), split="test")  # no ids given: the row index within the sample
        with pytest.raises(DatasetFormatError, match="unique spot id"):
            w.add(rec("C", "d3", 2, ["x", "x"]), split="train")
    ds = PairedSpotDataset(tmp_path / "ds")
    assert list(zip(ds.samples, ds.spot_ids, strict=True)) == [
        ("A", "AAAC-1"), ("A", "AAAG-1"), ("A", "AAAT-1"), ("A", "AACA-1"), ("B", "0"), ("B", "1"), ("B", "2")]
    assert PairedSpotDataset(tmp_path / "ds", "test").spot_ids == ["0", "1", "2"]


def test_grid_id_format_round_trip():
    g = GEOMETRY_PRESETS["hest"]
    assert g.grid_ids([0, 12, 12345], [34, 0, 7]) == ["square_r0000_c0034", "square_r0012_c0000",
                                                      "square_r12345_c0007"]
    assert parse_grid_id("hex_r0012_c0034") == ("hex", 12, 34)
    with pytest.raises(HescapeDataError, match="lattice id"):
        parse_grid_id("AAACAAGTATCTCCCA-1")
