"""The library side of the train stage's loop, for any model (unpaired.models.training.Model): the
training device, set up once per process; the start of a run on every rank (resumed or fresh,
wrapped in DDP, compiled); one epoch of steps on every rank.

Data parallel: each process trains one DistributedDataParallel replica on its share of every epoch;
rank 0 alone decides about resuming and writes (unpaired.models.state, unpaired.models.live).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from unpaired import allocator, checkpoint, distributed, threads
from unpaired.devices import bf16_for, precision_for, precision_warning, resolve_device
from unpaired.distributed import Rank
from unpaired.files import make_dirs
from unpaired.models.feeding import DeviceFeeder
from unpaired.models.progress import Progress
from unpaired.models.state import TrainState, data_names, resume
from unpaired.models.training import Model, TrainParams, use_channels_last

LOG_EVERY = (
    50  # steps between progress-bar loss updates (each one reads the losses from the device)
)


def setup_device(p: TrainParams, rank: Rank) -> torch.device:
    """This process's training device for train.device, resolved once: checks that this node can hold
    train.devices processes, joins the process group if any (under torchrun: cuda:LOCAL_RANK on CUDA,
    the node's cores split on the CPU), then the host allocator (unpaired.allocator), the threads
    (train.threads) and the precision settings (TF32 where fp32 runs on CUDA); prints the precision
    warning (rank 0). Repeatability: the CPU always runs torch's deterministic algorithms; CUDA
    runs them only with train.deterministic (then also cuDNN without autotuning, and
    CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set, which cuBLAS reads when it starts: set here, before
    any CUDA work), else cuDNN autotunes (benchmark mode).
    Raises ParamsError (one line) for a device this machine lacks."""
    if p.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    requested = resolve_device(p.device)
    distributed.check_devices(p.devices, requested)
    device, note = process_device(requested, rank)
    if rank.distributed:
        distributed.init(rank, requested)  # makes cuda:LOCAL_RANK current
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # one process on cuda:N: N is current, not cuda:0
    if note and rank.main:
        print(note)
    allocator.keep_freed_memory()  # a step's freed activations reused, not faulted in again
    threads.apply(p.threads)
    if (
        rank.main
        and device.type == "cpu"
        and (note := threads.load_note("train.threads", p.threads))
    ):
        print(note, flush=True)
    cuda = device.type == "cuda"
    if device.type == "cpu" or p.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cuda and not p.deterministic
    torch.backends.cudnn.deterministic = p.deterministic
    if cuda and not bf16_for(device, p.precision):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    warning = precision_warning(device, p.precision)
    if rank.main:
        if device.type == "cuda":  # which precision, and why (bf16 only where native)
            print(f"train: {precision_for(device, p.precision).why}")
        if warning:
            print(warning, file=sys.stderr)
    return device


def process_device(requested: torch.device, rank: Rank) -> tuple[torch.device, str | None]:
    """The device this process trains on, for train.device resolved to `requested`, and a line
    to print (None: nothing to say). One process trains on `requested` as named (cuda:N included);
    each process of a data-parallel run on CUDA takes cuda:LOCAL_RANK (torchrun's local rank), so
    a cuda:N in params is not used, which the line says."""
    if not rank.distributed or requested.type != "cuda":
        return requested, None
    mine = torch.device("cuda", rank.local_rank)
    if requested.index is None:
        return mine, None
    return mine, (
        f"train: train.device {requested} is not used by a run of {rank.world_size} processes: each "
        f"trains on cuda:LOCAL_RANK (cuda:0 to cuda:{rank.local_world_size - 1} on this node); "
        f"say train.device: cuda (or auto) to silence this"
    )


def resume_on_every_rank(
    model: type[Model], p: TrainParams, data: Path, out: Path, rank: Rank
) -> tuple[dict[str, Any] | None, list[str]]:
    """state.resume's answer on every rank: rank 0 decides (it verifies out/last.pt, and moves an
    earlier run that does not fit aside); the other ranks follow it, reading the same last.pt."""
    stored, extended = resume(model, p, data, out, rank.world_size) if rank.main else (None, [])
    if rank.distributed:
        resumed, extended = rank.gather((stored is not None, extended))[0]
        if resumed and not rank.main:
            stored = checkpoint.load(out / "last.pt")
    return stored, extended


def start_run(
    model: type[Model], p: TrainParams, data: Path, out: Path, device: torch.device, rank: Rank
) -> TrainState:
    """The state a run of `model` starts from, on every rank: out/last.pt's when it can be continued
    (resume_on_every_rank), else a fresh one (TrainState.new); in the memory format of
    train.memory_format (training.use_channels_last); then wrapped in DDP (several processes) and
    compiled (train.compile). `data`: the prepared folder; `out`: the checkpoints folder (rank 0
    makes it). Raises UserError (one line) for a last.pt that cannot be continued, ParamsError for
    channels_last where it computes wrong."""
    channels_last = use_channels_last(
        p.memory_format, device
    )  # before anything is moved or written
    stored, extended = resume_on_every_rank(model, p, data, out, rank)
    if rank.main:
        make_dirs(out)
    state = TrainState.new(model, p, device, rank, data_names(data), channels_last)
    if stored is not None:
        state.load_state_dict(stored, out / "last.pt", extended=bool(extended))
        if rank.main:
            print(
                f"train: resuming from {out / 'last.pt'}: epochs 1-{state.epoch} done, "
                + (
                    f"training from epoch {state.epoch + 1}"
                    if state.epoch < state.total
                    else "nothing left to train"
                )
            )
    if rank.distributed:
        state.model.distribute(device)
    if p.compile_mode:
        state.model.compile(p.compile_mode)
    return state


def train_epoch(
    state: TrainState, feeder: DeviceFeeder, progress: Progress, autocast
) -> tuple[list[float], float]:
    """Train epoch state.epoch + 1 on every rank (state.epoch itself is counted by state.end_epoch).
    Returns the mean losses over all ranks (the model's LOSS_NAMES order) and the images/s of the
    epoch (all ranks together). The losses reach the host once per epoch, and every LOG_EVERY steps
    on a terminal (the progress bar, rank 0).

    Under train.compile: reduce-overhead each step starts with torch.compiler.cudagraph_mark_step_begin():
    CUDA-graph trees otherwise start a new generation at each compiled call without a pending
    backward, here the D step's call, and may then reuse the memory of the G step's outputs, which
    the D step still reads (the pool returns views of them)."""
    epoch, device, rank, names = state.epoch + 1, state.device, state.rank, state.model.LOSS_NAMES
    plan = feeder.plan(state.g_data)
    state.model.start_epoch(feeder.images_per_epoch)
    sums = torch.zeros(len(names), device=device)
    t0 = time.perf_counter()
    bar = tqdm(
        feeder.batches(plan),
        total=feeder.steps_per_epoch,
        desc=f"epoch {epoch}/{state.total}",
        unit="it",
        leave=False,
        disable=None if rank.main else True,
    )
    progress.start_epoch(epoch, plain=bar.disable and rank.main)
    graphs = state.p.compile_mode == "reduce-overhead"
    for step, (real_A, real_B) in enumerate(bar, 1):
        if graphs:  # one step is one CUDA-graph generation (see the docstring)
            torch.compiler.cudagraph_mark_step_begin()
        sums += state.model.step(real_A, real_B, autocast)
        if step % LOG_EVERY == 0 and not bar.disable:  # one device read per LOG_EVERY steps
            bar.set_postfix({k: f"{v:.2f}" for k, v in zip(names, (sums / step).tolist())})
        progress.step(step, sums)
    rank.sum(sums)  # losses of all ranks, for the log
    means = (
        sums / (feeder.steps_per_epoch * rank.world_size)
    ).tolist()  # the epoch's one host sync
    return means, feeder.images_per_epoch * rank.world_size / (time.perf_counter() - t0)
