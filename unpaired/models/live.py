"""Rank 0's outputs besides the checkpoints: the dvclive logs (metrics/train), rewritten whole from the
run's own history after every epoch, so they always match the checkpoints, and each epoch's sample
grid and line on stdout (RunLog).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unpaired.files import creating, make_dirs
from unpaired.models.samples import fixed_images, grid, sample_path, write_sample
from unpaired.models.state import TrainState


def reset_live(live_dir: Path) -> None:
    """Empty the dvclive folder for a rebuilt log, keeping the .gitignore files DVC writes there
    (tracked in git: `metrics/train/plots/.gitignore`)."""
    if not live_dir.exists():
        return
    keep = {f: f.read_bytes() for f in live_dir.rglob(".gitignore")}
    with creating(live_dir):
        shutil.rmtree(live_dir)
    for f, content in keep.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content)


def read_speeds(live_dir: Path, last_epoch: int) -> dict[int, float]:
    """{epoch: images/s} of epochs 1..last_epoch from an existing dvclive log (timing lives there
    alone, never in last.pt), so a resumed run's log keeps them; {} when there is none to read."""
    import csv

    try:
        with open(live_dir / "plots" / "metrics" / "images_per_s.tsv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        speeds = {int(r["step"]): float(r["images_per_s"]) for r in rows}
    except (OSError, KeyError, ValueError, TypeError):
        return {}
    return {e: v for e, v in speeds.items() if 1 <= e <= last_epoch}


def write_live(
    live_dir: Path, history: list[dict[str, Any]], speeds: dict[int, float], out: Path
) -> None:
    """Write the dvclive logs afresh from the run's own history (the losses and lr of every epoch),
    this process's images/s per epoch (`speeds`, not kept in last.pt) and the sample PNGs in out/
    samples/. Called after every epoch, so the logs are whole at the end even when another process
    (a refused concurrent `dvc repro`) deleted them meanwhile."""
    from dvclive import Live  # imported here: dvclive pulls in dvc, slow to import for other users

    reset_live(live_dir)
    live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)
    for record in history:
        live.step = record["epoch"]
        for name, value in record["metrics"].items():
            live.log_metric(name, value)
        if record["epoch"] in speeds:
            live.log_metric("images_per_s", speeds[record["epoch"]])
        png = sample_path(out, record["epoch"])
        if png.is_file():
            with Image.open(png) as image:
                live.log_image(f"samples/{png.name}", image.copy())
        live.make_summary()
    live.end()
    make_dirs(live_dir / "plots" / "images")  # a declared output, even empty


class RunLog:
    """Rank 0's publishing of a run in `out` (the checkpoints folder) and `live_dir` (the dvclive
    folder): `start` opens it, `publish` closes each epoch (sample grid, history record, logs, the
    epoch line), `result` is the final history record. The images/s of each epoch (`speeds`) live in
    the dvclive log alone, never in last.pt: a resumed run reads them back from there. `sample_A`,
    `sample_B`: the fixed test images of the sample grid, N×3×crop×crop in [-1, 1] on the device."""

    def __init__(
        self,
        out: Path,
        live_dir: Path,
        speeds: dict[int, float],
        sample_A: torch.Tensor,
        sample_B: torch.Tensor,
    ):
        self.out, self.live_dir, self.speeds = out, live_dir, speeds
        self.sample_A, self.sample_B = sample_A, sample_B

    @classmethod
    def start(cls, state: TrainState, where: str, data: Path, out: Path, live_dir: Path) -> RunLog:
        """The run's opening lines (`where`: where the training images live; with several processes,
        how they share a batch), the logs of the epochs already done (state.history), and the first
        train.samples images of data/testA and data/testB, resized to train.crop_size."""
        p, rank = state.p, state.rank
        speeds = read_speeds(live_dir, state.epoch)
        print(f"train: {where}")
        if rank.distributed:
            print(
                f"train: {rank.world_size} processes ({'NCCL' if state.device.type == 'cuda' else 'gloo'}), "
                f"batch {p.batch_size} each: effective batch {p.batch_size * rank.world_size}, lr "
                f"{p.scaled_lr(rank.world_size):.2e} (train.lr_scaling: {p.lr_scaling})"
            )
        write_live(live_dir, state.history, speeds, out)
        return cls(
            out,
            live_dir,
            speeds,
            fixed_images(data / "testA", p.samples, p.crop_size).to(state.device),
            fixed_images(data / "testB", p.samples, p.crop_size).to(state.device),
        )

    def publish(
        self, state: TrainState, losses: dict[str, float], lr: float, images_per_s: float
    ) -> None:
        """After epoch state.epoch (its `losses`: all ranks' means, the `lr` it ran at, the images/s of
        all ranks together): its sample grid PNG, its history record, the dvclive logs, its line."""
        epoch = state.epoch
        if len(self.sample_A) and len(self.sample_B):
            write_sample(
                self.out, epoch, grid(*state.model.sample_rows(self.sample_A, self.sample_B))
            )
        state.history.append({"epoch": epoch, "metrics": {**losses, "lr": lr}})
        self.speeds[epoch] = images_per_s
        write_live(self.live_dir, state.history, self.speeds, self.out)
        print(
            f"epoch {epoch}/{state.total}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
            + f"  lr {lr:.2e}  {images_per_s:.1f} img/s",
            flush=True,
        )

    def result(self, state: TrainState) -> dict[str, Any]:
        """The last history record, with its epoch's images/s when known; {} when nothing was trained."""
        if not state.history:
            return {}
        last = state.history[-1]
        speed = {"images_per_s": self.speeds[state.epoch]} if state.epoch in self.speeds else {}
        return {**last, "metrics": {**last["metrics"], **speed}}
