"""Data-parallel training over several processes with PyTorch's own engine (torch.distributed).

The train stage with `train.devices: N > 1` re-launches itself as N processes on this node through
`torch.distributed.run` (what the `torchrun` command runs); on several nodes, `torchrun` is run by
hand on each (README, "Several GPUs and nodes"). Each process reads its place from the variables
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and joins the process group: NCCL
on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU (the cores split between the
processes of a node).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unpaired import params
from unpaired.threads import cpu_count as cpu_cores   # the CPUs of this process's affinity mask


@dataclass(frozen=True)
class Rank:
    """This process's place in the job. The single-process default is rank 0 of 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and samples, and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (the tensor lives on this rank's device)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable state, e.g. the pools)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def from_env() -> Rank | None:
    """The Rank torchrun's variables describe, or None when this process was not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return Rank(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def check_devices(n: int, device: torch.device, key: str = "train.devices") -> None:
    """One line naming `key` when this node cannot hold n processes: one GPU each on CUDA, at least
    one core each on the CPU (threads are split between them), a single device on MPS."""
    if n <= 1:
        return
    if device.type == "cuda":
        have = torch.cuda.device_count()
        params.check(n <= have, key, f"{n} processes requested but only {have} CUDA device(s) here; "
                                     f"use {key}: {have} or less")
    elif device.type == "mps":
        params.fail(key, f"{n} processes requested but MPS is one device; use {key}: 1")
    else:
        have = cpu_cores()
        params.check(n <= have, key, f"{n} processes requested but only {have} CPU core(s) here (each "
                                     f"process needs one); use {key}: {have} or less")


def launch(n: int, module: str, args: list[str] | None = None) -> None:
    """Run `python -m module args` as n processes on this node through torch.distributed.run
    (standalone rendezvous on a free local port) and wait for them. A failed process has printed
    its own line; this raises UserError naming how many failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from unpaired.errors import UserError
    # torchrun would otherwise set OMP_NUM_THREADS=1 with a banner; each process sets its threads.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // n)))
    argv = ["--standalone", f"--nproc-per-node={n}", "--module", module, *(args or [])]
    sys.stdout.flush()
    # The processes print their own one-line errors; torchrun's log of a failure would repeat them
    # as a multi-line report.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as err:
        failed = sorted(err.failures)
        raise UserError(f"{len(failed)} of {n} training processes failed (rank(s) "
                        f"{', '.join(map(str, failed))}); see their messages above") from None


def init(rank: Rank, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device: on
    CUDA cuda:LOCAL_RANK; on the CPU the node's cores are split evenly between its processes
    (unless OMP_NUM_THREADS says how many threads each takes)."""
    cuda = device.type == "cuda"
    if cuda:
        if rank.local_rank >= torch.cuda.device_count():
            from unpaired.errors import UserError
            raise UserError(f"torchrun --nproc-per-node: {rank.local_world_size} processes on this node "
                            f"but only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    elif rank.distributed and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cpu_cores() // rank.local_world_size))
    if rank.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank.rank, world_size=rank.world_size,
                                device_id=device if cuda else None)
    return device


def finish(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.destroy_process_group()
