"""Rank 0's outputs besides the checkpoints: the dvclive logs (metrics/train), written whole from the
run's own history when the run starts, then extended by each epoch (rewritten whole instead when
they are not what this run last wrote: another process deleted or changed them), and at every exit
cut to the epochs the checkpoints hold, so they always match the checkpoints; each epoch's sample
grid and line on stdout (RunLog). The files are written off the training thread, in order, by the
run's Writer (unpaired.models.writer), which every exit waits for.

Timing (images/s per epoch) is kept out of last.pt (no clock in an artifact) but must outlive the
logs, which DVC deletes before it runs the stage: it is kept beside the checkpoints too, in
out/.images_per_s.json (SPEEDS), which .dvcignore leaves out of the output's hash, and which moves
aside with the run's checkpoints; each epoch's images/s there is kept with that epoch's losses and
lr, and read back only for the same record. So a run resumed under `dvc repro`, even with nothing
left to train, logs the images/s of every epoch again.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unpaired import checkpoint
from unpaired.errors import uninterrupted
from unpaired.files import atomic_write_json, creating, make_dirs
from unpaired.models.samples import fixed_images, grid, sample_path, write_sample
from unpaired.models.state import TrainState, move_back
from unpaired.models.writer import Writer


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


SPEEDS = ".images_per_s.json"  # in the checkpoints folder (.dvcignore names it): {"epoch": {"images_per_s":
# float, "metrics": that epoch's history record}}


def read_speeds(live_dir: Path, out: Path, history: list[dict[str, Any]]) -> dict[int, float]:
    """{epoch: images/s} of the epochs of `history` (the run's, from last.pt; timing is never in
    it), so a resumed run's log keeps them: from out/SPEEDS, each only where the losses and lr
    stored beside it are that epoch's record in `history` (the file stays in the folder when `dvc
    exp apply` or `dvc checkout` brings another run's checkpoints: DVC ignores it), else from an
    existing dvclive log (a run of an older version); {} when neither can be read."""
    import csv

    records = {r["epoch"]: r["metrics"] for r in history}
    speeds: dict[int, float] = {}
    try:
        with open(live_dir / "plots" / "metrics" / "images_per_s.tsv", newline="") as f:
            speeds.update(
                {
                    int(r["step"]): float(r["images_per_s"])
                    for r in csv.DictReader(f, delimiter="\t")
                }
            )
    except (OSError, KeyError, ValueError, TypeError):
        pass
    try:
        kept = json.loads((out / SPEEDS).read_text())
        speeds.update(
            {
                int(e): float(v["images_per_s"])
                for e, v in kept.items()
                if v.get("metrics") == records.get(int(e), {})
            }
        )
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        pass
    return {e: v for e, v in speeds.items() if e in records}


def write_speeds(out: Path, history: list[dict[str, Any]], speeds: dict[int, float]) -> None:
    """out/SPEEDS: each epoch's images/s with its history record (read_speeds checks it)."""
    atomic_write_json(
        out / SPEEDS,
        {
            str(r["epoch"]): {"images_per_s": speeds[r["epoch"]], "metrics": r["metrics"]}
            for r in history
            if r["epoch"] in speeds
        },
    )


def write_live(
    live_dir: Path, history: list[dict[str, Any]], speeds: dict[int, float], out: Path
) -> None:
    """Write the dvclive logs afresh from the run's own history (the losses and lr of every epoch),
    this process's images/s per epoch (`speeds`, not kept in last.pt) and the sample PNGs in out/
    samples/. Called after every epoch, so the logs are whole at the end even when another process
    (a refused concurrent `dvc repro`) deleted them meanwhile. Every declared output is there, even
    for no epoch (metrics.json `{}`, empty plot folders): none is left for `make repro` to put back
    from an earlier run."""
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
    for folder in ("images", "metrics"):  # declared outputs, even empty
        make_dirs(live_dir / "plots" / folder)


def append_live(live_dir: Path, record: dict[str, Any], speed: float | None, out: Path) -> None:
    """Extend dvclive logs that hold the epochs before record["epoch"] (as write_live wrote them) by
    that epoch: its losses and lr, its images/s (`speed`, None: unknown) and its sample PNG in out/
    samples/; metrics.json then summarises it, as write_live's would. One row per plot file and one
    image, where write_live rewrites every epoch's."""
    from dvclive import Live

    live = Live(str(live_dir), resume=True, save_dvc_exp=False, dvcyaml=False, report=None)
    live.step = record["epoch"]
    for name, value in record["metrics"].items():
        live.log_metric(name, value)
    if speed is not None:
        live.log_metric("images_per_s", speed)
    png = sample_path(out, record["epoch"])
    if png.is_file():
        with Image.open(png) as image:
            live.log_image(f"samples/{png.name}", image.copy())
    live.make_summary()
    live.end()


def _summary(live_dir: Path) -> bytes | None:
    try:
        return (live_dir / "metrics.json").read_bytes()
    except OSError:
        return None


class RunLog:
    """Rank 0's publishing of a run in `out` (the checkpoints folder) and `live_dir` (the dvclive
    folder): `start` opens it, `publish` closes each epoch (sample grid, history record, logs, the
    epoch line), `result` is the final history record; settle_logs closes it at every end of the
    run. The images/s of each epoch (`speeds`) are never in last.pt: they are kept in out/SPEEDS and
    the dvclive log, and a resumed run reads them back. `sample_A`,
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
        self.writer = Writer()
        self.logged: tuple[int, bytes | None] | None = None  # (last epoch, metrics.json) written

    def _write_logs(self, history: list[dict[str, Any]], speeds: dict[int, float]) -> None:
        """On the writer thread: the dvclive logs of `history`, extended by its last epoch when
        they hold what this run wrote last (the epochs before it), else rewritten whole."""
        last = history[-1]["epoch"] if history else 0
        if (
            self.logged is not None
            and self.logged[0] == last - 1
            and self.logged[1] is not None
            and self.logged[1] == _summary(self.live_dir)
            and (self.live_dir / "plots" / "metrics").is_dir()
        ):
            append_live(self.live_dir, history[-1], speeds.get(last), self.out)
        else:
            write_live(self.live_dir, history, speeds, self.out)
        self.logged = (last, _summary(self.live_dir))

    @classmethod
    def start(cls, state: TrainState, where: str, data: Path, out: Path, live_dir: Path) -> RunLog:
        """The run's opening lines (`where`: where the training images live; with several processes,
        how they share a batch), the logs of the epochs already done (state.history), and the first
        train.samples images of data/testA and data/testB, resized to train.crop_size."""
        p, rank = state.p, state.rank
        speeds = read_speeds(live_dir, out, state.history)
        print(f"train: {where}")
        if rank.distributed:
            print(
                f"train: {rank.world_size} processes ({'NCCL' if state.device.type == 'cuda' else 'gloo'}), "
                f"batch {p.batch_size} each: effective batch {p.batch_size * rank.world_size}, lr "
                f"{p.scaled_lr(rank.world_size):.2e} (train.lr_scaling: {p.lr_scaling})"
            )
        log = cls(
            out,
            live_dir,
            speeds,
            fixed_images(data / "testA", p.samples, p.crop_size).to(state.device),
            fixed_images(data / "testB", p.samples, p.crop_size).to(state.device),
        )
        log.writer.submit(log._write_logs, list(state.history), dict(speeds))
        return log

    def publish(
        self, state: TrainState, losses: dict[str, float], lr: float, images_per_s: float
    ) -> None:
        """After epoch state.epoch (its `losses`: all ranks' means, the `lr` it ran at, the images/s of
        all ranks together): its history record and line, now; its sample grid (computed now) PNG,
        the images/s file and the dvclive logs, handed to the writer thread once the previous
        epoch's writes are done (raises what one of those raised)."""
        self.writer.join()
        epoch = state.epoch
        sample = (
            grid(*state.model.sample_rows(self.sample_A, self.sample_B)).cpu()
            if len(self.sample_A) and len(self.sample_B)
            else None
        )
        state.history.append({"epoch": epoch, "metrics": {**losses, "lr": lr}})
        self.speeds[epoch] = images_per_s
        history, speeds = list(state.history), dict(self.speeds)
        if sample is not None:
            self.writer.submit(write_sample, self.out, epoch, sample)
        self.writer.submit(write_speeds, self.out, history, speeds)
        self.writer.submit(self._write_logs, history, speeds)
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


def settle_logs(out: Path, live_dir: Path, log: RunLog | None, state: TrainState | None) -> None:
    """At every end of a run, finished, interrupted or failed (rank 0): wait for the run's writer
    (its files are whole after it; a write that failed while the run was ending otherwise is said
    in one line on stderr), then make the dvclive logs (and metrics.json) tell the epochs whose
    epoch_NNN.pt is in `out`, so that they and the checkpoints are one run's. With the run's `log`
    and `state`: rewritten when they show epochs past the last one saved (train.save_every, or an
    end between an epoch's log and its save). Without them (the run ended before its log was
    written): an empty log when `out` exists and holds no epoch (a fresh start has moved the
    earlier checkpoints aside, and `make repro` would put that run's logs back beside none), else
    left as they are. Ctrl-C is ignored meanwhile: the run is ending anyway."""
    if log is not None:
        with uninterrupted():
            lost = log.writer.close()
        if lost is not None:
            detail = " ".join(str(lost).split()) or type(lost).__name__
            print(f"train: writing the run's files failed as it ended: {detail}", file=sys.stderr)
    saved = max(checkpoint.epoch_files(out), default=0)
    if log is not None and state is not None:
        if any(r["epoch"] > saved for r in state.history):
            with uninterrupted():
                write_live(
                    live_dir, [r for r in state.history if r["epoch"] <= saved], log.speeds, out
                )
    elif not saved and out.is_dir():  # (no `out`: the run stopped before it touched anything)
        with uninterrupted():
            write_live(live_dir, [], {}, out)


def restore_earlier_run(out: Path, live_dir: Path, before: set[str]) -> bool:
    """At the end of a fresh run that saved no epoch (interrupted or failed before its first
    checkpoint), rank 0: the earlier checkpoints it moved aside come back to `out` (move_back) and
    the dvclive logs are written from their last.pt's history, so the outputs are the earlier
    run's again, as before this run (under `make repro` the put-back then restores dvc.lock's logs
    too). Says so in one line. Returns True when they came back. Ctrl-C is ignored meanwhile."""
    with uninterrupted():
        back = move_back(out, before)
        if back is None:
            return False
        history: list[dict[str, Any]] = []
        try:
            last = checkpoint.load(out / "last.pt")
            saved = max(checkpoint.epoch_files(out), default=0)
            history = [r for r in last.get("history", []) if r["epoch"] <= saved]
        except (checkpoint.CheckpointError, OSError, KeyError, TypeError):
            pass  # an unreadable last.pt: the logs say no epoch, as a fresh start would
        write_live(live_dir, history, read_speeds(live_dir, out, history), out)
    print(
        f"train: this run saved no epoch; moved the earlier checkpoints back from {back}/ to {out}/"
    )
    return True
