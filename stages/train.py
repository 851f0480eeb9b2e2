"""train: the prepared data → checkpoints (epoch_NNN.pt, last.pt, samples/) + dvclive logs.

    python -m stages.train --data data/prepared.tar --view data/prepared --out models/checkpoints \
        --live metrics/train

CycleGAN with the reference update order and defaults (unpaired/training.py), configured by
params.yaml's `train` section. Resumable (unpaired/train_state.py): a last.pt of the same run is
continued, one whose schedule only grew is extended, anything else is moved aside. The dvclive logs
are rewritten from the run's own history after every epoch. A run whose losses stop being finite
stops. One train run at a time writes the outputs (a lock file next to --out).

Data parallel: run under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment); every rank trains
on its share of each epoch; rank 0 alone decides about resuming and writes.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unpaired import threads
threads.passive_wait()   # before torch loads OpenMP, which reads its wait policy only then

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from unpaired import checkpoint, distributed, params  # noqa: E402
from unpaired.devices import autocast_for, bf16_for, resolve_device  # noqa: E402
from unpaired.distributed import Rank  # noqa: E402
from unpaired.errors import main_guard  # noqa: E402
from unpaired.files import output_lock, remove_stale_temporaries, unpack_view  # noqa: E402
from unpaired.progress import Progress, speed_hint  # noqa: E402
from unpaired.samples import fixed_images, grid, triplets  # noqa: E402
from unpaired.train_state import (TrainState, check_finite, check_finite_weights, data_names,  # noqa: E402
                                  read_speeds, resume, save_sample, write_live)
from unpaired.training import (LOSS_NAMES, TrainParams, channels_last_ok, choose_data_device,  # noqa: E402
                               compile_models, distribute, feeder_for, load_folder)

LOG_EVERY = 50   # steps between progress-bar loss updates (each one reads the losses from the device)


@dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes (dvc.yaml's cmd passes them)."""
    data: Path    # the prepared view: trainA, trainB, testA, testB
    out: Path     # the checkpoints
    live: Path    # the dvclive logs


