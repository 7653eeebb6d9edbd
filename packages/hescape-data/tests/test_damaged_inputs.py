"""Damaged inputs and datasets: every one ends in one clear line, exit code 2, and nothing written or lost.

The table ``CASES`` holds one row per damaged input (Xenium bundle, Space Ranger outs/, options, output location,
dataset): a function that builds it cheaply in the case's directory (from the session's synthetic bundle, the
vendored Visium fixture, or a session-built dataset) and returns the ``hescape-data`` arguments, and the words the
error line must contain. Each case asserts: exit code 2; stderr is exactly one line starting
``hescape-data: error: `` with those words; no traceback; and the directory tree around (inputs included) is the
same before and after, byte for byte (nothing written, nothing deleted).

Below the table: the behaviours around safe writes (names from inputs never become paths outside the dataset,
replacing with no gap, leftovers of killed builds, modes following the umask, a QC failure leaves nothing,
``info --verify`` reports all-zero gene columns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from hescape.data import DatasetWriter, PairedSpotDataset, SpotRecords
from hescape.data.arrow import encode_png, verify_dataset
from hescape.data.cli import main
from hescape.data.errors import DatasetFormatError, PanelMismatchError
from PIL import Image

VISIUM = Path(__file__).parent / "data" / "visium-spaceranger-1.0.0"
HE = "Xenium_Synthetic_S1_he_image.ome.tif"
ALN = "Xenium_Synthetic_S1_he_imagealignment.csv"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def built_dataset(xenium_bundle, tmp_path_factory) -> Path:
    """A small dataset built from the session's bundle (no QC figure), to damage in ``info`` cases."""
    out = tmp_path_factory.mktemp("damaged-ds") / "ds"
    assert main(["build", "xenium", str(xenium_bundle), "--out", str(out), "--quiet", "--no-qc",
                 "--pitch-um", "80", "--rows-per-shard", "20"]) == 0
    return out


@dataclass
class Ctx:
    """Where a case builds its damaged input: ``root`` (snapshotted) and the pristine sources to copy."""

    root: Path
    src_bundle: Path
    src_dataset: Path

    def xenium(self) -> Path:
        """A writable copy of the synthetic Xenium bundle."""
        return Path(shutil.copytree(self.src_bundle, self.root / "bundle"))

    def visium(self) -> Path:
        """A writable copy of the vendored Space Ranger outs/."""
        return Path(shutil.copytree(VISIUM, self.root / "outs"))

    def dataset(self) -> Path:
        """A writable copy of the session-built dataset."""
        return Path(shutil.copytree(self.src_dataset, self.root / "ds"))

    @property
    def out(self) -> str:
        return str(self.root / "out")


def _x(ctx: Ctx, *extra: str, bundle: Path | None = None) -> list[str]:
    """``build xenium`` arguments on a (possibly damaged) bundle."""
    b = bundle if bundle is not None else ctx.xenium()
    return ["build", "xenium", str(b), "--out", ctx.out, "--quiet", "--no-qc", *extra]


def _v(ctx: Ctx, *extra: str, outs: Path | None = None, image: str = "lowres") -> list[str]:
    """``build visium`` arguments on a (possibly damaged) outs/ (lowres image: upsampling allowed)."""
    o = outs if outs is not None else ctx.visium()
    return ["build", "visium", str(o), "--image", image, "--out", ctx.out, "--quiet", "--no-qc",
            "--max-upsample", "100", *extra]


