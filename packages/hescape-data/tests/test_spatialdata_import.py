"""The inputs users actually have: the official HESCAPE shards (``hescape-data import hescape``) and SpatialData stores
(``hescape-data build spatialdata``).

Official layout (dataset card of ``Peng-AI/hescape-pyarrow``; ``peng-lab/hescape`` ``constants.py``): ``name`` a
ClassLabel, ``image`` a Hugging Face Image struct ``{bytes, path}``, ``gexp`` one ``(1, G)`` row of raw counts,
``cell_coords``, ``source``, ``tissue`` (ClassLabel) and the metadata columns. The shards here are written in that
layout by the test, with sample ids of the breast preset, so splits, donors and µm/px come from the preset's CSVs,
which the test reads itself with :mod:`csv`.

SpatialData: a store written by ``spatialdata`` itself (its models), with an image under a known scale and
translation and marks planted in the image where the spots are; the patches must show those marks at their centre.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hescape.data import PairedSpotDataset, PanelMismatchError, SpotOptions, load_panel, verify_dataset
from hescape.data.arrow import open_shard, read_manifest, string_column
from hescape.data.cli import main
from hescape.data.errors import HescapeDataError, InputFormatError
from hescape.data.import_hescape import import_hescape
from PIL import Image

PANEL = "human-breast-panel"
META_COLS = ["atlas", "age", "diagnosis", "cancer", "oncotree_code", "tumor_grade", "gender", "race", "treatment_type",
             "therapeutic_agents", "tumor_tissue_type", "assay", "preservation_method", "stain", "spaceranger",
             "species", "cytassist"]


def _preset_rows() -> dict[str, tuple[str, dict]]:
    """``{id: (split, row)}`` read straight from the vendored preset CSVs."""
    out = {}
    for split in ("train", "val", "test"):
        with (resources.files("hescape.data") / "panels" / PANEL / f"{split}.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                out[r["id"]] = (split, r)
    return out


def _image(seed: int, fmt: str, size: int = 512) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([(xx + 7 * seed) % 256, (yy + 3 * seed) % 256, ((xx + yy) // 2 + seed) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 90}))
    return buf.getvalue()


def _nested(values: np.ndarray, inner: int) -> pa.Array:
    """``(n, inner)`` values as ``list<list<float32>>`` of shape ``(1, inner)`` per row (the Array2D storage)."""
    n = len(values)
    flat = pa.array(values.astype(np.float32).ravel())
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * inner, inner), pa.int32()), flat)
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()), rows)


class _Array2D(pa.ExtensionType):
    """A stand-in for ``datasets``' Array2D extension type (``save_to_disk`` shards read with ``datasets`` loaded)."""

    def __init__(self, storage_type):
        super().__init__(storage_type, "hescape-test.array2d")

    def __arrow_ext_serialize__(self):
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls(storage_type)


#: (sample, rows, image format) in dataset order; TENX97 is in no split of the breast preset (paired_w_addon.csv).
LAYOUT = [("TENX95", 4, "PNG"), ("NCBI785", 3, "JPEG"), ("NCBI783", 3, "PNG"), ("TENX97", 2, "PNG")]


