"""train: data/prepared → models/checkpoints/ (epoch_NNN.pt, last.pt) + metrics/train/ (dvclive).

    python -m stages.train

CycleGAN with the reference update order and defaults (see unpaired/training.py). Resumable: if
models/checkpoints/last.pt exists and was written by a run with the same train params and the same
prepared data, training continues from it; if only the schedule length (train.epochs,
train.epochs_decay) grew, the run is extended from it; otherwise it starts afresh, names the keys
that differ and moves the earlier run's checkpoints to models/checkpoints.previous/<time>/. The
dvclive logs are rebuilt from the history stored in last.pt, so they always match the checkpoints.
Checkpoints are verified before they are resumed from; a run whose losses stop being finite stops.
One train run at a time writes the outputs (a lock file, models/.checkpoints.lock).

With train.devices: N > 1, main() starts N copies of this stage through torch.distributed.run
(unpaired/distributed.py); each runs train() with its Rank and trains one DistributedDataParallel
model on its share of every epoch; rank 0 alone decides about resuming and writes. Run by hand under
torchrun (several nodes), the stage skips the launch and trains as the rank torchrun says.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unpaired import threads
threads.passive_wait()   # before torch loads OpenMP, which reads its wait policy only then

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from unpaired import checkpoint, distributed, params  # noqa: E402
from unpaired.errors import UserError, main_guard  # noqa: E402
from unpaired.devices import check_device, resolve_device  # noqa: E402
from unpaired.files import remove_stale_temporaries, unpack_view  # noqa: E402
from unpaired.distributed import Rank  # noqa: E402
from unpaired.samples import fixed_images, grid, triplets  # noqa: E402
from unpaired.training import (LOSS_NAMES, DeviceFeeder, ImagePool, build_models, channels_last_ok,  # noqa: E402
                               choose_data_device, compile_models, distribute, load_folder, lr_factor,
                               optimizers, train_step)

DATA = Path("data/prepared")
PACKED = Path("data/prepared.tar")
CHECKPOINTS = Path("models/checkpoints")
LIVE = Path("metrics/train")
# Params that do not change the numbers a run produces: editing them keeps a resumable last.pt.
NOT_HASHED = ("save_every", "compile", "samples", "threads", "devices", "data_device")
COMPILE_MODES = ("default", "reduce-overhead")
SCHEDULE = ("epochs", "epochs_decay")   # the keys along which a finished run can be extended
LOG_EVERY = 50   # steps between progress-bar loss updates (each one reads the losses from the device)
# Without a terminal (logs, CI): a plain progress line when PROGRESS_EVERY_S passed since the last
# one, or at each 10 % of an epoch but at most one per PROGRESS_MIN_GAP_S. Each line reads the
# running losses from the device (one sync), so the rate is bounded on both ends.
PROGRESS_EVERY_S = 60.0
PROGRESS_MIN_GAP_S = 10.0
SLOW_FACTOR = 3.0   # warn once when an epoch runs this many times slower than the first steps did


@dataclass(frozen=True)
class TrainParams(params.Params):
    epochs: int = 3                  # epochs at the initial learning rate
    epochs_decay: int = 3            # then epochs of linear decay towards 0
    lr: float = 0.0002
    beta1: float = 0.5
    lambda_cycle: float = 10.0       # λ for each cycle loss
    lambda_identity: float = 0.5     # identity loss weight, × lambda_cycle (0 disables)
    pool_size: int = 50
    ngf: int = 16
    ndf: int = 32
    n_blocks: int = 6
    n_layers: int = 3                # discriminator conv layers (3 = 70×70 PatchGAN)
    load_size: int = 72              # images are resized to this ...
    crop_size: int = 64              # ... then randomly cropped to this
    no_flip: bool = False
    batch_size: int = 1
    save_every: int = 1              # epochs between checkpoints (the last epoch is always saved)
    samples: int = 4                 # test images per direction in the per-epoch sample image
    seed: int = 0
    device: str = "auto"             # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    precision: str = "auto"          # auto (bf16 on CUDA, else fp32), bf16, fp32 (TF32 on CUDA)
    compile: bool | str = False      # false, default or reduce-overhead (torch's modes; true = default)
    batched_passes: bool = True      # run independent network passes of a step as one batch
    devices: int = 1                 # processes (one per GPU, or CPU processes) on this node, via torchrun
    lr_scaling: str = "none"         # none, linear or sqrt: lr × 1, world size, √(world size)
    data_device: str = "auto"        # auto, device or host: where the training images live (CUDA)
    threads: int | str = "auto"      # CPU threads: auto (CPUs - 1, at least 1) or N; passive OpenMP wait

    def validate(self, prefix: str) -> None:
        c = params.check
        for key in ("epochs", "ngf", "ndf", "n_blocks", "n_layers", "batch_size", "save_every"):
            c(getattr(self, key) >= (0 if key == "n_blocks" else 1), f"{prefix}.{key}",
              f"must be >= {0 if key == 'n_blocks' else 1}, got {getattr(self, key)}")
        c(self.epochs_decay >= 0, f"{prefix}.epochs_decay", f"must be >= 0, got {self.epochs_decay}")
        c(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        c(0 <= self.beta1 < 1, f"{prefix}.beta1", f"must be in [0, 1), got {self.beta1}")
        c(self.lambda_cycle >= 0 and self.lambda_identity >= 0, f"{prefix}.lambda_cycle",
          "lambda_cycle and lambda_identity must be >= 0")
        c(self.pool_size >= 0, f"{prefix}.pool_size", f"must be >= 0, got {self.pool_size}")
        c(self.samples >= 0, f"{prefix}.samples", f"must be >= 0, got {self.samples}")
        c(self.crop_size >= 16 and self.crop_size % 4 == 0, f"{prefix}.crop_size",
          f"must be a multiple of 4 and >= 16 (the generator downsamples twice), got {self.crop_size}")
        c(self.crop_size <= self.load_size, f"{prefix}.crop_size",
          f"must be <= {prefix}.load_size ({self.load_size}), got {self.crop_size}")
        smallest = 3 * 2 ** self.n_layers   # the PatchGAN's last feature map must stay >= 2×2
        c(self.crop_size >= smallest, f"{prefix}.crop_size",
          f"must be >= {smallest} for a discriminator with n_layers={self.n_layers}, got {self.crop_size}")
        check_device(self.device, f"{prefix}.device")
        c(self.precision in ("auto", "bf16", "fp32"), f"{prefix}.precision",
          f"unknown precision {self.precision!r}; use auto, bf16 or fp32")
        threads.check(self.threads, f"{prefix}.threads")
        c(isinstance(self.compile, bool) or self.compile in COMPILE_MODES, f"{prefix}.compile",
          f"unknown mode {self.compile!r}; use false, default or reduce-overhead")
        c(self.devices >= 1, f"{prefix}.devices", f"must be >= 1, got {self.devices}")
        c(self.lr_scaling in ("none", "linear", "sqrt"), f"{prefix}.lr_scaling",
          f"unknown rule {self.lr_scaling!r}; use none, linear or sqrt")
        c(self.data_device in ("auto", "device", "host"), f"{prefix}.data_device",
          f"unknown place {self.data_device!r}; use auto, device or host")

    @property
    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode."""
        return "default" if self.compile is True else (self.compile or None)

    def scaled_lr(self, world_size: int) -> float:
        """train.lr under train.lr_scaling for an effective batch of batch_size × world_size."""
        return self.lr * {"none": 1.0, "linear": world_size, "sqrt": world_size ** 0.5}[self.lr_scaling]


