"""Which training rows each step sees: a batch sampler whose order is a pure function of (seed, epoch), and which
can start in the middle of an epoch, so that a resumed run sees exactly the batches it would have seen.

Each epoch shuffles the rows with ``torch.randperm`` drawn from a generator seeded with ``derive_seed(seed,
"sampler", epoch)``; under ``torch.distributed`` the permutation is cut into ``world_size`` strided shards as
``torch.utils.data.DistributedSampler`` does with ``drop_last=True`` (``indices[rank:total:world_size]``,
``torch/utils/data/distributed.py``). Incomplete last batches are dropped.

Batch-aware sampling (``data.batch_sampling``; the samples are the batches of a batch effect):

* ``random`` — the plain permutation above: a step's rows come from any samples.
* ``within_sample`` — every global batch (all processes' rows of one step) comes from one sample, so no negative
  in the contrastive loss differs from its positive by batch signature. Each sample's rows are permuted, cut into
  global batches (a sample's incomplete last batch is dropped), and the order of all batches is permuted.
* ``balanced`` — every global batch holds the samples in equal shares (±1 row): the samples' permuted rows are
  interleaved round-robin (the sample order drawn anew each round) until the smallest sample runs out, then cut
  into global batches. A sample's rows beyond the smallest sample's count are left out of that epoch (a different
  subset each epoch).

Every mode gives the same number of batches in every epoch, and process ``r`` of ``W`` takes rows
``r, r + W, …`` of each global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from .config import BATCH_SAMPLING

__all__ = ["derive_seed", "EpochBatchSampler", "BATCH_SAMPLING"]


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
    mode
        ``random`` | ``within_sample`` | ``balanced`` (:data:`BATCH_SAMPLING`, module docstring).
    groups
        ``(n,)`` the sample of every row (any hashable labels); needed by ``within_sample`` and ``balanced``.

    Call :meth:`set_epoch` before iterating; ``start_batch`` skips the batches an interrupted run already did.

    Raises
    ------
    HescapeConfigError
        An unknown mode, ``groups`` missing or of the wrong length, or an epoch without one whole global batch
        (``within_sample``: no sample holds one; ``balanced``: the smallest sample times the number of samples is
        smaller than one).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 mode: str = "random", groups=None):
        super().__init__()
        from .errors import HescapeConfigError

        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = n // world_size
        self.epoch, self.start_batch = 0, 0
        if mode not in BATCH_SAMPLING:
            msg = f"data.batch_sampling: unknown mode {mode!r}; expected one of {', '.join(BATCH_SAMPLING)}"
            raise HescapeConfigError(msg)
        self.mode = mode
        self.global_batch = batch_size * world_size
        if mode == "random":
            self.n_batches = self.per_rank // batch_size
            return
        if groups is None or len(groups) != n:
            found = "none" if groups is None else f"{len(groups)} labels"
            msg = f"data.batch_sampling={mode}: expected the sample of each of the {n} training rows, found {found}"
            raise HescapeConfigError(msg)
        _, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        self.members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        sizes = [len(m) for m in self.members]
        if mode == "within_sample":
            self.n_batches = sum(s // self.global_batch for s in sizes)
            if self.n_batches == 0:
                msg = (f"data.batch_sampling=within_sample: every batch comes from one sample, but the largest "
                       f"training sample has {max(sizes)} spots, fewer than a batch of {self.global_batch}; lower "
                       "batch_size / global_batch_size or use data.batch_sampling=balanced")
                raise HescapeConfigError(msg)
        else:
            self.n_batches = (min(sizes) * len(sizes)) // self.global_batch
            if self.n_batches == 0:
                msg = (f"data.batch_sampling=balanced: each epoch takes {min(sizes)} spots (the smallest training "
                       f"sample) from each of the {len(sizes)} samples, fewer than a batch of {self.global_batch}; "
                       "lower batch_size / global_batch_size")
                raise HescapeConfigError(msg)

    def __len__(self) -> int:
        """Batches in a whole epoch (not counting ``start_batch``)."""
        return self.n_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every global batch of ``epoch`` (rows of all processes), in the order they are used (batch-aware modes)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "sampler", epoch))
        gb = self.global_batch
        shuffled = [m[torch.randperm(len(m), generator=g).numpy()] for m in self.members]
        if self.mode == "within_sample":
            batches = [rows[i * gb:(i + 1) * gb] for rows in shuffled for i in range(len(rows) // gb)]
            order = torch.randperm(len(batches), generator=g).numpy()
            return [batches[i] for i in order]
        smallest = min(len(m) for m in shuffled)
        rounds = [torch.randperm(len(shuffled), generator=g).numpy() for _ in range(smallest)]
        stream = np.array([shuffled[s][r] for r, order in enumerate(rounds) for s in order], dtype=np.int64)
        return [stream[b * gb:(b + 1) * gb] for b in range(self.n_batches)]

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's rows of ``epoch``, in the order they are used (``random``: its whole strided shard, as
        ``DistributedSampler`` gives it, the rows past the last whole batch included)."""
        if self.mode == "random":
            g = torch.Generator().manual_seed(derive_seed(self.seed, "sampler", epoch))
            perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
            return perm[self.rank :: self.world_size].tolist()
        return [int(i) for b in self._global_batches(epoch) for i in b[self.rank::self.world_size]]

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.epoch_indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            yield rows[b * self.batch_size : (b + 1) * self.batch_size]