# ------------------------------------------------------------------------------------------------ damage helpers
def _json_edit(path: Path, fn: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _set(key: str, value) -> Callable[[dict], dict]:
    def f(d: dict) -> dict:
        d[key] = value
        return d
    return f


def _h5(path: Path, fn: Callable[[h5py.Group], None]) -> Path:
    with h5py.File(path, "r+") as f:
        fn(f["matrix"])
    return path


def _replace(g: h5py.Group, name: str, value) -> None:
    del g[name]
    g[name] = value


def _cells(bundle: Path, fn: Callable[[pa.Table], pa.Table]) -> Path:
    p = bundle / "cells.parquet"
    pq.write_table(fn(pq.read_table(p)), p)
    return bundle


def _col(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


def _truncate(path: Path, frac: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])


def _he_shape(bundle: Path) -> tuple[int, int]:
    with tifffile.TiffFile(bundle / HE) as t:
        s = t.series[0]
        return s.shape[0], s.shape[1]


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header claims ``width`` × ``height`` (a decompression bomb's header)."""
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _aln(ctx: Ctx, text: str, *extra: str) -> list[str]:
    b = ctx.xenium()
    (b / ALN).write_text(text)
    return _x(ctx, *extra, bundle=b)


def _exp(ctx: Ctx, fn: Callable[[dict], object]) -> list[str]:
    b = ctx.xenium()
    _json_edit(b / "experiment.xenium", fn)
    return _x(ctx, bundle=b)


def _xh5(ctx: Ctx, fn: Callable[[h5py.Group], None]) -> list[str]:
    b = ctx.xenium()
    _h5(b / "cell_feature_matrix.h5", fn)
    return _x(ctx, bundle=b)


def _xcells(ctx: Ctx, fn: Callable[[pa.Table], pa.Table]) -> list[str]:
    return _x(ctx, bundle=_cells(ctx.xenium(), fn))


def _he(ctx: Ctx, fn: Callable[[Path, tuple[int, int]], None]) -> list[str]:
    b = ctx.xenium()
    fn(b / HE, _he_shape(b))
    return _x(ctx, bundle=b)


def _sf(ctx: Ctx, fn: Callable[[dict], object]) -> list[str]:
    o = ctx.visium()
    _json_edit(o / "spatial" / "scalefactors_json.json", fn)
    return _v(ctx, outs=o)


def _vh5(ctx: Ctx, fn: Callable[[h5py.Group], None]) -> list[str]:
    o = ctx.visium()
    _h5(o / "filtered_feature_bc_matrix.h5", fn)
    return _v(ctx, outs=o)


def _positions(ctx: Ctx, fn: Callable[[list[str]], list[str]]) -> list[str]:
    o = ctx.visium()
    p = o / "spatial" / "tissue_positions_list.csv"
    p.write_text("\n".join(fn(p.read_text().splitlines())) + "\n")
    return _v(ctx, outs=o)


def _lowres(ctx: Ctx, fn: Callable[[Path], None]) -> list[str]:
    o = ctx.visium()
    fn(o / "spatial" / "tissue_lowres_image.png")
    return _v(ctx, outs=o)


def _manifest(ctx: Ctx, fn: Callable[[dict], object], *cmd: str) -> list[str]:
    ds = ctx.dataset()
    _json_edit(ds / "manifest.json", fn)
    return [*(cmd or ("info",)), str(ds), *(["--verify"] if not cmd else [])]


def _shard(ctx: Ctx, fn: Callable[[Path], None], verify: bool = False) -> list[str]:
    ds = ctx.dataset()
    fn(ds / json.loads((ds / "manifest.json").read_text())["shards"][0]["file"])
    return ["info", str(ds), *(["--verify"] if verify else [])]


def _del(key: str) -> Callable[[dict], dict]:
    def f(d: dict) -> dict:
        del d[key]
        return d
    return f


def _flip_middle_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _out_is_project(ctx: Ctx) -> list[str]:
    proj = ctx.root / "project"
    proj.mkdir()
    (proj / "notes.txt").write_text("three years of work")
    return [*_x(ctx), "--out", str(proj), "--overwrite"]


def _out_foreign_manifest(ctx: Ctx) -> list[str]:
    proj = ctx.root / "project"
    proj.mkdir()
    (proj / "manifest.json").write_text(json.dumps({"name": "some other tool"}))
    return [*_x(ctx), "--out", str(proj), "--overwrite"]


def _out_symlink(ctx: Ctx) -> list[str]:
    (ctx.root / "real").mkdir()
    (ctx.root / "link").symlink_to(ctx.root / "real")
    return [*_x(ctx), "--out", str(ctx.root / "link"), "--overwrite"]


def _out_file(ctx: Ctx, under: bool) -> list[str]:
    f = ctx.root / "file.txt"
    f.write_text("x")
    return [*_x(ctx), "--out", str(f / "ds" if under else f), "--overwrite"]


def _interrupted_replace(ctx: Ctx) -> list[str]:
    ds = ctx.dataset()
    os.replace(ds, ds.parent / f".ds.old-{_dead_pid()}-{socket.gethostname()}-abcdefgh")
    return ["info", str(ds)]


_DEAD: list[int] = []


def _dead_pid() -> int:
    """The id of a process that has exited (for names of leftovers of a killed build)."""
    if not _DEAD:
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        _DEAD.append(p.pid)
    return _DEAD[0]


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Ctx], list[str]]
    expect: str


