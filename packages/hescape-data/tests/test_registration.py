"""Spot-to-image registration check (hescape.data.registration): misregistrations that keep the spots on the image.

Truth: the vendored Space Ranger 1.0.0 output (scanpy, BSD-3) marks 4,235 spots in_tissue = 1 and 757 in_tissue = 0
on its lowres H&E image; a correct registration puts the first on stained tissue and the second on glass. Faults
are written into copies of it (a scale factor halved or doubled, the image transposed or mirrored, pixel columns
swapped) and into a copy of the synthetic Xenium bundle (pixel_size doubled).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hescape.data.arrow import read_manifest
from hescape.data.cli import main
from hescape.data.errors import InputFormatError, RegistrationError
from hescape.data.geometry import get_geometry
from hescape.data.ingest import PatchOptions, build_visium_dataset, build_xenium_dataset
from hescape.data.readers.image import ArrayImage
from hescape.data.readers.visium import read_visium
from hescape.data.registration import MIN_AUROC, auroc, auroc_se, check_registration, tissue_mask
from PIL import Image

LOW = PatchOptions(max_upsample=100)  # the lowres image is ~24 µm/px: allow it, the check is what is tested


def _copy(visium_outs: Path, tmp_path: Path) -> Path:
    out = Path(shutil.copytree(visium_outs, tmp_path / "outs"))
    for p in out.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out


def _scale_lowres(outs: Path, k: float) -> None:
    path = outs / "spatial" / "scalefactors_json.json"
    sf = json.loads(path.read_text())
    sf["tissue_lowres_scalef"] *= k
    path.write_text(json.dumps(sf))


def _edit_image(outs: Path, op) -> None:
    path = outs / "spatial" / "tissue_lowres_image.png"
    Image.fromarray(np.ascontiguousarray(op(np.asarray(Image.open(path))))).save(path)


def test_auroc_hand_example_and_sklearn():
    # pairs (pos, neg): (2,1)=1, (2,2)=½, (3,1)=1, (3,2)=1 -> 3.5 / 4
    assert auroc([2.0, 3.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auroc([0.0], [1.0]) == 0.0
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40) / 4, rng.integers(0, 4, 30) / 4  # many ties
    ref = metrics.roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(ref, abs=1e-12)


def test_tissue_mask_glass_grey_and_stain():
    px = np.array([[[255, 255, 255], [178, 178, 178], [20, 20, 20], [232, 196, 218], [200, 120, 180]]], np.uint8)
    # white glass, grey glass (the fixture's), a black border, pale eosin (mean 215, chroma 36), stained tissue
    assert tissue_mask(px).tolist() == [[False, False, False, True, True]]


def test_fixture_passes_and_is_recorded(visium_outs, tmp_path):
    out = build_visium_dataset(visium_outs, tmp_path / "ds", image="lowres", progress=False, qc=False, patch=LOW)
    m = read_manifest(out)
    reg = m["registration"]
    assert reg["verdict"] == "ok" and reg["checked"]
    assert reg["n_spots"] == 4235 and reg["n_background"] == 757  # every in_tissue 1 / 0 spot of the positions file
    assert reg["auroc"] > 0.95  # measured 0.984
    assert max(v for v in reg["alternatives"].values() if v is not None) < reg["auroc"]
    assert m["samples"][0]["registration"]["auroc"] == reg["auroc"]
    assert m["ingest"]["patch"]["registration_check"] is True


@pytest.mark.parametrize(("fault", "error", "match"), [
    ("scalef_half", RegistrationError, r"AUROC 0\.5\d.*2× their scale"),
    ("scalef_double", InputFormatError, r"outside it .*image scale factor"),
    ("scalef_1.03", RegistrationError, r"AUROC 0\.9[23].*0\.97× their scale"),  # a 3 % scale error
    ("shift_x_one_spacing", RegistrationError, r"shifted by -1 spot spacings along x"),  # 150 px ≈ 92 µm
    ("scalef_1.1", RegistrationError, r"AUROC 0\.80.*0\.9× their scale \(the µm→pixel scale should be 0\.9× what it is.*\(AUROC 0\.9[01]"),  # a 10 % scale error
    ("transposed_image", RegistrationError, r"x and y swapped .*AUROC 0\.98"),
    ("mirrored_image", RegistrationError, r"AUROC 0\.9[12].*mirrored left-right \(AUROC 0\.9[89]"),
    ("rotated_image", RegistrationError, r"rotated by 90°"),
    ("swapped_pixel_columns", InputFormatError, r"found them swapped"),
])
def test_misregistration_refused(visium_outs, tmp_path, fault, error, match):
    outs = _copy(visium_outs, tmp_path)
    if fault == "scalef_half":
        _scale_lowres(outs, 0.5)
    elif fault == "scalef_double":
        _scale_lowres(outs, 2.0)
    elif fault == "scalef_1.1":
        _scale_lowres(outs, 1.1)
    elif fault == "scalef_1.03":
        _scale_lowres(outs, 1.03)
    elif fault == "shift_x_one_spacing":  # pxl_col_in_fullres + 150 (the positions file's last column)
        pos = outs / "spatial" / "tissue_positions_list.csv"
        rows = [r.split(",") for r in pos.read_text().splitlines()]
        pos.write_text("\n".join(",".join(r[:5] + [str(int(r[5]) + 150)]) for r in rows) + "\n")
    elif fault == "transposed_image":
        _edit_image(outs, lambda a: a.transpose(1, 0, 2))
    elif fault == "mirrored_image":
        _edit_image(outs, lambda a: a[:, ::-1])
    elif fault == "rotated_image":
        _edit_image(outs, lambda a: np.rot90(a, -1))
    else:
        pos = outs / "spatial" / "tissue_positions_list.csv"
        rows = [r.split(",") for r in pos.read_text().splitlines()]
        pos.write_text("\n".join(",".join(r[:4] + [r[5], r[4]]) for r in rows) + "\n")
    with pytest.raises(error, match=match) as e:
        build_visium_dataset(outs, tmp_path / "ds", image="lowres", progress=False, qc=False, patch=LOW)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_opt_out_builds_and_records(visium_outs, tmp_path, capsys):
    outs = _copy(visium_outs, tmp_path)
    _edit_image(outs, lambda a: a[:, ::-1])
    args = ["build", "visium", str(outs), "--image", "lowres", "--max-upsample", "100", "--quiet", "--no-qc"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mirrored left-right" in err[0] and "--skip-registration-check" in err[0]
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "ds"), "--skip-registration-check"]) == 0
    assert "would have refused" in capsys.readouterr().err  # said on the console, not only in the manifest
    m = read_manifest(tmp_path / "ds")
    assert m["ingest"]["patch"]["registration_check"] is False
    assert m["registration"]["verdict"] == "skipped by the user (would refuse)"
    assert m["registration"]["best_alternative"] == "mirror_lr"


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.arrow"))}


def test_check_changes_no_row(visium_outs, tmp_path):
    """The check only measures: a correctly registered input gives the same shards with it on or off."""
    a = build_visium_dataset(visium_outs, tmp_path / "a", image="lowres", progress=False, qc=False, patch=LOW)
    off = PatchOptions(max_upsample=100, registration_check=False)
    b = build_visium_dataset(visium_outs, tmp_path / "b", image="lowres", progress=False, qc=False, patch=off)
    assert _digest(a) == _digest(b) and _digest(a)
    ma, mb = read_manifest(a), read_manifest(b)
    assert mb["registration"]["verdict"] == "skipped by the user"
    assert mb["registration"]["auroc"] == ma["registration"]["auroc"]


def test_xenium_pixel_size_doubled_refused(bundle_copy, tmp_path):
    ok = build_xenium_dataset(bundle_copy, tmp_path / "ok", progress=False, qc=False)
    reg = read_manifest(ok)["registration"]
    assert reg["verdict"] == "ok" and reg["auroc"] >= MIN_AUROC  # measured 1.0 on the synthetic bundle
    exp = json.loads((bundle_copy / "experiment.xenium").read_text())
    exp["pixel_size"] *= 2  # cells land at half their distance from the alignment's origin, all still on the image
    (bundle_copy / "experiment.xenium").write_text(json.dumps(exp))
    with pytest.raises(RegistrationError, match=r"AUROC 0\.7\d.*2× their scale.*Xenium pixel_size"):
        build_xenium_dataset(bundle_copy, tmp_path / "ds", progress=False, qc=False)
    assert not (tmp_path / "ds").exists()


def test_image_without_glass_not_checked(synth, tmp_path):
    """The synthetic Space Ranger image is pink tissue everywhere (no glass to tell apart): a note, no refusal."""
    t = synth.write_visium_outs(tmp_path / "outs")
    out = build_visium_dataset(t["outs"], tmp_path / "ds", image=t["image"], progress=False, qc=False)
    reg = read_manifest(out)["registration"]
    assert reg["verdict"] == "not checked" and reg["auroc"] is None
    assert reg["image_tissue_fraction"] > 0.99 and "of the image is stained" in reg["note"]


def test_auroc_se_matches_simulation():
    """Hanley & McNeil's standard error against the spread of AUROCs of 400 simulated binormal samples."""
    rng = np.random.default_rng(1)
    aucs = [auroc(rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 90)) for _ in range(400)]
    assert auroc_se(float(np.mean(aucs)), 60, 90) == pytest.approx(np.std(aucs), rel=0.2)
    assert auroc_se(0.9, 4235, 757) < 0.01 and auroc_se(0.9, 0, 757) == 0.0


