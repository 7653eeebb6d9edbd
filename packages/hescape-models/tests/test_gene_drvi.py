"""The DRVI gene encoder (drvi-py) and the ``hescape-models`` command.

Truths used: drvi-py's own ``DRVI.load(dir, adata).get_latent_representation()`` (its data loader, its log1p
preprocessing, its inference path) for the trunk's output; the encoder's parameter count computed by hand from
the architecture in drvi-py 0.2.8 (``Encoder``: two hidden Linear layers with LayerNorm without affine
parameters, then Linear mean and variance heads); the registry's own lists for ``hescape-models list``.

The tests that train need drvi-py (``pip install 'hescape-models[drvi]'``) and hescape-data; they are skipped,
saying so, where either is missing. Training is tiny: 300 spots × 30 genes, 2 samples, 3 epochs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hescape.models import HescapeModelError, WeightsError, create_gene_encoder, describe_encoders
from hescape.models.cli import main
from hescape.models.gene.drvi import CONFIG_FILE, ENCODER_FILE, INSTALL_HINT

HAS_DRVI = importlib.util.find_spec("drvi") is not None
HAS_DATA = importlib.util.find_spec("hescape.data") is not None
needs_drvi = pytest.mark.skipif(not (HAS_DRVI and HAS_DATA),
                                reason=f"needs drvi-py ({INSTALL_HINT}) and hescape-data to train a DRVI")

N_GENES, N_SPOTS = 30, 150
GENES = [f"GENE{i:02d}" for i in range(N_GENES)]
GENE_IDS = [f"ENSG{i:011d}" for i in range(N_GENES)]
TINY = {"n_latent": 8, "layers": (16, 16), "max_epochs": 3, "progress": False}
SAMPLES = (("s1", "d1", "train"), ("s2", "d2", "train"), ("s3", "d3", "val"))


def _counts(rng: np.random.Generator, k: int) -> np.ndarray:
    """Negative-binomial-like counts with a per-sample depth and per-gene means (integers, as float32)."""
    mean = np.exp(rng.normal(0.3, 1.0, N_GENES))[None] * (1.0 + 0.5 * k)
    depth = rng.gamma(2.0, 0.5, (N_SPOTS, 1))
    return rng.poisson(mean * depth).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny HESCAPE dataset: samples s1 and s2 (train) and s3 (val); returns (dir, {sample: counts})."""
    if not HAS_DATA:
        pytest.skip("needs hescape-data")
    from hescape.data import DatasetWriter, SpotRecords, encode_png

    root = tmp_path_factory.mktemp("drvi")
    rng = np.random.default_rng(0)
    image = encode_png(np.zeros((4, 4, 3), np.uint8))
    counts = {}
    with DatasetWriter(root / "ds", genes=GENES, gene_ids=GENE_IDS) as w:
        for k, (name, donor, split) in enumerate(SAMPLES):
            counts[name] = _counts(rng, k)
            w.add(SpotRecords(name=name, donor=donor, tissue="t", source="test", images=[image] * N_SPOTS,
                              gexp=counts[name], coords_um=np.zeros((N_SPOTS, 2)), n_cells=np.ones(N_SPOTS, int)),
                  split=split)
    return root / "ds", counts


@pytest.fixture(scope="module")
def pretrained(dataset):
    if not HAS_DRVI:
        pytest.skip(f"needs drvi-py ({INSTALL_HINT})")
    from hescape.models.gene.drvi import pretrain_drvi

    ds, _ = dataset
    return pretrain_drvi(ds, ds.parent / "drvi_model", seed=0, **TINY)


def _adata(counts: np.ndarray, samples: list[str]):
    """An AnnData for drvi-py built here from the raw counts (not by the code under test)."""
    import anndata
    import pandas as pd

    obs = pd.DataFrame({"sample": pd.Categorical(samples)}, index=[f"c{i}" for i in range(len(samples))])
    adata = anndata.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=GENES))
    adata.layers["counts"] = adata.X.copy()  # the layer the DRVI was set up with
    return adata


# ------------------------------------------------------------------------------------------- pretraining

@needs_drvi
def test_pretrain_writes_the_directory_atomically(dataset, pretrained):
    ds, _ = dataset
    assert sorted(p.name for p in pretrained.iterdir()) == sorted(
        ["drvi", CONFIG_FILE, ENCODER_FILE, "drvi_reference.h5ad"])
    assert (pretrained / "drvi" / "model.pt").is_file()
    assert sorted(os.listdir(pretrained.parent)) == ["drvi_model", "ds"]  # no temporary sibling left behind
    mask = os.umask(0)
    os.umask(mask)
    assert [oct(p.stat().st_mode & 0o777) for p in (pretrained, pretrained / ENCODER_FILE)] == [
        oct(0o777 & ~mask), oct(0o666 & ~mask)]  # the modes the umask gives, not mkdtemp's 0700
    import drvi

    cfg = json.loads((pretrained / CONFIG_FILE).read_text())
    assert cfg["genes"] == GENES and cfg["gene_ids"] == GENE_IDS
    assert cfg["n_latent"] == 8 and cfg["module_kwargs"]["encoder_dims"] == [16, 16]
    assert cfg["covariate"] == "sample" and cfg["covariate_categories"] == ["s1", "s2"]  # the val sample is not seen
    assert cfg["dataset"]["n_spots"] == 2 * N_SPOTS and cfg["dataset"]["samples"] == ["s1", "s2"]
    assert len(cfg["dataset"]["fingerprint"]) == 64 and cfg["versions"]["drvi-py"] == drvi.__version__
    assert cfg["training"]["max_epochs"] == 3 and cfg["training"]["seed"] == 0