C = Case
CASES: list[Case] = [
    # ---- output location: never delete or write into what is not ours (checked before any input is read)
    C("out-is-the-input-bundle", lambda c: [*_x(c), "--out", str(c.root / "bundle"), "--overwrite"],
      "is the input"),
    C("out-inside-the-input", lambda c: [*_x(c), "--out", str(c.root / "bundle" / "ds")], "lies inside the input"),
    C("out-contains-the-input", lambda c: [*_x(c), "--out", str(c.root), "--overwrite"], "contains the input"),
    C("out-is-the-he-image", lambda c: [*_x(c), "--out", str(c.root / "bundle" / HE), "--overwrite"],
      "the input"),
    C("out-is-visium-outs", lambda c: [*_v(c), "--out", str(c.root / "outs"), "--overwrite"], "is the input"),
    C("out-is-a-project-folder", _out_is_project, "refusing to delete"),
    C("out-has-a-foreign-manifest", _out_foreign_manifest, "refusing to delete"),
    C("out-exists-no-overwrite", lambda c: [*_x(c), "--out", str(c.dataset())], "already exists"),
    C("out-is-a-file", lambda c: _out_file(c, under=False), "found a file"),
    C("out-under-a-file", lambda c: _out_file(c, under=True), "is a file, not a directory"),
    C("out-is-a-symlink", _out_symlink, "symbolic link"),
    # ---- options (checked before any input is read)
    C("rows-per-shard-0", lambda c: _x(c, "--rows-per-shard", "0"), "--rows-per-shard: expected a whole number"),
    C("rows-per-shard-negative", lambda c: _x(c, "--rows-per-shard", "-3"), "--rows-per-shard"),
    C("rows-per-shard-not-int", lambda c: _x(c, "--rows-per-shard", "1e3"), "invalid int value"),
    C("split-capitalised", lambda c: _x(c, "--split", "Train"), "--split: expected one of"),
    C("split-unknown", lambda c: _v(c, "--split", "holdout"), "--split: expected one of"),
    C("min-tissue-fraction-above-1", lambda c: _x(c, "--min-tissue-fraction", "1.5"), "--min-tissue-fraction"),
    C("min-tissue-fraction-negative", lambda c: _v(c, "--min-tissue-fraction", "-0.1"), "--min-tissue-fraction"),
    C("min-tissue-fraction-nan", lambda c: _x(c, "--min-tissue-fraction", "nan"), "--min-tissue-fraction"),
    C("um-per-px-absurdly-small", lambda c: _x(c, "--um-per-px", "1e-6"), "patch size: expected 8 to 2048 px"),
    C("patch-8000-px", lambda c: _x(c, "--fov-um", "4000"), "patch size: expected 8 to 2048 px"),
    C("spot-diameter-huge", lambda c: _x(c, "--spot-diameter-um", "1e5"), "pooled into"),
    C("pitch-tiny", lambda c: _x(c, "--pitch-um", "0.01"), "spot pitch: expected at least"),
    C("dense-overlap", lambda c: _x(c, "--geometry", "visium", "--pitch-um", "5", "--spot-diameter-um", "200"),
      "pooled into"),
    C("um-per-px-zero", lambda c: _x(c, "--um-per-px", "0"), "um_per_px: expected a positive finite"),
    C("um-per-px-negative", lambda c: _v(c, "--um-per-px", "-0.5"), "um_per_px: expected a positive finite"),
    C("fov-um-inf", lambda c: _x(c, "--fov-um", "inf"), "fov_um: expected a positive finite"),
    C("spot-diameter-negative", lambda c: _x(c, "--spot-diameter-um", "-55"), "diameter_um: expected a positive"),
    C("pitch-zero", lambda c: _x(c, "--pitch-um", "0"), "pitch_um: expected a positive"),
    C("max-upsample-below-1", lambda c: _x(c, "--max-upsample", "0.5"), "--max-upsample"),
    C("max-missing-above-1", lambda c: _x(c, "--max-missing", "2"), "--max-missing"),
    C("min-counts-negative", lambda c: _x(c, "--min-counts", "-1"), "--min-counts"),
    C("min-cells-negative", lambda c: _x(c, "--min-cells", "-1"), "--min-cells"),
    C("min-qv-nan", lambda c: _x(c, "--min-qv", "nan"), "--min-qv"),
    C("panel-unknown", lambda c: _x(c, "--panel", "human-kidney-panel"), "human-kidney-panel"),
    C("transcripts-with-panel", lambda c: _x(c, "--counts-from", "transcripts", "--panel", "human-breast-panel"),
      "--counts-from transcripts"),
    C("sample-name-empty", lambda c: _x(c, "--sample", " "), "--sample: expected a non-empty printable name"),
    C("donor-name-control-chars", lambda c: _x(c, "--donor", "a\nb"), "--donor: expected a non-empty printable"),
    C("unknown-option", lambda c: _x(c, "--overwrite-everything"), "unrecognized arguments"),
    C("bad-choice", lambda c: _x(c, "--grid", "triangle"), "invalid choice"),
    # ---- experiment.xenium
    C("experiment-is-a-json-array", lambda c: _exp(c, lambda d: [d]), "expected a JSON object"),
    C("experiment-not-json", lambda c: _exp_text(c, "{pixel_size: 0.2125"), "expected JSON"),
    C("experiment-not-utf8", lambda c: _exp_bytes(c, b"\xff\xfe\x00garbage"), "expected JSON"),
    C("experiment-missing", lambda c: _x(c, bundle=_rm(c.xenium(), "experiment.xenium")), "no such file"),
    C("pixel-size-string", lambda c: _exp(c, _set("pixel_size", "0.2125")), "'pixel_size'"),
    C("pixel-size-bool", lambda c: _exp(c, _set("pixel_size", True)), "'pixel_size'"),
    C("pixel-size-negative", lambda c: _exp(c, _set("pixel_size", -0.2125)), "'pixel_size'"),
    C("pixel-size-10x-too-large", lambda c: _exp(c, _set("pixel_size", 2.125)), "section-sized part"),
    C("pixel-size-20x-too-small", lambda c: _exp(c, _set("pixel_size", 0.2125 / 20)),
      "expected the H&E image to cover the cells"),
    # ---- cells table
    C("centroids-not-numeric", lambda c: _xcells(c, lambda t: _col(
        t, "x_centroid", pa.array([f"{v:.1f}um" for v in t.column("x_centroid").to_pylist()]))),
      "expected numeric µm values in column 'x_centroid'"),
    C("centroids-nan", lambda c: _xcells(c, lambda t: _col(
        t, "y_centroid", pa.array([np.nan] + t.column("y_centroid").to_pylist()[1:]))), "finite cell centroids"),
    C("cells-column-missing", lambda c: _xcells(c, lambda t: t.drop_columns(["y_centroid"])), "missing ['y_centroid']"),
    C("cells-duplicate-ids", lambda c: _xcells(c, lambda t: _col(
        t, "cell_id", pa.array([t.column("cell_id")[0].as_py()] * t.num_rows, t.column("cell_id").type))),
      "unique cell ids"),
    C("cells-parquet-truncated", lambda c: _x(c, bundle=_trunc(c.xenium(), "cells.parquet", 0.5)),
      "expected a Parquet table"),
    C("cells-missing", lambda c: _x(c, bundle=_rm(c.xenium(), "cells.parquet")), "found neither"),
    # ---- cell_feature_matrix.h5
    C("h5-indptr-decreasing", lambda c: _xh5(c, lambda g: _replace(g, "indptr", _bad_indptr(g, "decreasing"))),
      "expected matrix/indptr to rise"),
    C("h5-indptr-wrong-end", lambda c: _xh5(c, lambda g: _replace(g, "indptr", _bad_indptr(g, "end"))),
      "expected matrix/indptr to rise"),
    C("h5-indptr-not-integer", lambda c: _xh5(c, lambda g: _replace(g, "indptr", g["indptr"][:].astype(float))),
      "matrix/indptr to be a 1-D integer array"),
    C("h5-data-strings", lambda c: _xh5(c, lambda g: _replace(g, "data", g["data"][:].astype("S8"))),
      "matrix/data to be a 1-D numeric array"),
    C("h5-shape-three-numbers", lambda c: _xh5(c, lambda g: _replace(g, "shape", [1, 2, 3])), "matrix/shape"),
    C("h5-layout-missing-indptr", lambda c: _xh5(c, lambda g: g.__delitem__("indptr")), "10x v3 HDF5 layout"),
    C("h5-truncated", lambda c: _x(c, bundle=_trunc(c.xenium(), "cell_feature_matrix.h5", 0.4)),
      "HDF5 cannot open"),
    C("h5-negative-counts", lambda c: _xh5(c, lambda g: _replace(g, "data", -g["data"][:].astype(np.int32))),
      "expected counts >= 0"),
    C("h5-nan-counts", lambda c: _xh5(c, lambda g: _replace(g, "data", np.full(g["data"].shape, np.nan))),
      "expected finite counts"),
    C("h5-log-normalised", lambda c: _xh5(c, lambda g: _replace(g, "data", np.log1p(g["data"][:].astype(float)))),
      "expected raw integer counts"),
    C("h5-barcodes-other-run", lambda c: _xh5(c, lambda g: _replace(
        g, "barcodes", np.array([f"other-{i}".encode() for i in range(len(g["barcodes"]))]))),
      "expected the same cell ids"),
    C("h5-no-gene-expression", lambda c: _xh5(c, lambda g: _replace(
        g, "features/feature_type", np.array([b"Negative Control Probe"] * len(g["features/feature_type"])))),
      "'Gene Expression'"),
    # ---- MEX matrix folder and cells.csv.gz (the other XOA formats)
    C("mex-matrix-truncated-gzip", lambda c: _x(c, bundle=_trunc(_as_mex(c.xenium()), MEX + "/matrix.mtx.gz", 0.5)),
      "expected a Matrix Market file"),
    C("mex-features-two-columns", lambda c: _x(c, bundle=_mex_features_cut(_as_mex(c.xenium()))),
      "3 tab-separated columns"),
    C("mex-barcodes-not-gzip", lambda c: _x(c, bundle=_write(_as_mex(c.xenium()), MEX + "/barcodes.tsv.gz", b"x\x00y")),
      "tab-separated text file"),
    C("cells-csv-truncated-gzip", lambda c: _x(c, bundle=_trunc(_as_csv(c.xenium()), "cells.csv.gz", 0.5)),
      "expected a gzipped CSV table"),
    C("cells-csv-centroids-text", lambda c: _x(c, bundle=_as_csv(_cells(c.xenium(), lambda t: _col(
        t, "x_centroid", pa.array(["12.5um"] * t.num_rows))))), "expected numeric µm values"),
    # ---- H&E image and alignment
    C("he-truncated-tiled-tiff", lambda c: _he(c, lambda p, s: _truncate(p, 0.6)), "truncated"),
    C("he-level-0-tiles-corrupt", lambda c: _he(c, lambda p, s: _corrupt_level0_tiles(p)),
      "expected decodable image tiles"),
    C("he-blank-white", lambda c: _he(c, lambda p, s: tifffile.imwrite(
        p, np.full((*s, 3), 255, np.uint8), tile=(128, 128), photometric="rgb")), "found a uniform one"),
    C("he-not-a-tiff", lambda c: _he(c, lambda p, s: p.write_bytes(b"not a tiff" * 100)), "tifffile cannot read"),
    C("he-grayscale", lambda c: _he(c, lambda p, s: tifffile.imwrite(p, np.full(s, 128, np.uint8))),
      "expected an RGB H&E image"),
    C("he-16-bit", lambda c: _he(c, lambda p, s: tifffile.imwrite(
        p, np.full((*s, 3), 128, np.uint16), photometric="rgb")), "expected 8-bit RGB"),
    C("he-missing", lambda c: _x(c, bundle=_rm(c.xenium(), HE)), "expected a post-Xenium H&E image"),
    C("he-option-missing-file", lambda c: _x(c, "--he-image", str(c.root / "nope.ome.tif"), "--alignment",
                                             str(c.root / "bundle" / ALN)), "no such file"),
    C("alignment-missing", lambda c: _x(c, bundle=_rm(c.xenium(), ALN)), "no alignment CSV"),
    C("alignment-not-numeric", lambda c: _aln(c, "a,b,c\n1,2,3\n0,0,1\n"), "non-numeric"),
    C("alignment-singular", lambda c: _aln(c, "1,2,0\n2,4,0\n0,0,1\n"), "singular"),
    C("alignment-projective", lambda c: _aln(c, "1,0,0\n0,1,0\n0.01,0,1\n"), "affine matrix"),
    C("alignment-2x3", lambda c: _aln(c, "1,0,0\n0,1,0\n"), "3×3"),
    C("alignment-nan", lambda c: _aln(c, "nan,0,0\n0,1,0\n0,0,1\n"), "finite values"),
    C("alignment-binary", lambda c: _aln_bytes(c, b"\x89PNG\r\n\x1a\n\xff\xfe\xfa"), "alignment"),
    C("bundle-missing", lambda c: ["build", "xenium", str(c.root / "nope"), "--out", c.out, "--quiet"],
      "no such directory"),
    C("transcripts-missing", lambda c: _x(c, "--counts-from", "transcripts"), "transcripts.parquet"),
    # ---- Space Ranger outs/
    C("scalefactors-json-array", lambda c: _sf(c, lambda d: [d]), "expected a JSON object"),
    C("scalefactors-not-json", lambda c: _sf_text(c, "spot_diameter_fullres = 89"), "expected JSON"),
    C("spot-diameter-fullres-negative", lambda c: _sf(c, _set("spot_diameter_fullres", -89.4)),
      "spot_diameter_fullres"),
    C("positions-not-numeric", lambda c: _positions(c, lambda ls: [ls[0].replace(",0,0,0,", ",yes,0,0,"), *ls[1:]]),
      "tissue_positions_list.csv"),
    C("positions-short-row", lambda c: _positions(c, lambda ls: [",".join(ls[0].split(",")[:4]), *ls[1:]]),
      "6 columns"),
    C("positions-missing", lambda c: _v(c, outs=_rm(c.visium(), "spatial/tissue_positions_list.csv")),
      "found neither"),
    C("visium-matrix-missing", lambda c: _v(c, outs=_rm(c.visium(), "filtered_feature_bc_matrix.h5")),
      "filtered_feature_bc_matrix.h5"),
    C("visium-raw-matrix-missing", lambda c: _v(c, "--matrix", "raw"), "raw_feature_bc_matrix.h5"),
    C("visium-h5-indptr-corrupt", lambda c: _vh5(c, lambda g: _replace(g, "indptr", _bad_indptr(g, "decreasing"))),
      "expected matrix/indptr to rise"),
    C("visium-barcodes-not-in-positions", lambda c: _vh5(c, lambda g: _replace(
        g, "barcodes", np.array([f"NOPE{i}-1".encode() for i in range(len(g["barcodes"]))]))),
      "expected every matrix barcode"),
    C("visium-h5-log-normalised", lambda c: _vh5(c, lambda g: _replace(g, "data", np.log1p(g["data"][:] * 1.0))),
      "expected raw integer counts"),
    C("visium-hd-routed-as-visium", lambda c: _sf(c, lambda d: {**d, "bin_size_um": 8.0, "microns_per_pixel": 0.27}),
      "Visium HD"),
    C("visium-barcode-listed-twice", lambda c: _positions(c, lambda ls: [*ls, ls[-1]]), "expected each barcode once"),
    C("visium-pixel-columns-swapped", lambda c: _positions(c, lambda ls: [_swap_px(x) for x in ls]), "found them swapped"),
    C("visium-no-in-tissue-spots", lambda c: _positions(c, lambda ls: [_not_in_tissue(x) for x in ls]),
      "in-tissue"),
    C("visium-image-missing-file", lambda c: _v(c, image=str(c.root / "fullres.tif")), "no such file"),
    C("visium-image-blank-white", lambda c: _lowres(c, lambda p: Image.new("RGB", Image.open(p).size,
                                                                         (255, 255, 255)).save(p)),
      "found a uniform one"),
    C("visium-image-truncated-png", lambda c: _lowres(c, lambda p: _truncate(p, 0.5)), "PIL cannot read"),
    C("visium-image-grayscale", lambda c: _lowres(c, lambda p: Image.open(p).convert("L").save(p)), "mode 'L'"),
    C("visium-image-bomb-1.6-gigapixels", lambda c: _lowres(c, lambda p: _png_claiming(p, 40_000, 40_000)),
      "at most 1,000,000,000 pixels"),
    C("visium-image-bomb-3.6-gigapixels", lambda c: _lowres(c, lambda p: _png_claiming(p, 60_000, 60_000)),
      "at most 1,000,000,000 pixels"),
    C("visium-hd-rows-per-shard-0", lambda c: ["build", "visium-hd", str(c.visium()), "--image", "lowres", "--out",
                                               c.out, "--rows-per-shard", "0"], "--rows-per-shard"),
    C("visium-hd-out-is-the-input", lambda c: ["build", "visium-hd", str(c.visium()), "--image", "lowres", "--out",
                                               str(c.root / "outs"), "--overwrite"], "is the input"),
    C("visium-outs-missing", lambda c: ["build", "visium", str(c.root / "outs"), "--image", "lowres", "--out", c.out],
      "no such directory"),
    # ---- scale factors that are not positive JSON numbers (each once crashed or built silently)
    C("lowres-scalef-string", lambda c: _sf(c, _set("tissue_lowres_scalef", "0.045004502")),
      "'tissue_lowres_scalef' to be a positive number"),
    C("lowres-scalef-null", lambda c: _sf(c, _set("tissue_lowres_scalef", None)),
      "'tissue_lowres_scalef' to be a positive number"),
    C("lowres-scalef-zero", lambda c: _sf(c, _set("tissue_lowres_scalef", 0)),
      "'tissue_lowres_scalef' to be a positive number"),
    C("hires-scalef-negative", lambda c: _sf(c, _set("tissue_hires_scalef", -0.15)),
      "'tissue_hires_scalef' to be a positive number"),
    C("lowres-scalef-missing", lambda c: _sf(c, _del("tissue_lowres_scalef")), "found none"),
    # ---- positions file in another encoding / not text
    C("positions-latin-1", lambda c: _positions_bytes(c, lambda b: b.replace(b"ACGCCTGACACGCGCT", b"ACGCCTGAC\xe9CGCGCT")),
      "expected a UTF-8 CSV file"),
    C("positions-utf-16", lambda c: _positions_bytes(c, lambda b: b.decode().encode("utf-16")), "not UTF-8 text"),
    C("positions-nul-bytes", lambda c: _positions_bytes(c, lambda b: b.replace(b",0,0,0,", b",0\x00,0,0,", 1)),
      "expected numbers in columns 2–6"),
    # ---- feature tables: names that match nothing, counts float32 cannot hold
    C("gene-name-empty", lambda c: _vh5(c, lambda g: _replace(g, "features/name", _first(g["features/name"], b""))),
      "expected gene names and ids as non-empty printable text"),
    C("gene-name-padded", lambda c: _vh5(c, lambda g: _replace(g, "features/name", _first(g["features/name"],
                                                                                           b" MIR1302-2HG "))),
      "without surrounding spaces"),
    C("gene-name-line-break", lambda c: _xh5(c, lambda g: _replace(g, "features/name",
                                                                   _first(g["features/name"], b"GENE\nX"))),
      "expected gene names and ids"),
    C("gene-id-empty", lambda c: _vh5(c, lambda g: _replace(g, "features/id", _first(g["features/id"], b""))),
      "1 ids (e.g. ['']"),
    C("counts-beyond-float32", lambda c: _vh5(c, lambda g: _replace(g, "data", g["data"][:].astype(np.int64) * 2**25)),
      "at most 16,777,216 per entry"),
    C("xenium-counts-uint64-max", lambda c: _xh5(c, lambda g: _replace(g, "data", np.full(g["data"].shape, 2**63,
                                                                                         np.uint64))),
      "at most 16,777,216 per entry"),
    # ---- transcripts.parquet without a column / with text coordinates (once a multi-line pyarrow dump)
    C("transcripts-without-qv", lambda c: _transcripts(c, qv=False), "missing ['qv']"),
    C("transcripts-x-as-text", lambda c: _transcripts(c, x_text=True), "expected numeric columns"),
    # ---- an RGBA image whose alpha says "nothing here" (once read as the black under the alpha)
    C("visium-image-fully-transparent", lambda c: _lowres(c, _transparent), "found a uniform one"),
    # ---- damaged datasets: info / info --verify / split
    C("manifest-without-samples", lambda c: _manifest(c, _del("samples")), "missing ['samples']"),
    C("manifest-n-rows-wrong", lambda c: _manifest(c, lambda m: {**m, "n_rows": m["n_rows"] + 1}), "n_rows says"),
    C("manifest-empty-shard-list", lambda c: _manifest(c, lambda m: {**m, "shards": []}), "at least one shard"),
    C("manifest-gene-count-not-shard-width", lambda c: _manifest(
        c, lambda m: {**m, "genes": m["genes"][:-1], "gene_ids": m["gene_ids"][:-1]}), "gexp values per row"),
    C("manifest-n-spots-wrong", lambda c: _manifest(c, lambda m: {**m, "samples": [
        {**m["samples"][0], "n_spots": m["samples"][0]["n_spots"] - 1}]}), "n_spots add up"),
    C("manifest-duplicate-genes", lambda c: _manifest(c, lambda m: {**m, "genes": [m["genes"][1]] + m["genes"][1:]}),
      "unique gene names"),
    C("manifest-shard-path-escapes", lambda c: _manifest(c, lambda m: {**m, "shards": [
        {**s, "file": "../" + s["file"]} for s in m["shards"]]}), "plain file names"),
    C("manifest-is-a-json-array", lambda c: _manifest(c, lambda m: [m]), "expected a JSON object"),
    C("manifest-other-schema", lambda c: _manifest(c, _set("schema_version", "other/9")), "schema_version"),
    C("manifest-not-json", lambda c: _manifest_text(c, "{\"schema_version\": "), "not valid JSON"),
    C("manifest-missing-half-deleted", lambda c: ["info", str(_rm(c.dataset(), "manifest.json"))],
      "no manifest.json"),
    C("split-on-damaged-manifest", lambda c: _manifest(c, _del("shards"), "split", "--by", "donor"),
      "missing ['shards']"),
    C("shard-truncated", lambda c: _shard(c, lambda p: _truncate(p, 0.5)), "truncated or corrupt"),
    C("shard-empty-file", lambda c: _shard(c, lambda p: p.write_bytes(b"")), "is empty (0 bytes)"),
    C("shard-missing", lambda c: _shard(c, lambda p: p.unlink()), "is missing"),
    C("shard-bit-flip-verify", lambda c: _shard(c, _flip_middle_byte, verify=True), "SHA-256"),
    C("dataset-interrupted-replace", _interrupted_replace, "interrupted replace"),
    C("info-not-a-dataset", lambda c: ["info", str(c.root)], "no manifest.json"),
]


