"""Triton CLIP/SigLIP kernels: under the CPU interpreter (subprocess, small sizes) and on CUDA (``gpu`` marker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_WORKER = Path(__file__).with_name("triton_interpret_worker.py")
_TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}  # max error as a fraction of max|reference|


def _cases() -> list[dict]:
    cases = []
    for kind in ("clip", "siglip"):
        for m, d in ((1, 7), (3, 7), (33, 32), (64, 20)):
            for dtype in ("float32", "bfloat16", "float16"):
                scale, bias = (100.0, -3.0) if m % 2 else (14.3, -10.0)
                cases.append({"kind": kind, "m": m, "n": m, "d": d, "offset": 0, "dtype": dtype, "scale": scale,
                              "bias": bias, "grad_output": 0.37})
        for m, n, offset in ((5, 20, 15), (17, 34, 17)):  # local-loss terms: rectangular, shifted positives
            cases.append({"kind": kind, "m": m, "n": n, "d": 16, "offset": offset, "dtype": "float32",
                          "scale": 30.0, "bias": -5.0, "grad_output": -1.5})
    for c in cases:
        c["id"] = f"{c['kind']}-{c['m']}x{c['n']}+{c['offset']}-d{c['d']}-{c['dtype']}"
    return cases


_CASES = _cases()


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(_WORKER)], input=json.dumps(_CASES), capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    if proc.returncode != 0:
        msg = f"interpreter worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        raise AssertionError(msg)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", _CASES, ids=[c["id"] for c in _CASES])
def test_interpreted_kernels_match_reference(interpreted, case):
    res = interpreted[case["id"]]
    ours, ref = res["loss"]
    if abs(ours - ref) > 2e-6 * max(1.0, abs(ref)):
        msg = f"loss: expected {ref}, found {ours}"
        raise AssertionError(msg)
    if res["grad_dtypes"] != [f"torch.{case['dtype']}"] * 2:
        msg = f"expected feature gradients in torch.{case['dtype']}, found {res['grad_dtypes']}"
        raise AssertionError(msg)
    names = ("d_img", "d_gex", "d_scale") + (("d_bias",) if case["kind"] == "siglip" else ())
    for name in names:
        tol = _TOL[case["dtype"]] if name in ("d_img", "d_gex") else 2e-5
        err, mag = res[name]["max_err"], res[name]["ref_max"]
        if err > tol * max(mag, 1e-30):
            msg = f"{name}: max error {err:.3g} exceeds {tol}·max|ref| = {tol * mag:.3g}"
            raise AssertionError(msg)


# ---------------------------------------------------------------------------------------------- CUDA (gpu marker)

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_GPU_SHAPES = [(1, 7), (3, 128), (257, 7), (1000, 128), (4097, 256), (8192, 128)]


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("b", "d"), _GPU_SHAPES)
def test_cuda_kernels_match_open_clip(kind, dtype, b, d):
    from hescape.models.losses import clip_loss, siglip_loss
    from open_clip.loss import ClipLoss as OCClip
    from open_clip.loss import SigLipLoss as OCSigLip

    gen = torch.Generator().manual_seed(b + d)
    dt = getattr(torch, dtype)
    v = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1).cuda().to(dt).requires_grad_()
    g = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1).cuda().to(dt).requires_grad_()
    s = torch.tensor(100.0 if b % 2 else 14.3, device="cuda", requires_grad=True)
    bb = torch.tensor(-5.0, device="cuda", requires_grad=True)
    inputs = [v, g, s] + ([bb] if kind == "siglip" else [])
    ours = clip_loss(v, g, s, impl="triton") if kind == "clip" else siglip_loss(v, g, s, bb, impl="triton")
    go = torch.tensor(0.37, device="cuda")
    got = torch.autograd.grad(ours, inputs, grad_outputs=go)
    v32, g32 = v.detach().float().requires_grad_(), g.detach().float().requires_grad_()
    ref_in = [v32, g32, s] + ([bb] if kind == "siglip" else [])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # an IEEE fp32 reference
    try:
        ref = OCClip()(v32, g32, s) if kind == "clip" else OCSigLip()(v32, g32, s, bb)
        want = torch.autograd.grad(ref, ref_in, grad_outputs=go)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if abs(ours.item() - ref.item()) > 1e-5 * max(1.0, abs(ref.item())):
        msg = f"loss: expected {ref.item()}, found {ours.item()}"
        raise AssertionError(msg)
    for name, x, y in zip(("d_img", "d_gex", "d_scale", "d_bias"), got, want, strict=False):
        tol = _TOL[dtype] if name in ("d_img", "d_gex") else 1e-4
        y = y.to(x.dtype).double() if name in ("d_img", "d_gex") else y.double()
        err = (x.double() - y).abs().max().item()
        if err > tol * y.abs().max().item():
            msg = f"{name}: max error {err:.3g} exceeds {tol}·max|ref|"
            raise AssertionError(msg)


@pytest.mark.gpu
@_needs_cuda
def test_cuda_auto_dispatch_uses_triton(monkeypatch):
    from hescape.models.losses import ClipLoss, resolve_impl

    if resolve_impl("auto", torch.device("cuda")) != "triton":
        msg = "expected impl='auto' to pick triton on CUDA"
        raise AssertionError(msg)
    calls = []
    import hescape.models.ops.clip_loss as op

    real = op.ClipLossFunction.apply
    monkeypatch.setattr(op.ClipLossFunction, "apply", lambda *a: calls.append(1) or real(*a))
    v = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    ClipLoss()(v, v, torch.tensor(10.0, device="cuda"))
    if not calls:
        msg = "expected ClipLoss on CUDA to call the Triton ClipLossFunction"
        raise AssertionError(msg)