def bf16_for(device: torch.device, precision: str) -> bool:
    """bf16 autocast: asked for, or `auto` on CUDA (tests/test_accel.py: bf16 loss curves stay well
    within the seed-to-seed noise of fp32 ones on CPU autocast; gpu_check.sh measures CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    if not bf16_for(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def run_params(p: TrainParams) -> dict[str, Any]:
    """The train params that change the numbers a run produces (stored in last.pt, compared per key)."""
    return {k: v for k, v in params.as_dict(p).items() if k not in NOT_HASHED}


def data_names(data: Path) -> list[str]:
    """The prepared training files: their names are content hashes, so the sorted names identify the data."""
    return sorted(f.relative_to(data).as_posix() for f in data.glob("train*/*.png"))


def run_hash(run: dict[str, Any], names: list[str]) -> str:
    """One digest of run_params and data_names (stored in last.pt beside them)."""
    return hashlib.sha256(json.dumps([run, names], sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for one train run: flock on `.<out name>.lock` next to it (not
    inside: `out` is a DVC output). The file holds the holder's PID; the lock ends with the process,
    even on kill -9. Raises UserError naming the holder when another process holds it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{out}: another train run (PID {holder}) is writing it; wait for it to end, "
                        f"or stop it (kill {holder}) and run again") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


def _move_aside(out: Path, why: str) -> None:
    """Move every file of `out` (the checkpoints of an earlier run) to <out>.previous/<time>/, which
    git ignores (a `*` .gitignore inside) and DVC does not track, and say so. Nothing is deleted."""
    if not out.is_dir() or not any(not f.name.startswith(".") for f in out.iterdir()):
        return          # nothing of a run (hidden files are temporaries of interrupted writes)
    aside_root = out.parent / f"{out.name}.previous"
    aside_root.mkdir(exist_ok=True)
    ignore = aside_root / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# checkpoints of earlier train runs, moved aside by stages/train.py\n*\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = aside_root / stamp, 1
    while dest.exists():
        n += 1
        dest = aside_root / f"{stamp}-{n}"
    epochs = sorted(checkpoint.epoch_files(out))
    out.rename(dest)
    out.mkdir()
    what = f"epochs {epochs[0]}-{epochs[-1]}" if epochs else "no epoch files"
    print(f"train: {why}; moved the earlier checkpoints ({what}) to {dest}/ (delete it when you no "
          f"longer need them)")


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """{key: "train.key old -> new"} for each key whose value differs (a missing one shows as absent)."""
    absent = object()
    show = lambda v: "absent" if v is absent else repr(v)  # noqa: E731
    out = {}
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key, absent), current.get(key, absent)
        if old != new:
            out[key] = f"train.{key} {show(old)} -> {show(new)}"
    return out


RESUME_KEYS = ("epoch", "run_params", "data_names", "nets", "opt_G", "opt_D", "sched_G", "sched_D",
               "pool_A", "pool_B", "rng", "history", "G_AB", "G_BA", "model", "format")


def _resume(p: TrainParams, data: Path, out: Path, world_size: int = 1) -> tuple[dict[str, Any] | None, list[str]]:
    """The verified state of out/last.pt to continue from, and the schedule keys that changed
    (non-empty: the run is extended). None when there is nothing to continue: then every earlier
    file has been moved aside (never deleted) with a line saying why. A last.pt written by another
    world size (train.devices) is not continued. Run by rank 0 alone: it moves and rewrites files. Raises UserError when the
    schedule is shorter than the epochs already trained."""
    last = out / "last.pt"
    if not last.exists():
        _move_aside(out, f"starting afresh: {last} is missing")
        return None, []
    try:
        state = checkpoint.load(last)
    except checkpoint.CheckpointError as err:
        _move_aside(out, f"starting afresh: {err.problem}")
        return None, []
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        _move_aside(out, f"starting afresh: {last} lacks {', '.join(missing)} (written by an older "
                         f"version of train, or edited)")
        return None, []
    written = state.get("world_size", 1)
    if written != world_size:
        _move_aside(out, f"starting afresh: {last} was written by {written} process(es), this run has "
                         f"{world_size} (train.devices); each process's pool and random streams cannot be "
                         f"split or merged exactly")
        return None, []
    changed = _differences(state["run_params"], run_params(p))
    other_data = state["data_names"] != data_names(data)
    if other_data or not set(changed) <= set(SCHEDULE):
        why = ", ".join(list(changed.values()) + ([f"other prepared training images in {data}"] if other_data else []))
        _move_aside(out, f"starting afresh: {last} was written with {why}")
        return None, []
    total = p.epochs + p.epochs_decay
    if state["epoch"] > total:
        raise UserError(f"params.yaml: train.epochs + train.epochs_decay = {total} is below the "
                        f"{state['epoch']} epochs already in {last}: raise them to extend that run, or "
                        f"move {out} away to start afresh")
    _check_epoch_files(out, state)
    if changed and state["epoch"] == total:
        print(f"train: {last} already holds all {total} epochs of the new schedule "
              f"({', '.join(changed.values())}); nothing to train")
    elif changed:
        old = state["history"][-1]["metrics"]["lr"] if state["history"] else float("nan")
        new = p.lr * lr_factor(state["epoch"], p.epochs, p.epochs_decay)
        print(f"train: extending the run in {last} (epoch {state['epoch']}): {', '.join(changed.values())}; from "
              f"epoch {state['epoch'] + 1} on the learning rate follows the new schedule: {new:.3g} "
              f"(epoch {state['epoch']} ran at {old:.3g})")
    return state, sorted(changed)


def _check_epoch_files(out: Path, state: dict[str, Any]) -> None:
    """Verify the epoch_NNN.pt files of the run being resumed: one past last.pt's epoch (from an older
    version, which wrote it first) is removed, to be written again; last.pt's own epoch file is
    written from last.pt if an interruption left it missing (train writes last.pt first); a damaged
    one is rewritten from last.pt when it is last.pt's epoch, else removed (its weights exist nowhere
    else), with a line saying so. So a damaged file is never carried forward into the DVC output."""
    generators = {k: state[k] for k in ("format", "epoch", "model", "G_AB", "G_BA")}
    files = checkpoint.epoch_files(out)
    if state["epoch"] not in files:
        checkpoint.save(generators, out / f"epoch_{state['epoch']:03d}.pt")
    for epoch, path in files.items():
        if epoch > state["epoch"]:
            path.unlink()
            continue
        try:
            checkpoint.load(path)
        except checkpoint.CheckpointError as err:
            if epoch == state["epoch"]:
                checkpoint.save(generators, path)
                print(f"train: {err.problem}; rewrote it from {out / 'last.pt'}")
            else:
                path.unlink()
                print(f"train: {err.problem}; removed it (its weights exist nowhere else: retrain from "
                      f"scratch to have that epoch again)")


def _restore(state: dict[str, Any], last: Path, models, opt_G, opt_D, sched_G, sched_D, pool_A, pool_B,
             g_data: torch.Generator, g_pool: torch.Generator, device: torch.device,
             rule: Callable[[int], float] | None, rank: Rank = Rank()) -> None:
    """Load a verified last.pt state into the run's objects (rank 0's pools from the top level, other
    ranks' from `other_ranks`); `rule` (the new lr rule) when the schedule was extended. Raises
    UserError (one line) when the state does not fit the models."""
    try:
        for name in ("G_A", "G_B", "D_A", "D_B"):
            getattr(models, name).load_state_dict(state["nets"][name])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        sched_G.load_state_dict(state["sched_G"])
        sched_D.load_state_dict(state["sched_D"])
        own = ({"pool_A": state["pool_A"], "pool_B": state["pool_B"], "pool": state["rng"]["pool"]}
               if rank.main else state["other_ranks"][rank.rank - 1])
        pool_A.load(own["pool_A"], device)
        pool_B.load(own["pool_B"], device)
        g_pool.set_state(own["pool"])
        torch.set_rng_state(state["rng"]["torch"])
        g_data.set_state(state["rng"]["data"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"{last}: its stored state does not fit the models its train params describe "
                        f"({type(err).__name__}: {detail}); it was edited or written by another version: "
                        f"move {last.parent} away to start afresh") from None
    if rule is not None:   # extended: the new rule's lr from the resumed epoch on (LambdaLR's formula)
        for opt, sched in ((opt_G, sched_G), (opt_D, sched_D)):
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * rule(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in opt.param_groups]


def _diverged(epoch: int, total: int, what: str, p: TrainParams, out: Path) -> UserError:
    kept = (f"{out / 'last.pt'} keeps the last good epoch" if (out / "last.pt").exists()
            else "no checkpoint was written")
    return UserError(f"epoch {epoch}/{total}: {what}: training diverged; lower params.yaml: train.lr "
                     f"(now {p.lr:g}) or check the prepared data; nothing of this epoch was saved, {kept}")


def _check_finite(epoch: int, total: int, losses: dict[str, float], p: TrainParams, out: Path) -> None:
    """Stop the run at the first epoch whose mean losses are not finite, before anything of the
    epoch is written; the last good last.pt stays resumable. Uses the per-epoch means, which reach
    the host once per epoch anyway: no extra device sync."""
    if not all(math.isfinite(v) for v in losses.values()):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        raise _diverged(epoch, total, f"the losses are not finite ({shown})", p, out)


def _check_finite_weights(models, epoch: int, total: int, p: TrainParams, out: Path) -> None:
    """Refuse to checkpoint non-finite weights (one device sync, where the save syncs anyway)."""
    flags = [torch.isfinite(v).all() for name in ("G_A", "G_B", "D_A", "D_B")
             for v in getattr(models, name).state_dict().values() if v.is_floating_point()]
    if not bool(torch.stack(flags).all()):
        raise _diverged(epoch, total, "the weights are not finite after this epoch", p, out)


def _reset_live(live_dir: Path) -> None:
    """Empty the dvclive folder for a rebuilt log, keeping the .gitignore files DVC writes there
    (tracked in git: `metrics/train/plots/.gitignore`)."""
    if not live_dir.exists():
        return
    keep = {f: f.read_bytes() for f in live_dir.rglob(".gitignore")}
    shutil.rmtree(live_dir)
    for f, content in keep.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content)


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
    this process trains (step 1 warms up); `hint` is the setting to try, named in the warning.
    `clock` returns seconds (time.perf_counter)."""

    def __init__(self, steps: int, images_per_step: float, total: int, hint: str,
                 every_s: float | None = None, min_gap_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.steps, self.images_per_step, self.total, self.hint = steps, images_per_step, total, hint
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.min_gap_s = PROGRESS_MIN_GAP_S if min_gap_s is None else min_gap_s
        self.clock = clock
        self.baseline: float | None = None     # images/s of the first steps
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
            sums.sum().item()                                     # wait for the device: true timing
            now = self.clock()
            self.baseline = (step - 1) * self.images_per_step / max(now - self.t1, 1e-9)
        if not self.plain or step >= self.steps:                  # the epoch line covers the end
            return
        marked = step * 10 >= self.next_mark * self.steps
        if not (now - self.last >= self.every_s or (marked and now - self.last >= self.min_gap_s)):
            return
        while self.next_mark * self.steps <= step * 10:
            self.next_mark += 1
        means = (sums / step).tolist()                            # the one device read of this line
        now = self.clock()
        self.last = now
        rate = step / max(now - self.t0, 1e-9)                    # steps/s in this epoch
        left = self.steps - step
        run_left = left + (self.total - self.epoch) * self.steps
        print(f"epoch {self.epoch}/{self.total}  step {step}/{self.steps} ({100 * step // self.steps}%)  "
              f"{rate * self.images_per_step:.1f} img/s  ETA {_clock_str(left / rate)} "
              f"(run {_clock_str(run_left / rate)})  "
              + "  ".join(f"{k} {v:.3f}" for k, v in zip(LOSS_NAMES, means)), flush=True)
        self.check_speed(rate * self.images_per_step)

    def end_epoch(self, images_per_s: float) -> None:
        if self.baseline is None:                                 # epochs too short to measure steps
            self.baseline = images_per_s
        self.check_speed(images_per_s)

    def check_speed(self, images_per_s: float) -> None:
        if self.warned or self.baseline is None or images_per_s * SLOW_FACTOR > self.baseline:
            return
        self.warned = True
        print(f"train: warning: epoch {self.epoch} runs at {images_per_s:.2f} img/s, "
              f"{self.baseline / max(images_per_s, 1e-9):.0f}x slower than its first steps "
              f"({self.baseline:.2f} img/s): other work is probably sharing the machine; {self.hint}",
              flush=True)


def _speed_hint(device: torch.device, p: TrainParams) -> str:
    if device.type != "cpu":
        return "stop the other work on the device, or train on another one"
    if torch.get_num_threads() > 1:
        return (f"try params.yaml: train.threads: 1 (now {threads.describe(p.threads)}), or stop the "
                f"other work")
    return "stop the other work, or train on another machine"


def _rank_state(pool_A: ImagePool, pool_B: ImagePool, g_pool: torch.Generator) -> dict[str, Any]:
    """What is this rank's own: its pools and the random stream they draw from."""
    return {"pool_A": pool_A.state(), "pool_B": pool_B.state(), "pool": g_pool.get_state()}


def _log_epoch(live, record: dict[str, Any]) -> None:
    live.step = record["epoch"]
    for name, value in record["metrics"].items():
        live.log_metric(name, value)
    if record.get("sample") is not None:
        live.log_image(f"samples/epoch_{record['epoch']:03d}.png",
                       Image.fromarray(record["sample"].permute(1, 2, 0).numpy()))
    live.make_summary()


def train(p: TrainParams, data: Path = DATA, out: Path = CHECKPOINTS, live_dir: Path = LIVE,
          stop_after: int | None = None, rank: Rank = Rank()) -> dict[str, Any]:
    """Train to p.epochs + p.epochs_decay (or stop after epoch `stop_after`, for tests that
    simulate an interruption). Returns the final history record (rank 0; other ranks return {}).

    `rank`: this process's place in a data-parallel job (joins the process group if not yet done,
    see unpaired.distributed); by default the only process. Every rank trains on its share of each
    epoch; rank 0 alone decides about resuming, and writes checkpoints, logs and samples.
    Raises UserError (one line) for unusable data, a shorter schedule than the checkpoint's, a
    checkpoint that does not fit, and non-finite losses or weights."""
    from dvclive import Live  # imported here: dvclive pulls in dvc, slow to import for other users

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
    images_A = load_folder(data / "trainA", p.load_size)
    images_B = load_folder(data / "trainB", p.load_size)
    run, names = run_params(p), data_names(data)      # stored in every last.pt of this run
    expected = run_hash(run, names)
    state, extended = _resume(p, data, out, rank.world_size) if rank.main else (None, [])
    if rank.distributed:   # rank 0's decision (it has verified last.pt); the others read the same file
        resumed, extended = rank.gather((state is not None, extended))[0]
        if resumed and not rank.main:
            state = checkpoint.load(out / "last.pt")
    if rank.main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(p.seed)
    g_data = torch.Generator().manual_seed(p.seed + 1)          # the epoch plan: the same on every rank
    g_pool = torch.Generator().manual_seed(p.seed + 2 + 1_000_003 * rank.rank)   # (seed, rank)
    channels_last = cuda and channels_last_ok(device)
    models = build_models(p.ngf, p.ndf, p.n_blocks, p.n_layers, device, channels_last=channels_last)
    lr = p.scaled_lr(rank.world_size)
    opt_G, opt_D = optimizers(models, lr, p.beta1, fused=cuda)
    rule = lambda e: lr_factor(e, p.epochs, p.epochs_decay)  # noqa: E731
    sched_G = torch.optim.lr_scheduler.LambdaLR(opt_G, rule)
    sched_D = torch.optim.lr_scheduler.LambdaLR(opt_D, rule)
    pool_A, pool_B = ImagePool(p.pool_size, g_pool), ImagePool(p.pool_size, g_pool)
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        _restore(state, out / "last.pt", models, opt_G, opt_D, sched_G, sched_D, pool_A, pool_B,
                 g_data, g_pool, device, rule if extended else None, rank)
        history = state["history"]
        start = state["epoch"]
        if rank.main:
            total = p.epochs + p.epochs_decay
            print(f"train: resuming from {out / 'last.pt'}: epochs 1-{start} done, "
                  + (f"training from epoch {start + 1}" if start < total else "nothing left to train"))
    if rank.distributed:
        models = distribute(models, device)
    if p.compile_mode:
        models = compile_models(models, p.compile_mode)

    data_device, why = choose_data_device(p.data_device, device, images_A.nbytes + images_B.nbytes)
    feeder = DeviceFeeder(images_A, images_B, p.crop_size, not p.no_flip, p.batch_size, device,
                          channels_last, data_device, rank.rank, rank.world_size)
    if rank.main:
        print(f"train: {why}")
        if rank.distributed:
            print(f"train: {rank.world_size} processes ({'NCCL' if cuda else 'gloo'}), batch {p.batch_size} "
                  f"each: effective batch {p.batch_size * rank.world_size}, lr {lr:.2e} "
                  f"(train.lr_scaling: {p.lr_scaling})")
    sample_A = fixed_images(data / "testA", p.samples, p.crop_size).to(device)
    sample_B = fixed_images(data / "testB", p.samples, p.crop_size).to(device)
    autocast = autocast_for(device, p.precision)
    model_cfg = {"ngf": p.ngf, "n_blocks": p.n_blocks, "in_channels": 3, "out_channels": 3}

    live = None
    if rank.main:
        _reset_live(live_dir)
        live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)
        for record in history:
            _log_epoch(live, record)

    total = p.epochs + p.epochs_decay
    end = total if stop_after is None else min(total, stop_after)
    images_per_step = feeder.images_per_epoch * rank.world_size / feeder.steps_per_epoch
    progress = Progress(feeder.steps_per_epoch, images_per_step, total, _speed_hint(device, p))
    for epoch in range(start + 1, end + 1):
        for net in models.nets():
            net.train()
        plan = feeder.plan(g_data)
        pool_A.prepare(feeder.images_per_epoch, device)
        pool_B.prepare(feeder.images_per_epoch, device)
        sums = torch.zeros(len(LOSS_NAMES), device=device)
        lr = opt_G.param_groups[0]["lr"]
        t0 = time.perf_counter()
        bar = tqdm(feeder.batches(plan), total=feeder.steps_per_epoch, desc=f"epoch {epoch}/{total}",
                   unit="it", leave=False, disable=None if rank.main else True)
        progress.start_epoch(epoch, plain=bar.disable and rank.main)
        for step, (real_A, real_B) in enumerate(bar, 1):
            sums += train_step(models, opt_G, opt_D, pool_A, pool_B, real_A, real_B,
                               p.lambda_cycle, p.lambda_identity, autocast, p.batched_passes)
            if step % LOG_EVERY == 0 and not bar.disable:   # one device read per LOG_EVERY steps
                bar.set_postfix({k: f"{v:.2f}" for k, v in zip(LOSS_NAMES, (sums / step).tolist())})
            progress.step(step, sums)
        rank.sum(sums)                                            # losses of all ranks, for the log
        means = (sums / (feeder.steps_per_epoch * rank.world_size)).tolist()   # the epoch's one host sync
        seconds = time.perf_counter() - t0
        _check_finite(epoch, total, dict(zip(LOSS_NAMES, means)), p, out)   # the same on every rank
        sched_G.step()
        sched_D.step()
        metrics = dict(zip(LOSS_NAMES, means))
        metrics["lr"] = lr
        metrics["images_per_s"] = feeder.images_per_epoch * rank.world_size / seconds
        saving = epoch % p.save_every == 0 or epoch == total
        if saving:   # every rank holds the same weights: every rank stops here alike
            _check_finite_weights(models, epoch, total, p, out)
        others = rank.gather(_rank_state(pool_A, pool_B, g_pool))[1:] if saving else []
        if not rank.main:
            if saving:
                rank.barrier()              # wait for rank 0's checkpoint (see below)
            continue
        sample = None
        if len(sample_A) and len(sample_B):
            models.G_A.eval()
            models.G_B.eval()
            sample = grid(*triplets(models.G_A, models.G_B, sample_A, sample_B))
        record = {"epoch": epoch, "metrics": metrics, "sample": sample}
        history.append(record)
        _log_epoch(live, record)
        print(f"epoch {epoch}/{total}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                     if k in LOSS_NAMES)
              + f"  lr {lr:.2e}  {metrics['images_per_s']:.1f} img/s", flush=True)
        progress.end_epoch(metrics["images_per_s"])
        if saving:
            payload = checkpoint.generators_payload(epoch, model_cfg, models.G_A, models.G_B)
            full = dict(payload)
            full.update({
                "run_hash": expected, "run_params": run, "data_names": names,
                "world_size": rank.world_size, "device": device.type,   # what `auto` resolved to (report)
                "nets": {name: {k: v.detach().cpu() for k, v in getattr(models, name).state_dict().items()}
                         for name in ("G_A", "G_B", "D_A", "D_B")},
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "sched_G": sched_G.state_dict(), "sched_D": sched_D.state_dict(),
                "pool_A": pool_A.state(), "pool_B": pool_B.state(),
                "other_ranks": others,          # ranks 1.. : their pools and pool streams
                "rng": {"torch": torch.get_rng_state(), "data": g_data.get_state(),
                        "pool": g_pool.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if cuda else None},
                "history": history,
            })
            checkpoint.save(full, out / "last.pt")     # first: a missing epoch file is rebuilt from it
            checkpoint.save(payload, out / f"epoch_{epoch:03d}.pt")
            rank.barrier()                  # no rank goes on (or exits) before the files are whole
    if live is not None:
        live.end()
        (live_dir / "plots" / "images").mkdir(parents=True, exist_ok=True)   # a declared output, even empty
    return history[-1] if history and rank.main else {}


def main() -> None:
    # A data-parallel run is launched from outside (dvc.yaml's cmd: unpaired.torchrun); each of its
    # processes runs this with torchrun's rank. session(): signals, parent-death signal, one line.
    with distributed.session() as rank:
        p = params.parse(TrainParams, params.section(params.load(), "train"), "train")
        device = resolve_device(p.device)
        distributed.check_devices(p.devices, device)
        distributed.init(rank, device)
        with distributed.output_lock(CHECKPOINTS, rank):   # one train run at a time, held by every rank
            if rank.main:
                remove_stale_temporaries(CHECKPOINTS, DATA.parent)    # what a killed run left (.last.pt.tmp-*)
                if PACKED.is_file():       # after a `dvc pull` only the tar is there
                    unpack_view(PACKED, DATA)
            rank.barrier()                 # (several nodes share one filesystem: rank 0 unpacks)
            train(p, rank=rank)


if __name__ == "__main__":
    from unpaired.restore import keep_outputs   # under dvc repro: a failure keeps the previous outputs
    main_guard(keep_outputs(main))
