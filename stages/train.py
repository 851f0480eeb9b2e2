"""train: the prepared data → checkpoints (epoch_NNN.pt, last.pt, samples/) + dvclive logs.

    python -m stages.train --data data/prepared.tar --view data/prepared \
        --out models/checkpoints --live metrics/train

CycleGAN with the reference update order and defaults (unpaired/training.py), configured by
params.yaml's `train` section (TrainParams). Resumable and extendable from out/last.pt; an earlier
run that does not fit is moved aside (unpaired/train_state.py). The dvclive logs are rewritten from
the run's own history after every epoch, so they always match the checkpoints. A run whose losses
or weights stop being finite stops. One train run at a time writes the outputs (distributed.output_lock).

Data parallel: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each process
trains one DistributedDataParallel replica on its share of every epoch; rank 0 alone decides about
resuming and writes. Without torchrun, or with world size 1, it is the plain one-process run.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from unpaired import threads
threads.passive_wait()   # before torch loads OpenMP, which reads its wait policy only then

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from unpaired import checkpoint, distributed, params, train_state  # noqa: E402
from unpaired.devices import autocast_for, bf16_for, precision_warning, resolve_device  # noqa: E402
from unpaired.distributed import Rank  # noqa: E402
from unpaired.errors import ArgumentParser, main_guard  # noqa: E402
from unpaired.files import make_dirs, remove_stale_temporaries, unpack_view  # noqa: E402
from unpaired.progress import Progress, speed_hint  # noqa: E402
from unpaired.samples import fixed_images, grid, triplets  # noqa: E402
from unpaired.train_state import TrainState, write_sample as save_sample  # noqa: E402
from unpaired.feeding import DeviceFeeder, decoded_bytes, feeder_for, image_files, place_images  # noqa: E402
from unpaired.training import LOSS_NAMES, TrainParams, channels_last_ok, compile_models, distribute  # noqa: E402

LOG_EVERY = 50   # steps between progress-bar loss updates (each one reads the losses from the device)


def train_one_epoch(state: TrainState, feeder: DeviceFeeder, progress: Progress, autocast,
                    total: int) -> tuple[list[float], float]:
    """Train epoch state.epoch + 1 on every rank. Returns the mean losses over all ranks (LOSS_NAMES
    order) and the images/s of the epoch (all ranks together)."""
    epoch, device, rank = state.epoch + 1, state.device, state.rank
    for net in state.models.nets():
        net.train()
    plan = feeder.plan(state.g_data)
    state.pool_A.prepare(feeder.images_per_epoch, device)
    state.pool_B.prepare(feeder.images_per_epoch, device)
    sums = torch.zeros(len(LOSS_NAMES), device=device)
    t0 = time.perf_counter()
    bar = tqdm(feeder.batches(plan), total=feeder.steps_per_epoch, desc=f"epoch {epoch}/{total}",
               unit="it", leave=False, disable=None if rank.main else True)
    progress.start_epoch(epoch, plain=bar.disable and rank.main)
    for step, (real_A, real_B) in enumerate(bar, 1):
        sums += state.step(real_A, real_B, autocast)
        if step % LOG_EVERY == 0 and not bar.disable:   # one device read per LOG_EVERY steps
            bar.set_postfix({k: f"{v:.2f}" for k, v in zip(LOSS_NAMES, (sums / step).tolist())})
        progress.step(step, sums)
    rank.sum(sums)                                            # losses of all ranks, for the log
    means = (sums / (feeder.steps_per_epoch * rank.world_size)).tolist()   # the epoch's one host sync
    return means, feeder.images_per_epoch * rank.world_size / (time.perf_counter() - t0)


def setup_device(p: TrainParams, rank: Rank) -> torch.device:
    """The training device, its precision settings and threads; joins the process group if any."""
    device = resolve_device(p.device)
    if rank.distributed:
        device = distributed.init(rank, device)
    threads.apply(p.threads)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cuda
    if cuda and not bf16_for(device, p.precision):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    warning = precision_warning(device, p.precision)
    if warning and rank.main:
        print(warning, file=sys.stderr)
    return device


def train(p: TrainParams, data: Path, out: Path, live_dir: Path, stop_after: int | None = None,
          rank: Rank = Rank()) -> dict[str, Any]:
    """Train to p.epochs + p.epochs_decay (or stop after epoch `stop_after`, for tests that simulate
    an interruption). `data`: the prepared folder (trainA/B, testA/B); `out`: the checkpoints
    folder; `live_dir`: the dvclive folder. Returns the final history record (rank 0; other ranks
    return {}). Raises UserError (one line) for unusable data, a shorter schedule than the
    checkpoint's, a checkpoint that does not fit, a train.data_device the images do not fit, and
    non-finite losses or weights."""
    device = setup_device(p, rank)
    files_A, files_B = image_files(data / "trainA"), image_files(data / "trainB")
    placement = place_images(p.data_device, device, decoded_bytes(len(files_A) + len(files_B), p.load_size),
                             rank.local_world_size)      # before any output: a setting that does not fit stops here
    stored, extended = train_state.resume(p, data, out, rank.world_size) if rank.main else (None, [])
    if rank.distributed:   # rank 0's decision (it has verified last.pt); the others read the same file
        resumed, extended = rank.gather((stored is not None, extended))[0]
        if resumed and not rank.main:
            stored = checkpoint.load(out / "last.pt")
    if rank.main:
        make_dirs(out)
    channels_last = device.type == "cuda" and channels_last_ok(device)
    state = TrainState.new(p, device, rank, train_state.data_names(data), channels_last)
    total = p.epochs + p.epochs_decay
    if stored is not None:
        state.load_state_dict(stored, out / "last.pt", extended=bool(extended))
        if rank.main:
            print(f"train: resuming from {out / 'last.pt'}: epochs 1-{state.epoch} done, "
                  + (f"training from epoch {state.epoch + 1}" if state.epoch < total else "nothing left to train"))
    if rank.distributed:
        state.models = distribute(state.models, device)
    if p.compile_mode:
        state.models = compile_models(state.models, p.compile_mode)

    feeder = feeder_for(p, files_A, files_B, device, channels_last, placement, rank)
    speeds = train_state.read_speeds(live_dir, state.epoch) if rank.main else {}   # dvclive only, not last.pt
    if rank.main:
        print(f"train: {placement.why}")
        if rank.distributed:
            print(f"train: {rank.world_size} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
                  f"batch {p.batch_size} each: effective batch {p.batch_size * rank.world_size}, lr "
                  f"{p.scaled_lr(rank.world_size):.2e} (train.lr_scaling: {p.lr_scaling})")
        train_state.write_live(live_dir, state.history, speeds, out)
    sample_A = fixed_images(data / "testA", p.samples, p.crop_size).to(device)
    sample_B = fixed_images(data / "testB", p.samples, p.crop_size).to(device)
    autocast = autocast_for(device, p.precision)
    images_per_step = feeder.images_per_epoch * rank.world_size / feeder.steps_per_epoch
    progress = Progress(feeder.steps_per_epoch, images_per_step, total, speed_hint(device, p))
    end = total if stop_after is None else min(total, stop_after)
    while state.epoch < end:
        lr = state.lr
        means, images_per_s = train_one_epoch(state, feeder, progress, autocast, total)
        epoch = state.epoch + 1
        losses = dict(zip(LOSS_NAMES, means))
        train_state.check_finite(epoch, total, losses, p, out)   # the same on every rank
        state.sched_G.step()
        state.sched_D.step()
        state.epoch = epoch
        saving = epoch % p.save_every == 0 or epoch == total
        if saving:   # every rank holds the same weights: every rank stops here alike
            train_state.check_finite_weights(state.models, epoch, total, p, out)
        others = rank.gather(state.rank_state())[1:] if saving else []
        if not rank.main:
            if saving:
                rank.barrier()              # wait for rank 0's checkpoint (see below)
            continue
        if len(sample_A) and len(sample_B):
            state.models.G_A.eval()
            state.models.G_B.eval()
            save_sample(out, epoch, grid(*triplets(state.models.G_A, state.models.G_B,
                                                                sample_A, sample_B)))
        state.history.append({"epoch": epoch, "metrics": {**losses, "lr": lr}})
        speeds[epoch] = images_per_s
        train_state.write_live(live_dir, state.history, speeds, out)
        print(f"epoch {epoch}/{total}  " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
              + f"  lr {lr:.2e}  {images_per_s:.1f} img/s", flush=True)
        progress.end_epoch(images_per_s)
        if saving:
            state.save(out, others)
            rank.barrier()                  # no rank goes on (or exits) before the files are whole
    if not rank.main or not state.history:
        return {}
    return {**state.history[-1], "metrics": {**state.history[-1]["metrics"],
                                             **({"images_per_s": speeds[state.epoch]} if state.epoch in speeds else {})}}


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the packed prepared data (a .tar)")
    ap.add_argument("--view", type=Path, required=True, help="its unpacked folder (trainA/B, testA/B)")
    ap.add_argument("--out", type=Path, required=True, help="the checkpoints folder")
    ap.add_argument("--live", type=Path, required=True, help="the dvclive folder")
    args = ap.parse_args(argv)
    # A data-parallel run is launched from outside (dvc.yaml's cmd: unpaired.torchrun); each of its
    # processes runs this with torchrun's rank. session(): signals, parent-death signal, one line.
    with distributed.session() as rank:
        p = params.parse(TrainParams, params.section(params.load(), "train"), "train")
        device = resolve_device(p.device)
        distributed.check_devices(p.devices, device)
        distributed.init(rank, device)
        with distributed.output_lock(args.out, rank):   # one train run at a time, held by every rank
            if rank.main:
                remove_stale_temporaries(args.out, args.out / "samples", args.view.parent)   # a killed run's
                if args.data.is_file():     # after a `dvc pull` only the tar is there
                    unpack_view(args.data, args.view)
            rank.barrier()                  # (several nodes share one filesystem: rank 0 unpacks)
            train(p, args.view, args.out, args.live, rank=rank)


if __name__ == "__main__":
    main_guard(main)
