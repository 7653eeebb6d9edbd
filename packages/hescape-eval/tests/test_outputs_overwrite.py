"""Output files of the commands: ``embed --out`` refuses an existing file unless ``--overwrite``; writes are atomic.

Truth: the bytes of the files on disk before and after (an existing file is untouched by a refused command; a
replaced file holds the new embeddings, equal to the model applied by hand; no temporary file is left).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hescape.eval import HescapeEvalError
from hescape.eval._write import atomic_write_text, publish, refuse_existing


def test_embed_refuses_an_existing_out_before_loading_anything(tmp_path, cli):
    out = tmp_path / "e.npz"
    out.write_bytes(b"precious")
    # the model path does not exist: the refusal must come first, so nothing is loaded or computed
    code, stdout, err = cli("embed", str(tmp_path / "no-model"), str(tmp_path / "no-data"), "--out", str(out))
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith(f"hescape-eval: error: --out {out}: expected a path where no output exists yet")
    assert "--overwrite" in err and out.read_bytes() == b"precious"
    (tmp_path / "d.npz").mkdir()
    code, _, err = cli("embed", "m", "d", "--out", str(tmp_path / "d.npz"), "--overwrite")
    assert code == 2 and "a directory" in err


def test_publish_never_replaces_a_file_that_appeared(tmp_path):
    tmp, target = tmp_path / ".t.partial", tmp_path / "t.npz"
    tmp.write_bytes(b"new")
    target.write_bytes(b"old")  # appeared after the up-front check
    with pytest.raises(HescapeEvalError, match="--overwrite"):
        publish(tmp, target, overwrite=False)
    assert target.read_bytes() == b"old" and not tmp.exists()
    tmp.write_bytes(b"new")
    publish(tmp, target, overwrite=True)
    assert target.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"newer")
    publish(tmp, tmp_path / "fresh.npz", overwrite=False)
    assert (tmp_path / "fresh.npz").read_bytes() == b"newer" and not tmp.exists()
    with pytest.raises(HescapeEvalError, match="existing file"):
        refuse_existing([target])
    refuse_existing([tmp_path / "absent"])


def test_atomic_write_text_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    p = atomic_write_text(tmp_path / "sub" / "r.md", "first\n")
    assert p.read_text() == "first\n"
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(p, "second\n")
    assert p.read_text() == "first\n" and [q.name for q in p.parent.iterdir()] == ["r.md"]


def test_embed_overwrite_replaces_atomically(tmp_path, cli):
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("hescape.models", reason="hescape-eval embed needs hescape-models")
    data = pytest.importorskip("hescape.data", reason="hescape-eval embed needs hescape-data")
    from hescape.data.geometry import get_geometry
    from hescape.eval.io import load_embeddings
    from safetensors.torch import save_file

    cfg = data.SyntheticConfig(sample_size_um=300.0, n_donors=3, pixel_size_um=2.0,
                               geometry=get_geometry("hescape").with_(um_per_px=2.0))
    ds = data.build_synthetic_dataset(tmp_path / "ds", cfg, progress=False)
    genes = data.read_manifest(ds)["genes"]
    torch.manual_seed(0)
    model = models.create_model("vit_mlp_nano", panel=genes).eval()
    ck = tmp_path / "run" / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"),
              metadata={"model_cfg": json.dumps(models.cfg_to_dict(model.recorded_cfg())),
                        "genes": json.dumps(list(genes))})
    (ck.parent / "index.json").write_text(json.dumps({"best": ck.name, "last": ck.name}))
    out = tmp_path / "emb" / "test.npz"
    out.parent.mkdir()
    out.write_bytes(b"stale")
    code, _, err = cli("embed", str(tmp_path / "run"), str(ds), "--out", str(out))
    assert code == 2 and out.read_bytes() == b"stale", err
    code, stdout, err = cli("embed", str(tmp_path / "run"), str(ds), "--out", str(out), "--overwrite")
    assert code == 0, err
    emb = load_embeddings(out)
    pds = data.PairedSpotDataset(ds, "test")
    with torch.no_grad():
        img = model.encode_image(torch.stack([pds[i]["image"] for i in range(len(pds))])).numpy()
    np.testing.assert_allclose(emb.image, img, atol=1e-5)
    assert [p.name for p in out.parent.iterdir()] == ["test.npz"]  # no temporary file left
    # a new path needs no --overwrite
    code, _, err = cli("embed", str(tmp_path / "run"), str(ds), "--out", str(tmp_path / "emb" / "b.npz"))
    assert code == 0 and load_embeddings(tmp_path / "emb" / "b.npz").image.shape == emb.image.shape, err
