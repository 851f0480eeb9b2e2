"""Data-parallel training over several processes with PyTorch's own engine (torch.distributed).

A data-parallel run is launched from outside the stage, by torchrun: the train stage's `cmd` in
dvc.yaml runs `python -m unpaired.torchrun --standalone --nproc-per-node ${train.devices} -m
stages.train ...` (unpaired/torchrun.py: torchrun with no orphans and one-line failures); on several
nodes it is run by hand on each (README, "Several GPUs and nodes"). Each process reads its place
from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE: from_env), and
joins the process group (init): NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the
CPU (the cores split between the processes of a node). Without torchrun's variables (or at world
size 1) a process is the plain one-process case: no process group.

session() is the frame of a stage's main() (signals, parent-death signal, failures recorded for
the launcher, the process group left at the end); output_lock() keeps one run at a time on an
output folder, held by every process of the run until the last one ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from unpaired import params
from unpaired.errors import UserError, main_guard
from unpaired.files import creating, make_dirs
from unpaired.threads import cpu_count as cpu_cores  # the CPUs of this process's affinity mask
from unpaired.torchrun import parent_death_signal, record_failure


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
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable state, e.g. the pools).
        Every tensor in `obj` travels as a compact CPU copy (host_copies), so every rank receives
        CPU tensors whatever device the sender's lived on."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, host_copies(obj))
        return out


def host_copies(obj):
    """`obj` with every tensor in it (inside dicts, lists and tuples, at any depth) replaced by a
    detached copy in CPU memory that owns only its own elements; anything else as it is.

    For torch.distributed's object collectives, which pickle what they are given: a CUDA tensor is
    unpickled by every receiver onto the sender's device (rank 1's cuda:1 pool would reach rank 0
    as cuda:1 tensors, on a GPU rank 0 does not train on), and a view pickles the whole storage it
    is a view of (a pool's remaining draws are slices of the epoch's)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copies(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copies(v) for v in obj)
    return obj


def from_env() -> Rank | None:
    """The Rank torchrun's variables describe, or None when this process was not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return Rank(
        int(os.environ["RANK"]),
        world,
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )


def check_devices(n: int, device: torch.device, key: str = "train.devices") -> None:
    """One line naming `key` when this node cannot hold n processes: one GPU each on CUDA, at least
    one core each on the CPU (threads are split between them), a single device on MPS; or when
    n > 1 but this process was not started by torchrun: nothing would start the other n - 1.
    (Under torchrun, torchrun's options say how many processes there are.)"""
    if n <= 1:
        return
    if device.type == "cuda":
        have = torch.cuda.device_count()
        params.check(
            n <= have,
            key,
            f"{n} processes requested but only {have} CUDA device(s) here; "
            f"use {key}: {have} or less",
        )
    elif device.type == "mps":
        params.fail(key, f"{n} processes requested but MPS is one device; use {key}: 1")
    else:
        have = cpu_cores()
        params.check(
            n <= have,
            key,
            f"{n} processes requested but only {have} CPU core(s) here (each "
            f"process needs one); use {key}: {have} or less",
        )
    if from_env() is None:
        params.fail(
            key,
            f"{n} processes are started by torchrun, not by the stage: run `uv run dvc "
            f"repro train` (its command starts them), or by hand `python -m unpaired.torchrun "
            f"--standalone --nproc-per-node {n} -m stages.train ...` (the command in dvc.yaml); "
            f"for one process use {key}: 1",
        )


# How long a rank waits in a collective before the process group gives up on it (NCCL's watchdog
# aborts the process; gloo raises). NCCL's own default is 10 minutes, and the train stage's other
# ranks wait in a collective while rank 0 alone does work that grows with the data and the run:
# unpacking the prepared tar (sha256 of the tar, then every file checked against SHA256SUMS), on
# resume loading and verifying last.pt and every epoch_NNN.pt (zip CRCs, torch.load, content digest),
# and after an epoch writing the sample grid, the dvclive logs and the checkpoints (fsync'd). At the
# paper's setting (ngf 64, 9 blocks: last.pt about 0.35 GB, each epoch file 0.09 GB; 40 epoch files
# at save_every 5) and a multi-GB tar on a network disk of ~100 MB/s, that is minutes, near or past
# 10. 30 minutes is gloo's own default (CPU runs keep the timeout they had) and leaves several times
# that margin on NCCL; the cost is that a genuine hang of a GPU collective is noticed after 30
# minutes instead of 10 (a rank that dies is noticed at once: unpaired.torchrun stops the others).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def init(rank: Rank, device: torch.device, timeout: timedelta | None = None) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device: on
    CUDA cuda:LOCAL_RANK; on the CPU the node's cores are split evenly between its processes
    (unless OMP_NUM_THREADS says how many threads each takes). `timeout`: how long a collective
    waits for the other ranks (default COLLECTIVE_TIMEOUT, read at call time)."""
    cuda = device.type == "cuda"
    if cuda:
        if rank.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun --nproc-per-node: {rank.local_world_size} processes on this node "
                f"but only {torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    elif rank.distributed and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cpu_cores() // rank.local_world_size))
    if rank.distributed and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank.rank,
            world_size=rank.world_size,
            device_id=device if cuda else None,
            timeout=COLLECTIVE_TIMEOUT if timeout is None else timeout,
        )
    return device


def finish(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _as_printed(err: BaseException) -> tuple[str, int]:
    """What unpaired.errors.main_guard prints for `err` (stderr) and the status it exits with; a
    bug's traceback and status 1 when main_guard lets it through."""
    trace = "".join(traceback.format_exception(err))

    def fail() -> None:
        raise err

    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out):
            main_guard(fail)
    except SystemExit as done:
        return out.getvalue(), done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 (main_guard lets bugs through: they keep their traceback)
        pass
    return trace, 1