def test_pale_scan_passes(visium_outs, tmp_path):
    """A faded / over-exposed scan of a correctly registered section: the fixture's lowres image blended 60 % with
    white (tissue chroma 5-15, under the tissue mask's 15). The positions are the fixture's own, so the
    registration is right; the binary mask scored it 0.776 (< 0.85, refused), the stain score 0.985."""
    outs = _copy(visium_outs, tmp_path)
    _edit_image(outs, lambda a: (0.4 * a[..., :3] + 0.6 * 255).round().astype(np.uint8))
    out = build_visium_dataset(outs, tmp_path / "ds", image="lowres", progress=False, qc=False, patch=LOW)
    reg = read_manifest(out)["registration"]
    assert reg["verdict"] == "ok" and reg["auroc"] > 0.95
    assert reg["on_tissue_fraction"] < 0.3  # the binary mask alone misses most of the faint tissue


def test_few_spots_fatty_tissue_passes(visium_outs):
    """The fixture's 100 matrix spots (of 4,235 in tissue) on its image with 60 white fat holes punched into the
    tissue, the in_tissue = 0 spots unused (an inferred background): correctly registered, yet with 100 spots an
    alternative wins by chance (shift_y+1: +0.056, over the fixed 0.03 margin); the margin now grows with the
    AUROC's standard error (0.08 here). Still refused: the same spots at half the scale."""
    s = read_visium(visium_outs, image="lowres")
    a = s.image.array.copy()
    m = np.asarray(s.um_to_px, float)
    tissue_px = s.tissue_um @ m[:2, :2].T + m[:2, 2]
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    for _ in range(60):
        cx, cy = tissue_px[rng.integers(len(tissue_px))]
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(4, 9) ** 2] = 245
    s.image, s.background_um, s.tissue_um = ArrayImage(a), None, None
    geom = get_geometry("visium")
    rec = check_registration(s, s.xy_um, geom)
    assert rec["verdict"] == "ok" and rec["n_spots"] == 100
    assert rec["thresholds"]["alternative_margin"] > 0.05
    s.um_to_px = np.diag([0.5, 0.5, 1.0]) @ m
    with pytest.raises(RegistrationError, match="2× their scale"):
        check_registration(s, s.xy_um, geom)


