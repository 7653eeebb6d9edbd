"""Kill -9 a training run at random steps and inside checkpoint writes, resume it each time, and get exactly the run
that was never interrupted: the same weights bit for bit (best and last checkpoints), the same metrics, steps,
results and test embeddings.

The runs are children of a fork server (``fork_runner.py``) that imported the training stack once; every run,
the uninterrupted reference included, is a fresh fork of the same process on one CPU thread. Faults are injected
with ``HESCAPE_TRAIN_FAULT`` (:mod:`hescape.train.faults`): the process SIGKILLs itself at the named point, or
sleeps there (``HESCAPE_TRAIN_FAULT_MARKER``) until this test kills it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hescape.train.checkpoint import read_checkpoint


class ForkServer:
    def __init__(self, tmp: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("HESCAPE_TRAIN_FAULT", None)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_runner.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.tmp, self.n = tmp, 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (exit {self.proc.poll()})"
        return json.loads(line)

    def start(self, argv: list[str], **env) -> tuple[int, Path]:
        self.n += 1
        log = self.tmp / f"run-{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return self._read()["pid"], log

    def wait(self) -> int:
        return self._read()["rc"]

    def run(self, argv: list[str], **env) -> tuple[int, str]:
        _, log = self.start(argv, **env)
        rc = self.wait()
        return rc, log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("forks"))
    yield s
    s.close()


def _args(dataset, out, name):
    return [f"data.path={dataset}", f"out_dir={out}", f"run_name={name}", "epochs=3", "batch_size=8",
            "checkpoint_every=3", "log_every=1", "recall_ks=1,5", "probe=false", "progress=false"]


def _assert_same_run(a: Path, b: Path) -> None:
    for which in ("best", "last"):
        ca, cb = read_checkpoint(a, which), read_checkpoint(b, which)
        assert ca["dir"].name == cb["dir"].name and ca["step"] == cb["step"]
        assert ca["state_dict"].keys() == cb["state_dict"].keys()
        for k, v in ca["state_dict"].items():  # bit for bit, NaN-safe: compare the bytes
            assert torch.equal(v.view(-1).view(torch.uint8), cb["state_dict"][k].view(-1).view(torch.uint8)), k
        for key in ("epoch", "batch", "best_epoch", "best_score", "best_dir", "metrics_sizes"):
            assert ca[key] == cb[key], key
        assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
        assert torch.equal(ca["rng"]["generators"]["augment"], cb["rng"]["generators"]["augment"])
        sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in sa[i])
    for f in ("steps.jsonl", "steps.csv", "metrics.jsonl", "metrics.csv", "results.json", "results.csv",
              "results.md", "checkpoints/index.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ea, eb = np.load(a / "embeddings" / "test.npz"), np.load(b / "embeddings" / "test.npz")
    assert sorted(ea.files) == sorted(eb.files) and all(np.array_equal(ea[k], eb[k]) for k in ea.files)


def test_kill_and_resume_equals_uninterrupted_run(server, tiny_dataset, tmp_path):
    out = tmp_path / "runs"
    rc, log = server.run(_args(tiny_dataset, out, "ref"))
    assert rc == 0, log
    ref = out / "ref"
    assert json.loads((ref / "checkpoints" / "index.json").read_text())["step"] == 12  # 3 epochs × 4 batches

    run = out / "int"
    rng = random.Random(20261130)  # the kill steps are random, and reproducible
    early, late = rng.randint(1, 5), rng.randint(8, 11)
    kills = [
        ("first run, killed after step", {"HESCAPE_TRAIN_FAULT": f"step:{early}"}),
        ("resumed, killed inside a checkpoint write (weights written, side file not)", "partial"),
        ("resumed, killed with the new checkpoint complete but index.json not yet replaced",
         {"HESCAPE_TRAIN_FAULT": "checkpoint_before_index:1"}),
        ("resumed, killed after index.json, before the old checkpoint is deleted",
         {"HESCAPE_TRAIN_FAULT": "checkpoint_after_index:1"}),
        ("resumed, killed after step", {"HESCAPE_TRAIN_FAULT": f"step:{late}"}),
        ("resumed, killed after the test lines, before the results files", {"HESCAPE_TRAIN_FAULT": "results:1"}),
    ]
    for i, (what, fault) in enumerate(kills):
        argv = _args(tiny_dataset, out, "int") if i == 0 else ["--resume", str(run), "progress=false"]
        if fault == "partial":  # sleep inside the write; this test sends the SIGKILL
            marker = tmp_path / "in-checkpoint"
            pid, log = server.start(argv, HESCAPE_TRAIN_FAULT="checkpoint_partial:1",
                                    HESCAPE_TRAIN_FAULT_MARKER=str(marker))
            deadline = time.time() + 120
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            rc = server.wait()
            assert marker.exists(), f"{what}: the run never reached the checkpoint write\n{log.read_text()}"
            tmp_dirs = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
            assert [sorted(x.name for x in p.iterdir()) for p in tmp_dirs] == [["model.safetensors"]], what
        else:
            rc, text = server.run(argv, **fault)
        assert rc == -signal.SIGKILL, f"{what}: exit {rc}\n{text if fault != 'partial' else log.read_text()}"
        if i == 3:  # a torn last line, as a power cut can leave: the resume cuts it off
            with open(run / "steps.jsonl", "a") as f:
                f.write('{"step": 99, "lo')
    rc, log = server.run(["--resume", str(run), "progress=false"])
    assert rc == 0, log
    assert "| image → gene |" in log
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers removed
    _assert_same_run(ref, run)


def test_resume_refusals(server, tiny_dataset, tmp_path):
    """--resume takes the run's own configuration: options that change the computation are refused, in one line."""
    out = tmp_path / "runs"
    rc, log = server.run(_args(tiny_dataset, out, "r"), HESCAPE_TRAIN_FAULT="step:2")
    assert rc == -signal.SIGKILL, log
    for argv, expected in (
        (["--resume", str(out / "r"), "optim.lr=0.1"], "'optim.lr' cannot change"),
        (["--resume", str(out / "r"), "--config", str(out / "r" / "config.json")], "drop --config"),
        (["--resume", str(tmp_path / "nothing")], "expected a run directory holding config.json"),
    ):
        rc, log = server.run(argv)
        assert rc == 2 and expected in log and log.count("\n") == 1, log
    # a new run into an existing directory is refused, and the directory is left as it was
    before = sorted((p.relative_to(out), p.stat().st_size) for p in (out / "r").rglob("*"))
    rc, log = server.run(_args(tiny_dataset, out, "r"))
    assert rc == 2 and "already exists" in log and f"--resume {out / 'r'}" in log
    assert sorted((p.relative_to(out), p.stat().st_size) for p in (out / "r").rglob("*")) == before
    # a run killed before its first checkpoint resumes from step 0 in the same directory
    rc, log = server.run(_args(tiny_dataset, out, "early"), HESCAPE_TRAIN_FAULT="step:1")
    assert rc == -signal.SIGKILL, log
    assert not (out / "early" / "checkpoints" / "index.json").exists()
    rc, log = server.run(["--resume", str(out / "early"), "progress=false", "data.num_workers=0"])
    assert rc == 0, log
    rc, log = server.run(_args(tiny_dataset, out, "whole"))
    assert rc == 0, log
    _assert_same_run(out / "whole", out / "early")


