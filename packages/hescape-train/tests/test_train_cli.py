"""hescape-train end to end on a tiny dataset, and its error messages."""

from __future__ import annotations

import json

import pytest
import torch
from hescape.train import load_config, main
from hescape.train.checkpoint import read_checkpoint
from hescape.train.config import describe_options
from hescape.train.errors import HescapeConfigError


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _tiny_args(tiny_dataset, tmp_path, *extra):
    return (f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "run_name=r", "epochs=2", "batch_size=16",
            "progress=false", "recall_ks=1,5", *extra)


def test_train_end_to_end(tiny_dataset, tmp_path, capsys):
    code, out, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path))
    assert code == 0, err
    run = tmp_path / "r"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "metrics.csv", "steps.jsonl",
                                               "steps.csv", "checkpoints", "results.md", "results.json",
                                               "results.csv", "embeddings"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("epoch") for x in lines[:2]] == [1, 2] and lines[-1]["split"] == "test"
    assert [x.get("checkpoint") for x in lines[-2:]] == ["last", "best"]
    res = json.loads((run / "results.json").read_text())
    n = res["i2g_n"]
    assert res["i2g_R@5_chance"] == pytest.approx(5 / n) and 0 <= res["g2i_R@1"] <= 1
    assert "image → gene" in out and "(chance)" in out and f"{n} spots" in out
    # the colour-statistics probe on the same split, beside the model
    assert 0 <= res["i2g_R@5_probe"] <= 1 and 0 <= res["g2i_R@5_probe"] <= 1
    assert "image → gene: colour probe" in out and "× the colour probe" in out
    ckpt = read_checkpoint(run)  # the best: model.safetensors + state.pt (loaded with weights_only=True)
    assert len(ckpt["genes"]) == 280 and ckpt["model_cfg"]["panel"] == ckpt["genes"]
    # every encoder's name, weights tag and contract are recorded, so a reload restores the preprocessing
    towers = ckpt["encoders"]["towers"]
    assert towers["image"]["encoder"] == "vit_nano" and towers["image"]["weights"] == "random-init"
    assert towers["gene"]["contract"]["preprocessing"] == "log1p"
    assert ckpt["model_cfg"]["image"]["contract"]["input_size"] == 64


def test_same_seed_same_result(tiny_dataset, tmp_path, capsys):
    a = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "a"))
    b = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "b"))
    assert a[0] == b[0] == 0
    ra = json.loads((tmp_path / "a" / "r" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "r" / "results.json").read_text())
    assert ra == rb


def test_siglip_and_init_checkpoint(tiny_dataset, tmp_path, capsys):
    code, _, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "s", "model.loss=siglip"))
    assert code == 0, err
    run = tmp_path / "s" / "r"
    best = read_checkpoint(run)["dir"]
    # a run directory, a checkpoint directory, or its model.safetensors
    for i, ckpt in enumerate((run, best, best / "model.safetensors")):
        code, _, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / f"c{i}", f"model.init_checkpoint={ckpt}",
                                                "epochs=1"))
        assert code == 0, err
    # options the checkpoint fixes may repeat its values, never contradict them (they would be silently dropped)
    code, _, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "same", f"model.init_checkpoint={run}",
                                            "model.loss=siglip", "model.embed_dim=128", "epochs=1"))
    assert code == 0, err
    for bad, named in (("model.embed_dim=64", "fixes embed_dim=128"), ("model.image=cnn_tiny", "fixes image='vit_nano'"),
                       ("model.gene_finetune=frozen", "fixes gene_finetune='full'"),
                       ("model.image_weights=/tmp", "holds every weight")):
        code, _, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "bad", f"model.init_checkpoint={run}", bad))
        assert code == 2 and named in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad" / "r").exists()