def test_tissue_filled_image_with_spots_on_part_passes(visium_outs):
    """The fixture's image cropped to its tissue (74 % of the pixels tissue) with only its 100 matrix spots and an
    inferred background (a HEST-like sample: the capture area inside a larger section): the other tissue counts as
    background, AUROC 0.55 — under the inferred floor, yet 80 % of the spots sit on tissue, so not a
    misregistration. The floor refuses only when the spots are mostly off tissue: the same spots moved off the
    tissue (a shifted alignment) are refused."""
    s = read_visium(visium_outs, image="lowres")
    a = s.image.array
    m = np.asarray(s.um_to_px, float)
    tissue_px = s.tissue_um @ m[:2, :2].T + m[:2, 2]
    x0, y0 = tissue_px.min(0).astype(int) - 5
    x1, y1 = tissue_px.max(0).astype(int) + 5
    crop = m.copy()
    crop[0, 2] -= x0
    crop[1, 2] -= y0
    s.image, s.um_to_px, s.background_um, s.tissue_um = ArrayImage(a[y0:y1, x0:x1].copy()), crop, None, None
    geom = get_geometry("visium")
    rec = check_registration(s, s.xy_um, geom)
    assert rec["verdict"] == "ok" and rec["auroc"] < 0.6 and rec["on_tissue_fraction"] >= 0.7
    # the same spots on glass: the fixture's image pasted into a 3000 px canvas of its own glass colour, the
    # positions moved 1,500 px right and down (a shifted alignment): mostly off tissue, so the floor refuses
    glass = a[5:25, 5:25].reshape(-1, 3).mean(0).astype(np.uint8)
    big = np.empty((3000, 3000, 3), np.uint8)
    big[:] = glass
    big[: a.shape[0], : a.shape[1]] = a
    shifted = m.copy()
    shifted[:2, 2] += 1500
    s.image, s.um_to_px = ArrayImage(big), shifted
    rec = check_registration(s, s.xy_um, geom, enabled=False)
    assert rec["verdict"] == "skipped by the user (would refuse)" and rec["on_tissue_fraction"] < 0.7
    best = rec["alternatives"][rec["best_alternative"]]
    assert rec["auroc"] < 0.6 and best < rec["auroc"] + rec["thresholds"]["alternative_margin"]  # the floor refused