MEX = "cell_feature_matrix"


def _as_mex(bundle: Path) -> Path:
    """The bundle with its HDF5 matrix rewritten as the MEX folder (matrix.mtx.gz, features/barcodes.tsv.gz)."""
    import gzip

    import scipy.io
    from hescape.data.readers.tenx import read_10x_h5

    fm = read_10x_h5(bundle / "cell_feature_matrix.h5")
    d = bundle / MEX
    d.mkdir()
    with gzip.open(d / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, fm.counts.T.tocoo().astype(np.int32))
    with gzip.open(d / "features.tsv.gz", "wt") as fh:
        fh.writelines(f"{i}\t{n}\t{t}\n" for i, n, t in zip(fm.feature_ids, fm.feature_names, fm.feature_types,
                                                               strict=True))
    with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
        fh.writelines(f"{b}\n" for b in fm.barcodes)
    (bundle / "cell_feature_matrix.h5").unlink()
    return bundle


def _mex_features_cut(bundle: Path) -> Path:
    import gzip

    p = bundle / MEX / "features.tsv.gz"
    with gzip.open(p, "rt") as fh:
        lines = ["\t".join(ln.rstrip("\n").split("\t")[:2]) for ln in fh]
    with gzip.open(p, "wt") as fh:
        fh.writelines(ln + "\n" for ln in lines)
    return bundle


