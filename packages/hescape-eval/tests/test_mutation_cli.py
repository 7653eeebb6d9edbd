"""``hescape-eval mutation`` (hescape.eval.mutation): slide table → tiles → cached features → MIL → results.

Slides are written here as real OME-TIFF pyramids (tifffile) with a known tissue rectangle on a white background;
positive slides carry hematoxylin-rich (bluer) tissue, negative ones eosin-rich (pinker) tissue. The encoder is a
registered test encoder whose output is known by hand: the mean and s.d. of each RGB channel of a tile in [0, 1].
Truth: the feature files equal those statistics of the slide pixels; F1/AUROC in the results equal scikit-learn on
the per-slide predictions; the baselines equal 2p/(1+p) and the majority label counted by hand; the planted colour
signal is learned. Refusals are one line and exit status 2, before any slide is encoded.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile", reason="slides need tifffile (pip install 'hescape-eval[wsi]')")
torch = pytest.importorskip("torch")
models = pytest.importorskip("hescape.models", reason="the mutation command builds encoders with hescape-models")

from hescape.eval.cli import main  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402

ENCODER = "test_tile_colour_stats"
SIDE_PX = 768  # 384 µm at 0.5 µm/px: a 3 x 3 grid of 128 µm tiles
TISSUE_COLS = 512  # tissue in x < 256 µm: tiles of grid columns 0 and 1 (6 per slide)


class _ColourStats(models.ImageEncoder):
    """(B, 3, 256, 256) uint8 → (B, 6): per-channel mean and s.d. of the tile in [0, 1] (contract: no resize,
    mean 0, std 1). Counts its calls and can be told to fail after ``fail_after`` calls (to test resuming)."""

    out_dim = 6
    calls = 0
    fail_after: int | None = None

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        type(self).calls += 1
        if type(self).fail_after is not None and type(self).calls > type(self).fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from hescape.models.contracts import ImageContract
    from hescape.models.zoo import _REGISTRY, EncoderEntry, register_encoder

    added = ENCODER not in _REGISTRY["image"]
    if added:
        register_encoder(EncoderEntry(ENCODER, "image", _ColourStats,
                                      ImageContract(input_size=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
                                      out_dim=6, description="test: tile colour statistics"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if added:  # the registry is process-wide: leave it as found for the other test files
        _REGISTRY["image"].pop(ENCODER, None)


def _slide_pixels(label: int, rng) -> np.ndarray:
    img = np.clip(242 + rng.normal(0, 2, (SIDE_PX, SIDE_PX, 3)), 0, 255).astype(np.uint8)
    base = np.array([150, 90, 190]) if label else np.array([215, 110, 160])  # bluer (H-rich) vs pinker (E-rich)
    base = base + rng.normal(0, 6, 3)  # slide-to-slide stain variation, smaller than the planted difference
    tissue = base + rng.normal(0, 18, (SIDE_PX, TISSUE_COLS, 3))
    img[:, :TISSUE_COLS] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


def _write_ome(path, img):
    half = img.reshape(SIDE_PX // 2, 2, SIDE_PX // 2, 2, 3).astype(np.float32).mean((1, 3)).round().astype(np.uint8)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, subifds=1, tile=(256, 256), photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(half, subfiletype=1, tile=(256, 256), photometric="rgb")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """20 slides from 10 sites (one positive and one negative each), 6 tissue tiles per slide."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    rng = np.random.default_rng(0)
    rows, pixels = ["path,patient,site,label"], {}
    for i in range(20):
        label, site = i % 2, f"TSS-{i // 2:02d}"
        img = _slide_pixels(label, rng)
        _write_ome(root / "slides" / f"slide{i:02d}.ome.tif", img)
        pixels[f"slide{i:02d}"] = img
        rows.append(f"slides/slide{i:02d}.ome.tif,P{i:02d},{site},{label}")
    (root / "slides.csv").write_text("\n".join(rows) + "\n")
    return root, pixels


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_end_to_end_features_metrics_baselines_and_resume(cohort, tmp_path, capsys, cli, one_line_error):
    root, pixels = cohort
    out = tmp_path / "res"
    args = ["mutation", str(root / "slides.csv"), "--encoder", ENCODER, "--out", str(out), "--epochs", "10",
            "--batch-size", "4", "--no-progress"]
    # 1. interrupted after 7 encoder calls (batches of 4 tiles: slides 0-2 complete, slide 3 half done)
    _ColourStats.calls, _ColourStats.fail_after = 0, 7
    assert main(args) == 130  # Ctrl-C: one line on stderr, exit status 130, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("hescape-eval: interrupted")
    cached = sorted(p.name for p in (out / "features").iterdir())
    assert cached == ["slide00.npz", "slide01.npz", "slide02.npz"], cached  # no partial file of slide 3
    assert not (out / "mutation.json").exists()
    # 2. resumed: only the 17 slides left are encoded (2 calls each: 6 tiles in batches of 4)
    _ColourStats.calls, _ColourStats.fail_after = 0, None
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert _ColourStats.calls == 17 * 2
    # features = colour statistics of the slide pixels, tile by tile (positions: (x, y) µm of the top-left corner)
    for sid, img in pixels.items():
        with np.load(out / "features" / f"{sid}.npz") as z:
            feats, pos, enc = z["features"], z["positions_um"], str(z["encoder"])
        assert enc == f"{ENCODER} random-init seed 0"
        assert sorted(map(tuple, pos.tolist())) == [(x, y) for x in (0.0, 128.0) for y in (0.0, 128.0, 256.0)]
        for (x, y), f in zip(pos, feats, strict=True):
            tile = img[int(y * 2):int(y * 2) + 256, int(x * 2):int(x * 2) + 256].reshape(-1, 3) / 255.0
            np.testing.assert_allclose(f[:3], tile.mean(0), atol=1e-5)
            np.testing.assert_allclose(f[3:], tile.std(0, ddof=1), atol=1e-4)
    # metrics = scikit-learn on the per-slide predictions, fold by fold
    pred = _read_csv(out / "predictions.csv")
    assert len(pred) == 20 and {r["slide_id"] for r in pred} == set(pixels)
    res = json.loads((out / "mutation.json").read_text())
    folds = {}
    for r in pred:
        folds.setdefault(int(r["fold"]), []).append(r)
    assert sorted(folds) == [0, 1, 2, 3, 4]
    for site in {r["site"] for r in pred}:  # site-preserving: all slides of a site in one fold
        assert len({r["fold"] for r in pred if r["site"] == site}) == 1
    by_fold = {f["test_fold"]: f for f in res["folds"]}
    labels = {r["slide_id"]: int(r["label"]) for r in pred}
    for k, rs in folds.items():
        y = np.array([int(r["label"]) for r in rs])
        p = np.array([float(r["probability"]) for r in rs])
        f = by_fold[k]
        assert f["auroc"] == pytest.approx(roc_auc_score(y, p))
        assert f["f1"] == pytest.approx(f1_score(y, (p >= 0.5).astype(int)))
        prev = y.mean()
        assert f["all_positive_f1"] == pytest.approx(2 * prev / (1 + prev))
        train = [s for kk, rr in folds.items() if kk not in (k, f["val_fold"]) for s in (r["slide_id"] for r in rr)]
        n_pos = sum(labels[s] for s in train)
        major = int(n_pos >= len(train) - n_pos)
        assert f["majority_class"] == major
        assert f["majority_f1"] == pytest.approx(2 * prev / (1 + prev) if major else 0.0)
        assert f["auroc_null_sd"] == pytest.approx(math.sqrt((len(y) + 1) / (12 * y.sum() * (len(y) - y.sum()))))
    aurocs = [f["auroc"] for f in res["folds"]]
    assert res["summary"]["auroc"]["mean"] == pytest.approx(np.mean(aurocs))
    assert res["summary"]["auroc"]["std"] == pytest.approx(np.std(aurocs))
    # the planted colour difference is learned at the paper's optimiser settings
    print(res["summary"], (out / "mutation.md").read_text(), sep="\n")
    assert res["summary"]["auroc"]["mean"] > 0.9
    assert res["protocol"]["lr"] == 2e-5 and res["protocol"]["heads"] == 8 and res["protocol"]["dim_head"] == 64
    assert res["encoder"]["random_init"] is True and "randomly initialised" in (out / "mutation.md").read_text()
    # the CSV's fold rows and summary rows, the Markdown table, the feature table readable by mil_from_csv
    rows = _read_csv(out / "mutation.csv")
    assert [r["row"] for r in rows] == [f"fold {k}" for k in by_fold] + ["mean", "std"]
    assert float(rows[-2]["auroc"]) == pytest.approx(res["summary"]["auroc"]["mean"])
    assert "| Transformer MIL |" in stdout and "| *all positive* |" in stdout and "| *majority class* |" in stdout
    from hescape.eval.mil import load_bags_csv

    bags, y, sites, patients = load_bags_csv(out / "features.csv")
    assert len(bags) == 20 and all(b.shape == (6, 6) for b in bags) and y.sum() == 10
    # 3. a finished run is not overwritten; --overwrite reuses every cached feature file
    code, _, err = cli(*args)
    one_line_error(code, err, "--overwrite", "mutation.md")
    _ColourStats.calls = 0
    code, _, err = cli(*args, "--overwrite", "--epochs", "1")
    assert code == 0 and _ColourStats.calls == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["features", "features.csv", "mutation.csv", "mutation.json",
                                                     "mutation.md", "predictions.csv"]  # no temporary file left


