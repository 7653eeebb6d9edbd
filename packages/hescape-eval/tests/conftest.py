"""Shared test helpers for hescape-eval, exposed as fixtures (the tests run under ``--import-mode=importlib``, so a
test file cannot import another one or this conftest).

- ``cli``: run ``hescape-eval`` in-process and capture its exit code, stdout and stderr.
- ``one_line_error``: the CLI's refusal contract (exit 2, stderr exactly one ``hescape-eval: error:`` line).
- ``refuses``: the library's refusal contract (a ``HescapeEvalError`` saying expected / found / fix).
- ``train_run``: a finished hescape-train run directory (config.json + results.json) for the report readers.
- ``mil_bags`` / ``torch_one_thread``: planted multiple-instance bags and a one-thread torch for the MIL tests.

Only hescape-eval's own dependencies (numpy, torch) are used here, and torch only inside its fixture: the tests
must still collect when hescape-eval is installed alone, with the optional packages absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hescape.eval import HescapeEvalError
from hescape.eval.cli import main

ERROR_PREFIX = "hescape-eval: error: "


def run_cli(capsys, *argv) -> tuple[int | str | None, str, str]:
    """``main(argv)`` with every argument passed through ``str`` (paths may be given as ``Path``); argparse's
    ``SystemExit`` (usage errors, ``--help``) becomes its exit code. Returns ``(code, stdout, stderr)``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err: str, *words: str, logged: bool = False) -> str:
    """Assert the CLI refused cleanly: exit code 2 and stderr is exactly one ``hescape-eval: error:`` line that
    contains every one of ``words``, with no traceback and no ``np.str_(...)`` repr leaking into the message.
    Returns that line.

    ``logged=True`` is for a refusal that comes after the command has started and logged to stderr (``mutation``
    prints its plan and a random-init warning before it tiles the slides): lines before the error are then allowed,
    but the error must still be the only error line and the last line."""
    assert code == 2, err
    lines = err.strip().splitlines()
    if logged:
        assert sum(ln.startswith(ERROR_PREFIX) for ln in lines) == 1, err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    assert "np.str_" not in lines[0] and "Traceback" not in err
    return lines[0]


def assert_raises_eval_error(fn: Callable[[], object], *words: str) -> str:
    """Assert ``fn()`` raises ``HescapeEvalError`` whose message says expected / found / fix and every one of
    ``words``. Returns the message."""
    with pytest.raises(HescapeEvalError) as info:
        fn()
    msg = str(info.value)
    for word in ("expected", "found", "fix", *words):
        assert word in msg, f"{word!r} missing from: {msg}"
    return msg


def write_train_run(run: Path, cfg: dict, *, i2g: float, g2i: float, pool: int = 100, k: int = 5) -> Path:
    """Create the run folder ``run`` (it must not exist yet) as hescape-train leaves it: ``config.json`` holding
    ``cfg`` and ``results.json`` holding, per direction, Recall@k, its chance level ``k / pool``, the protocol
    ("full") and the pool size."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg))
    res = {}
    for d, v in (("i2g", i2g), ("g2i", g2i)):
        res.update({f"{d}_R@{k}": v, f"{d}_R@{k}_chance": k / pool, f"{d}_protocol": "full", f"{d}_pool": pool})
    (run / "results.json").write_text(json.dumps(res))
    return run


def planted_bags(seed=0, n=40, tiles=20, d=32, k=4, amp=5.0):
    """``n`` bags of ``tiles`` × ``d`` float32 Gaussian tiles, labels alternating 0, 1; each positive bag has ``k``
    tiles shifted by ``amp`` along one random unit direction. Returns ``(bags, labels, sites)`` with 10 sites,
    ``n // 10`` consecutive bags each."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    y = np.tile([0, 1], n // 2)
    bags = []
    for i in range(n):
        b = rng.normal(size=(tiles, d)).astype(np.float32)
        if y[i]:
            b[rng.choice(tiles, k, replace=False)] += amp * u
        bags.append(b)
    return bags, y, np.repeat(np.arange(10), n // 10)


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (code, stdout, stderr)``: :func:`run_cli` bound to this test's ``capsys``."""

    def _cli(*argv):
        return run_cli(capsys, *argv)

    return _cli


@pytest.fixture(scope="session")
def one_line_error():
    """:func:`assert_one_line_error`."""
    return assert_one_line_error


@pytest.fixture(scope="session")
def refuses():
    """:func:`assert_raises_eval_error`."""
    return assert_raises_eval_error


@pytest.fixture(scope="session")
def train_run():
    """:func:`write_train_run`."""
    return write_train_run


@pytest.fixture(scope="session")
def mil_bags():
    """:func:`planted_bags`."""
    return planted_bags


@pytest.fixture
def torch_one_thread():
    """Run the test with one torch thread (results independent of the machine's core count), then restore."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
