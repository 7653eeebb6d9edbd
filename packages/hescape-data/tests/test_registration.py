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
from hescape.data.ingest import PatchOptions, build_visium_dataset, build_xenium_dataset
from hescape.data.registration import MIN_AUROC, auroc, tissue_mask
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
    ("scalef_1.1", RegistrationError, r"AUROC 0\.80.*0\.9× their scale \(the µm→pixel scale should be 0\.9× what it is.*\(AUROC 0\.90"),  # a 10 % scale error
    ("transposed_image", RegistrationError, r"x and y swapped .*AUROC 0\.98"),
    ("mirrored_image", RegistrationError, r"AUROC 0\.91.*mirrored left-right \(AUROC 0\.98"),
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
    assert reg["image_tissue_fraction"] > 0.99 and "stained tissue" in reg["note"]