def _table(tmp_path, root, rows, header="path,patient,site,label"):
    p = tmp_path / "t.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def _good_rows(root, n=20):
    return [f"{root}/slides/slide{i:02d}.ome.tif,P{i:02d},TSS-{i // 2:02d},{i % 2}" for i in range(n)]


def test_refusals_before_any_work(cohort, tmp_path, cli, one_line_error):
    root, _ = cohort
    out = tmp_path / "out"
    _ColourStats.calls, _ColourStats.fail_after = 0, None
    # a missing column
    t = _table(tmp_path, root, [r.rsplit(",", 1)[0] for r in _good_rows(root)], header="path,patient,site")
    one_line_error(*cli("mutation", str(t), "--encoder", ENCODER, "--out", str(out))[::2],
                   "missing ['label']", "columns")
    # a slide that cannot be opened
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a TIFF")
    rows = _good_rows(root)
    rows[5] = f"{bad},P05,TSS-02,1"
    one_line_error(*cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                         str(out))[::2], "row 7", "broken.svs", "readable Aperio SVS or OME-TIFF")
    # one class in a fold: every slide of sites 00-01 negative... make one site hold the only positives
    rows = [f"{root}/slides/slide{i:02d}.ome.tif,P{i:02d},TSS-{i // 2:02d},{int(i < 2)}" for i in range(20)]
    one_line_error(*cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                         str(out))[::2], "expected both classes")
    # a label that is not 0/1, a slide listed twice, fewer sites than folds
    rows = _good_rows(root)
    rows[3] = rows[3][:-1] + "MSI"
    one_line_error(*cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                         str(out))[::2], "row 5 label", "0 or 1")
    rows = _good_rows(root) + [_good_rows(root)[0]]
    one_line_error(*cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                         str(out))[::2], "row 22", "already in row 2")
    rows = [f"{root}/slides/slide{i:02d}.ome.tif,P{i:02d},TSS-{i % 4},{i % 2}" for i in range(20)]
    one_line_error(*cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                         str(out))[::2], "at least 5 sites")
    # a pretrained encoder without weights, an unknown encoder
    good = _table(tmp_path, root, _good_rows(root))
    one_line_error(*cli("mutation", str(good), "--encoder", "uni", "--out", str(out))[::2],
                   "--encoder uni", "--weights")
    one_line_error(*cli("mutation", str(good), "--encoder", "no_such_net", "--out", str(out))[::2],
                   "unknown image encoder")
    one_line_error(*cli("mutation", str(good), "--encoder", ENCODER, "--device", "gpu", "--out",
                         str(out))[::2], "--device gpu", "cpu, cuda, cuda:N or auto")
    assert _ColourStats.calls == 0 and not out.exists()  # nothing was encoded or written