@contextlib.contextmanager
def session() -> Iterator[Rank]:
    """The frame of a stage's main(), around everything it does (params included). Yields this
    process's Rank: torchrun's (from_env), or rank 0 of 1.

    - SIGTERM and SIGHUP stop the process as Ctrl-C does (KeyboardInterrupt: `interrupted`, status
      130, the lock released), in a one-process run as in each rank.
    - Under torchrun: SIGKILL when the launcher dies (prctl PR_SET_PDEATHSIG, for a torchrun run by
      hand; unpaired.torchrun's workers have it from their first instruction); any failure is
      recorded for the launcher (what main_guard would print and its status: unpaired.torchrun
      prints the first rank's) and the process exits with that status, printing nothing, so that
      the other ranks' consequent errors (a peer gone in a collective) never reach the terminal;
      at the end the process group is left (finish).
    Join the process group with init(rank, device) inside, once the device is known."""
    before = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        rank = from_env()
        if rank is None:
            yield Rank()
            return
        parent_death_signal(signal.SIGKILL)
        try:
            yield rank
        except SystemExit:
            raise
        except BaseException as err:  # noqa: BLE001 (KeyboardInterrupt too: one record, no print)
            # The launcher's SIGTERM (it stops the other ranks once one failed) must not turn this
            # failure into a second message: no more signals, and no goodbye to the process group
            # (a peer may be gone: destroy_process_group could wait for it).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
            text, status = _as_printed(err)
            if not record_failure(text, status):
                signal.pthread_sigmask(
                    signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
                )
                raise
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
        finish(rank)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def lock_holder() -> int:
    """The PID whose `kill` stops this whole run: torchrun's launcher (this process's parent)
    under torchrun, else this process."""
    return os.getppid() if from_env() is not None else os.getpid()


def _refuse(out: Path, fd: int) -> UserError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    return UserError(
        f"{out}: another train run (PID {holder}) is writing it; wait for it to end, "
        f"or stop it (kill {holder}) and run again"
    )


@contextlib.contextmanager
def output_lock(out: Path, rank: Rank = Rank()) -> Iterator[None]:
    """Hold `out` for one run: flock on `.<out name>.lock` next to it (not inside: `out` is a DVC
    output), taken by every process of the run and released by the kernel when the last of them
    ends, however it ends (kill -9 included). The file names lock_holder(). Raises UserError
    naming the holder when another run holds it. Every rank calls it (it has barriers).

    Rank 0 takes the lock exclusively (no process of any other run holds it), writes the holder,
    then, in a run of several processes, turns it shared; then the other ranks take it shared.
    Another run's rank 0 cannot take it exclusively while any of them lives."""
    make_dirs(out.parent)
    path = out.parent / f".{out.name}.lock"
    fd = -1
    if rank.main:
        with creating(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(out, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{lock_holder()}\n".encode(), 0)
        if rank.distributed:
            try:  # not atomic: another run's rank 0 may win in between; this run then stops
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _refuse(out, fd) from None
    rank.barrier()
    if not rank.main:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(out, fd) from None
    rank.barrier()
    try:
        yield
    finally:
        os.close(fd)  # releases this process's hold
