"""Results do not depend on data.num_workers (augmentation and sampling have their own generators), and the
sampler can start in the middle of an epoch."""

from __future__ import annotations

import json

import torch
from hescape.train.augment import augment
from hescape.train.checkpoint import read_checkpoint
from hescape.train.cli import main
from hescape.train.sampler import EpochBatchSampler, derive_seed


def _train(capsys, dataset, out, *extra):
    code = main([f"data.path={dataset}", f"out_dir={out}", "run_name=r", "epochs=2", "batch_size=8", "log_every=1",
                 "recall_ks=1,5", "probe=false", "progress=false", *extra])
    assert code == 0, capsys.readouterr().err
    return read_checkpoint(out / "r", "last")


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_num_workers_does_not_change_results(tiny_dataset, tmp_path, capsys):
    w0 = _train(capsys, tiny_dataset, tmp_path / "w0", "data.num_workers=0")
    w2 = _train(capsys, tiny_dataset, tmp_path / "w2", "data.num_workers=2")
    assert w0["step"] == w2["step"] == 8
    assert _same_weights(w0["state_dict"], w2["state_dict"])
    assert (tmp_path / "w0/r/steps.jsonl").read_bytes() == (tmp_path / "w2/r/steps.jsonl").read_bytes()
    r0, r2 = (json.loads((tmp_path / d / "r/results.json").read_text()) for d in ("w0", "w2"))
    assert r0 == r2
    # the comparison can fail: another seed gives other weights
    s1 = _train(capsys, tiny_dataset, tmp_path / "s1", "seed=1")
    assert not _same_weights(w0["state_dict"], s1["state_dict"])


def test_augmentation_draws_only_from_its_generator():
    """Augmenting consumes no global random number, and the same generator state gives the same patches."""
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(derive_seed(0, "augment")), stain_jitter=0.1, hed_jitter=0.4)
    assert torch.equal(torch.get_rng_state(), before)
    b = augment(x, torch.Generator().manual_seed(derive_seed(0, "augment")), stain_jitter=0.1, hed_jitter=0.4)
    assert torch.equal(a, b)


def test_sampler_positions():
    s = EpochBatchSampler(n=50, batch_size=8, seed=3)
    assert len(s) == 6  # 50 // 8, the incomplete batch dropped
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=4)
    assert list(s) == full[4:]  # a resumed epoch continues with the batches it had not done
    rows = [i for b in full for i in b]
    assert len(set(rows)) == 48 and set(rows) <= set(range(50))
    s.set_epoch(3)
    assert list(s) != full  # a new permutation each epoch
    # two processes: disjoint strided shards of one permutation (DistributedSampler's layout, drop_last)
    shards = [EpochBatchSampler(50, 4, 3, rank=r, world_size=2) for r in (0, 1)]
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(derive_seed(3, "sampler", 0)))[:50].tolist()
    assert shards[0].epoch_indices(0) == perm[0:50:2] and shards[1].epoch_indices(0) == perm[1:50:2]
    assert derive_seed(0, "augment") != derive_seed(0, "sampler", 0) != derive_seed(1, "sampler", 0)