def test_unusable_slides_named_before_folds_and_any_work(cohort, tmp_path, cli, one_line_error):
    """A missing slide, a text file, a folder and a truncated copy in a table that would also fail the fold checks
    (3 sites < 5 folds): one error naming the first bad CSV row and path, listing the other bad rows; exit 2; nothing
    tiled, encoded or written."""
    root, _ = cohort
    out = tmp_path / "out"
    _ColourStats.calls, _ColourStats.fail_after = 0, None
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide\n")
    data = (root / "slides" / "slide00.ome.tif").read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[:len(data) // 2])
    rows = [f"{root}/slides/slide{i:02d}.ome.tif,P{i:02d},TSS-{i % 3},{i % 2}" for i in range(3)]
    rows += [f"{tmp_path}/missing.svs,P10,TSS-0,1", f"{notes},P11,TSS-1,0", f"{tmp_path},P12,TSS-2,1",
             f"{cut},P13,TSS-0,0"]
    table = _table(tmp_path, root, rows)  # CSV lines: header 1, good slides 2-4, bad 5-8
    code, _, err = cli("mutation", str(table), "--encoder", ENCODER, "--out", str(out))
    one_line_error(code, err, "slide table row 5", "(also unusable: rows 6, 7, 8)", f"'{tmp_path}/missing.svs'",
                   "found no such file")
    assert "sites" not in err
    # each bad row alone: its own cause, under its own row number
    for k, words in [(4, ("notes.svs", "not a TIFF file")), (5, ("found a folder",)),
                     (6, ("cut.ome.tif", "found a truncated file"))]:
        code, _, err = cli("mutation", str(_table(tmp_path, root, rows[:3] + [rows[k]])), "--encoder",
                           ENCODER, "--out", str(out))
        one_line_error(code, err, "slide table row 5:", *words)
    assert _ColourStats.calls == 0 and not out.exists()


def test_table_refusals_empty_and_one_class(cohort, tmp_path, cli, one_line_error):
    root, _ = cohort
    out = tmp_path / "out"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    one_line_error(*cli("mutation", str(empty), "--encoder", ENCODER, "--out", str(out))[::2],
                   "empty.csv", "found an empty file")
    header = tmp_path / "header.csv"
    header.write_text("path,patient,site,label\n")
    one_line_error(*cli("mutation", str(header), "--encoder", ENCODER, "--out", str(out))[::2],
                   "found a header only")
    rows = [f"{root}/slides/slide{i:02d}.ome.tif,P{i:02d},TSS-{i // 2:02d},0" for i in range(20)]
    one_line_error(*cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                         str(out))[::2], "slide labels", "only label [0] in all 20 slides", "label column")
    assert not out.exists()


