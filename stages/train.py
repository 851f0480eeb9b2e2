"""train: the prepared data → checkpoints (epoch_NNN.pt, last.pt, samples/) + dvclive logs.

    python -m stages.train --data data/prepared.tar --view data/prepared \
        --out models/checkpoints --live metrics/train

CycleGAN (unpaired/models/cyclegan.py) or CUT / FastCUT (unpaired/models/cut.py), as train.model
says, each with its reference's update order and defaults, configured by params.yaml's `train`
section (TrainParams). Resumable and extendable from out/last.pt; an earlier run that does not fit
is moved aside (unpaired/models/state.py). The dvclive logs are written from the run's own history
and extended after every epoch, so they always match the checkpoints. Rank 0 writes each epoch's
files on a writer thread while the next epoch trains (unpaired/models/writer.py). A run whose
losses or weights stop being finite stops. One train run at a time writes the outputs
(distributed.output_lock).

Data parallel: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each process
trains one DistributedDataParallel replica on its share of every epoch; rank 0 alone decides about
resuming and writes. Without torchrun, or with world size 1, it is the plain one-process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unpaired import distributed, params
from unpaired.devices import autocast_for
from unpaired.distributed import Rank
from unpaired.errors import ArgumentParser, end_process, main_guard
from unpaired.files import mark_settled, remove_stale_temporaries, unpack_view
from unpaired.models.cut import CUT
from unpaired.models.cyclegan import CycleGAN
from unpaired.models.feeding import decoded_bytes, feeder_for, image_files, place_images
from unpaired.models.live import RunLog, restore_earlier_run, settle_logs
from unpaired.models.loop import setup_device, start_run, train_epoch
from unpaired.models.progress import Progress, speed_hint
from unpaired.models.state import aside_runs
from unpaired.models.training import TrainParams


def train(
    p: TrainParams,
    data: Path,
    out: Path,
    live_dir: Path,
    stop_after: int | None = None,
    rank: Rank = Rank(),
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train to p.epochs + p.epochs_decay (or stop after epoch `stop_after`, for tests that simulate
    an interruption). `data`: the prepared folder (trainA/B, testA/B); `out`: the checkpoints
    folder; `live_dir`: the dvclive folder; `device`: from setup_device (main() sets it up before it
    takes the output lock; None: set up here). Returns the final history record (rank 0; other
    ranks return {}). Raises UserError (one line) for unusable data, a shorter schedule than the
    checkpoint's, a checkpoint that does not fit, a train.data_device the images do not fit, and
    non-finite losses or weights."""
    device = setup_device(p, rank) if device is None else device
    files_A, files_B = image_files(data / "trainA"), image_files(data / "trainB")
    placement = place_images(
        p.data_device,
        device,
        decoded_bytes(len(files_A) + len(files_B), p.load_size),
        rank.local_world_size,
        batch_bytes=decoded_bytes(2 * p.batch_size, p.load_size),
    )  # before any output: a setting that does not fit stops here
    state, log = None, None
    aside = aside_runs(out) if rank.main else set()  # earlier runs moved aside before this one
    try:
        model = CycleGAN if p.model == "cyclegan" else CUT  # FastCUT: CUT with its own defaults
        state = start_run(model, p, data, out, device, rank)
        log = RunLog.start(state, placement.why, data, out, live_dir) if rank.main else None
        feeder = feeder_for(p, files_A, files_B, device, state.channels_last, placement, rank)
        autocast = autocast_for(device, p.precision)
        images_per_step = feeder.images_per_epoch * rank.world_size / feeder.steps_per_epoch
        progress = Progress(
            feeder.steps_per_epoch,
            images_per_step,
            state.total,
            speed_hint(device, p),
            state.model.LOSS_NAMES,
        )
        end = state.total if stop_after is None else min(state.total, stop_after)
        while state.epoch < end:
            lr = state.lr
            means, images_per_s = train_epoch(state, feeder, progress, autocast)
            losses = dict(zip(state.model.LOSS_NAMES, means))
            saving = state.end_epoch(losses, out)  # the same on every rank
            if rank.main:
                log.publish(state, losses, lr, images_per_s)
                progress.end_epoch(images_per_s)
            if saving:  # every rank: rank 0 hands the files to its writer, the others wait
                state.save(out, log.writer if rank.main else None)
        if rank.main:
            log.writer.join()  # the last epoch's files are whole (a failed write ends the run)
    finally:
        if rank.main:  # however the run ends, the logs tell the epochs the checkpoints hold
            settle_logs(out, live_dir, log, state)
            if not restore_earlier_run(out, live_dir, aside):  # (a fresh run that saved nothing)
                mark_settled("train")  # so `make repro`'s put-back keeps them
    return log.result(state) if rank.main else {}


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the packed prepared data (a .tar)")
    ap.add_argument(
        "--view", type=Path, required=True, help="its unpacked folder (trainA/B, testA/B)"
    )
    ap.add_argument("--out", type=Path, required=True, help="the checkpoints folder")
    ap.add_argument("--live", type=Path, required=True, help="the dvclive folder")
    args = ap.parse_args(argv)
    # A data-parallel run is launched from outside (dvc.yaml's cmd: unpaired.torchrun); each of its
    # processes runs this with torchrun's rank. session(): signals, parent-death signal, one line.
    with distributed.session() as rank:
        p = params.parse(TrainParams, params.section(params.load(), "train"), "train")
        device = setup_device(p, rank)  # joins the process group: output_lock has barriers
        with distributed.output_lock(args.out, rank):  # one train run at a time, held by every rank
            if rank.main:
                remove_stale_temporaries(
                    args.out, args.out / "samples", args.view.parent
                )  # a killed run's
                if args.data.is_file():  # after a `dvc pull` only the tar is there
                    unpack_view(args.data, args.view)
            rank.barrier()  # (several nodes share one filesystem: rank 0 unpacks)
            train(p, args.view, args.out, args.live, rank=rank, device=device)


if __name__ == "__main__":
    main_guard(main)
    end_process()  # done: skip torch's teardown (errors.end_process)
