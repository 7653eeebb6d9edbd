"""torch.distributed set-up for torchrun and Slurm (srun) launches.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Under
``srun`` without torchrun, the Slurm variables ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``
are used instead; ``MASTER_ADDR`` must then be exported by the batch script (e.g. the first host of
``scontrol show hostnames $SLURM_JOB_NODELIST``) and ``MASTER_PORT`` defaults to 29500.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import HescapeConfigError

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun or srun; returns the rank info and this rank's device."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world <= 1:
        return DistInfo(), device
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if "MASTER_ADDR" not in os.environ:
        msg = ("a multi-process launch was detected (WORLD_SIZE/SLURM_NTASKS > 1) but MASTER_ADDR is not set; "
               "launch with torchrun, or export MASTER_ADDR (and MASTER_PORT) in the Slurm batch script")
        raise HescapeConfigError(msg)
    os.environ.setdefault("MASTER_PORT", "29500")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local), device


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
