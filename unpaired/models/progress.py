"""Progress lines and the ETA inside epochs, for logs and CI, and the slow-down warning."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from unpaired import threads

if TYPE_CHECKING:
    from unpaired.models.training import TrainParams

# Without a terminal (logs, CI): a plain progress line when PROGRESS_EVERY_S passed since the last
# one, or at each 10 % of an epoch but at most one per PROGRESS_MIN_GAP_S. Each line reads the
# running losses from the device (one sync), so the rate is bounded on both ends.
PROGRESS_EVERY_S = 60.0
PROGRESS_MIN_GAP_S = 10.0
SLOW_FACTOR = 3.0  # warn once when an epoch runs this many times slower than the first steps did


def _clock_str(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress inside epochs, for logs and CI (no terminal; tqdm's bar is used on terminals), and a
    one-time warning when the run slows down far below what its first steps showed.

    `plain` lines (stdout, flushed): `epoch 2/6  step 120/480 (25%)  3.4 img/s  ETA 1:45 (run
    12:30)  G_A 0.512 ...` with the running mean losses, at a bounded rate (PROGRESS_EVERY_S,
    PROGRESS_MIN_GAP_S). The first steps' speed is measured over steps 2..11 of the first epoch
    this process trains (step 1 warms up); `hint` is the setting to try, named in the warning;
    `names` the model's loss names (Model.LOSS_NAMES), in the order of the sums `step` is given.
    `clock` returns seconds (time.perf_counter)."""

    def __init__(
        self,
        steps: int,
        images_per_step: float,
        total: int,
        hint: str,
        names: tuple[str, ...],
        every_s: float | None = None,
        min_gap_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.steps, self.images_per_step, self.total, self.hint = (
            steps,
            images_per_step,
            total,
            hint,
        )
        self.names = names
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.min_gap_s = PROGRESS_MIN_GAP_S if min_gap_s is None else min_gap_s
        self.clock = clock
        self.baseline: float | None = None  # images/s of the first steps
        self.warned = False
        self.base_end = min(steps, 11)

    def start_epoch(self, epoch: int, plain: bool) -> None:
        self.epoch, self.plain = epoch, plain
        self.t0 = self.last = self.clock()
        self.t1: float | None = None
        self.next_mark = 1

    def step(self, step: int, sums: torch.Tensor) -> None:
        """After each step; reads the device only at the bounded moments."""
        now = self.clock()
        if step == 1:
            self.t1 = now
        elif self.baseline is None and step == self.base_end and self.t1 is not None:
            sums.sum().item()  # wait for the device: true timing
            now = self.clock()
            self.baseline = (step - 1) * self.images_per_step / max(now - self.t1, 1e-9)
        if not self.plain or step >= self.steps:  # the epoch line covers the end
            return
        marked = step * 10 >= self.next_mark * self.steps
        if not (now - self.last >= self.every_s or (marked and now - self.last >= self.min_gap_s)):
            return
        while self.next_mark * self.steps <= step * 10:
            self.next_mark += 1
        means = (sums / step).tolist()  # the one device read of this line
        now = self.clock()
        self.last = now
        rate = step / max(now - self.t0, 1e-9)  # steps/s in this epoch
        left = self.steps - step
        run_left = left + (self.total - self.epoch) * self.steps
        print(
            f"epoch {self.epoch}/{self.total}  step {step}/{self.steps} ({100 * step // self.steps}%)  "
            f"{rate * self.images_per_step:.1f} img/s  ETA {_clock_str(left / rate)} "
            f"(run {_clock_str(run_left / rate)})  "
            + "  ".join(f"{k} {v:.3f}" for k, v in zip(self.names, means)),
            flush=True,
        )
        self.check_speed(rate * self.images_per_step)

    def end_epoch(self, images_per_s: float) -> None:
        if self.baseline is None:  # epochs too short to measure steps
            self.baseline = images_per_s
        self.check_speed(images_per_s)

    def check_speed(self, images_per_s: float) -> None:
        if self.warned or self.baseline is None or images_per_s * SLOW_FACTOR > self.baseline:
            return
        self.warned = True
        print(
            f"train: warning: epoch {self.epoch} runs at {images_per_s:.2f} img/s, "
            f"{self.baseline / max(images_per_s, 1e-9):.0f}x slower than its first steps "
            f"({self.baseline:.2f} img/s): other work is probably sharing the machine; {self.hint}",
            flush=True,
        )


def speed_hint(device: torch.device, p: TrainParams) -> str:
    if device.type != "cpu":
        return "stop the other work on the device, or train on another one"
    if torch.get_num_threads() > 1:
        fewer = f"params.yaml: train.threads: 1 (now {threads.describe(p.threads)}; other bytes)"
        if (os.environ.get(threads.WAIT_POLICY) or "").upper() != "PASSIVE":
            return (
                f"its idle threads spin: stop it and run again with OMP_WAIT_POLICY=PASSIVE in the "
                f"environment (it resumes, with the same bytes), or try {fewer}, or stop the other work"
            )
        return f"try {fewer}, or stop the other work"
    return "stop the other work, or train on another machine"