def write_official(root: Path, *, n_genes: int = 280, fmt: str = "parquet", rows_per_shard: int = 5, seed: int = 0,
                   gexp_extension: bool = False, sizes: dict[str, int] | None = None):
    """Shards in the official layout; returns the rows ``(name, image bytes, gexp, coords)`` in dataset order."""
    rng = np.random.default_rng(seed)
    names = [s for s, _, _ in LAYOUT]
    rows = []
    for s, n, f in LAYOUT:
        for _ in range(n):
            rows.append((s, _image(len(rows), f, (sizes or {}).get(s, 512)), rng.poisson(0.7, n_genes).astype(np.float32),
                         rng.uniform(0, 5000, 2)))
    feats = {"name": {"names": names, "_type": "ClassLabel"}, "image": {"_type": "Image"},
             "gexp": {"shape": [1, n_genes], "dtype": "float32", "_type": "Array2D"},
             "cell_coords": {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "Sequence"},
             "source": {"dtype": "string", "_type": "Value"}, "tissue": {"names": ["breast"], "_type": "ClassLabel"},
             **{c: {"dtype": "bool" if c == "cancer" else "string", "_type": "Value"} for c in META_COLS}}
    gexp_type = _Array2D(pa.list_(pa.list_(pa.float32()))) if gexp_extension else pa.list_(pa.list_(pa.float32()))
    schema = pa.schema([("name", pa.int64()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("gexp", gexp_type), ("cell_coords", pa.list_(pa.float64())),
                        ("source", pa.string()), ("tissue", pa.int64()),
                        *[(c, pa.bool_() if c == "cancer" else pa.string()) for c in META_COLS]],
                       metadata={"huggingface": json.dumps({"info": {"features": feats}})})
    root.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(rows) // rows_per_shard)
    for k in range(n_shards):
        part = rows[k * rows_per_shard:(k + 1) * rows_per_shard]
        m = len(part)
        cols = [pa.array([names.index(r[0]) for r in part], pa.int64()),
                pa.StructArray.from_arrays([pa.array([r[1] for r in part], pa.binary()),
                                            pa.array([None] * m, pa.string())], names=["bytes", "path"]),
                (pa.ExtensionArray.from_storage(gexp_type, _nested(np.stack([r[2] for r in part]), n_genes))
                 if gexp_extension else _nested(np.stack([r[2] for r in part]), n_genes)),
                pa.array([r[3].tolist() for r in part], pa.list_(pa.float64())),
                pa.array(["xenium"] * m), pa.array([0] * m, pa.int64()),
                *[pa.array([r[0] != "TENX95" for r in part]) if c == "cancer"
                  else pa.array([f"{c}-{r[0]}" for r in part])
                  for c in META_COLS]]
        table = pa.Table.from_arrays(cols, schema=schema)
        if fmt == "parquet":
            pq.write_table(table, root / f"train-{k:05d}-of-{n_shards:05d}.parquet", row_group_size=3)
        else:
            with pa.OSFile(str(root / f"data-{k:05d}-of-{n_shards:05d}.arrow"), "wb") as sink, \
                    pa.ipc.new_stream(sink, schema) as w:
                w.write_table(table, max_chunksize=2)
    return rows


def _rows_of(path: Path) -> dict[str, dict]:
    """``{spot_id: row}`` of a written dataset, read with pyarrow."""
    m = read_manifest(path)
    out = {}
    for s in m["shards"]:
        t = open_shard(path / s["file"], s["rows"])
        names = string_column(t, "name")
        for i in range(t.num_rows):
            out[t.column("spot_id")[i].as_py()] = {
                "name": names[i], "image": t.column("image")[i]["bytes"].as_py(),
                "gexp": np.asarray(t.column("gexp")[i].as_py(), np.float32),
                "coords": np.asarray(t.column("cell_coords")[i].as_py()), "n_cells": t.column("n_cells")[i].as_py()}
    return out


@pytest.fixture
def array2d_registered():
    pa.register_extension_type(_Array2D(pa.list_(pa.list_(pa.float32()))))
    yield
    pa.unregister_extension_type("hescape-test.array2d")


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "arrow-extension"])
def test_official_import_keeps_rows_images_splits_and_donors(tmp_path, fmt, request):
    if fmt == "arrow-extension":
        request.getfixturevalue("array2d_registered")
    rows = write_official(tmp_path / "hub" / PANEL, fmt=fmt.split("-")[0], gexp_extension=fmt == "arrow-extension")
    out = import_hescape(tmp_path / "hub", tmp_path / "ds", panel=PANEL, progress=False, rows_per_shard=4,
                         batch_rows=3)
    m = verify_dataset(out)
    preset = _preset_rows()
    kept = [s for s, _, _ in LAYOUT if s in preset]
    assert [s["name"] for s in m["samples"]] == kept
    for s in m["samples"]:
        split, row = preset[s["name"]]
        assert s["split"] == split
        assert s["donor"] == f"{' '.join(row['dataset_title'].split())} / {row['patient']}"
        assert s["patch_um_per_px"] == float(row["pixel_size_um_estimated"])
        assert s["patch_px"] == [512, 512] and s["tissue"] == "breast" and s["source"] == "xenium"
        assert s["metadata"]["atlas"] == [f"atlas-{s['name']}"] and s["metadata"]["cancer"] == [s["name"] != "TENX95"]
    assert m["import"]["unlisted_samples_dropped"] == {"TENX97": 2}
    assert m["genes"] == list(load_panel(PANEL).genes)
    got = _rows_of(out)
    want = {str(i): r for i, r in enumerate(rows) if r[0] in preset}  # spot_id = the official row index
    assert set(got) == set(want) and m["n_rows"] == 10
    for sid, (name, img, gexp, xy) in want.items():
        assert got[sid]["name"] == name and got[sid]["n_cells"] == -1
        assert got[sid]["image"] == img  # the very bytes: not re-encoded
        np.testing.assert_array_equal(got[sid]["gexp"], gexp)
        np.testing.assert_array_equal(got[sid]["coords"], xy)
    ds = PairedSpotDataset(out, "val")  # 512 px patches reach the torch dataset as they are
    item = ds[0]
    assert item["image"].shape == (3, 512, 512) and item["sample"] == "NCBI785"
    np.testing.assert_array_equal(item["gexp"].numpy(), rows[4][2])
    assert m["geometry"]["patch_px"] == 512 and m["geometry"]["diameter_um"] == 55.0