def _as_csv(bundle: Path) -> Path:
    """The bundle with cells.parquet rewritten as cells.csv.gz."""
    import pyarrow.csv as pacsv

    t = pq.read_table(bundle / "cells.parquet")
    pacsv.write_csv(t, pa.CompressedOutputStream(str(bundle / "cells.csv.gz"), "gzip"))
    (bundle / "cells.parquet").unlink()
    return bundle


def _write(root: Path, rel: str, data: bytes) -> Path:
    (root / rel).write_bytes(data)
    return root


def _corrupt_level0_tiles(path: Path) -> None:
    """Garbage over the start of every tile of the full-resolution level (the file keeps its size and layout)."""
    with tifffile.TiffFile(path) as t:
        page = t.series[0].levels[0].pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    data = bytearray(path.read_bytes())
    for off, n in spans:
        data[off : off + min(n, 64)] = b"\xff" * min(n, 64)
    path.write_bytes(bytes(data))


def _rm(root: Path, rel: str) -> Path:
    (root / rel).unlink()
    return root


def _trunc(root: Path, rel: str, frac: float) -> Path:
    _truncate(root / rel, frac)
    return root


def _exp_text(ctx: Ctx, text: str) -> list[str]:
    b = ctx.xenium()
    (b / "experiment.xenium").write_text(text)
    return _x(ctx, bundle=b)