def test_any_registered_towers_with_lora_and_frozen(tiny_dataset, tmp_path, capsys):
    """Encoders are named in the config; LoRA/frozen towers train, the checkpoint restores them exactly."""
    args = ("model.image=vit_nano", "model.image_finetune=lora", "model.gene=mlp_small", "model.gene_finetune=frozen",
            "model.projection=linear", "model.image_projection=transformer", 'model.image_options={"depth": 2}',
            "model.image_lora_targets=attn.qkv")
    code, _, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "a", *args, "epochs=1"))
    assert code == 0, err
    ckpt = read_checkpoint(tmp_path / "a" / "r")
    lora = {k.split(".lora_")[0] for k in ckpt["state_dict"] if ".lora_" in k}
    assert lora == {f"image_encoder.backbone.blocks.{i}.attn.qkv" for i in range(2)}  # the CLI's targets, no proj
    towers = ckpt["encoders"]["towers"]
    assert towers["image"]["finetune"] == "lora" and towers["gene"]["finetune"] == "frozen"
    assert towers["gene"]["params"]["trainable"] == 0 < towers["image"]["params"]["trainable"]
    assert towers["image"]["projection"] == "transformer" and towers["gene"]["projection"] == "linear"
    assert sum(k.startswith("image_encoder.backbone.blocks.") and k.endswith(".norm1.weight")
               for k in ckpt["state_dict"]) == 2  # the image_options reached the builder
    from hescape.models import HescapeCLIP, cfg_from_dict

    again = HescapeCLIP(cfg_from_dict(ckpt["model_cfg"]), load_weights=False)
    again.load_state_dict(ckpt["state_dict"])  # strict: same LoRA layout, heads and towers
    code, _, err = _run(capsys, *_tiny_args(tiny_dataset, tmp_path / "b", f"model.init_checkpoint={tmp_path}/a/r",
                                            "epochs=1"))
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["epoch=3"], "unknown config key 'epoch'. Did you mean 'epochs'?"),
        (["optim.lr=fast"], "expected a value of type float"),
        (["data.path=/nonexistent/dataset"], "does not exist"),
        (["model.n_genes=300"], "expects 300 genes"),
        (["model.name=vit_mlp_nan"], "Did you mean 'vit_mlp_nano'?"),
        (["model.image=unii"], "unknown image encoder 'unii'"),
        (["model.image_finetune=half"], "unknown finetune mode 'half'"),
        (["model.image_options=depth:2"], "expected a value of type dict"),
        (["data.gene_transform=log1p"], "unknown config key 'data.gene_transform'"),
        (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
        (["novalue"], "expected key=value"),
        (["recall_ks=1,5,100000"], "asks for Recall@100000 but the test split has"),
        (["recall_ks=0,5"], "recall_ks must list positive k values"),
    ],
)
def test_bad_input_is_one_clear_line(args, expected, tiny_dataset, tmp_path, capsys):
    base = [] if args[0].startswith(("data.path", "--config", "novalue")) else [f"data.path={tiny_dataset}"]
    code, out, err = _run(capsys, *base, f"out_dir={tmp_path}", "progress=false", *args)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert err.startswith("hescape-train: error:") and err.count("\n") == 1


def test_checkpoint_with_other_panel_is_refused(tiny_dataset, tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"genes": ["A", "B"], "state_dict": {}, "model_cfg": {}}, ckpt)
    code, _, err = _run(capsys, f"data.path={tiny_dataset}", f"out_dir={tmp_path}", f"model.init_checkpoint={ckpt}")
    assert code == 2 and "2-gene panel but the dataset has 280 genes" in err


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\noptim:\n  lr: 0.01\nmodel.loss: siglip\n")
    cfg = load_config(str(f), ["optim.lr=0.02"])
    assert cfg.epochs == 3 and cfg.optim.lr == 0.02 and cfg.model.loss == "siglip"
    f.write_text("[1, 2]\n")
    with pytest.raises(HescapeConfigError, match="mapping"):
        load_config(str(f))


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ("epochs", "optim.lr", "data.path", "model.loss", "data.stain_jitter"):
        assert key in text
    assert "synthetic" in describe_options()


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_dataset, tmp_path):
    """torchrun with 2 gloo processes trains, and rank 0 alone writes the run directory."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "hescape.train.cli", *_tiny_args(tiny_dataset, tmp_path, "epochs=1")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| image → gene |") == 1  # only rank 0 prints the table
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["world_size"] == 2
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["split"] == "test"
