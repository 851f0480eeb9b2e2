"""The state of a train run and its one file format (last.pt), and what happens to the files of an
earlier run: resume, extend, move aside, repair epoch files.

A run is resumable from out/last.pt when it was written with the same run params (the train params
that change the numbers: all but NOT_HASHED) and the same prepared data; if only the schedule
(train.epochs, train.epochs_decay) grew, it is extended; otherwise the earlier files are moved to
<out>.previous/<time>/. Each epoch's sample grid is a PNG in out/samples/ (written once, never kept in
last.pt), so last.pt stays the same size apart from the per-epoch numbers of its history. Nothing
in last.pt or the epoch files depends on the clock, the host or the process.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from unpaired import checkpoint, params
from unpaired.distributed import Rank
from unpaired.errors import UserError
from unpaired.files import atomic_write_bytes, creating, make_dirs
from unpaired.training import (LOSS_NAMES, ImagePool, Models, TrainParams, build_models, lr_factor,
                               optimizers, train_step)

# Params that do not change the numbers a run produces: editing them keeps a resumable last.pt.
NOT_HASHED = ("save_every", "compile", "samples", "threads", "devices", "data_device")
SCHEDULE = ("epochs", "epochs_decay")   # the keys along which a finished run can be extended
NETS = ("G_A", "G_B", "D_A", "D_B")


def run_params(p: TrainParams) -> dict[str, Any]:
    """The train params that change the numbers a run produces (stored in last.pt, compared per key)."""
    return {k: v for k, v in params.as_dict(p).items() if k not in NOT_HASHED}


def data_names(data: Path) -> list[str]:
    """The prepared training files: their names are content hashes, so the sorted names identify the data."""
    return sorted(f.relative_to(data).as_posix() for f in data.glob("train*/*.png"))


def run_hash(run: dict[str, Any], names: list[str]) -> str:
    """One digest of run_params and data_names (stored in last.pt beside them)."""
    return hashlib.sha256(json.dumps([run, names], sort_keys=True).encode()).hexdigest()


def move_aside(out: Path, why: str) -> None:
    """Move every file of `out` (the checkpoints of an earlier run) to <out>.previous/<time>/, which
    git ignores (a `*` .gitignore inside) and DVC does not track, and say so. Nothing is deleted."""
    if not out.is_dir() or not any(not f.name.startswith(".") for f in out.iterdir()):
        return          # nothing of a run (hidden files are temporaries of interrupted writes)
    aside_root = out.parent / f"{out.name}.previous"
    make_dirs(aside_root)
    ignore = aside_root / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# checkpoints of earlier train runs, moved aside by the train stage\n*\n")
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


def differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
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


def resume(p: TrainParams, data: Path, out: Path, world_size: int = 1) -> tuple[dict[str, Any] | None, list[str]]:
    """The verified state of out/last.pt to continue from, and the schedule keys that changed
    (non-empty: the run is extended). None when there is nothing to continue: then every earlier
    file has been moved aside (never deleted) with a line saying why. A last.pt written by another
    world size (train.devices) is not continued. Run by rank 0 alone: it moves and rewrites files. Raises UserError when the
    schedule is shorter than the epochs already trained."""
    last = out / "last.pt"
    if not last.exists():
        move_aside(out, f"starting afresh: {last} is missing")
        return None, []
    try:
        state = checkpoint.load(last)
    except checkpoint.CheckpointError as err:
        move_aside(out, f"starting afresh: {err.problem}")
        return None, []
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        move_aside(out, f"starting afresh: {last} lacks {', '.join(missing)} (written by an older "
                         f"version of train, or edited)")
        return None, []
    written = state.get("world_size", 1)
    if written != world_size:
        move_aside(out, f"starting afresh: {last} was written by {written} process(es), this run has "
                         f"{world_size} (train.devices); each process's pool and random streams cannot be "
                         f"split or merged exactly")
        return None, []
    changed = differences(state["run_params"], run_params(p))
    other_data = state["data_names"] != data_names(data)
    if other_data or not set(changed) <= set(SCHEDULE):
        why = ", ".join(list(changed.values()) + ([f"other prepared training images in {data}"] if other_data else []))
        move_aside(out, f"starting afresh: {last} was written with {why}")
        return None, []
    total = p.epochs + p.epochs_decay
    if state["epoch"] > total:
        raise UserError(f"params.yaml: train.epochs + train.epochs_decay = {total} is below the "
                        f"{state['epoch']} epochs already in {last}: raise them to extend that run, or "
                        f"move {out} away to start afresh")
    check_epoch_files(out, state)
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


def check_epoch_files(out: Path, state: dict[str, Any]) -> None:
    """Verify the epoch_NNN.pt files of the run being resumed: one past last.pt's epoch (from an older
    version, which wrote it first) is removed, to be written again; last.pt's own epoch file is
    written from last.pt if an interruption left it missing (train writes last.pt first); a damaged
    one is rewritten from last.pt when it is last.pt's epoch, else removed (its weights exist nowhere
    else), with a line saying so. So a damaged file is never carried forward into the DVC output."""
    generators = {k: state[k] for k in ("format", "epoch", "model", "G_AB", "G_BA")}
    drop_samples_after(out, state["epoch"])
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


def _diverged(epoch: int, total: int, what: str, p: TrainParams, out: Path) -> UserError:
    kept = (f"{out / 'last.pt'} keeps the last good epoch" if (out / "last.pt").exists()
            else "no checkpoint was written")
    return UserError(f"epoch {epoch}/{total}: {what}: training diverged; lower params.yaml: train.lr "
                     f"(now {p.lr:g}) or check the prepared data; nothing of this epoch was saved, {kept}")


def check_finite(epoch: int, total: int, losses: dict[str, float], p: TrainParams, out: Path) -> None:
    """Stop the run at the first epoch whose mean losses are not finite, before anything of the
    epoch is written; the last good last.pt stays resumable. Uses the per-epoch means, which reach
    the host once per epoch anyway: no extra device sync."""
    if not all(math.isfinite(v) for v in losses.values()):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        raise _diverged(epoch, total, f"the losses are not finite ({shown})", p, out)


def check_finite_weights(models, epoch: int, total: int, p: TrainParams, out: Path) -> None:
    """Refuse to checkpoint non-finite weights (one device sync, where the save syncs anyway)."""
    flags = [torch.isfinite(v).all() for name in ("G_A", "G_B", "D_A", "D_B")
             for v in getattr(models, name).state_dict().values() if v.is_floating_point()]
    if not bool(torch.stack(flags).all()):
        raise _diverged(epoch, total, "the weights are not finite after this epoch", p, out)


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




def sample_path(out: Path, epoch: int) -> Path:
    """Where epoch `epoch`'s sample grid lives: out/samples/epoch_NNN.png (uint8 RGB)."""
    return out / "samples" / f"epoch_{epoch:03d}.png"


