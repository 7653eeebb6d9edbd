"""A fork server for the crash tests (run as a script, not collected by pytest).

It imports the training stack once, then runs each requested ``hescape-train`` command in a forked child, so that
the many short runs a crash test kills cost no import time each. Nothing computes before the fork (the server
only imports), and ``OMP_NUM_THREADS=1`` keeps every child on the same single thread.

Protocol, one JSON object per line: the test writes ``{"argv": [...], "env": {...}, "log": path}``; the server
answers ``{"pid": n}`` when the child starts and ``{"pid": n, "rc": code}`` when it ends (``rc = -9``: SIGKILL).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

torch.set_num_threads(1)

import hescape.train.trainer  # noqa: E402, F401 - the expensive imports, once
from hescape.train.cli import main  # noqa: E402


def _child(cmd: dict) -> int:
    fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(cmd.get("env", {}))
    try:
        return int(main(cmd["argv"]) or 0)
    except SystemExit as e:
        return int(e.code or 0)
    except BaseException:  # noqa: BLE001 - report any crash in the log and as exit code 99
        traceback.print_exc()
        return 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(cmd))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
