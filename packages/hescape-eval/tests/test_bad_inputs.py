"""Damaged and odd inputs a new user meets: each is one :class:`HescapeEvalError` (expected / found / fix), exit
status 2 from the command, never a traceback, a silent zero or a mean over different experiments."""

from __future__ import annotations

import numpy as np
import pytest
from hescape.eval import HescapeEvalError
from hescape.eval.cli import main
from hescape.eval.io import read_npz, save_embeddings

torch = pytest.importorskip("torch")
from hescape.eval.mil import cross_validate_mil, load_bags_csv  # noqa: E402

FIX = "; fix: "


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embeddings_file(path, n=12):
    return save_embeddings(path, image=_unit(n, 4, 0), gene=_unit(n, 4, 1), index=np.arange(n), sample=["s"] * n,
                           donor=["d"] * n)


def _damaged(tmp_path):
    """``name -> path`` of files that are not a readable .npz archive, made from a good one by hand."""
    good = _embeddings_file(tmp_path / "good.npz").read_bytes()
    files = {"truncated": good[: len(good) // 2], "cut_at_end": good[:-10], "empty": b""}
    corrupt = bytearray(good)
    corrupt[300:340] = b"\x00" * 40  # inside the first member's local header and data
    files["corrupt_member"] = bytes(corrupt)
    out = {}
    for name, data in files.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
        out[name] = tmp_path / f"{name}.npz"
    np.save(tmp_path / "plain.npy", _unit(12, 4))
    (tmp_path / "plain.npy").rename(tmp_path / "npy_named_npz.npz")  # an .npy file under an .npz name
    out["npy_named_npz"] = tmp_path / "npy_named_npz.npz"
    return out


@pytest.mark.parametrize("name", ["truncated", "cut_at_end", "empty", "corrupt_member", "npy_named_npz"])
def test_damaged_embeddings_file_is_one_line_exit_2(tmp_path, capsys, name):
    path = _damaged(tmp_path)[name]
    assert main(["retrieval", str(path), "--ks", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hescape-eval: error: embeddings file {path}: expected an .npz archive") and FIX in err
    assert err.count("\n") == 1, err
    with pytest.raises(HescapeEvalError, match="expected an .npz archive of arrays"):
        read_npz(path, what="x", fix="y")


# -- MIL slide tables --------------------------------------------------------------------------------------------------

def _bag(seed, n=6, d=4):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _table(tmp_path, rows, header="path,patient,site,label"):
    p = tmp_path / "bags.csv"
    p.write_text("\n".join([header, *rows]) + ("\n" if rows or header else ""))
    return p


@pytest.mark.parametrize(("text", "words"), [
    ("", "found an empty file"),
    ("\n\n", "found an empty file"),
    ("path,patient,site,label\n", "found a header only"),
])
def test_empty_bag_table_says_what_is_missing(tmp_path, text, words):
    p = tmp_path / "bags.csv"
    p.write_text(text)
    with pytest.raises(HescapeEvalError, match=words) as info:
        load_bags_csv(p)
    assert FIX in str(info.value)


def test_bag_table_rows_are_checked(tmp_path):
    np.savez(tmp_path / "a.npz", features=_bag(0))
    np.savez(tmp_path / "b.npz", features=_bag(1))
    # the same slide twice (once by a relative, once by an absolute path) would weigh double
    p = _table(tmp_path, ["a.npz,P1,S1,1", f"{tmp_path / 'a.npz'},P1,S1,1"])
    with pytest.raises(HescapeEvalError, match="row 3: expected each slide once"):
        load_bags_csv(p)
    # an empty site cell would put unrelated slides into one site
    with pytest.raises(HescapeEvalError, match="row 3: expected a value in column 'site'"):
        load_bags_csv(_table(tmp_path, ["a.npz,P1,S1,1", "b.npz,P2,,0"]))
    with pytest.raises(HescapeEvalError, match="row 2: expected a value in column 'path'"):
        load_bags_csv(_table(tmp_path, [",P1,S1,1"]))
    # relative paths are taken from the CSV's folder, not the working directory
    bags, labels, sites, patients = load_bags_csv(_table(tmp_path, ["a.npz,P1,S1,1", "b.npz,P2,S2,0"]))
    assert np.array_equal(bags[1], _bag(1)) and labels.tolist() == [1, 0] and sites.tolist() == ["S1", "S2"]


def test_bag_feature_files_are_checked(tmp_path):
    np.savez(tmp_path / "nan.npz", features=np.where(np.eye(6, 4) > 0, np.nan, 0.0))
    np.savez(tmp_path / "flat.npz", features=np.zeros(8))
    np.savez(tmp_path / "other.npz", feats=_bag(0))
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    cases = {"nan.npz": "found NaN or inf in 4 of 6 tiles, first at tile 0", "flat.npz": "found shape (8,)",
             "other.npz": "found arrays ['feats']", "cut.npz": "expected an .npz archive of arrays, found unreadable",
             "missing.npz": "found no such file"}
    for name, words in cases.items():
        with pytest.raises(HescapeEvalError, match=r"row 2 features .*" + words.replace("(", r"\(").replace(
                ")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            load_bags_csv(_table(tmp_path, [f"{name},P1,S1,1"]))


def test_cross_validate_refuses_no_slides_and_non_finite_bags():
    with pytest.raises(HescapeEvalError, match="MIL inputs: expected one bag per slide, found no slides"):
        cross_validate_mil([], [], [])
    bags = [_bag(i) for i in range(10)]
    bags[7][2, 1] = np.inf  # before: trained on, NaN logits, then scikit-learn's "Input contains NaN"
    with pytest.raises(HescapeEvalError, match="bag 7: expected finite features, found NaN or inf in 1 of 6 tiles"):
        cross_validate_mil(bags, [0, 1] * 5, list("abcdefghij"))
    bags[7] = np.zeros((0, 4), np.float32)
    with pytest.raises(HescapeEvalError, match=r"bag 7: expected a non-empty \(N tiles, D\)"):
        cross_validate_mil(bags, [0, 1] * 5, list("abcdefghij"))


# -- output paths ------------------------------------------------------------------------------------------------------

@pytest.fixture
def finished_run(tmp_path, train_run):
    """A finished run ``tmp_path / "r"``: config.json, results.json (Recall@5 0.25 both ways, pool 100) and
    embeddings/test.npz."""
    cfg = {"format": "hescape-train-config/1", "seed": 0, "model": {"image": "uni", "gene": "mlp"},
           "data": {"path": None, "panel": "human-breast-panel"}}
    run = train_run(tmp_path / "r", cfg, i2g=0.25, g2i=0.25, pool=100)
    _embeddings_file(run / "embeddings" / "test.npz")
    return run


def test_report_refuses_existing_outputs_unless_overwrite(tmp_path, capsys, finished_run):
    run, out = finished_run, tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out), "--no-figures"]) == 0
    (out / "report.md").write_text("precious")
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hescape-eval: error: --out {out / 'report.md'}: expected a path where no output exists")
    assert "--overwrite" in err and err.count("\n") == 1 and (out / "report.md").read_text() == "precious"
    assert main(["report", str(run), "--out", str(out), "--no-figures", "--overwrite"]) == 0
    assert "0.250" in (out / "report.md").read_text()
    (tmp_path / "a-file").write_text("x")
    assert main(["report", str(run), "--out", str(tmp_path / "a-file")]) == 2
    assert "expected a folder" in capsys.readouterr().err


def test_retrieval_out_is_checked_before_ranking(tmp_path, capsys, finished_run):
    run = finished_run
    out = tmp_path / "r.json"
    out.write_text("precious")
    for argv, words in ((["--out", str(out)], "expected a path where no output exists yet"),
                        (["--out", str(tmp_path / "r.txt")], "expected a file name ending in .json"),
                        (["--out", str(tmp_path)], "expected a file name ending in .json")):
        assert main(["retrieval", str(run), "--ks", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert out.read_text() == "precious"
    assert main(["retrieval", str(run), "--ks", "1", "--out", str(out), "--overwrite"]) == 0
    assert '"reports"' in out.read_text()


def test_unwritable_out_is_one_line_in_the_package_shape(tmp_path, capsys, finished_run):
    run = finished_run
    (tmp_path / "plain").write_text("a file, not a folder")
    # the parent of --out is a file: the OS refuses (NotADirectoryError), even for root
    assert main(["retrieval", str(run), "--ks", "1", "--out", str(tmp_path / "plain" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hescape-eval: error: {tmp_path / 'plain'}") and "expected a path this command can" in err
    assert FIX in err and err.count("\n") == 1, err


def test_ctrl_c_while_writing_the_figure_leaves_no_partial_file(tmp_path, capsys, monkeypatch, finished_run):
    figure = pytest.importorskip("matplotlib.figure")
    run, out = finished_run, tmp_path / "rep"

    def interrupted(self, fh, **kwargs):
        fh.write(b"\x89PNG half")  # some bytes reach the file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(figure.Figure, "savefig", interrupted)
    assert main(["report", str(run), "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    # the report is published only once every file is finished: nothing of it, and no temporary file, is left
    assert not out.exists()


# -- tile features -----------------------------------------------------------------------------------------------------

def _small_slide(tmp_path):
    """A one-level OME-TIFF at 0.5 µm/px: 512 x 512 px, pink tissue in the left half, white on the right."""
    tifffile = pytest.importorskip("tifffile")
    from hescape.eval.wsi import tile_slide

    rng = np.random.default_rng(0)
    img = np.full((512, 512, 3), 242, np.uint8)
    img[:, :256] = np.stack([rng.integers(150, 230, (512, 256)), rng.integers(50, 120, (512, 256)),
                             rng.integers(120, 200, (512, 256))], axis=-1)
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, img, ome=True, photometric="rgb", tile=(256, 256),
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    return tile_slide(path)


def test_nan_tile_features_are_refused_and_never_cached(tmp_path):
    from hescape.eval.wsi import slide_features

    tiles = _small_slide(tmp_path)
    assert len(tiles) == 2  # the two left tiles hold tissue

    def nan_encoder(x):
        out = torch.zeros(x.shape[0], 3)
        out[-1, 0] = float("nan")
        return out

    with pytest.raises(HescapeEvalError, match="expected finite features, found NaN or inf for 1 of 2 tiles"):
        slide_features(tiles, nan_encoder, cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # a rerun cannot reuse NaN


def test_damaged_feature_cache_is_one_error(tmp_path):
    from hescape.eval.wsi import slide_features

    tiles = _small_slide(tmp_path)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / f"{tiles.slide_id}.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(HescapeEvalError, match="feature cache .*expected an .npz archive of arrays.*fix: delete"):
        slide_features(tiles, lambda x: torch.zeros(x.shape[0], 3), cache_dir=cache, progress=False)
    np.savez(cache / f"{tiles.slide_id}.npz", features=np.zeros((2, 3)))  # no positions or encoder: not a cache of ours
    with pytest.raises(HescapeEvalError, match=r"missing \['positions_um', 'encoder'\]"):
        slide_features(tiles, lambda x: torch.zeros(x.shape[0], 3), cache_dir=cache, progress=False)


# -- expression probe ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "words"), [
    ({"n_genes": 0}, r"n_genes \(--n-genes\): expected a positive integer"),  # before: IndexError from scanpy's ranking
    ({"n_genes": 2.5}, r"n_genes \(--n-genes\): expected a positive integer"),
    ({"min_cells_pct": 1.5}, r"min_cells_pct \(--min-cells-pct\): expected a fraction in \[0, 1\]"),
])
def test_expression_probe_gene_selection_options(kwargs, words):
    from hescape.eval.expression import expression_probe, select_variable_genes

    rng = np.random.default_rng(0)
    emb, counts = rng.normal(size=(40, 8)), rng.poisson(3, size=(40, 20))
    genes, patients = [f"g{i}" for i in range(20)], np.repeat(["p0", "p1", "p2", "p3"], 10)
    with pytest.raises(HescapeEvalError, match=words):
        expression_probe(emb, counts, genes, patients, n_components=4, **kwargs)
    with pytest.raises(HescapeEvalError, match=words):
        select_variable_genes(counts, genes, patients, **kwargs)
