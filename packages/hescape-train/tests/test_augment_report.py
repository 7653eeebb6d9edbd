"""Stain augmentation (physics of Beer–Lambert mixing) and the results table with a baseline row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hescape.eval import RetrievalResult
from hescape.train.report import format_results_table
from hescape.train.trainer import _augment

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin and eosin (R, G, B), normalised.
H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def _pure(vec: np.ndarray, amounts: np.ndarray) -> torch.Tensor:
    """(B, 3, 4, 4) float images of one stain: I = exp(-amount · vec) (Beer–Lambert), amounts (B,)."""
    od = amounts[:, None, None, None] * vec[None, :, None, None] * np.ones((1, 1, 4, 4))
    return torch.from_numpy(np.exp(-od)).float()


@pytest.mark.parametrize("vec", [H, E], ids=["haematoxylin", "eosin"])
def test_hed_jitter_changes_amount_not_colour(vec):
    """A patch of one stain stays that stain: its optical density keeps the stain's direction, only its amount
    changes, and the amount changes by one factor per patch."""
    x = _pure(vec, np.array([0.3, 0.6, 0.9, 1.2]))
    y = _augment(x, torch.Generator().manual_seed(1), stain_jitter=0.0, hed_jitter=0.5)
    od = -torch.log(y).double().numpy()  # (B, 3, 4, 4), flips/rotations do not matter for constant patches
    direction = od / np.linalg.norm(od, axis=1, keepdims=True)
    np.testing.assert_allclose(direction, np.broadcast_to(vec[None, :, None, None], od.shape), atol=2e-5)
    ratio = np.linalg.norm(od, axis=1).reshape(4, -1) / np.array([0.3, 0.6, 0.9, 1.2])[:, None]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-5)  # one per patch
    assert np.ptp(ratio[:, 0]) > 0.05  # and different patches get different factors


def test_no_stain_augmentation_keeps_pixels():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    y = _augment(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8 and sorted(y.flatten().tolist()) == sorted(x.flatten().tolist())


def _res(r5: float) -> RetrievalResult:
    return RetrievalResult(n=100, recall={1: r5 / 4, 5: r5}, chance={1: 0.01, 5: 0.05}, mean_rank=20.0,
                           median_rank=10.0, chance_mean_rank=50.5)


def test_table_shows_baseline_rows_and_ratios():
    table = format_results_table({"i2g": _res(0.30), "g2i": _res(0.20)}, "T",
                                 baseline={"i2g": _res(0.10), "g2i": _res(0.05)}, baseline_name="colour probe")
    lines = table.splitlines()
    assert lines[0] == "T"
    assert "| image → gene: colour probe | 0.025 (0.010) | 0.100 (0.050) | 20.0 (50.5) | 10.0 |" in lines
    assert lines[-1] == ("image → gene R@5 = 6.0× chance, 3.0× the colour probe; "
                         "gene → image R@5 = 4.0× chance, 4.0× the colour probe")
    plain = format_results_table({"i2g": _res(0.30), "g2i": _res(0.20)})
    assert "probe" not in plain and plain.splitlines()[-1] == ("image → gene R@5 = 6.0× chance, "
                                                               "gene → image R@5 = 4.0× chance")