def _exp_bytes(ctx: Ctx, data: bytes) -> list[str]:
    b = ctx.xenium()
    (b / "experiment.xenium").write_bytes(data)
    return _x(ctx, bundle=b)


def _aln_bytes(ctx: Ctx, data: bytes) -> list[str]:
    b = ctx.xenium()
    (b / ALN).write_bytes(data)
    return _x(ctx, bundle=b)


def _positions_bytes(ctx: Ctx, fn: Callable[[bytes], bytes]) -> list[str]:
    o = ctx.visium()
    p = o / "spatial" / "tissue_positions_list.csv"
    p.write_bytes(fn(p.read_bytes()))
    return _v(ctx, outs=o)


def _first(ds: h5py.Dataset, value: bytes) -> np.ndarray:
    """The dataset's values with the first one replaced by ``value`` (bytes)."""
    v = ds[:].astype(object)
    v[0] = value
    return v.astype("S")


def _transcripts(ctx: Ctx, *, qv: bool = True, x_text: bool = False) -> list[str]:
    """A bundle with a small transcripts.parquet in XOA's columns, damaged as asked."""
    b = ctx.xenium()
    cells = pq.read_table(b / "cells.parquet")
    from hescape.data.readers.tenx import read_10x_h5

    gene = read_10x_h5(b / "cell_feature_matrix.h5").feature_names[0]
    x = cells.column("x_centroid").to_numpy()[:50].astype(np.float32)
    cols = {"feature_name": pa.array([gene] * len(x)),
            "x_location": pa.array([f"{v:.2f}" for v in x]) if x_text else pa.array(x),
            "y_location": pa.array(cells.column("y_centroid").to_numpy()[:50].astype(np.float32))}
    if qv:
        cols["qv"] = pa.array(np.full(len(x), 40.0, np.float32))
    pq.write_table(pa.table(cols), b / "transcripts.parquet")
    return _x(ctx, "--counts-from", "transcripts", bundle=b)


