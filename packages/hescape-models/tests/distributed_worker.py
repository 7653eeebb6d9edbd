"""Two-process gloo run of the distributed losses; launched by ``test_losses_distributed.py``.

``python distributed_worker.py OUT_DIR`` spawns 2 CPU ranks (torch.multiprocessing, free port on 127.0.0.1);
each rank writes ``rank{r}.pt`` with its loss and gradients for every case, on the shared seeded full batch.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
B_LOCAL, DIM = 6, 5
CASES = [  # (loss, local_loss, gather_with_grad)
    ("clip", False, True), ("clip", True, True), ("siglip", False, True), ("siglip", True, True),
    ("clip", False, False), ("siglip", True, False),
]


def full_batch():
    gen = torch.Generator().manual_seed(7)
    v = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, DIM, generator=gen), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, DIM, generator=gen), dim=-1)
    return v, g, torch.tensor(20.0), torch.tensor(-4.0)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from hescape.models.losses import create_loss

    v_all, g_all, s0, b0 = full_batch()
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results = {}
    for name, local_loss, with_grad in CASES:
        v = v_all[sl].clone().requires_grad_()
        g = g_all[sl].clone().requires_grad_()
        s, b = s0.clone().requires_grad_(), b0.clone().requires_grad_()
        loss_fn = create_loss(name, rank=rank, world_size=WORLD, local_loss=local_loss, gather_with_grad=with_grad,
                              tile=4)
        loss = loss_fn(v, g, s, b)["contrastive_loss"]
        loss.backward()
        results[(name, local_loss, with_grad)] = {"loss": loss.detach(), "v": v.grad, "g": g.grad, "s": s.grad,
                                                  "b": b.grad}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(_rank_main, args=(_free_port(), sys.argv[1]), nprocs=WORLD, join=True)
