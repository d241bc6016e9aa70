"""Data-parallel training over processes launched by ``torchrun`` (torch.distributed).

``torchrun --nproc_per_node=N -m training.cli train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup`
then joins the process group (gloo on CPU, nccl on CUDA: the backend follows ``--device``; a CUDA device is
indexed by the local rank). Without those variables everything here is a no-op and the trainer runs as one
process, unchanged.

How a step is shared (the fused paper step; the co-trainer's REINFORCE and random agents instead serve each
rank's share of the context sets from the rank's own vector env, and average gradients the same way): every rank
draws the *global* batch of ``--batch-size`` context sets from the same seeded generator and keeps its own
contiguous slice of ``batch_size / N`` sets, so the data a run sees does not depend on N; each rank samples its
searches with its own generator (seed offset by the rank); after the backward pass the gradients are averaged
with one all-reduce of one flat buffer (an explicit all-reduce rather than DDP: the model is called through
several methods, not one ``forward``, and the step is a single backward, so DDP's bucketing would buy nothing),
then clipped and applied identically on every rank, so the parameters stay equal. Rank 0 alone logs (statistics
averaged over the ranks first), evaluates, checkpoints (atomically) and writes ``results.json``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

#: how long a rank waits in a collective (rank 0's evaluations and checkpoints run while the others wait)
COLLECTIVE_TIMEOUT_HOURS = 4


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[int, int, str | None]:
    """Join the process group if launched by torchrun: ``(rank, world_size, backend)``; ``(0, 1, None)`` alone.

    A CUDA ``device`` becomes this process's local GPU (``cuda:<LOCAL_RANK>``); see :func:`local_device`.
    """
    if not launched():
        return 0, 1, None
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        # The other ranks wait in the next all-reduce while rank 0 evaluates: allow a long evaluation (the GP
        # paper protocol's 48,000 tasks) rather than torch's default 10-30 minute collective timeout.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=COLLECTIVE_TIMEOUT_HOURS))
    return dist.get_rank(), dist.get_world_size(), dist.get_backend()


def local_device(device: str) -> str:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    if launched() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Replace every gradient by its mean over the ranks: one all-reduce of one flat buffer (missing
    gradients count as zeros, so every rank sends the same layout)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def average_stats(stats: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """The mean over the ranks of each statistic (same keys on every rank)."""
    if world_size == 1:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist(), strict=True)}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