def test_faded_scan_is_still_checked(visium_outs, tmp_path):
    """The fixture's image at a quarter of its contrast (255 - (255 - x) / 4): no pixel passes the tissue mask's
    chroma >= 15, yet the stain is visible (chroma 5-15 vs glass 1-3). The check still decides: the registered scan
    passes, its mirror image is refused (it was "not checked" and built silently)."""
    outs = _copy(visium_outs, tmp_path)
    _edit_image(outs, lambda a: (255 - (255 - a.astype(np.int32)) // 4).astype(np.uint8))
    out = build_visium_dataset(outs, tmp_path / "ok", image="lowres", progress=False, qc=False, patch=LOW)
    reg = read_manifest(out)["registration"]
    assert reg["verdict"] == "ok" and reg["auroc"] > 0.95
    _edit_image(outs, lambda a: a[:, ::-1])
    with pytest.raises(RegistrationError, match="mirrored left-right"):
        build_visium_dataset(outs, tmp_path / "bad", image="lowres", progress=False, qc=False, patch=LOW)


def test_small_faults_named_or_warned(visium_outs, tmp_path):
    """A 2 % scale error is named as a scale error (not as a shift); a shift of about half a spot spacing (50 µm
    along x: its undoing scores 0.013 higher, under the 0.015 margin) builds with a warning that an alternative fits
    slightly better."""
    outs = _copy(visium_outs, tmp_path)
    _scale_lowres(outs, 1.02)
    with pytest.raises(RegistrationError, match=r"0\.98× their scale"):
        build_visium_dataset(outs, tmp_path / "s", image="lowres", progress=False, qc=False, patch=LOW)
    outs2 = Path(shutil.copytree(visium_outs, tmp_path / "outs2"))
    for f in outs2.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    pos = outs2 / "spatial" / "tissue_positions_list.csv"
    rows = [r.split(",") for r in pos.read_text().splitlines()]
    pos.write_text("\n".join(",".join(r[:5] + [str(int(r[5]) + 81)]) for r in rows) + "\n")  # 81 px = 50 µm
    with pytest.warns(UserWarning, match="fits slightly better"):
        out = build_visium_dataset(outs2, tmp_path / "w", image="lowres", progress=False, qc=False, patch=LOW)
    assert read_manifest(out)["registration"]["best_alternative"] == "shift_x-0.5"
