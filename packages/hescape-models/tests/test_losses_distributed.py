"""Distributed CLIP/SigLIP (2 gloo CPU ranks) equal the single-process loss on the concatenated batch.

Convention checked (that of open_clip with gather_with_grad=True): every rank's loss is the global loss
(or, with local_loss, the mean over ranks is), and every rank's feature gradient is ``world_size ×`` the
single-process gradient of its slice, so DDP's 1/world_size averaging recovers the exact gradient; the
replicated logit_scale/logit_bias gradients average over ranks to the single-process ones.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def _load(name: str, file: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / file)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


W = _load("_hescape_models_distributed_worker", "distributed_worker.py")
H = _load("_hescape_models_loss_testing", "_loss_testing.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(_HERE / "distributed_worker.py"), str(out)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        msg = f"distributed worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        raise AssertionError(msg)
    return [torch.load(out / f"rank{r}.pt") for r in range(W.WORLD)]


def _single_process(name: str):
    from hescape.models.losses import create_loss

    v, g, s, b = (t.clone().requires_grad_() for t in W.full_batch())
    loss = create_loss(name, impl="openclip")(v, g, s, b)["contrastive_loss"]
    loss.backward()
    return {"loss": loss.detach(), "v": v.grad, "g": g.grad, "s": s.grad, "b": b.grad}


@pytest.mark.parametrize("case", [c for c in W.CASES if c[2]], ids=lambda c: f"{c[0]}-local{c[1]}")
def test_gather_with_grad_matches_single_process(ranks, case):
    name, local_loss, _ = case
    ref = _single_process(name)
    per_rank = [r[case] for r in ranks]
    losses = torch.stack([r["loss"] for r in per_rank])
    if local_loss:
        H.assert_verbose_allclose(losses.mean(), ref["loss"], atol=1e-6, rtol=1e-5, name="mean loss", floor=1.0)
    else:
        for r, loss in enumerate(losses):
            H.assert_verbose_allclose(loss, ref["loss"], atol=1e-6, rtol=1e-5, name=f"loss rank {r}", floor=1.0)
    for key in ("v", "g"):
        got = torch.cat([r[key] for r in per_rank]) / W.WORLD  # what DDP's averaging makes of it
        H.assert_verbose_allclose(got, ref[key], atol=1e-5, rtol=1e-4, name=f"d_{key}")
    for key in ("s", "b") if name == "siglip" else ("s",):
        got = torch.stack([r[key] for r in per_rank]).mean()
        H.assert_verbose_allclose(got, ref[key], atol=1e-5, rtol=1e-4, name=f"d_{key}")


@pytest.mark.parametrize("case", [c for c in W.CASES if not c[2]], ids=lambda c: f"{c[0]}-local{c[1]}")
def test_gather_without_grad_keeps_the_loss_value(ranks, case):
    name, local_loss, _ = case
    ref = _single_process(name)
    losses = torch.stack([r[case]["loss"] for r in ranks])
    got = losses.mean() if local_loss else losses
    H.assert_verbose_allclose(got, ref["loss"].expand_as(got), atol=1e-6, rtol=1e-5, name="loss", floor=1.0)
    for r in ranks:  # only the own slot carries gradient: finite, nonzero
        if not (torch.isfinite(r[case]["v"]).all() and r[case]["v"].abs().sum() > 0):
            msg = "expected a finite, nonzero local image gradient without gather_with_grad"
            raise AssertionError(msg)
