"""Batch-robust training options: batch-aware sampling and sample-centred embeddings.

Truth used here: counting rows per batch and per sample by hand, and brute-force loops over rows.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hescape.eval.correction import centre_within
from hescape.train.errors import HescapeConfigError
from hescape.train.sampler import EpochBatchSampler

# four samples of unequal size (the smallest 23 rows), rows of a sample not contiguous
_SIZES = {"A": 61, "B": 40, "C": 23, "D": 50}
_GROUPS = np.array([s for s, n in _SIZES.items() for _ in range(n)], dtype=object)
_GROUPS = _GROUPS[np.random.default_rng(5).permutation(len(_GROUPS))]


def _batches(sampler: EpochBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("epoch", [0, 3])
def test_within_sample_batches_hold_one_sample(epoch):
    s = EpochBatchSampler(len(_GROUPS), 8, seed=1, mode="within_sample", groups=_GROUPS)
    batches = _batches(s, epoch)
    assert len(batches) == sum(n // 8 for n in _SIZES.values()) == len(s)
    for b in batches:
        assert len(b) == 8 and len({_GROUPS[i] for i in b}) == 1
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no row twice in an epoch
    per_sample = Counter(_GROUPS[i] for i in flat)
    assert per_sample == {k: (n // 8) * 8 for k, n in _SIZES.items()}
    # the batch order mixes samples (not all of A, then all of B …)
    firsts = [_GROUPS[b[0]] for b in batches]
    assert firsts != sorted(firsts)


@pytest.mark.parametrize("batch_size", [8, 10])
def test_balanced_batches_share_samples_equally(batch_size):
    s = EpochBatchSampler(len(_GROUPS), batch_size, seed=2, mode="balanced", groups=_GROUPS)
    for epoch in (0, 1):
        batches = _batches(s, epoch)
        assert len(batches) == (23 * 4) // batch_size == len(s)
        for b in batches:
            counts = Counter(_GROUPS[i] for i in b)
            share = [counts.get(k, 0) for k in _SIZES]
            assert max(share) - min(share) <= 1, share  # equal shares, ±1 when 4 does not divide the batch
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
    assert _batches(s, 0) != _batches(s, 1)  # a new draw each epoch


@pytest.mark.parametrize("mode", ["random", "within_sample", "balanced"])
def test_processes_split_each_global_batch(mode):
    """Two processes of batch 4 see, together, exactly the rows one process of batch 8 sees, step by step."""
    one = _batches(EpochBatchSampler(len(_GROUPS), 8, seed=3, mode=mode, groups=_GROUPS), 2)
    ranks = [_batches(EpochBatchSampler(len(_GROUPS), 4, seed=3, rank=r, world_size=2, mode=mode, groups=_GROUPS), 2)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, rows in enumerate(one):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(rows)
        if mode == "within_sample":
            assert len({_GROUPS[i] for i in ranks[0][step] + ranks[1][step]}) == 1


def test_sampler_resumes_mid_epoch_and_is_seeded():
    s = EpochBatchSampler(len(_GROUPS), 8, seed=4, mode="balanced", groups=_GROUPS)
    full = _batches(s, 1)
    s.set_epoch(1, start_batch=3)
    assert list(s) == full[3:]
    other = EpochBatchSampler(len(_GROUPS), 8, seed=5, mode="balanced", groups=_GROUPS)
    assert _batches(other, 1) != full


def test_sampler_refusals():
    with pytest.raises(HescapeConfigError, match="largest training sample has 61 spots, fewer than a batch of 64"):
        EpochBatchSampler(len(_GROUPS), 64, seed=0, mode="within_sample", groups=_GROUPS)
    with pytest.raises(HescapeConfigError, match="23 spots \\(the smallest training sample\\) from each of the 4"):
        EpochBatchSampler(len(_GROUPS), 100, seed=0, mode="balanced", groups=_GROUPS)
    with pytest.raises(HescapeConfigError, match="expected the sample of each of the 174 training rows, found none"):
        EpochBatchSampler(len(_GROUPS), 8, seed=0, mode="balanced")
    with pytest.raises(HescapeConfigError, match="unknown mode 'per_donor'"):
        EpochBatchSampler(len(_GROUPS), 8, seed=0, mode="per_donor", groups=_GROUPS)


def test_centre_within_matches_a_loop_and_keeps_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    codes = torch.tensor([0, 1, 0, 2, 1, 0, 1, 1, 3])  # samples 2 and 3 have one row each
    out = centre_within(x, codes)
    for i in range(9):
        same = [j for j in range(9) if codes[j] == codes[i]]
        if len(same) == 1:
            want = x[i].detach()
        else:
            v = x[i].detach() - torch.stack([x[j].detach() for j in same]).mean(0)
            want = v / v.norm()
        assert torch.allclose(out[i].detach(), want, atol=1e-12)
    out[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