def test_gene_order_is_the_reference_h5ad():
    """The vendored panel (the import's gene order) lists the genes of nicheformer_reference.h5ad, in its order."""
    ad = pytest.importorskip("anndata")
    ref = Path("/work/shared/reference/hescape-panels") / PANEL / "nicheformer_reference.h5ad"
    if not ref.is_file():
        pytest.skip("reference h5ad not on this machine")
    assert list(ad.read_h5ad(ref, backed="r").var_names) == list(load_panel(PANEL).genes)


def test_official_wrong_gexp_length_is_refused_and_nothing_written(tmp_path, capsys):
    write_official(tmp_path / "hub", n_genes=279)
    with pytest.raises(PanelMismatchError) as e:
        import_hescape(tmp_path / "hub", tmp_path / "ds", panel=PANEL, progress=False)
    msg = str(e.value)
    assert "train-00000-of-00003.parquet" in msg and "280" in msg and "279" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no dataset, no temporary sibling
    rc = main(["import", "hescape", str(tmp_path / "hub"), "--panel", PANEL, "--out", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "expected gexp rows of 280 values" in err[0]
    assert not (tmp_path / "ds").exists()


def test_official_unlisted_and_damaged_inputs(tmp_path):
    write_official(tmp_path / "hub")
    with pytest.raises(HescapeDataError, match=r"in none \(\['TENX97'\]\).*--unlisted drop"):
        import_hescape(tmp_path / "hub", tmp_path / "ds", panel=PANEL, unlisted="error", progress=False)
    with pytest.raises(PanelMismatchError, match="expected gexp rows of 260 values .* found rows of 280.*"
                       r"human-breast-panel"):
        import_hescape(tmp_path / "hub", tmp_path / "ds", panel="human-skin-panel", progress=False)
    with pytest.raises(InputFormatError, match="found no such directory"):
        import_hescape(tmp_path / "empty", tmp_path / "ds", panel=PANEL, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFormatError, match=r"\*\.parquet"):
        import_hescape(tmp_path / "empty", tmp_path / "ds", panel=PANEL, progress=False)
    # a damaged image in a kept row: refused, nothing written
    f = sorted((tmp_path / "hub").glob("*.parquet"))[0]
    t = pq.read_table(f)
    img = t.column("image").combine_chunks()
    data = [b"\x89PNG\r\n\x1a\n" + b"\0" * 40] + img.field("bytes").to_pylist()[1:]
    t = t.set_column(1, t.schema.field("image"), pa.StructArray.from_arrays(
        [pa.array(data, pa.binary()), img.field("path")], names=["bytes", "path"]))
    pq.write_table(t.replace_schema_metadata(pq.read_schema(f).metadata), f)
    with pytest.raises(InputFormatError, match="cannot be read"):
        import_hescape(tmp_path / "hub", tmp_path / "ds", panel=PANEL, progress=False)
    assert not (tmp_path / "ds").exists()


def test_official_mixed_patch_sizes_warn(tmp_path):
    write_official(tmp_path / "hub", sizes={"NCBI783": 600})
    with pytest.warns(UserWarning, match=r"different sizes \(NCBI783: 600x600, NCBI785: 512x512, TENX95: 512x512\)"):
        out = import_hescape(tmp_path / "hub", tmp_path / "ds", panel=PANEL, progress=False)
    m = read_manifest(out)
    assert {s["name"]: s["patch_px"] for s in m["samples"]} == {"TENX95": [512, 512], "NCBI785": [512, 512],
                                                               "NCBI783": [600, 600]}
    assert m["geometry"]["uniform_patches"] is False


def test_official_cli(tmp_path, capsys):
    write_official(tmp_path / "hub")
    rc = main(["import", "hescape", str(tmp_path / "hub"), "--panel", PANEL, "--out", str(tmp_path / "ds"),
               "--quiet", "--check-images", "all"])
    out = capsys.readouterr().out
    assert rc == 0 and "10 spots, 280 genes, 3 samples" in out and "splits: test=3, train=4, val=3" in out


# ------------------------------------------------------------------------------------------------ SpatialData


@pytest.fixture(scope="module")
def sd_store(tmp_path_factory):
    """A store written by spatialdata: image 'he' (px -> global: scale 2, then translate (30, -10)), circles 'spots'
    (shape units -> global: scale 0.5, then translate (5, 7)) annotated by table 'table', polygons 'cells' annotated by
    table 'cells'. At 0.25 µm per global unit the image is 0.5 µm/px and the circles 55 µm wide (220 shape units).

    Each spot has a 4 × 4 px mark of its own colour planted in the image, centred on the spot.
    """
    sd = pytest.importorskip("spatialdata")
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    gpd = pytest.importorskip("geopandas")
    from shapely.geometry import box
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale, Sequence, Translation

    h, w = 200, 260
    img = np.full((h, w, 3), 236, np.uint8)
    img[::7, ::5] = 200  # some texture (not a blank placeholder)
    corners = [(40, 30), (100, 30), (160, 30), (70, 120), (130, 120), (200, 150)]  # mark's top-left pixel (c0, r0)
    colours = [(10 + 30 * i, 200 - 25 * i, 60 + 20 * i) for i in range(len(corners))]
    for (c0, r0), col in zip(corners, colours, strict=True):
        img[r0:r0 + 4, c0:c0 + 4] = col
    centres_px = np.array([(c0 + 2.0, r0 + 2.0) for c0, r0 in corners])  # continuous centre of the 4 × 4 mark
    global_xy = centres_px * 2.0 + np.array([30.0, -10.0])
    shape_xy = (global_xy - np.array([5.0, 7.0])) / 0.5
    image = Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), scale_factors=[2],
                               transformations={"global": Sequence([Scale([2.0, 2.0], axes=("x", "y")),
                                                                    Translation([30.0, -10.0], axes=("x", "y"))])})
    circles = ShapesModel.parse(shape_xy, geometry=0, radius=np.full(len(shape_xy), 220.0),
                                index=pd.Index(np.arange(len(shape_xy))),
                                transformations={"global": Sequence([Scale([0.5, 0.5], axes=("x", "y")),
                                                                     Translation([5.0, 7.0], axes=("x", "y"))])})
    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(6)]
    counts = rng.integers(1, 20, (len(shape_xy), len(genes))).astype(np.float32)
    barcodes = [f"BC{i:03d}-1" for i in range(len(shape_xy))]
    obs = pd.DataFrame({"region": pd.Categorical(["spots"] * len(barcodes)), "spot_id": np.arange(len(barcodes))},
                       index=barcodes)
    table = TableModel.parse(ad.AnnData(X=counts[::-1].copy(), obs=obs.iloc[::-1].copy(),
                                        var=pd.DataFrame(index=genes)),
                             region="spots", region_key="region", instance_key="spot_id")  # rows in reverse order
    # cells: 2 × 2 µm squares (8 global units of 0.25 µm) scattered over the image, identity transform
    n_cells = 150
    # global units: a central block, so that the pseudo-spot lattice over it lies on the image (30..550, -10..390)
    cxy = rng.uniform([80, 80], [240, 200], (n_cells, 2))
    polys = gpd.GeoDataFrame(geometry=[box(x - 4, y - 4, x + 4, y + 4) for x, y in cxy],
                             index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    cells = ShapesModel.parse(polys, transformations={"global": Scale([1.0, 1.0], axes=("x", "y"))})
    cell_counts = rng.poisson(2.0, (n_cells, len(genes))).astype(np.float32)
    cobs = pd.DataFrame({"region": pd.Categorical(["cells"] * n_cells), "cell_id": list(polys.index)},
                        index=[f"c{i}" for i in range(n_cells)])
    ctable = TableModel.parse(ad.AnnData(X=cell_counts, obs=cobs, var=pd.DataFrame(index=genes)),
                              region="cells", region_key="region", instance_key="cell_id")
    store = tmp_path_factory.mktemp("sd") / "section1.zarr"
    sd.SpatialData(images={"he": image}, shapes={"spots": circles, "cells": cells},
                   tables={"table": table, "cell_table": ctable}).write(store)
    return {"store": store, "colours": colours, "counts": dict(zip(barcodes, counts, strict=True)),
            "global_xy": dict(zip(barcodes, global_xy, strict=True)), "cell_counts": cell_counts}


def _patch_geometry():
    from hescape.data.geometry import get_geometry

    return get_geometry("visium").with_(fov_um=16.0, um_per_px=0.5)  # 32 px patches at the image's own 0.5 µm/px


def test_spatialdata_spots_land_on_their_marks(sd_store, tmp_path):
    from hescape.data.ingest_spatialdata import build_spatialdata_dataset

    out = build_spatialdata_dataset(sd_store["store"], tmp_path / "ds", table="table", image="he", um_per_unit=0.25,
                                    geometry=_patch_geometry(), progress=False, qc=True)
    m = verify_dataset(out)
    s = m["samples"][0]
    assert s["name"] == "section1" and s["source_um_per_px"] == pytest.approx(0.5)  # 0.25 µm/unit × 2 units/px
    assert m["ingest"]["observations"] == "spots" and m["geometry"]["diameter_um"] == pytest.approx(55.0)
    assert (out / "qc" / "section1.png").is_file()
    rows = _rows_of(out)
    assert set(rows) == set(sd_store["counts"])  # spot_id = the table's obs index
    colour_of = dict(zip(sd_store["counts"], sd_store["colours"], strict=True))
    for bc, r in rows.items():
        np.testing.assert_array_equal(r["gexp"], sd_store["counts"][bc])
        np.testing.assert_allclose(r["coords"], sd_store["global_xy"][bc] * 0.25)
        patch = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(float)
        assert patch.shape == (32, 32, 3)
        # the mark of this spot's colour fills the centre of its patch (4 × 4 px around the centre at 16, 16)
        np.testing.assert_allclose(patch[15:17, 15:17].reshape(-1, 3), [colour_of[bc]] * 4, atol=1)
        dark = np.abs(patch - 236).sum(-1) * (np.abs(patch - np.array(colour_of[bc])).sum(-1) < 30)
        yy, xx = np.mgrid[0:32, 0:32] + 0.5  # pixel centres
        assert (dark * xx).sum() / dark.sum() == pytest.approx(16.0, abs=0.1)
        assert (dark * yy).sum() / dark.sum() == pytest.approx(16.0, abs=0.1)


def test_spatialdata_cells_pool_into_pseudo_spots(sd_store, tmp_path):
    from hescape.data.geometry import get_geometry
    from hescape.data.ingest_spatialdata import build_spatialdata_dataset

    out = build_spatialdata_dataset(sd_store["store"], tmp_path / "ds", table="cell_table", image="he",
                                    um_per_unit=0.25,
                                    geometry=get_geometry("hescape").with_(fov_um=16.0, um_per_px=0.5),
                                    progress=False, qc=False, sample="s1", spots=SpotOptions(min_counts=0))
    m = read_manifest(out)
    rows = _rows_of(out)
    # a hexagon tiling puts every cell in exactly one spot: pooled totals equal the table's
    np.testing.assert_allclose(np.sum([r["gexp"] for r in rows.values()], 0), sd_store["cell_counts"].sum(0))
    assert sum(r["n_cells"] for r in rows.values()) == 150
    assert m["ingest"]["observations"] == "cells" and m["geometry"]["name"] == "hescape"
    # spot_id = the pseudo-spot's lattice id; decoded with the manifest's record, it gives the row's centre
    from hescape.data.geometry import parse_grid_id

    rec = m["spot_ids"]
    for sid, r in rows.items():
        _, row, col = parse_grid_id(sid)
        x = rec["origin_um"][0] + col * rec["pitch_um"] + (rec["pitch_um"] / 2 if row % 2 else 0.0)
        np.testing.assert_allclose(r["coords"], [x, rec["origin_um"][1] + row * rec["row_step_um"]], atol=1e-6)


def test_spatialdata_bad_inputs(sd_store, tmp_path, capsys):
    from hescape.data.ingest_spatialdata import build_spatialdata_dataset

    store = sd_store["store"]
    with pytest.raises(InputFormatError, match=r"image element 'nope'.*image elements are \['he'\]"):
        build_spatialdata_dataset(store, tmp_path / "ds", table="table", image="nope", um_per_unit=0.25)
    with pytest.raises(InputFormatError, match=r"table elements are \[.cell_table., .table.\]"):
        build_spatialdata_dataset(store, tmp_path / "ds", table="tbl", image="he", um_per_unit=0.25)
    with pytest.raises(InputFormatError, match="annotate shapes 'cells'"):
        build_spatialdata_dataset(store, tmp_path / "ds", table="table", image="he", shapes="cells", um_per_unit=0.25)
    with pytest.raises(InputFormatError, match="--um-per-unit"):
        build_spatialdata_dataset(store, tmp_path / "ds", table="table", image="he")
    assert not (tmp_path / "ds").exists()
    rc = main(["build", "spatialdata", str(store), "--table", "table", "--image", "HE", "--um-per-unit", "0.25",
               "--out", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "['he']" in err[0]
    rc = main(["build", "spatialdata", str(store), "--table", "table", "--image", "he", "--um-per-unit", "0.25",
               "--fov-um", "16", "--out", str(tmp_path / "ds2"), "--quiet", "--no-qc"])
    assert rc == 0 and read_manifest(tmp_path / "ds2")["n_rows"] == 6


def test_spatialdata_missing_package_message(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "spatialdata" or name.startswith("spatialdata."):
            raise ImportError("No module named 'spatialdata'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from hescape.data.readers.spatialdata_store import read_spatialdata

    with pytest.raises(InputFormatError, match=r'pip install "hescape-data\[spatialdata\]"'):
        read_spatialdata(tmp_path, table="t", image="i")



def _io_store(path: Path, reader: str, *, shape_scale: float, image_scale: float, xy_units: np.ndarray,
              radius_units: float):
    """A store laid out as spatialdata-io writes one (``attrs["spatialdata_io_reader"]``): circles ``cells`` with
    ``Scale(shape_scale)`` into ``global``, an image with ``Scale(image_scale)`` into ``global``."""
    sd = pytest.importorskip("spatialdata")
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    img = np.full((3, 400, 400), 230, np.uint8)
    img[:, ::9, ::4] = 190
    image = Image2DModel.parse(img, dims=("c", "y", "x"),
                               transformations={"global": Scale([image_scale, image_scale], axes=("x", "y"))})
    ids = [f"cell{i}" for i in range(len(xy_units))]
    circles = ShapesModel.parse(xy_units, geometry=0, radius=np.full(len(xy_units), radius_units),
                                index=pd.Index(ids),
                                transformations={"global": Scale([shape_scale, shape_scale], axes=("x", "y"))})
    counts = np.random.default_rng(1).integers(0, 6, (len(ids), 4)).astype(np.float32)
    obs = pd.DataFrame({"region": pd.Categorical(["cells"] * len(ids)), "cell_id": ids}, index=ids)
    table = TableModel.parse(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(4)])),
                             region="cells", region_key="region", instance_key="cell_id")
    sd.SpatialData(images={"he": image}, shapes={"cells": circles}, tables={"table": table},
                   attrs={"spatialdata_io_reader": reader}).write(path)
    return counts


def test_spatialdata_io_stores_say_their_microns(tmp_path):
    """spatialdata-io stores: Xenium shapes are in µm (Scale(1/pixel_size) into morphology pixels); Visium spots lie
    100 µm apart. The H&E µm/px follows without --um-per-unit (hand-computed below)."""
    from hescape.data.geometry import get_geometry
    from hescape.data.ingest_spatialdata import build_spatialdata_dataset

    # Xenium: cells at 5 µm radius in µm; H&E px -> morphology px by 1.29: 0.2125 × 1.29 = 0.274125 µm/px
    rng = np.random.default_rng(0)
    xy_um = rng.uniform(20, 80, (60, 2))
    counts = _io_store(tmp_path / "x.zarr", "xenium", shape_scale=1 / 0.2125, image_scale=1.29, xy_units=xy_um,
                       radius_units=5.0)
    out = build_spatialdata_dataset(tmp_path / "x.zarr", tmp_path / "dx", table="table", image="he", progress=False,
                                    qc=False, geometry=get_geometry("hescape").with_(fov_um=20.0, um_per_px=0.5),
                                    spots=SpotOptions(min_counts=0))
    m = read_manifest(out)
    assert m["samples"][0]["source_um_per_px"] == pytest.approx(0.2125 * 1.29, rel=1e-6)
    assert m["ingest"]["observations"] == "cells"  # 10 µm circles are cells
    rows = _rows_of(out)
    np.testing.assert_allclose(np.sum([r["gexp"] for r in rows.values()], 0), counts.sum(0))
    # Visium: spots 138 full-res px apart (= 100 µm) on a hex lattice; the image is the full-res image itself
    pitch = 138.0
    xy_px = np.array([[60 + pitch * (c + 0.5 * (r % 2)), 60 + pitch * np.sqrt(3) / 2 * r]
                      for r in range(3) for c in range(2)])
    _io_store(tmp_path / "v.zarr", "visium", shape_scale=1.0, image_scale=1.0, xy_units=xy_px,
              radius_units=65 / 100 * pitch / 2)
    out = build_spatialdata_dataset(tmp_path / "v.zarr", tmp_path / "dv", table="table", image="he", progress=False,
                                    qc=False, geometry=get_geometry("visium").with_(fov_um=40.0, um_per_px=1.0))
    m = read_manifest(out)
    assert m["samples"][0]["source_um_per_px"] == pytest.approx(100 / pitch, rel=1e-6)
    assert m["ingest"]["observations"] == "spots" and m["geometry"]["diameter_um"] == pytest.approx(65.0)
    assert m["geometry"]["pitch_um"] == pytest.approx(100.0)
