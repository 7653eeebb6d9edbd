"""Tiled torch CLIP/SigLIP losses against open_clip: values, every gradient, dtypes, odd sizes, memory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hescape.models import HescapeModelError
from hescape.models.losses import ClipLoss, SigLipLoss, clip_loss, create_loss, siglip_loss
from hescape.models.losses._tiled import clip_loss_torch, siglip_loss_torch
from open_clip.loss import ClipLoss as OCClipLoss
from open_clip.loss import SigLipLoss as OCSigLipLoss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _load_helpers():
    """Import ``_loss_testing.py`` by path (under importlib mode the tests folder is not on sys.path)."""
    name = "_hescape_models_loss_testing"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_loss_testing.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


H = _load_helpers()



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tiled ops pay intra-op thread barriers on a busy 2-core box; one thread is faster and steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_SHAPE_PARAMS = [(1, 7), (3, 7), (3, 128), (257, 7), (257, 128), (1000, 7), (1000, 128)]
_DTYPE_PARAMS = [pytest.param(dt, tol, id=str(dt).removeprefix("torch.")) for dt, tol in H.DTYPE_PARAMS.items()]
_SCALE_PARAMS = [(1.0, 0.0), (14.3, -10.0), (100.0, -3.0)]  # (logit_scale, logit_bias)
_TILE = 128  # small, so that B=257/1000 span several partial tiles


def _oc_reference(kind, v, g, s, b):
    """open_clip on the fp32 upcast of the same (possibly 16-bit) inputs: the exact value of what we compute."""
    v32, g32 = v.detach().float().requires_grad_(), g.detach().float().requires_grad_()
    if kind == "clip":
        return OCClipLoss()(v32, g32, s), (v32, g32)
    return OCSigLipLoss()(v32, g32, s, b), (v32, g32)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize(("scale", "bias"), _SCALE_PARAMS)
@pytest.mark.parametrize(("dtype", "tol"), _DTYPE_PARAMS)
@pytest.mark.parametrize(("b", "d"), _SHAPE_PARAMS)
def test_matches_open_clip(kind, scale, bias, dtype, tol, b, d):
    atol, rtol = tol
    v, g, s, bb = H.make_inputs(b, d, dtype, scale, bias, seed=b * 31 + d)
    if kind == "clip":
        ours = clip_loss_torch(v, g, s, tile=_TILE)
        inputs = (v, g, s)
    else:
        ours = siglip_loss_torch(v, g, s, bb, tile=_TILE)
        inputs = (v, g, s, bb)
    val, got = H.grads(ours, inputs, grad_output=0.37)
    ref, (v32, g32) = _oc_reference(kind, v, g, s, bb)
    ref_inputs = (v32, g32, s) if kind == "clip" else (v32, g32, s, bb)
    ref_val, want = H.grads(ref, ref_inputs, grad_output=0.37)
    H.assert_verbose_allclose(val, ref_val, atol=2e-6, rtol=2e-5, name="loss", floor=1.0)
    for name, gx, wx in zip(("d_img", "d_gex", "d_scale", "d_bias"), got, want, strict=False):
        if name in ("d_img", "d_gex"):
            if gx.dtype != dtype:
                msg = f"{name}: expected dtype {dtype}, found {gx.dtype}"
                raise AssertionError(msg)
            wx = wx.to(dtype)  # the reference gradient rounded like ours
        H.assert_verbose_allclose(gx, wx, atol=atol if name in ("d_img", "d_gex") else 2e-5, rtol=rtol, name=name)


@pytest.mark.parametrize("tile", [1, 7, 64, 4096])
def test_result_does_not_depend_on_tile(tile):
    v, g, s, bb = H.make_inputs(37, 9, torch.float32, 30.0, -5.0)
    for fn, inputs in ((lambda t: clip_loss_torch(v, g, s, tile=t), (v, g, s)),
                       (lambda t: siglip_loss_torch(v, g, s, bb, tile=t), (v, g, s, bb))):
        val, got = H.grads(fn(tile), inputs, 1.0)
        ref_val, want = H.grads(fn(37), inputs, 1.0)
        H.assert_verbose_allclose(val, ref_val, atol=1e-6, rtol=1e-5, name="loss", floor=1.0)
        for i, (x, y) in enumerate(zip(got, want, strict=True)):
            H.assert_verbose_allclose(x, y, atol=1e-5, rtol=1e-5, name=f"grad {i}")


@pytest.mark.parametrize(("m", "n", "offset"), [(5, 15, 0), (5, 15, 10), (4, 12, 4), (1, 3, 2)])
def test_rectangular_local_terms_match_naive(m, n, offset):
    v, g, s, bb = H.make_inputs(m, 11, torch.float32, 50.0, -4.0, n=n)
    for ours, ref, inputs in (
        (clip_loss_torch(v, g, s, diag_offset=offset, row_weight=0.3, col_weight=0.0, tile=3),
         H.naive_clip_rect(v, g, s, offset, 0.3, 0.0), (v, g, s)),
        (siglip_loss_torch(v, g, s, bb, diag_offset=offset, tile=3), H.naive_siglip_rect(v, g, s, bb, offset),
         (v, g, s, bb)),
    ):
        val, got = H.grads(ours, inputs, -1.3)
        ref_val, want = H.grads(ref, inputs, -1.3)
        H.assert_verbose_allclose(val, ref_val, atol=1e-6, rtol=1e-5, name="loss", floor=1.0)
        for i, (x, y) in enumerate(zip(got, want, strict=True)):
            H.assert_verbose_allclose(x, y, atol=1e-5, rtol=1e-4, name=f"grad {i}")


def test_only_requested_gradients_are_returned():
    v, g, s, bb = H.make_inputs(6, 4, torch.float32, 10.0, -1.0)
    s.requires_grad_(False)
    loss = siglip_loss_torch(v, g.detach(), s, bb.detach())
    (dv,) = torch.autograd.grad(loss, [v])
    ref = OCSigLipLoss()(v, g.detach(), s, bb.detach())
    (want,) = torch.autograd.grad(ref, [v])
    H.assert_verbose_allclose(dv, want, atol=1e-6, rtol=1e-5, name="d_img")


def test_modules_dispatch_and_match_open_clip_impl():
    v, g, s, bb = H.make_inputs(19, 8, torch.float32, 20.0, -6.0)
    for name in ("clip", "siglip"):
        ours = create_loss(name)(v, g, s, bb)
        ref = create_loss(name, impl="openclip")(v, g, s, bb)
        if set(ours) != {"contrastive_loss"}:
            msg = f"expected only the key 'contrastive_loss', found {sorted(ours)}"
            raise AssertionError(msg)
        H.assert_verbose_allclose(ours["contrastive_loss"], ref["contrastive_loss"], atol=1e-6, rtol=1e-5, name=name)
    functional = clip_loss(v, g, s, impl="torch")
    module = ClipLoss(impl="torch", tile=4)(v, g, s)["contrastive_loss"]
    H.assert_verbose_allclose(functional, module, atol=1e-6, rtol=1e-5, name="functional vs module")
    sig = siglip_loss(v, g, s, bb)
    H.assert_verbose_allclose(sig, SigLipLoss()(v, g, s, bb)["contrastive_loss"], atol=1e-6, rtol=1e-5, name="sig")


@pytest.mark.parametrize(("call", "match"), [
    (lambda v, g, s, b: clip_loss(v, g[:, :3], s), "same dim"),
    (lambda v, g, s, b: clip_loss(v[0], g, s), "2-D tensor"),
    (lambda v, g, s, b: clip_loss(v.double(), g.double(), s), "dtype"),
    (lambda v, g, s, b: clip_loss(v, g, torch.ones(2)), "one-element"),
    (lambda v, g, s, b: clip_loss(v, g[:3], s), "square"),
    (lambda v, g, s, b: clip_loss(v[:2], g, s, diag_offset=3, col_weight=0.0), "offset"),
    (lambda v, g, s, b: siglip_loss(v, g, s, None), "logit_bias"),
    (lambda v, g, s, b: SigLipLoss()(v, g, s), "logit_bias"),
    (lambda v, g, s, b: clip_loss(v, g, s, impl="trition"), "did you mean 'triton'"),
    (lambda v, g, s, b: clip_loss(v, g, s, impl="triton"), "CUDA"),
    (lambda v, g, s, b: clip_loss(v, g, s, tile=0), "tile"),
    (lambda v, g, s, b: create_loss("sigclip"), "expected one of"),
    (lambda v, g, s, b: ClipLoss(world_size=2), "process group"),
    (lambda v, g, s, b: ClipLoss(rank=3, world_size=2), "rank"),
])
def test_invalid_inputs_raise_model_error(call, match):
    v, g, s, bb = H.make_inputs(4, 5, torch.float32, 10.0, -1.0)
    with pytest.raises(HescapeModelError, match=match):
        out = call(v, g, s, bb)
        if isinstance(out, torch.nn.Module):  # constructor accepted: the process group is checked at forward
            out(v, g, s, bb)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any ATen op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tiled_path_never_allocates_batch_squared(kind):
    b, d, tile = 4096, 8, 256
    v, g, s, bb = H.make_inputs(b, d, torch.float32, 14.3, -10.0)
    limit = tile * tile + b * d
    with _MaxNumel() as ours:
        loss = clip_loss_torch(v, g, s, tile=tile) if kind == "clip" else siglip_loss_torch(v, g, s, bb, tile=tile)
        loss.backward()
    if ours.ops < 2 * (b // tile) ** 2:  # forward and backward both went through the mode
        msg = f"expected the mode to see every tile op, saw {ours.ops} ops"
        raise AssertionError(msg)
    if ours.max_numel > limit:
        msg = f"expected no tensor above tile²+B·d = {limit} elements, found {ours.max_numel}"
        raise AssertionError(msg)
    # The detector does catch a B×B allocation: open_clip's loss trips it.
    v2, g2, s2, b2 = H.make_inputs(1024, d, torch.float32, 14.3, -10.0)
    with _MaxNumel() as oc:
        (OCClipLoss()(v2, g2, s2) if kind == "clip" else OCSigLipLoss()(v2, g2, s2, b2)).backward()
    if oc.max_numel < 1024 * 1024:
        msg = f"expected open_clip to allocate a 1024×1024 matrix, largest was {oc.max_numel}"
        raise AssertionError(msg)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(("b", "tile"), [(257, 64), (1000, 128), (300, 4096)])
def test_worker_threads_match_open_clip_deterministically(threads, b, tile):
    """With T > 1 torch threads the row tiles are split between T single-threaded workers (see _row_blocks)."""
    v, g, s, bb = H.make_inputs(b, 16, torch.float32, 30.0, -8.0, seed=b)
    torch.set_num_threads(threads)
    try:
        for kind in ("clip", "siglip"):
            inputs = (v, g, s) if kind == "clip" else (v, g, s, bb)
            fn = (lambda: clip_loss_torch(v, g, s, tile=tile)) if kind == "clip" else (
                lambda: siglip_loss_torch(v, g, s, bb, tile=tile))
            val, got = H.grads(fn(), inputs, 0.7)
            val2, got2 = H.grads(fn(), inputs, 0.7)
            if torch.get_num_threads() != threads:
                msg = f"expected the caller's thread count {threads} to survive, found {torch.get_num_threads()}"
                raise AssertionError(msg)
            for x, y in zip((val, *got), (val2, *got2), strict=True):
                if not torch.equal(x, y):
                    msg = f"{kind}: two identical calls with {threads} threads differ"
                    raise AssertionError(msg)
            ref, (v32, g32) = _oc_reference(kind, v, g, s, bb)
            ref_val, want = H.grads(ref, (v32, g32, *inputs[2:]), 0.7)
            H.assert_verbose_allclose(val, ref_val, atol=2e-6, rtol=2e-5, name=f"{kind} loss", floor=1.0)
            for i, (x, y) in enumerate(zip(got, want, strict=True)):
                H.assert_verbose_allclose(x, y, atol=2e-5, rtol=1e-4, name=f"{kind} grad {i}")
        # the one-directional rectangular (local-loss) terms, with the column statistics off
        vr, gr, sr, br = H.make_inputs(40, 11, torch.float32, 50.0, -4.0, n=120, seed=3)
        for ours, ref, inputs in (
            (clip_loss_torch(vr, gr, sr, diag_offset=40, row_weight=0.3, col_weight=0.0, tile=8),
             H.naive_clip_rect(vr, gr, sr, 40, 0.3, 0.0), (vr, gr, sr)),
            (siglip_loss_torch(vr, gr, sr, br, diag_offset=40, tile=8), H.naive_siglip_rect(vr, gr, sr, br, 40),
             (vr, gr, sr, br)),
        ):
            val, got = H.grads(ours, inputs, -1.3)
            ref_val, want = H.grads(ref, inputs, -1.3)
            H.assert_verbose_allclose(val, ref_val, atol=1e-6, rtol=1e-5, name="local loss", floor=1.0)
            for i, (x, y) in enumerate(zip(got, want, strict=True)):
                H.assert_verbose_allclose(x, y, atol=1e-5, rtol=1e-4, name=f"local grad {i}")
    finally:
        torch.set_num_threads(1)
