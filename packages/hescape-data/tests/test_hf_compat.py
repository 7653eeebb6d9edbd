"""Hugging Face `datasets` compatibility: our shards open with proper feature types, and shards in the official
HESCAPE layout (gexp as (1, G) nested lists, name as ClassLabel) are read by PairedSpotDataset."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hescape.data import DatasetFormatError, DatasetWriter, PairedSpotDataset, PanelMismatchError, SpotRecords
from hescape.data.arrow import encode_png, index_arrow_shards, pyarrow_dataset, read_manifest

datasets = pytest.importorskip("datasets")


def _records(name, donor, n=5, g=7, seed=0):
    rng = np.random.default_rng(seed)
    img = [encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return SpotRecords(name=name, donor=donor, tissue="t", source="s", images=img,
                       gexp=rng.poisson(3, (n, g)).astype(np.float32), coords_um=rng.uniform(0, 100, (n, 2)),
                       n_cells=np.full(n, 3))


@pytest.fixture
def ours(tmp_path):
    genes = [f"G{i}" for i in range(7)]
    with DatasetWriter(tmp_path / "ds", genes=genes, gene_ids=genes, rows_per_shard=4) as w:
        w.add(_records("a", "d1", seed=1), split="train")
        w.add(_records("b", "d2", seed=2), split="test")
    return tmp_path / "ds"


def test_hf_from_file_reads_feature_types(ours):
    m = read_manifest(ours)
    ref = PairedSpotDataset(ours)
    hf = datasets.concatenate_datasets([datasets.Dataset.from_file(str(ours / s["file"])) for s in m["shards"]])
    assert isinstance(hf.features["image"], datasets.Image)
    assert hf.features["gexp"].feature.dtype == "float32"
    assert hf.features["name"].dtype == "string"
    assert len(hf) == len(ref) == 10
    row = hf[6]
    assert row["image"].size == (8, 8)  # decoded to a PIL image by the Image feature
    np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), ref[6]["image"].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(np.asarray(row["gexp"], np.float32), ref[6]["gexp"].numpy())
    assert row["name"] == "b"


def test_pyarrow_dataset_over_stream_shards(ours):
    import pyarrow.dataset as pads

    t = pyarrow_dataset(ours).to_table(columns=["name", "n_cells"], filter=pads.field("name") == "b")
    assert t.num_rows == 5 and set(t.column("name").to_pylist()) == {"b"}


def _official_shard(path, names, per_name, g, seed, fmt="stream"):
    """A shard in the official layout: ClassLabel name, gexp (1, G) nested list, image struct, no donor."""
    rng = np.random.default_rng(seed)
    n = len(names) * per_name
    feats = {"name": {"names": names, "_type": "ClassLabel"}, "image": {"_type": "Image"},
             "gexp": {"feature": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
                      "_type": "Sequence"}}
    schema = pa.schema([("name", pa.int64()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("gexp", pa.list_(pa.list_(pa.float32())))],
                       metadata={"huggingface": json.dumps({"info": {"features": feats}})})
    gexp = rng.poisson(2, (n, g)).astype(np.float32)
    images = [encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    table = pa.table([pa.array(np.repeat(np.arange(len(names)), per_name)),
                      pa.StructArray.from_arrays([pa.array(images, pa.binary()), pa.array([None] * n, pa.string())],
                                                 names=["bytes", "path"]),
                      pa.array([[row.tolist()] for row in gexp], pa.list_(pa.list_(pa.float32())))], schema=schema)
    opener = pa.ipc.new_stream if fmt == "stream" else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, schema) as w:
        w.write_table(table, max_chunksize=3)
    return gexp


@pytest.mark.parametrize("fmt", ["stream", "file"])
def test_official_layout_is_read(tmp_path, fmt):
    names = ["TENX95", "NCBI783"]
    g1 = _official_shard(tmp_path / "data-00000-of-00002.arrow", names, 4, 9, seed=0, fmt=fmt)
    g2 = _official_shard(tmp_path / "data-00001-of-00002.arrow", names, 3, 9, seed=1, fmt=fmt)
    if fmt == "stream":  # HF itself reads the nested gexp as a (1, G) list and the name as its class
        hf = datasets.Dataset.from_file(str(tmp_path / "data-00000-of-00002.arrow"))
        assert np.asarray(hf[0]["gexp"]).shape == (1, 9)
        assert hf.features["name"].int2str(hf[5]["name"]) == "NCBI783"
    genes = [f"G{i}" for i in range(9)]
    with pytest.raises(PanelMismatchError, match="expected 8 values per row"):
        index_arrow_shards(tmp_path, genes=genes[:8])
    m = index_arrow_shards(tmp_path, genes=genes)
    assert {s["name"]: s["n_spots"] for s in m["samples"]} == {"TENX95": 7, "NCBI783": 7}
    assert {s["donor"] for s in m["samples"]} == set(names)
    ds = PairedSpotDataset(tmp_path)
    assert len(ds) == 14 and ds.samples[:5] == ["TENX95"] * 4 + ["NCBI783"]
    np.testing.assert_array_equal(ds.raw_counts(), np.concatenate([g1, g2]))
    item = ds[9]
    np.testing.assert_array_equal(item["gexp"].numpy(), g2[1])
    assert item["sample"] == "TENX95" and item["image"].shape == (3, 8, 8)
    with pytest.raises(FileExistsError):
        index_arrow_shards(tmp_path, genes=genes)


def test_index_refuses_shards_without_gexp(tmp_path):
    t = pa.table({"name": ["a"], "image": [{"bytes": b"", "path": None}]})
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    with pytest.raises(DatasetFormatError, match=r"missing \['gexp'\]"):
        index_arrow_shards(tmp_path, genes=["G0"])