def test_slide_without_tiles_refused_before_encoding(cohort, tmp_path, cli, one_line_error):
    root, _ = cohort
    # A 100 x 100 µm slide with 50 x 50 µm of tissue: its one (edge) tile of 128 µm holds (50/128)² = 15 % tissue.
    img = np.clip(242 + np.random.default_rng(1).normal(0, 2, (200, 200, 3)), 0, 255).astype(np.uint8)
    img[:100, :100] = _slide_pixels(1, np.random.default_rng(1))[:100, :100]
    small = tmp_path / "small.ome.tif"
    tifffile.imwrite(small, img, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                                                              "PhysicalSizeY": 0.5})
    rows = _good_rows(root)
    rows[-1] = f"{small},P19,TSS-09,1"
    _ColourStats.calls = 0
    code, _, err = cli("mutation", str(_table(tmp_path, root, rows)), "--encoder", ENCODER, "--out",
                       str(tmp_path / "o"), "--no-progress")
    one_line_error(code, err, "row 21", "at least one tile", "--min-tissue", logged=True)  # after the plan line
    assert _ColourStats.calls == 0


def test_hescape_run_as_encoder(cohort, tmp_path, cli, one_line_error):
    """A hescape-train run as --encoder: features are its 128-d image embeddings (tower + projection, unit norm)."""
    import hashlib

    from safetensors.torch import save_file

    root, pixels = cohort
    torch.manual_seed(0)
    model = models.create_model("vit_mlp_nano", panel=["A", "B", "C"]).eval()
    ck = tmp_path / "run" / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"),
              metadata={"model_cfg": json.dumps(models.cfg_to_dict(model.recorded_cfg())), "genes": '["A", "B", "C"]'})
    (ck.parent / "index.json").write_text(json.dumps({"best": ck.name, "last": ck.name}))
    out = tmp_path / "res"
    code, _, err = cli("mutation", str(root / "slides.csv"), "--encoder", str(tmp_path / "run"), "--out",
                       str(out), "--epochs", "1", "--no-progress")
    assert code == 0, err
    digest = hashlib.sha256((ck / "model.safetensors").read_bytes()).hexdigest()[:16]
    res = json.loads((out / "mutation.json").read_text())
    assert res["encoder"]["identity"] == f"hescape:model.safetensors sha256:{digest}"
    assert res["encoder"]["feature_dim"] == 128 and res["encoder"]["random_init"] is False
    img = pixels["slide07"]
    with np.load(out / "features" / "slide07.npz") as z:
        feats, pos = z["features"], z["positions_um"]
    tiles = np.stack([img[int(y * 2):int(y * 2) + 256, int(x * 2):int(x * 2) + 256] for x, y in pos])
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()).numpy()
    np.testing.assert_allclose(feats, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # weights or options make no sense with a run: refused
    code, _, err = cli("mutation", str(root / "slides.csv"), "--encoder", str(tmp_path / "run"), "--weights",
                       "w.bin", "--out", str(tmp_path / "o2"))
    one_line_error(code, err, "--weights", "HESCAPE run")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_cuda_matches_cpu(cohort, tmp_path, cli):
    """`--device cuda`: the tile features equal the CPU run's (colour statistics, float32 tolerance), the MIL runs on
    the GPU and learns the planted colour signal as on the CPU."""
    root, _ = cohort
    res = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / dev
        code, _, err = cli("mutation", str(root / "slides.csv"), "--encoder", ENCODER, "--out", str(out),
                           "--epochs", "10", "--batch-size", "4", "--no-progress", "--device", dev)
        assert code == 0, err
        res[dev] = json.loads((out / "mutation.json").read_text())
    for sid in (f"slide{i:02d}" for i in range(20)):
        with np.load(tmp_path / "cpu" / "features" / f"{sid}.npz") as a, \
                np.load(tmp_path / "cuda" / "features" / f"{sid}.npz") as b:
            np.testing.assert_array_equal(a["positions_um"], b["positions_um"])
            np.testing.assert_allclose(a["features"], b["features"], atol=1e-5)
    assert res["cuda"]["summary"]["auroc"]["mean"] > 0.9
    assert abs(res["cuda"]["summary"]["auroc"]["mean"] - res["cpu"]["summary"]["auroc"]["mean"]) < 0.1