@needs_drvi
def test_trunk_equals_drvi_latent_representation(dataset, pretrained):
    """q_m of the frozen trunk on raw counts = drvi-py's get_latent_representation(), on training and held-out
    counts (the encoder ignores the covariate, so the held-out rows borrow a training sample's label)."""
    from drvi.model import DRVI

    _, counts = dataset
    x = np.concatenate([counts["s1"], counts["s2"], counts["s3"]])
    labels = ["s1"] * N_SPOTS + ["s2"] * N_SPOTS + ["s1"] * N_SPOTS
    truth = DRVI.load(str(pretrained / "drvi"), adata=_adata(x, labels)).get_latent_representation()

    enc = create_gene_encoder("drvi", panel=GENES, gene_ids=GENE_IDS, model_dir=pretrained)
    enc.eval()
    assert enc.out_dim == 8 and enc.contract.preprocessing == "log1p" and enc.contract.vocabulary == "panel"
    digest = json.loads((pretrained / CONFIG_FILE).read_text())["files"]["encoder"]["sha256"]
    assert enc.weights_tag == f"drvi_model/{ENCODER_FILE} sha256:{digest[:16]}"  # what checkpoints record
    with torch.no_grad():
        ours = enc(torch.from_numpy(x)).numpy()
    assert ours.shape == (3 * N_SPOTS, 8)
    np.testing.assert_allclose(ours, truth, rtol=0, atol=1e-5)
    assert np.abs(truth).max() > 1e-3  # a real latent, not zeros