def _transparent(path: Path) -> None:
    """The image as RGBA with alpha 0 everywhere: its colours are still there, but nothing is to be seen."""
    rgba = np.array(Image.open(path).convert("RGBA"))
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(path)


def _sf_text(ctx: Ctx, text: str) -> list[str]:
    o = ctx.visium()
    (o / "spatial" / "scalefactors_json.json").write_text(text)
    return _v(ctx, outs=o)


def _manifest_text(ctx: Ctx, text: str) -> list[str]:
    ds = ctx.dataset()
    (ds / "manifest.json").write_text(text)
    return ["info", str(ds)]


def _bad_indptr(g: h5py.Group, how: str) -> np.ndarray:
    p = g["indptr"][:].copy()
    if how == "decreasing":
        p[len(p) // 2] = p[-1] + 5
    else:
        p[-1] = p[-1] + 7
    return p


def _swap_px(line: str) -> str:
    f = line.split(",")
    f[4], f[5] = f[5], f[4]
    return ",".join(f)


def _not_in_tissue(line: str) -> str:
    f = line.split(",")
    f[1] = "0"
    return ",".join(f)


# ------------------------------------------------------------------------------------------------ the table test
def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and (files) size and SHA-1, (links) target."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir", st.st_mode)
            else:
                snap[rel] = ("file", st.st_mode, st.st_size, hashlib.sha1(p.read_bytes()).hexdigest())
    return snap


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damaged_input(case: Case, xenium_bundle, built_dataset, tmp_path, capsys, caplog):
    root = tmp_path / "case"
    root.mkdir()
    argv = case.make(Ctx(root, xenium_bundle, built_dataset))
    capsys.readouterr()
    caplog.clear()
    before = _snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        code = main(argv)
    out, err = capsys.readouterr()
    after = _snapshot(tmp_path)
    lines = err.splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("hescape-data: error: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in out + err
    # log records would be more lines on a terminal's stderr (pytest captures them apart)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert before == after, sorted(set(before.items()) ^ set(after.items()))[:5]


# ------------------------------------------------------------------------------------------------ safe writes
def _records(name: str, gexp: np.ndarray) -> SpotRecords:
    n = len(gexp)
    img = [encode_png(np.full((8, 8, 3), 100 + i, np.uint8)) for i in range(n)]
    return SpotRecords(name=name, donor="d1", tissue="t", source="s", images=img, gexp=gexp.astype(np.float32),
                       coords_um=np.zeros((n, 2)), n_cells=np.ones(n, np.int32))


@pytest.mark.parametrize("region", ["../../escaped", "/tmp/hescape-escaped-abs", "a/../../b"])
def test_names_from_inputs_never_leave_the_dataset(bundle_copy, tmp_path, region):
    """``region_name`` becomes the sample name; the QC figure goes to ``<out>/qc/<safe name>.png``, nowhere else."""
    _json_edit(bundle_copy / "experiment.xenium", _set("region_name", region))
    work = tmp_path / "work"
    work.mkdir()
    before = {p for p in tmp_path.rglob("*")}
    out = work / "ds"
    assert main(["build", "xenium", str(bundle_copy), "--out", str(out), "--quiet", "--pitch-um", "80"]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == out or out in p.parents for p in created)
    qc = list((out / "qc").iterdir())
    assert len(qc) == 1 and qc[0].suffix == ".png" and "/" not in qc[0].name and not qc[0].name.startswith(".")
    assert not Path("/tmp/hescape-escaped-abs.png").exists()
    assert PairedSpotDataset(out).samples[0] == region  # the name itself is kept, only the path is made safe


def test_overwrite_replaces_a_dataset_with_no_gap_and_honours_the_umask(tmp_path):
    out = tmp_path / "ds"
    old = os.umask(0o002)
    try:
        for k in (1.0, 2.0):
            with DatasetWriter(out, genes=["a", "b"], gene_ids=["A", "B"], overwrite=True) as w:
                w.add(_records("S", np.full((3, 2), k)), split="train")
                w.file_path("qc", "../S.png").write_bytes(b"png")
    finally:
        os.umask(old)
    assert PairedSpotDataset(out).raw_counts()[0, 0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing aside, no temporary directory
    assert (out / "qc" / "S.png").is_file()  # "../S.png" became a plain name inside qc/
    assert out.stat().st_mode & 0o777 == 0o775
    for p in out.rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o775 if p.is_dir() else 0o664), p


def test_leftovers_of_killed_builds_are_cleaned(tmp_path):
    host = socket.gethostname()
    dead, live = _dead_pid(), os.getppid()
    stale = [tmp_path / f".ds.tmp-{dead}-{host}-abcd1234", tmp_path / f".ds.bundles-{dead}-{host}-efgh5678"]
    keep = [tmp_path / f".ds.tmp-{live}-{host}-ijkl9012",  # a live build
            tmp_path / f".ds.tmp-{dead}-some-other-host-mnop3456",  # another host of a shared file system
            tmp_path / f".other.tmp-{dead}-{host}-qrst7890"]  # another output's
    for p in stale + keep:
        p.mkdir()
        (p / "shard-00000.arrow").write_bytes(b"x")
    with DatasetWriter(tmp_path / "ds", genes=["a"], gene_ids=["A"]) as w:
        w.add(_records("S", np.ones((2, 1))), split="val")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


_KILLED_BUILD = """
import os, sys
import numpy as np
import hescape.data.arrow as A
from hescape.data import DatasetWriter, SpotRecords

out, when, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
real_replace = os.replace

def replace(src, dst):
    real_replace(src, dst)
    if when == "swap" and ".old-" in os.path.basename(dst):
        os.kill(os.getpid(), 9)  # killed between moving the old dataset aside and moving the new one in

A.os.replace = replace
img = [A.encode_png(np.full((8, 8, 3), 50, np.uint8))] * 2
with DatasetWriter(out, genes=["a"], gene_ids=["A"], rows_per_shard=1, overwrite=True) as w:
    w.add(SpotRecords(name="S", donor="d", tissue="t", source="s", images=img, gexp=np.full((2, 1), value),
                      coords_um=np.zeros((2, 2)), n_cells=np.ones(2, np.int32)), split="train")
    if when == "write":
        os.kill(os.getpid(), 9)  # killed while the shards are being written
"""


@pytest.mark.parametrize("when", ["write", "swap"])
def test_a_killed_build_loses_nothing_and_its_leftovers_are_cleaned(tmp_path, capsys, when):
    """SIGKILL during a build: ``info`` never calls the result normal; the next build cleans up (and restores)."""
    out = tmp_path / "ds"
    with DatasetWriter(out, genes=["a"], gene_ids=["A"]) as w:  # the previous dataset, value 1
        w.add(_records("S", np.ones((2, 1))), split="train")
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(out), when, "2"], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    hidden = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".ds."))
    if when == "write":
        assert hidden == [".ds.tmp"] and PairedSpotDataset(out).raw_counts()[0, 0] == 1.0  # untouched
    else:
        assert hidden == [".ds.old", ".ds.tmp"] and not out.exists()
        assert main(["info", str(out)]) == 2
        assert "interrupted replace" in capsys.readouterr().err
    # the next build of this path removes the dead build's leftovers; the previous dataset is back (swap)
    with DatasetWriter(out, genes=["a"], gene_ids=["A"], overwrite=True) as w:
        assert PairedSpotDataset(out).raw_counts()[0, 0] == 1.0
        w.add(_records("S", np.full((2, 1), 3.0)), split="train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert PairedSpotDataset(out).raw_counts()[0, 0] == 3.0


def test_interrupted_replace_is_reported_then_restored(tmp_path, capsys):
    out = tmp_path / "ds"
    with DatasetWriter(out, genes=["a"], gene_ids=["A"]) as w:
        w.add(_records("S", np.ones((2, 1))), split="train")
    aside = tmp_path / f".ds.old-{_dead_pid()}-{socket.gethostname()}-abcd1234"
    os.replace(out, aside)  # killed between "move the old aside" and "move the new in"
    assert main(["info", str(out)]) == 2
    assert "interrupted replace" in capsys.readouterr().err
    # the next build of the same path puts the previous dataset back first, so it is not lost
    with pytest.raises(FileExistsError, match="already exists"):
        DatasetWriter(out, genes=["a"], gene_ids=["A"])
    assert PairedSpotDataset(out).raw_counts().shape == (2, 1) and not aside.exists()


def test_qc_failure_leaves_nothing_and_a_rerun_works(bundle_copy, tmp_path, monkeypatch):
    import hescape.data.ingest as ingest

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(ingest, "qc_figure", broken)
    out = tmp_path / "ds"
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="exploded"):
        main(["build", "xenium", str(bundle_copy), "--out", str(out), "--quiet", "--pitch-um", "80"])
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()
    assert main(["build", "xenium", str(bundle_copy), "--out", str(out), "--quiet", "--pitch-um", "80"]) == 0
    assert len(list((out / "qc").glob("*.png"))) == 1


