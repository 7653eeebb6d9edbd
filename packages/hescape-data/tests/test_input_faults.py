"""Faults in inputs found by trying to break the readers, checked against facts that do not come from the code.

* An alpha channel is composited over white: a transparent pixel shows glass, not the black often stored under
  it; an opaque one keeps its value exactly (hand-computed values below).
* Counts are stored as float32, which holds every integer only up to 2**24 (IEEE 754 binary32, 24-bit
  significand): 2**24 + 1 is not representable, so larger counts are refused rather than rounded.
* Library error texts quoted in our one-line errors stay on one line.
* A positions file re-saved with a UTF-8 byte-order mark (spreadsheets do this) reads as the original.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hescape.data.arrow import pyarrow_dataset
from hescape.data.counts import MAX_COUNT, check_counts
from hescape.data.errors import InputFormatError, brief
from hescape.data.ingest import PatchOptions, build_visium_dataset, tissue_fraction
from hescape.data.readers.image import ArrayImage, TiffImage
from hescape.data.readers.spaceranger import read_positions_file
from PIL import Image

VISIUM = Path(__file__).parent / "data" / "visium-spaceranger-1.0.0"

# (R, G, B, A) -> RGB over white, by hand: rgb·a/255 + 255·(255 − a)/255, rounded half up
ALPHA_CASES = [((0, 0, 0, 0), (255, 255, 255)),  # transparent black: glass
               ((10, 20, 30, 255), (10, 20, 30)),  # opaque: unchanged
               ((0, 0, 0, 128), (127, 127, 127)),  # 255·127/255 = 127
               ((200, 100, 0, 51), (244, 224, 204))]  # 200·0.2 + 204 = 244; 100·0.2 + 204 = 224; 0 + 204 = 204


def _rgba_image() -> np.ndarray:
    img = np.zeros((64, 96, 4), np.uint8)
    for i, (px, _) in enumerate(ALPHA_CASES):
        img[:, i * 24 : (i + 1) * 24] = px
    return img


def _expected() -> np.ndarray:
    out = np.zeros((64, 96, 3), np.uint8)
    for i, (_, rgb) in enumerate(ALPHA_CASES):
        out[:, i * 24 : (i + 1) * 24] = rgb
    return out


def test_png_alpha_is_composited_over_white(tmp_path):
    p = tmp_path / "rgba.png"
    Image.fromarray(_rgba_image(), "RGBA").save(p)
    img = ArrayImage.from_file(p)
    np.testing.assert_array_equal(img.read_region(0, 0, 0, 64, 96), _expected())
    assert tissue_fraction(img.read_region(0, 0, 0, 64, 24)) == 0.0  # transparent black is glass, not tissue


@pytest.mark.parametrize("layout", ["interleaved", "planar"])
def test_tiff_alpha_is_composited_over_white(tmp_path, layout):
    p = tmp_path / "rgba.tif"
    data = _rgba_image()
    if layout == "planar":
        tifffile.imwrite(p, np.moveaxis(data, -1, 0), photometric="rgb", planarconfig="separate", extrasamples=[2])
    else:
        tifffile.imwrite(p, data, photometric="rgb", tile=(32, 32), extrasamples=[2])
    with TiffImage(p) as img:
        np.testing.assert_array_equal(img.read_region(0, 0, 0, 64, 96), _expected())
        thumb, _ = img.thumbnail(48)
        np.testing.assert_array_equal(thumb, _expected()[::2, ::2])


def test_opaque_rgba_reads_exactly_as_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((40, 50), 255, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(ArrayImage.from_file(tmp_path / "a.png").read_region(0, 0, 0, 40, 50), rgb)


def test_count_limit_is_where_float32_stops_being_exact():
    assert MAX_COUNT == 2**24
    assert float(np.float32(MAX_COUNT)) == MAX_COUNT
    assert float(np.float32(MAX_COUNT + 1)) != MAX_COUNT + 1  # the next integer is rounded in float32
    check_counts(np.array([0, 5, MAX_COUNT], np.int64), "m")
    for dtype in (np.int64, np.uint64, np.float64):
        with pytest.raises(InputFormatError, match="at most 16,777,216 per entry"):
            check_counts(np.array([3, MAX_COUNT + 1], dtype), "m")


def test_brief_keeps_a_library_message_on_one_line():
    text = "No match for FieldRef.Name(qv) in transcript_id: uint64\ncell_id: string\n\tx_location: float"
    assert brief(ValueError(text), 200) == "No match for FieldRef.Name(qv) in transcript_id: uint64 cell_id: string " \
                                           "x_location: float"
    cut = brief("a" * 300, 100)
    assert len(cut) == 100 and cut.endswith("…") and "\n" not in cut


def test_positions_with_byte_order_mark_and_header_read_as_the_original(tmp_path):
    """Space Ranger ≥ 2 writes ``tissue_positions.csv`` with a header; the same file saved by a spreadsheet gains a
    UTF-8 BOM before ``barcode`` (it was once read as a data row: "expected numbers ... found ['in_tissue', ...]")."""
    rows = (VISIUM / "spatial" / "tissue_positions_list.csv").read_bytes()
    head = b"barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
    (tmp_path / "plain.csv").write_bytes(rows)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + head + rows)
    a, b = read_positions_file(tmp_path / "plain.csv"), read_positions_file(tmp_path / "bom.csv")
    assert len(a) == len(b) == 4992  # the Visium array: 78 rows × 64 spots
    assert a.barcodes.tolist() == b.barcodes.tolist() and a.barcodes[0] == "ACGCCTGACACGCGCT-1"
    np.testing.assert_array_equal(a.xy_px, b.xy_px)


def test_visium_build_from_bom_positions_is_the_same_dataset(tmp_path):
    """The whole build, from a Space Ranger ≥ 2 positions file with a BOM: same spots, same µm."""
    outs = Path(shutil.copytree(VISIUM, tmp_path / "outs"))
    rows = (outs / "spatial" / "tissue_positions_list.csv").read_bytes()
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    (outs / "spatial" / "tissue_positions.csv").write_bytes(
        b"\xef\xbb\xbfbarcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n" + rows)
    kw = {"image": "lowres", "progress": False, "qc": False, "patch": PatchOptions(max_upsample=100)}
    a = pyarrow_dataset(build_visium_dataset(VISIUM, tmp_path / "a", **kw)).to_table()
    b = pyarrow_dataset(build_visium_dataset(outs, tmp_path / "b", **kw)).to_table()
    assert a.column("spot_id").to_pylist() == b.column("spot_id").to_pylist() and a.num_rows == 100
    np.testing.assert_array_equal(np.asarray(a.column("cell_coords").to_pylist()),
                                  np.asarray(b.column("cell_coords").to_pylist()))