def write_sample(out: Path, epoch: int, sample: torch.Tensor) -> None:
    """Write a 3×H×W uint8 grid as a PNG (atomically; the bytes depend on the pixels only)."""
    buf = io.BytesIO()
    Image.fromarray(sample.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    path = sample_path(out, epoch)
    make_dirs(path.parent)
    atomic_write_bytes(path, buf.getvalue())


def drop_samples_after(out: Path, epoch: int) -> None:
    """Remove sample grids of epochs past `epoch` (an interrupted run wrote them before its last.pt)."""
    for f in sorted((out / "samples").glob("epoch_*.png")):
        if f.stem[6:].isdigit() and int(f.stem[6:]) > epoch:
            f.unlink()


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


def write_live(live_dir: Path, history: list[dict[str, Any]], speeds: dict[int, float], out: Path) -> None:
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
    make_dirs(live_dir / "plots" / "images")   # a declared output, even empty


@dataclass
class TrainState:
    """Everything a run carries from epoch to epoch: the four networks, both optimizers and lr
    schedules, this rank's two image pools, the random streams (torch's global one, the data plan's
    `g_data`, the pools' `g_pool`), the last finished `epoch` and the `history` ([{"epoch": int,
    "metrics": {loss name: float, "lr": float}}], one per epoch). `state_dict()` is last.pt's format
    (the one place it is written); `load_state_dict()` restores it. Build with `TrainState.new`."""
    p: TrainParams
    device: torch.device
    rank: Rank
    names: list[str]                     # the prepared training files (data_names)
    models: Models
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    g_data: torch.Generator
    g_pool: torch.Generator
    pool_A: ImagePool
    pool_B: ImagePool
    sched_G: Any = None
    sched_D: Any = None
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, p: TrainParams, device: torch.device, rank: Rank, names: list[str],
            channels_last: bool) -> TrainState:
        """A fresh run, seeded by train.seed (the pools' stream also by the rank)."""
        torch.manual_seed(p.seed)
        g_data = torch.Generator().manual_seed(p.seed + 1)          # the epoch plan: the same on every rank
        g_pool = torch.Generator().manual_seed(p.seed + 2 + 1_000_003 * rank.rank)   # (seed, rank)
        models = build_models(p.ngf, p.ndf, p.n_blocks, p.n_layers, device, channels_last=channels_last)
        opt_G, opt_D = optimizers(models, p.scaled_lr(rank.world_size), p.beta1, fused=device.type == "cuda")
        state = cls(p, device, rank, names, models, opt_G, opt_D, g_data, g_pool,
                    ImagePool(p.pool_size, g_pool), ImagePool(p.pool_size, g_pool))
        state.sched_G, state.sched_D = state._schedules()
        return state

    def _schedules(self, last_epoch: int = -1):
        """LambdaLR schedules after the rule of the current train.epochs / train.epochs_decay; with
        `last_epoch` >= 0 (needs the optimizers' initial_lr) the lr is set for the epoch after it."""
        rule = lambda e: lr_factor(e, self.p.epochs, self.p.epochs_decay)  # noqa: E731
        return tuple(torch.optim.lr_scheduler.LambdaLR(opt, rule, last_epoch=last_epoch)
                     for opt in (self.opt_G, self.opt_D))

    @property
    def lr(self) -> float:
        return self.opt_G.param_groups[0]["lr"]

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor, autocast) -> torch.Tensor:
        """One training step (training.train_step) on B×3×H×W batches; the 8 losses on the device."""
        p = self.p
        return train_step(self.models, self.opt_G, self.opt_D, self.pool_A, self.pool_B, real_A, real_B,
                          p.lambda_cycle, p.lambda_identity, autocast, p.batched_passes)

    def rank_state(self) -> dict[str, Any]:
        """What is this rank's own: its pools and the random stream they draw from."""
        return {"pool_A": self.pool_A.state(), "pool_B": self.pool_B.state(), "pool": self.g_pool.get_state()}

    def generators(self) -> dict[str, Any]:
        """The epoch file's content: both generators and their model config (checkpoint format)."""
        cfg = {"ngf": self.p.ngf, "n_blocks": self.p.n_blocks, "in_channels": 3, "out_channels": 3}
        return checkpoint.generators_payload(self.epoch, cfg, self.models.G_A, self.models.G_B)

    def state_dict(self, other_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """last.pt's content (CPU tensors; nothing from the clock, host or process). `other_ranks`:
        ranks 1..'s rank_state(), gathered by rank 0."""
        run = run_params(self.p)
        state = self.generators()
        state.update({
            "run_hash": run_hash(run, self.names), "run_params": run, "data_names": self.names,
            "world_size": self.rank.world_size, "device": self.device.type,   # what `auto` resolved to
            "nets": {name: {k: v.detach().cpu() for k, v in getattr(self.models, name).state_dict().items()}
                     for name in NETS},
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "pool_A": self.pool_A.state(), "pool_B": self.pool_B.state(),
            "other_ranks": other_ranks or [],
            "rng": {"torch": torch.get_rng_state(), "data": self.g_data.get_state(), "pool": self.g_pool.get_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "history": self.history,
        })
        return state

    def load_state_dict(self, state: dict[str, Any], last: Path, extended: bool = False) -> None:
        """Restore a verified last.pt state (rank 0's pools from the top level, other ranks' from
        `other_ranks`). `extended`: the schedule grew, so the lr follows the new rule from the
        resumed epoch on. Raises UserError (one line) when the state does not fit the models."""
        try:
            for name in NETS:
                getattr(self.models, name).load_state_dict(state["nets"][name])
            self.opt_G.load_state_dict(state["opt_G"])
            self.opt_D.load_state_dict(state["opt_D"])
            if extended:   # the new rule's lr for the next epoch; the stored counters kept
                self.sched_G, self.sched_D = self._schedules(last_epoch=state["sched_G"]["last_epoch"] - 1)
            for sched, key in ((self.sched_G, "sched_G"), (self.sched_D, "sched_D")):
                sched.load_state_dict({k: v for k, v in state[key].items() if not (extended and k == "_last_lr")})
            own = state["other_ranks"][self.rank.rank - 1] if not self.rank.main else {
                "pool_A": state["pool_A"], "pool_B": state["pool_B"], "pool": state["rng"]["pool"]}
            self.pool_A.load(own["pool_A"], self.device)
            self.pool_B.load(own["pool_B"], self.device)
            self.g_pool.set_state(own["pool"])
            torch.set_rng_state(state["rng"]["torch"])
            self.g_data.set_state(state["rng"]["data"])
            if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:
            detail = " ".join(str(err).split())[:200]
            raise UserError(f"{last}: its stored state does not fit the models its train params describe "
                            f"({type(err).__name__}: {detail}); it was edited or written by another version: "
                            f"move {last.parent} away to start afresh") from None
        self.epoch = state["epoch"]
        self.history = [{"epoch": r["epoch"], "metrics": {k: v for k, v in r["metrics"].items()
                                                          if k in LOSS_NAMES or k == "lr"}}
                        for r in state["history"]]

    def save(self, out: Path, other_ranks: list[dict[str, Any]] | None = None) -> None:
        """Write out/last.pt, then out/epoch_NNN.pt (a missing epoch file is rebuilt from last.pt)."""
        checkpoint.save(self.state_dict(other_ranks), out / "last.pt")
        checkpoint.save(self.generators(), out / f"epoch_{self.epoch:03d}.pt")