def test_step_based_run_resumes_exactly_and_a_finished_run_is_left_alone(server, tiny_dataset, tmp_path):
    """max_steps / eval_every runs (evaluation points inside epochs, a last partial epoch) resume exactly too; a
    --resume of a finished run prints its results and changes nothing."""
    out = tmp_path / "runs"
    args = [f"data.path={tiny_dataset}", f"out_dir={out}", "max_steps=10", "eval_every=3", "checkpoint_every=2",
            "batch_size=8", "log_every=1", "recall_ks=1,5", "probe=false", "progress=false"]
    rc, log = server.run([*args, "run_name=ref"])
    assert rc == 0, log
    rng = random.Random(20261129)
    first, second = rng.randint(1, 4), rng.randint(5, 9)
    rc, log = server.run([*args, "run_name=int"], HESCAPE_TRAIN_FAULT=f"step:{first}")
    assert rc == -signal.SIGKILL, log
    rc, log = server.run(["--resume", str(out / "int"), "progress=false"], HESCAPE_TRAIN_FAULT=f"step:{second}")
    assert rc == -signal.SIGKILL, log
    rc, log = server.run(["--resume", str(out / "int"), "progress=false"])
    assert rc == 0, log
    _assert_same_run(out / "ref", out / "int")
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in (out / "int").rglob("*"))
    rc, log = server.run(["--resume", str(out / "int")])
    assert rc == 0 and "| image → gene |" in log and "nothing to resume" in log, log
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in (out / "int").rglob("*")) == before