@needs_drvi
def test_forward_backward(pretrained):
    enc = create_gene_encoder("drvi", panel=GENES, model_dir=pretrained)
    enc.train()
    y = enc(torch.poisson(torch.full((4, N_GENES), 2.0)))
    assert y.shape == (4, 8) and torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in enc.named_parameters():
        if ".var_encoder." in name:  # the variance head does not shape q_m: frozen, no gradient
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@needs_drvi
def test_same_seed_same_weights_through_the_cli(dataset, pretrained, tmp_path, capsys):
    from hescape.models.gene.drvi import pretrain_drvi

    ds, _ = dataset
    rc = main(["pretrain-drvi", str(ds), "--out", str(tmp_path / "cli"), "--n-latent", "8", "--layers", "16", "16",
               "--max-epochs", "3", "--no-progress"])
    assert rc == 0 and "DRVI model directory:" in capsys.readouterr().out
    assert (tmp_path / "cli" / ENCODER_FILE).read_bytes() == (pretrained / ENCODER_FILE).read_bytes()
    other = pretrain_drvi(ds, tmp_path / "cli", seed=1, overwrite=True, **TINY)  # replaces a DRVI directory
    assert (other / ENCODER_FILE).read_bytes() != (pretrained / ENCODER_FILE).read_bytes()
    assert json.loads((other / CONFIG_FILE).read_text())["training"]["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["cli"]


@needs_drvi
def test_out_locations_refused(dataset, tmp_path, capsys):
    from hescape.models.gene.drvi import pretrain_drvi

    ds, _ = dataset
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(HescapeModelError, match="exists; pass overwrite=True"):
        pretrain_drvi(ds, tmp_path / "notes", **TINY)
    with pytest.raises(HescapeModelError, match="not a DRVI directory"):
        pretrain_drvi(ds, tmp_path / "notes", overwrite=True, **TINY)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert main(["pretrain-drvi", str(ds), "--out", str(ds / "inside")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hescape-models: error:") and "inside the dataset" in err and "\n" not in err
    assert main(["pretrain-drvi", str(ds), "--out", str(tmp_path / "x"), "--layers", "0"]) == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- loading refusals

@needs_drvi
@pytest.mark.parametrize(("change", "words"), [
    (lambda g: g[:5] + ["KRT8"] + g[6:], ["column 5", "'GENE05'", "'KRT8'"]),
    (lambda g: g[::-1], ["column 0", "'GENE00'", "'GENE29'"]),
    (lambda g: g[:-1], ["this one has 29", "column 29", "'GENE29'", "it ends there"]),
])
def test_another_panel_is_refused(pretrained, change, words):
    with pytest.raises(HescapeModelError) as e:
        create_gene_encoder("drvi", panel=change(list(GENES)), model_dir=pretrained)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "pretrain-drvi" in str(e.value)


@needs_drvi
def test_other_refusals(pretrained, tmp_path):
    ids = list(GENE_IDS)
    ids[3] = "ENSG99999999999"
    with pytest.raises(HescapeModelError, match="'GENE03' .column 3. has Ensembl id 'ENSG99999999999'"):
        create_gene_encoder("drvi", panel=GENES, gene_ids=ids, model_dir=pretrained)
    with pytest.raises(HescapeModelError, match="n_latent=16 conflicts"):
        create_gene_encoder("drvi", panel=GENES, model_dir=pretrained, n_latent=16)
    with pytest.raises(HescapeModelError, match=f"has no {CONFIG_FILE}"):
        create_gene_encoder("drvi", panel=GENES, model_dir=tmp_path)

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(pretrained, bad)
    sd = load_file(str(pretrained / ENCODER_FILE))
    key = "z_encoder.mean_encoder.fc_layers.Layer 0.0.bias"
    save_file({k: v for k, v in sd.items() if k != key}, str(bad / ENCODER_FILE))
    with pytest.raises(WeightsError, match="missing 1 key.*mean_encoder"):
        create_gene_encoder("drvi", panel=GENES, model_dir=bad)
    save_file({k: v + 1 if k == key else v for k, v in sd.items()}, str(bad / ENCODER_FILE))
    with pytest.raises(HescapeModelError, match="does not match the SHA-256"):
        create_gene_encoder("drvi", panel=GENES, model_dir=bad)


@needs_drvi
def test_parameter_count_on_meta():
    """Full size (a 5,000-gene panel, n_latent 128, layers 128-128): G·128+128 + 128·128+128 + 2·(128·128+128)."""
    panel = [f"G{i}" for i in range(5000)]
    with torch.device("meta"):
        enc = create_gene_encoder("drvi", panel=panel, random_init=True)
    assert enc.out_dim == 128 and enc.weights_tag == "random-init"
    assert sum(p.numel() for p in enc.parameters()) == 5000 * 128 + 128 + 128 * 128 + 128 + 2 * (128 * 128 + 128)


def test_needs_a_model_dir():
    with pytest.raises(HescapeModelError, match="model_dir=DIR.*pretrain-drvi"):
        create_gene_encoder("drvi", panel=GENES)


def test_missing_drvi_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "drvi", None)  # `import drvi` now raises ImportError
    with pytest.raises(HescapeModelError, match=r"pip install 'hescape-models\[drvi\]'"):
        create_gene_encoder("drvi", panel=GENES, random_init=True)
    from hescape.models.gene.drvi import pretrain_drvi

    with pytest.raises(HescapeModelError, match=r"pip install 'hescape-models\[drvi\]'"):
        pretrain_drvi(tmp_path / "ds", tmp_path / "out")


def test_module_level_imports_need_no_optional_package():
    """drvi-py, scvi-tools, anndata and hescape-data are imported inside functions only, so hescape.models imports
    without them (CI proves it too: .ci/install_alone.sh runs this file with hescape-models alone)."""
    import ast

    import hescape.models.cli as cli
    import hescape.models.gene.drvi as mod

    optional = {"drvi", "scvi", "anndata", "pandas", "safetensors", "hescape.data"}
    for m in (mod, cli):
        for node in ast.parse(Path(m.__file__).read_text()).body:  # top-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            hit = [n for n in names if any(n == o or n.startswith(o + ".") for o in optional)]
            assert not hit, f"{m.__name__} imports {hit} at module level"


# ------------------------------------------------------------------------------------------ the command

def _rows(text: str) -> dict[str, list[str]]:
    lines = text.strip().splitlines()
    assert lines[0].split()[:4] == ["modality", "name", "out_dim", "params"]
    return {line.split()[1]: line.split() for line in lines[1:]}


def test_cli_list_prints_every_encoder(capsys):
    from hescape.models import list_gene_encoders, list_image_encoders

    assert main(["list"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == set(list_image_encoders()) | set(list_gene_encoders())
    assert all(rows[n][0] == "image" for n in list_image_encoders())
    assert all(rows[n][0] == "gene" for n in list_gene_encoders())
    assert rows["drvi"][2] == "128" and "log1p," in rows["drvi"] and "panel" in rows["drvi"]

    assert main(["list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries == json.loads(json.dumps(describe_encoders()))
    drvi = next(e for e in entries if e["name"] == "drvi")
    assert drvi["contract"]["preprocessing"] == "log1p" and drvi["contract"]["vocabulary"] == "panel"

    assert main(["list", "--modality", "gene"]) == 0
    assert set(_rows(capsys.readouterr().out)) == set(list_gene_encoders())
    assert main(["lst"]) == 2
    assert capsys.readouterr().err.startswith("hescape-models: error: argument cmd")


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (ep,) = entry_points(group="console_scripts", name="hescape-models")
    assert ep.value == "hescape.models.cli:main"
    assert Path(__file__).parents[1].joinpath("pyproject.toml").read_text().count('hescape-models = "hescape.models.cli:main"') == 1
