"""Under torchrun a user error is printed in full once, by rank 0; the other ranks exit with the same code 2 and one
short line each (so that an error only one rank met is not lost).

The launches are 2-process gloo runs on the CPU, as in test_ddp_equivalence.py; the expected lines are written here
by hand from the refused option, and torchrun's own failure report is the witness of every rank's exit code.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from hescape.train.cli import main

_PREFIX = "hescape-train: "


def _torchrun(*args, timeout=240):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "--monitor-interval=1", "-m", "hescape.train.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _check_once(proc, message_start: str) -> None:
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith(_PREFIX)]
    full = [line for line in ours if line.startswith(f"{_PREFIX}error: {message_start}")]
    assert len(full) == 1, proc.stderr[-3000:]  # rank 0, in full
    others = [line for line in ours if line not in full]
    assert len(others) == 1 and others[0].startswith(f"{_PREFIX}rank 1: error: {message_start[:40]}"), others
    short = others[0].removeprefix(f"{_PREFIX}rank 1: error: ")
    assert len(short) <= 61 < len(full[0].removeprefix(f"{_PREFIX}error: "))  # the first 60 characters and '…'
    # torchrun's report: both ranks stopped with exit code 2 (not killed, not a traceback)
    codes = re.findall(r"rank\s+: (\d+) \(local_rank[^\n]*\n\s*exitcode\s+: (-?\d+)", proc.stderr)
    assert sorted(codes) == [("0", "2"), ("1", "2")], proc.stderr[-3000:]
    assert not re.search(r'File "[^"]*hescape[/\\]train', proc.stderr)  # torchrun's own traceback only


def test_config_error_is_printed_once_under_torchrun(tmp_path):
    """A refused option (checked before the process group is joined): one full line, from rank 0."""
    missing = tmp_path / "no-such-dataset-folder"
    proc = _torchrun(f"data.path={missing}", f"out_dir={tmp_path}")
    _check_once(proc, f"data.path='{missing}' does not exist")
    assert not any(p.name != "no-such-dataset-folder" for p in tmp_path.iterdir())  # nothing created


@pytest.mark.slow
def test_error_after_joining_the_process_group_is_printed_once(tiny_dataset, tmp_path):
    """A refusal met by both ranks inside the training set-up (after init_process_group): one full line."""
    proc = _torchrun(f"data.path={tiny_dataset}", f"out_dir={tmp_path}", "model.n_genes=7", "progress=false")
    _check_once(proc, "the model expects 7 genes (model.n_genes)")


def test_single_process_prints_the_whole_line(tmp_path, capsys, monkeypatch):
    """Outside a launch (no RANK) and on rank 0 the message is whole; on rank 3 one short line."""
    missing = tmp_path / "no-such-dataset-folder"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert main([f"data.path={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{_PREFIX}error: data.path='{missing}' does not exist") and "\n" not in err
    text = err.removeprefix(f"{_PREFIX}error: ")
    assert len(text) > 60
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun without torchrun
    assert main([f"data.path={missing}"]) == 2
    assert capsys.readouterr().err == f"{_PREFIX}rank 3: error: {text[:60].rstrip()}…\n"