def setup_device(p: TrainParams, rank: Rank) -> torch.device:
    """The training device, with the precision and determinism settings of train.device/precision."""
    device = resolve_device(p.device)
    if rank.distributed:
        device = distributed.init(rank, device)
    threads.apply(p.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda" and not bf16_for(device, p.precision):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def train_one_epoch(s: TrainState, feeder, autocast, progress: Progress, rank: Rank) -> list[float]:
    """One epoch of s.models on this rank's share; returns the mean losses of all ranks (LOSS_NAMES)."""
    for net in s.models.nets():
        net.train()
    plan = feeder.plan(s.g_data)
    s.pool_A.prepare(feeder.images_per_epoch, s.device)
    s.pool_B.prepare(feeder.images_per_epoch, s.device)
    sums = torch.zeros(len(LOSS_NAMES), device=s.device)
    bar = tqdm(feeder.batches(plan), total=feeder.steps_per_epoch, desc=f"epoch {s.epoch + 1}/{s.total}",
               unit="it", leave=False, disable=None if rank.main else True)
    progress.start_epoch(s.epoch + 1, plain=bar.disable and rank.main)
    for step, (real_A, real_B) in enumerate(bar, 1):
        sums += s.step(real_A, real_B, autocast)
        if step % LOG_EVERY == 0 and not bar.disable:   # one device read per LOG_EVERY steps
            bar.set_postfix({k: f"{v:.2f}" for k, v in zip(LOSS_NAMES, (sums / step).tolist())})
        progress.step(step, sums)
    rank.sum(sums)                                                 # losses of all ranks, for the log
    return (sums / (feeder.steps_per_epoch * rank.world_size)).tolist()   # the epoch's one host sync


def train(p: TrainParams, data: Path, out: Path, live_dir: Path, stop_after: int | None = None,
          rank: Rank = Rank()) -> dict[str, Any]:
    """Train to p.epochs + p.epochs_decay (or stop after epoch `stop_after`, for tests that simulate an
    interruption): `data` the prepared view, `out` the checkpoints, `live_dir` the dvclive logs.
    Returns the final history record (rank 0; other ranks return {}).

    `rank`: this process's place in a data-parallel job (joins the process group if not yet done);
    by default the only process. Raises UserError (one line) for unusable data, a shorter schedule
    than the checkpoint's, a checkpoint that does not fit, and non-finite losses or weights."""
    device = setup_device(p, rank)
    images_A = load_folder(data / "trainA", p.load_size)
    images_B = load_folder(data / "trainB", p.load_size)
    state = resume(p, data, out, rank.world_size) if rank.main else None
    if rank.distributed:   # rank 0's decision (it has verified last.pt); the others read the same file
        if rank.gather(state is not None)[0] and not rank.main:
            state = checkpoint.load(out / "last.pt")
    if rank.main:
        out.mkdir(parents=True, exist_ok=True)

    channels_last = device.type == "cuda" and channels_last_ok(device)
    s = TrainState(p, data_names(data), device, channels_last, rank)
    if state is not None:
        s.load_state_dict(state, out / "last.pt")
        if rank.main:
            print(f"train: resuming from {out / 'last.pt'}: epochs 1-{s.epoch} done, "
                  + (f"training from epoch {s.epoch + 1}" if s.epoch < s.total else "nothing left to train"))
    if rank.distributed:
        s.models = distribute(s.models, device)
    if p.compile_mode:
        s.models = compile_models(s.models, p.compile_mode)

    data_device, why = choose_data_device(p.data_device, device, images_A.nbytes + images_B.nbytes)
    feeder = feeder_for(p, images_A, images_B, device, channels_last, data_device, rank)
    if rank.main:
        print(f"train: {why}")
        if rank.distributed:
            print(f"train: {rank.world_size} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
                  f"batch {p.batch_size} each: effective batch {p.batch_size * rank.world_size}, lr "
                  f"{s.lr:.2e} (train.lr_scaling: {p.lr_scaling})")
    sample_A = fixed_images(data / "testA", p.samples, p.crop_size).to(device)
    sample_B = fixed_images(data / "testB", p.samples, p.crop_size).to(device)
    autocast = autocast_for(device, p.precision)
    speeds = read_speeds(live_dir) if s.epoch else {}     # timing lives in the dvclive logs alone
    if rank.main:
        write_live(live_dir, s.history, speeds, out)

    end = s.total if stop_after is None else min(s.total, stop_after)
    images_per_step = feeder.images_per_epoch * rank.world_size / feeder.steps_per_epoch
    progress = Progress(feeder.steps_per_epoch, images_per_step, s.total, speed_hint(device, p))
    while s.epoch < end:
        lr = s.opt_G.param_groups[0]["lr"]
        t0 = time.perf_counter()
        losses = train_one_epoch(s, feeder, autocast, progress, rank)
        seconds = time.perf_counter() - t0
        check_finite(s.epoch + 1, s.total, dict(zip(LOSS_NAMES, losses)), p, out)   # alike on every rank
        s.end_epoch(losses, lr)
        saving = s.epoch % p.save_every == 0 or s.epoch == s.total
        if saving:   # every rank holds the same weights: every rank stops here alike
            check_finite_weights(s, out)
        others = rank.gather(s.rank_state())[1:] if saving else []
        if not rank.main:
            if saving:
                rank.barrier()              # wait for rank 0's checkpoint (see below)
            continue
        speeds[s.epoch] = feeder.images_per_epoch * rank.world_size / seconds
        if len(sample_A) and len(sample_B):
            s.models.G_A.eval()
            s.models.G_B.eval()
            save_sample(out, s.epoch, grid(*triplets(s.models.G_A, s.models.G_B, sample_A, sample_B)))
        print(f"epoch {s.epoch}/{s.total}  " + "  ".join(f"{k} {v:.3f}" for k, v in zip(LOSS_NAMES, losses))
              + f"  lr {lr:.2e}  {speeds[s.epoch]:.1f} img/s", flush=True)
        progress.end_epoch(speeds[s.epoch])
        if saving:
            s.save(out, others)
            rank.barrier()                  # no rank goes on (or exits) before the files are whole
        write_live(live_dir, s.history, speeds, out)
    return s.history[-1] if s.history and rank.main else {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the packed prepared data (data/prepared.tar)")
    parser.add_argument("--view", type=Path, required=True, help="its unpacked view (data/prepared)")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoints folder (models/checkpoints)")
    parser.add_argument("--live", type=Path, required=True, help="the dvclive folder (metrics/train)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p = params.parse(TrainParams, params.section(params.load(), "train"), "train")
    rank = distributed.from_env() or Rank()
    # One train run at a time: a second one stops here, naming the first; rank 0 holds the lock for
    # the job (several nodes share one filesystem).
    with output_lock(args.out) if rank.main else contextlib.nullcontext():
        if rank.distributed:
            distributed.init(rank, resolve_device(p.device))
        if rank.main:
            remove_stale_temporaries(args.out, args.view.parent)   # what a killed run left (.last.pt.tmp-*)
            if args.data.is_file():    # after a `dvc pull` only the tar is there
                unpack_view(args.data, args.view)
        rank.barrier()
        try:
            train(p, args.view, args.out, args.live, rank=rank)
        finally:
            distributed.finish(rank)


if __name__ == "__main__":
    main_guard(main)
