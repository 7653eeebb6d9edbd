"""The CUDA recall kernel (csrc/recall_cuda.cu), both its one-direction and its fused two-direction entry points,
run on the CPU: the unchanged kernel source compiled as C++ against csrc/testing/cuda_emulation.h (blocks one
after another, the 256 threads of a block as real concurrent threads: barriers and warp shuffles are real). CI
has no GPU, so this is where the kernel's indexing, tails, column splits, reductions and atomics are checked;
benchmarks/gpu/run.sh repeats the comparison on a GPU.

Truth: a NumPy stable descending argsort per row of float64 scores (quantised embeddings, every dot exact, so ties
are real), and, on continuous data, the C++ kernel's AVX2/AVX-512 path, which computes each score with the same
fused multiply-adds in the same order (one rounding each), so every score, tie and rank must agree bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import hescape.eval as E
import numpy as np
import pytest

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
_CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(
    _CXX is None or not (_CSRC / "testing" / "cuda_emulation.h").exists(),
    reason="needs a C++17 compiler and the repository's csrc/ (packages/hescape-eval/csrc symlink)",
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("cuda_emu") / "cuda_kernel_emulated"
    cmd = [_CXX, "-std=c++17", "-O1", "-pthread", "-ffp-contract=off", "-DHESCAPE_CUDA_EMULATION", "-I", str(_CSRC),
           "-x", "c++", str(_CSRC / "recall_cuda.cu"), "-x", "none", str(_CSRC / "testing" / "cuda_kernel_main.cpp"),
           "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def run_kernel(exe: Path, tmp: Path, q, g, q_labels=None, g_labels=None, *, bf16=False, sms=4):
    """Runs rank_cuda(q, g), rank_cuda(g, q) and rank_cuda_both(q, g); returns four (ranks, scores, indices)."""
    nq, d = q.shape
    ng = g.shape[0]
    inp, out = tmp / "in.bin", tmp / "out.bin"
    with inp.open("wb") as f:
        np.array([nq, ng, d, int(bf16), int(q_labels is not None), sms], np.int64).tofile(f)
        for x in (q, g):
            x = np.ascontiguousarray(x, np.float32)
            (x.view(np.uint32) >> 16).astype(np.uint16).tofile(f) if bf16 else x.tofile(f)
        if q_labels is not None:
            np.asarray(q_labels, np.int64).tofile(f)
            np.asarray(g_labels, np.int64).tofile(f)
    proc = subprocess.run([str(exe), str(inp), str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    buf, off, res = out.read_bytes(), 0, []
    for n in (nq, ng, nq, ng):
        parts = []
        for dt in (np.int64, np.float32, np.int64):
            parts.append(np.frombuffer(buf, dt, n, off))
            off += n * np.dtype(dt).itemsize
        res.append(tuple(parts))
    assert off == len(buf)
    return res


def stable_ranks(q: np.ndarray, g: np.ndarray, q_labels=None, g_labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the first positive in a stable descending sort of each row of float64 scores, and its index."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    ranks, first = np.empty(len(q), np.int64), np.empty(len(q), np.int64)
    for i in range(len(q)):
        order = np.lexsort((np.arange(len(g)), -s[i]))
        pos = order == i if q_labels is None else g_labels[order] == q_labels[i]
        ranks[i] = np.flatnonzero(pos)[0]
        first[i] = order[ranks[i]]
    return ranks, first


def quantised(nq: int, ng: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Values k/8 (|k| <= 8; exact in bf16 too), every dot exact in float32; planted duplicate rows (ties)."""
    rng = np.random.default_rng(seed)
    q = (rng.integers(-8, 9, size=(nq, d)) / 8).astype(np.float32)
    g = (rng.integers(-8, 9, size=(ng, d)) / 8).astype(np.float32)
    m = min(nq, ng)
    g[:m] = np.where(rng.random((m, d)) < 0.7, q[:m], g[:m])
    if ng >= 4:
        g[rng.integers(0, ng, ng // 4)] = g[rng.integers(0, ng, ng // 4)]
        q[rng.integers(0, nq, max(1, nq // 8))] = q[0]
    return q, g


def _same(a, b) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1].view(np.int32), b[1].view(np.int32))  # bit for bit
    np.testing.assert_array_equal(a[2], b[2])


# (n, d, sms, bf16): n not a multiple of the 64 x 64 block tile; d below, at and across the 16-feature chunks;
# sms = 1 makes each block sweep several column tiles (shared column buffer reused), sms = 4 splits the gallery.
@pytest.mark.parametrize(("n", "d", "sms", "bf16"), [(203, 7, 1, False), (131, 130, 4, True), (1, 3, 4, False),
                                                     (64, 16, 1, False)])
def test_diagonal_positives_match_stable_argsort(kernel, tmp_path, n, d, sms, bf16):
    q, g = quantised(n, n, d, seed=n + d)
    one_f, one_r, both_f, both_r = run_kernel(kernel, tmp_path, q, g, bf16=bf16, sms=sms)
    want_f, first_f = stable_ranks(q, g)
    want_r, first_r = stable_ranks(g, q)
    np.testing.assert_array_equal(one_f[0], want_f)
    np.testing.assert_array_equal(one_f[2], first_f)
    np.testing.assert_array_equal(one_r[0], want_r)
    np.testing.assert_array_equal(one_f[1].astype(np.float64), np.einsum("ij,ij->i", q.astype(float), g.astype(float)))
    _same(both_f, one_f)  # the fused pass equals the two separate calls
    _same(both_r, one_r)
    assert n == 1 or ((want_f > 0).any() and (want_r > 0).any())  # not a trivial case


@pytest.mark.parametrize(("nq", "ng", "sms"), [(203, 203, 1), (150, 203, 4), (203, 77, 1)])
def test_label_positives_match_stable_argsort(kernel, tmp_path, nq, ng, sms):
    q, g = quantised(nq, ng, 9, seed=nq + ng)
    rng = np.random.default_rng(nq * ng)
    ql = rng.integers(0, 6, nq)
    gl = rng.integers(0, 6, ng)
    gl[:6], ql[:6] = np.arange(6), np.arange(6)  # every label on both sides
    one_f, one_r, both_f, both_r = run_kernel(kernel, tmp_path, q, g, ql, gl, sms=sms)
    want_f, first_f = stable_ranks(q, g, ql, gl)
    want_r, first_r = stable_ranks(g, q, gl, ql)
    np.testing.assert_array_equal(one_f[0], want_f)
    np.testing.assert_array_equal(one_f[2], first_f)
    np.testing.assert_array_equal(one_r[0], want_r)
    np.testing.assert_array_equal(one_r[2], first_r)
    _same(both_f, one_f)
    _same(both_r, one_r)


def test_query_without_positive_reported(kernel, tmp_path):
    q, g = quantised(20, 30, 5, seed=1)
    ql = np.zeros(20, np.int64)
    ql[7] = 99  # no gallery row carries label 99
    gl = np.zeros(30, np.int64)
    one_f, _, both_f, _ = run_kernel(kernel, tmp_path, q, g, ql, gl)
    assert one_f[2][7] == -1 and both_f[2][7] == -1
    assert (np.delete(one_f[2], 7) >= 0).all()


@pytest.mark.skipif(not {"cpp-avx2", "cpp-avx512"} & set(E.available_backends()),
                    reason="needs the C++ kernel's fused-multiply-add path (AVX2 or AVX-512)")
@pytest.mark.parametrize("bf16", [False, True])
def test_continuous_data_bit_identical_to_cpp_fma_path(kernel, tmp_path, bf16):
    """Gaussian data with duplicated rows: every score is one fma chain in feature order on both kernels."""
    isa = "cpp-avx512" if "cpp-avx512" in E.available_backends() else "cpp-avx2"
    rng = np.random.default_rng(7)
    n, d = 150, 37
    q = rng.standard_normal((n, d)).astype(np.float32)
    g = (q + 0.4 * rng.standard_normal((n, d))).astype(np.float32)
    g[rng.permutation(n)[:30]] = g[rng.permutation(n)[:30]]
    if bf16:  # the kernels widen bf16 exactly: give both the same bf16-representable values
        q = (q.view(np.uint32) & 0xFFFF0000).view(np.float32)
        g = (g.view(np.uint32) & 0xFFFF0000).view(np.float32)
    one_f, one_r, both_f, both_r = run_kernel(kernel, tmp_path, q, g, bf16=bf16, sms=2)
    cf, cr = E.compute_ranks_both(q, g, backend=isa, num_threads=1)
    for emu, cpp in ((one_f, cf), (one_r, cr), (both_f, cf), (both_r, cr)):
        _same(emu, (cpp.ranks.numpy(), cpp.best_score.numpy(), cpp.best_index.numpy()))
