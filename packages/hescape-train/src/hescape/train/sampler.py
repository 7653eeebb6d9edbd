"""Which training rows each step sees: a batch sampler whose order is a pure function of (seed, epoch), and which
can start in the middle of an epoch, so that a resumed run sees exactly the batches it would have seen.

Each epoch shuffles the rows with ``torch.randperm`` drawn from a generator seeded with ``derive_seed(seed,
"sampler", epoch)``; under ``torch.distributed`` the permutation is cut into ``world_size`` strided shards as
``torch.utils.data.DistributedSampler`` does with ``drop_last=True`` (``indices[rank:total:world_size]``,
``torch/utils/data/distributed.py``). Incomplete last batches are dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

__all__ = ["derive_seed", "EpochBatchSampler"]


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for one random stream, from the run's ``seed`` and the stream's name (e.g. ``"augment"``),
    by SHA-256: streams are independent of each other and of the order in which they are created."""
    text = "/".join([str(int(seed)), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices for one epoch at a time (give it to ``DataLoader(batch_sampler=…)``).

    Parameters
    ----------
    n
        Rows in the training split.
    batch_size
        Rows per batch (per process).
    seed
        The run's seed.
    rank, world_size
        This process and the number of processes (1 without ``torch.distributed``).

    Call :meth:`set_epoch` before iterating; ``start_batch`` skips the batches an interrupted run already did.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches in a whole epoch (not counting ``start_batch``)."""
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's rows of ``epoch``, in the order they are used."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "sampler", epoch))
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.epoch_indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            yield rows[b * self.batch_size : (b + 1) * self.batch_size]
