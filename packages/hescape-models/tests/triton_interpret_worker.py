"""Runs the Triton loss kernels under TRITON_INTERPRET=1 on CPU and prints JSON errors vs open_clip.

Launched in a subprocess by ``test_losses_triton.py`` (the interpreter flag must be set before the kernels are
defined and must not leak into GPU tests of the same process). Reads the case list as JSON on stdin.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hescape.models.losses import clip_loss, siglip_loss  # noqa: E402
from hescape.models.losses.naive import clip_loss_naive, siglip_loss_naive  # noqa: E402
from open_clip.loss import ClipLoss, SigLipLoss  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rect_reference(kind, v, g, s, b, offset):
    if kind == "clip":
        return clip_loss_naive(v, g, s, offset=offset, row_weight=0.5 / v.shape[0], col_weight=0.0)
    return siglip_loss_naive(v, g, s, b, offset=offset)


def run_case(case: dict) -> dict:
    kind, m, n, d, offset = case["kind"], case["m"], case["n"], case["d"], case["offset"]
    dtype = _DTYPES[case["dtype"]]
    gen = torch.Generator().manual_seed(m * 101 + d)
    v = F.normalize(torch.randn(m, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    g = F.normalize(torch.randn(n, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(case["scale"], requires_grad=True)
    b = torch.tensor(case["bias"], requires_grad=True)
    inputs = [v, g, s] + ([b] if kind == "siglip" else [])
    local = m != n or offset
    if kind == "clip":
        ours = clip_loss(v, g, s, impl="triton", diag_offset=offset, **({"col_weight": 0.0} if local else {}))
    else:
        ours = siglip_loss(v, g, s, b, impl="triton", diag_offset=offset)
    go = torch.tensor(case["grad_output"])
    got = torch.autograd.grad(ours, inputs, grad_outputs=go)
    v32, g32 = v.detach().float().requires_grad_(), g.detach().float().requires_grad_()
    ref_inputs = [v32, g32, s] + ([b] if kind == "siglip" else [])
    if local:
        ref = _rect_reference(kind, v32, g32, s, b, offset)
    else:
        ref = ClipLoss()(v32, g32, s) if kind == "clip" else SigLipLoss()(v32, g32, s, b)
    want = torch.autograd.grad(ref, ref_inputs, grad_outputs=go)
    out = {"loss": [float(ours), float(ref)], "grad_dtypes": [str(t.dtype) for t in got[:2]]}
    for name, x, y in zip(("d_img", "d_gex", "d_scale", "d_bias"), got, want, strict=False):
        y = y.to(x.dtype) if name in ("d_img", "d_gex") else y
        x, y = x.double(), y.double()
        out[name] = {"max_err": (x - y).abs().max().item(), "ref_max": y.abs().max().item()}
    return out


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump({c["id"]: run_case(c) for c in cases}, sys.stdout)


if __name__ == "__main__":
    main()