def test_writer_refuses_zero_rows_per_shard_and_capitalised_split(tmp_path):
    from hescape.data.errors import HescapeDataError

    with pytest.raises(HescapeDataError, match="rows per shard"):
        DatasetWriter(tmp_path / "ds", genes=["a"], gene_ids=["A"], rows_per_shard=0)
    with pytest.raises(HescapeDataError, match="expected a split among"), \
            DatasetWriter(tmp_path / "ds", genes=["a"], gene_ids=["A"]) as w:
        w.add(_records("S", np.ones((2, 1))), split="Train")
    assert list(tmp_path.iterdir()) == []


def test_info_verify_reports_all_zero_gene_columns(tmp_path, capsys):
    out = tmp_path / "ds"
    g = np.array([[1, 0, 3], [2, 0, 0]])
    with DatasetWriter(out, genes=["EPCAM", "ZEROA", "CD3E"], gene_ids=["E1", "E2", "E3"]) as w:
        w.add(_records("S", g), split="train")
    assert main(["info", str(out), "--verify"]) == 0
    captured = capsys.readouterr()
    warn = [ln for ln in captured.err.splitlines() if ln.startswith("hescape-data: warning: ")]
    assert len(warn) == 1 and "1 of 3 gene columns are zero in every row" in warn[0] and "ZEROA" in warn[0]
    assert "EPCAM" not in warn[0] and "checksums OK" in captured.out


def test_open_is_cheap_and_checksums_are_on_request(built_dataset, tmp_path):
    ds = Path(shutil.copytree(built_dataset, tmp_path / "ds"))
    m = json.loads((ds / "manifest.json").read_text())
    _flip_middle_byte(ds / m["shards"][0]["file"])  # inside the image bytes: only the checksum sees it
    assert len(PairedSpotDataset(ds)) == m["n_rows"]
    with pytest.raises(DatasetFormatError, match="SHA-256"):
        verify_dataset(ds)
    verify_dataset(ds, checksums=False)
    m["genes"], m["gene_ids"] = m["genes"][:-1], m["gene_ids"][:-1]
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PanelMismatchError, match="gexp values per row"):
        PairedSpotDataset(ds)


def test_pil_decompression_bomb_limit_stays_on(tmp_path):
    from hescape.data.readers.image import ArrayImage

    limit = Image.MAX_IMAGE_PIXELS
    p = tmp_path / "x.png"
    Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(p)
    assert ArrayImage.from_file(p).shape == (6, 5)
    assert Image.MAX_IMAGE_PIXELS == limit is not None
