"""The state of a train run and its one file format (last.pt), and what happens to the files of an
earlier run: resume, extend, move aside, repair epoch files; the checks that stop a diverged run.

A run is resumable from out/last.pt when it was written with the same run params (the train params
that change the numbers: all but NOT_HASHED) and the same prepared data; if only the schedule
(train.epochs, train.epochs_decay) grew, it is extended; otherwise the earlier files are moved to
<out>.previous/<time>/. last.pt also records what the run's settings resolved to (`resolution`:
the device type, the precision, the networks' memory format); a run continued under another
resolution (train.device: auto on another machine) is said so in one line, and its optimizer state
is converted to this run's (load_optimizer_state). Each epoch's sample grid is a PNG in
out/samples/ (written once, never kept in last.pt), so last.pt stays the same size apart from the
per-epoch numbers of its history. Nothing in last.pt or the epoch files depends on the clock, the
host or the process.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unpaired import checkpoint, params
from unpaired.devices import bf16_for
from unpaired.distributed import Rank
from unpaired.errors import UserError
from unpaired.files import make_dirs
from unpaired.models.samples import drop_samples_after
from unpaired.models.schedule import lr_factor
from unpaired.models.training import CUT_ONLY, Model, TrainParams
from unpaired.models.writer import Writer, detached

# Params that do not change the numbers a run produces: editing them keeps a resumable last.pt.
NOT_HASHED = ("save_every", "compile", "samples", "threads", "devices", "data_device")
# Run params added after last.pt files existed: a last.pt without one is compared as if it held this
# value (what the run did then is what this value does now, up to its resolution: see `resolution`).
ADDED_LATER = {
    "memory_format": "auto",
    "deterministic": False,
    **{
        k: getattr(TrainParams(), k)
        for k in ("model", *CUT_ONLY, "antialias")  # train.model and CUT's keys came later
    },
}
SCHEDULE = ("epochs", "epochs_decay")  # the keys along which a finished run can be extended


def epoch_file_keys(model: type[Model]) -> tuple[str, ...]:
    """checkpoint.generators_payload's keys for `model`: format, epoch, model, its GENERATORS."""
    return ("format", "epoch", "model", *model.GENERATORS)


def run_params(p: TrainParams) -> dict[str, Any]:
    """The train params that change the numbers a run produces (stored in last.pt, compared per key)."""
    return {k: v for k, v in params.as_dict(p).items() if k not in NOT_HASHED}


def data_names(data: Path) -> list[str]:
    """The prepared training files: their names are content hashes, so the sorted names identify the data."""
    return sorted(f.relative_to(data).as_posix() for f in data.glob("train*/*.png"))


def run_hash(run: dict[str, Any], names: list[str]) -> str:
    """One digest of run_params and data_names (stored in last.pt beside them)."""
    return hashlib.sha256(json.dumps([run, names], sort_keys=True).encode()).hexdigest()


def aside_root(out: Path) -> Path:
    """<out>.previous: where move_aside puts the checkpoints of earlier runs."""
    return out.parent / f"{out.name}.previous"


def move_aside(out: Path, why: str) -> None:
    """Move every file of `out` (the checkpoints of an earlier run) to <out>.previous/<time>/, which
    git ignores (a `*` .gitignore inside) and DVC does not track, and say so. Nothing is deleted."""
    if not out.is_dir() or not any(not f.name.startswith(".") for f in out.iterdir()):
        return  # nothing of a run (hidden files are temporaries of interrupted writes)
    root = aside_root(out)
    make_dirs(root)
    ignore = root / ".gitignore"
    if not ignore.exists():
        ignore.write_text(
            "# checkpoints of earlier train runs, moved aside by the train stage\n*\n"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = root / stamp, 1
    while dest.exists():
        n += 1
        dest = root / f"{stamp}-{n}"
    epochs = sorted(checkpoint.epoch_files(out))
    out.rename(dest)
    out.mkdir()
    what = f"epochs {epochs[0]}-{epochs[-1]}" if epochs else "no epoch files"
    print(
        f"train: {why}; moved the earlier checkpoints ({what}) to {dest}/ (delete it when you no "
        f"longer need them)"
    )


def aside_runs(out: Path) -> set[str]:
    """The names of the earlier runs move_aside has put under <out>.previous/ (empty if none)."""
    root = aside_root(out)
    return {d.name for d in root.iterdir() if d.is_dir()} if root.is_dir() else set()


def move_back(out: Path, before: set[str]) -> Path | None:
    """Undo this run's move_aside when the run ends without an epoch of its own: `before` is
    aside_runs(out) as the run started; when exactly one run was moved aside since and `out` holds
    no file but hidden ones (an interrupted write's temporaries, the timing file), `out` is
    replaced by it, so the earlier checkpoints are where they were (and what dvc.lock records, if
    it did). Returns the folder they came back from, or None when nothing was moved back."""
    new = aside_runs(out) - before
    if len(new) != 1:
        return None
    if out.is_dir() and any(not f.name.startswith(".") for f in out.iterdir()):
        return None  # the run saved something of its own: it is the state now
    dest = aside_root(out) / new.pop()
    if out.is_dir():
        shutil.rmtree(out)
    dest.rename(out)
    return dest


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


def resume_keys(model: type[Model]) -> tuple[str, ...]:
    """The keys a last.pt of `model` must hold to be continued (CycleGAN: epoch, run_params,
    data_names, nets, opt_G, opt_D, sched_G, sched_D, pool_A, pool_B, rng, history, G_AB, G_BA,
    model, format; CUT: no pools, opt_F and sched_F, G_AB alone)."""
    return (
        "epoch",
        "run_params",
        "data_names",
        "nets",
        *(f"opt_{n}" for n in model.OPTIMIZERS),
        *(f"sched_{n}" for n in model.OPTIMIZERS),
        *model.RANK_STATE,
        "rng",
        "history",
        *model.GENERATORS,
        "model",
        "format",
    )


def resume(
    model: type[Model], p: TrainParams, data: Path, out: Path, world_size: int = 1
) -> tuple[dict[str, Any] | None, list[str]]:
    """The verified state of out/last.pt (a run of `model`) to continue from, and the schedule keys
    that changed (non-empty: the run is extended). None when there is nothing to continue: then every earlier
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
    stored = state.get("run_params") if isinstance(state, dict) else None
    written_model = stored.get("model", "cyclegan") if isinstance(stored, dict) else None
    if written_model is not None and written_model != p.model:  # before its keys: they differ
        move_aside(
            out,
            f"starting afresh: {last} was written with train.model {written_model} -> {p.model}",
        )
        return None, []
    missing = [k for k in resume_keys(model) if not isinstance(state, dict) or k not in state]
    if missing:
        move_aside(
            out,
            f"starting afresh: {last} lacks {', '.join(missing)} (written by an older "
            f"version of train, or edited)",
        )
        return None, []
    written = state.get("world_size", 1)
    if written != world_size:
        move_aside(
            out,
            f"starting afresh: {last} was written by {written} process(es), this run has "
            f"{world_size} (train.devices); each process's pool and random streams cannot be "
            f"split or merged exactly",
        )
        return None, []
    current = run_params(p)
    written = {**{k: v for k, v in ADDED_LATER.items() if k in current}, **state["run_params"]}
    changed = differences(written, current)
    other_data = state["data_names"] != data_names(data)
    if other_data or not set(changed) <= set(SCHEDULE):
        why = ", ".join(
            list(changed.values())
            + ([f"other prepared training images in {data}"] if other_data else [])
        )
        move_aside(out, f"starting afresh: {last} was written with {why}")
        return None, []
    total = p.epochs + p.epochs_decay
    if state["epoch"] > total:
        raise UserError(
            f"params.yaml: train.epochs + train.epochs_decay = {total} is below the "
            f"{state['epoch']} epochs already in {last}: raise them to extend that run, or "
            f"move {out} away to start afresh"
        )
    check_epoch_files(out, state, model)
    if changed and state["epoch"] == total:
        print(
            f"train: {last} already holds all {total} epochs of the new schedule "
            f"({', '.join(changed.values())}); nothing to train"
        )
    elif changed:
        old = state["history"][-1]["metrics"]["lr"] if state["history"] else float("nan")
        new = p.lr * lr_factor(state["epoch"], p.epochs, p.epochs_decay)
        print(
            f"train: extending the run in {last} (epoch {state['epoch']}): {', '.join(changed.values())}; from "
            f"epoch {state['epoch'] + 1} on the learning rate follows the new schedule: {new:.3g} "
            f"(epoch {state['epoch']} ran at {old:.3g})"
        )
    return state, sorted(changed)


def resolution(device: torch.device, precision: str, channels_last: bool) -> dict[str, str]:
    """What a run's settings resolved to, as last.pt records it beside run_params (which hold them
    as written, e.g. `auto`): {"device": "cpu"|"cuda"|"mps", "precision": "bf16"|"fp32" (train.precision
    by unpaired.devices.bf16_for), "memory_format": "channels_last"|"contiguous" (the networks')}."""
    return {
        "device": device.type,
        "precision": "bf16" if bf16_for(device, precision) else "fp32",
        "memory_format": "channels_last" if channels_last else "contiguous",
    }


def stored_resolution(state: dict[str, Any]) -> dict[str, str]:
    """The resolution a last.pt records (see `resolution`). A last.pt from before it was recorded in
    full: its precision as train.precision resolved then on its device type, its memory format
    as its stored weights are laid out; without a recorded device, none is known (left out)."""
    got = {
        k: state[k]
        for k in ("device", "precision", "memory_format")
        if isinstance(state.get(k), str)
    }
    if "device" in got and "precision" not in got:
        written = state["run_params"].get("precision", "auto")
        # the rule of the versions that did not record it: bf16 for auto or bf16 on any CUDA card
        # (asking this machine's devices would be wrong: the run may have been on another one)
        bf16 = got["device"] == "cuda" and written in ("auto", "bf16")
        got["precision"] = "bf16" if bf16 else "fp32"
    if "memory_format" not in got:
        convs = [
            w
            for net in state["nets"].values()
            for w in net.values()
            if isinstance(w, torch.Tensor)
            and w.dim() == 4
            and w.shape[1] > 1
            and w.shape[2] * w.shape[3] > 1
        ]
        got["memory_format"] = (
            "channels_last"
            if convs
            and not convs[0].is_contiguous()
            and convs[0].is_contiguous(memory_format=torch.channels_last)
            else "contiguous"
        )
    return got


def load_optimizer_state(opt: torch.optim.Optimizer, stored: dict[str, Any]) -> None:
    """opt.load_state_dict(stored), converted to `opt` as this run built it. torch restores the
    stored param groups' `fused` and `foreach` flags and keeps each stored tensor's strides; here
    both are this optimizer's own (a CUDA run's fused Adam continued on the CPU would run CPU fused
    Adam) and each per-weight tensor (Adam's moments) is laid out as its weight. Fused Adam walks
    moments and weights as flat arrays: a channels-last moment of a contiguous weight updates other
    elements than its own (measured on the CPU; tests/test_train.py checks the conversion). Raises what
    load_state_dict raises for a state of other parameters (ValueError, KeyError)."""
    stored_groups = stored["param_groups"]
    groups = [
        {**group, "fused": mine.get("fused"), "foreach": mine.get("foreach")}
        for group, mine in zip(stored_groups, opt.param_groups)
    ]
    opt.load_state_dict({**stored, "param_groups": groups + stored_groups[len(groups) :]})
    for group in opt.param_groups:
        for weight in group["params"]:
            moments = opt.state.get(weight, {})
            for key, value in moments.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == weight.shape
                    and value.stride() != weight.stride()
                ):
                    moments[key] = torch.empty_like(weight, dtype=value.dtype).copy_(value)


def check_epoch_files(out: Path, state: dict[str, Any], model: type[Model]) -> None:
    """Verify the epoch_NNN.pt files of the run being resumed: one past last.pt's epoch (from an older
    version, which wrote it first) is removed, to be written again; last.pt's own epoch file is
    written from last.pt if an interruption left it missing (train writes last.pt first); a damaged
    one is rewritten from last.pt when it is last.pt's epoch, else restored from the DVC cache when
    dvc.lock records it for this run (restore_from_dvc_cache), else removed (its weights exist
    nowhere else); one line says which. So a damaged file is never carried forward into the DVC
    output."""
    generators = {k: state[k] for k in epoch_file_keys(model)}
    drop_samples_after(out, state["epoch"])
    files = checkpoint.epoch_files(out)
    if state["epoch"] not in files:
        checkpoint.save(generators, out / f"epoch_{state['epoch']:03d}.pt")
    damaged: dict[int, str] = {}
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
                damaged[epoch] = err.problem
    if not damaged:
        return
    for epoch, why_not in restore_from_dvc_cache(
        out, {e: files[e] for e in damaged}, state
    ).items():
        if why_not is None:
            print(
                f"train: {damaged[epoch]}; restored it from the DVC cache (the version dvc.lock records)"
            )
        else:
            files[epoch].unlink(missing_ok=True)
            print(
                f"train: {damaged[epoch]}; not restored from the DVC cache ({why_not}): removed it (retrain "
                f"from scratch to have that epoch again)"
            )


def restore_from_dvc_cache(
    out: Path, damaged: dict[int, Path], state: dict[str, Any]
) -> dict[int, str | None]:
    """Bring damaged epoch files of the run in `out` (epoch -> path, each before last.pt's epoch;
    `state`: last.pt's verified content) back from the DVC cache: `dvc checkout <file path>`
    (dvc.repo.Repo.checkout; by the file's path, never the stage's: `out` is a persist output that
    also holds files dvc.lock does not record yet), then verified like any checkpoint (its digest,
    its epoch, last.pt's model config). Asked first (`dvc data status`): dvc.lock must record the
    file, the cache must hold it and the folder's listing (without them DVC's checkout of one file
    removes the whole folder), and dvc.lock must record this run: its version of last.pt, or of an
    epoch file at or after the damaged one, is the very file in `out` (epoch files of another run,
    one moved aside since, would load fine but hold other weights). Returns epoch -> None when
    restored, else the reason it was not (the damaged file is left for the caller to remove)."""
    import contextlib
    import os

    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        root = Path(Repo.find_root(str(out.resolve())))
    except NotDvcRepoError:
        return dict.fromkeys(damaged, "not in a DVC repository")
    rel = lambda p: Path(os.path.relpath(p.resolve(), root)).as_posix()  # noqa: E731
    answers: dict[int, str | None] = {}
    try:
        with (
            contextlib.chdir(root),
            Repo(str(root)) as repo,
        ):  # targets as `dvc` takes them in the root
            # dvc.lock's files of `out` (git's HEAD aside: `committed` is HEAD's dvc.lock to this one)
            status = repo.data_status(targets=[rel(out)], granular=True, with_renames=False)
            differ = {
                f for key in ("modified", "deleted") for f in status["uncommitted"].get(key, [])
            }
            unchanged = (
                set(status["unchanged"])
                | {f for key in ("added", "modified") for f in status["committed"].get(key, [])}
            ) - differ
            recorded, missing = unchanged | differ, set(status["not_in_cache"])
            for epoch, path in damaged.items():
                pull = (
                    f"`uv run dvc pull {rel(path)}` brings it back from a DVC remote that holds it"
                )
                if f"{rel(out)}/" in missing:
                    answers[epoch] = f"the cache lacks dvc.lock's listing of {rel(out)}: {pull}"
                elif rel(path) not in recorded:
                    answers[epoch] = f"dvc.lock records no {path.name}"
                elif rel(path) in missing:
                    answers[epoch] = f"dvc.lock records it, but the cache lacks it: {pull}"
                elif not (
                    rel(out / "last.pt") in unchanged
                    or any(
                        rel(f) in unchanged
                        for e, f in checkpoint.epoch_files(out).items()
                        if e >= epoch
                    )
                ):
                    answers[epoch] = "dvc.lock records the checkpoints of another run"
                else:
                    repo.checkout(targets=[rel(path)], force=True)
                    answers[epoch] = _restored_fits(path, epoch, state)
    except (
        DvcException,
        OSError,
    ) as err:  # DVC could not read the project (a broken dvc.yaml, ...)
        detail = " ".join(str(err).split())[:160]
        answers.update({e: f"DVC failed: {detail}" for e in damaged if e not in answers})
    return answers


def _restored_fits(path: Path, epoch: int, state: dict[str, Any]) -> str | None:
    """None when the file DVC restored at `path` is a whole epoch file of `epoch` with last.pt's model
    config (`state`), else what is wrong with it."""
    try:
        restored = checkpoint.load(path)
    except (checkpoint.CheckpointError, UserError) as err:
        return f"its copy there is not usable either: {err}"
    if restored.get("epoch") != epoch or restored.get("model") != state["model"]:
        return "dvc.lock records another epoch or model config under that name"
    return None


def _diverged(epoch: int, total: int, what: str, p: TrainParams, out: Path) -> UserError:
    kept = (
        f"{out / 'last.pt'} keeps the last good epoch"
        if (out / "last.pt").exists()
        else "no checkpoint was written"
    )
    return UserError(
        f"epoch {epoch}/{total}: {what}: training diverged; lower params.yaml: train.lr "
        f"(now {p.lr:g}) or check the prepared data; nothing of this epoch was saved, {kept}"
    )


def check_finite(
    epoch: int, total: int, losses: dict[str, float], p: TrainParams, out: Path
) -> None:
    """Stop the run at the first epoch whose mean losses are not finite, before anything of the
    epoch is written; the last good last.pt stays resumable. Uses the per-epoch means, which reach
    the host once per epoch anyway: no extra device sync."""
    if not all(math.isfinite(v) for v in losses.values()):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        raise _diverged(epoch, total, f"the losses are not finite ({shown})", p, out)


def check_finite_weights(model: Model, epoch: int, total: int, p: TrainParams, out: Path) -> None:
    """Refuse to checkpoint non-finite weights (one device sync, where the save syncs anyway)."""
    flags = [
        torch.isfinite(v).all()
        for net in model.nets.values()
        for v in net.state_dict().values()
        if v.is_floating_point()
    ]
    if not bool(torch.stack(flags).all()):
        raise _diverged(epoch, total, "the weights are not finite after this epoch", p, out)


@dataclass
class TrainState:
    """Everything a run carries from epoch to epoch: the `model` (unpaired.models.training.Model:
    its networks, optimizers and this rank's own state, e.g. CycleGAN's pools), the optimizers' lr
    `schedules`, the random streams (torch's global one, the data plan's `g_data`, this rank's
    `g_rank`, stored as rng "pool": the pools draw from it), the last finished `epoch` and the
    `history` ([{"epoch": int, "metrics": {loss name: float, "lr": float}}], one per epoch, kept by
    rank 0). `state_dict()` is last.pt's format (the one place it is written); `load_state_dict()`
    restores it. Build with `TrainState.new`."""

    p: TrainParams
    device: torch.device
    rank: Rank
    names: list[str]  # the prepared training files (data_names)
    model: Model
    g_data: torch.Generator
    g_rank: torch.Generator
    channels_last: bool  # the networks' memory format (and the feeders' batches)
    schedules: dict[str, Any] = field(default_factory=dict)  # LambdaLR per model.optimizers key
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(
        cls,
        model: type[Model],
        p: TrainParams,
        device: torch.device,
        rank: Rank,
        names: list[str],
        channels_last: bool,
    ) -> TrainState:
        """A fresh run of `model`, seeded by train.seed (this rank's stream also by the rank)."""
        torch.manual_seed(p.seed)
        g_data = torch.Generator().manual_seed(p.seed + 1)  # the epoch plan: the same on every rank
        g_rank = torch.Generator().manual_seed(p.seed + 2 + 1_000_003 * rank.rank)  # (seed, rank)
        state = cls(
            p,
            device,
            rank,
            names,
            model(p, device, rank.world_size, g_rank, channels_last),
            g_data,
            g_rank,
            channels_last,
        )
        state.schedules = state._schedules()
        return state

    def _schedules(self, last_epoch: int = -1) -> dict[str, Any]:
        """LambdaLR schedules after the rule of the current train.epochs / train.epochs_decay; with
        `last_epoch` >= 0 (needs the optimizers' initial_lr) the lr is set for the epoch after it."""
        rule = lambda e: lr_factor(e, self.p.epochs, self.p.epochs_decay)  # noqa: E731
        return {
            name: torch.optim.lr_scheduler.LambdaLR(opt, rule, last_epoch=last_epoch)
            for name, opt in self.model.optimizers.items()
        }

    @property
    def resolution(self) -> dict[str, str]:
        """What this run's settings resolved to (the module function `resolution`)."""
        return resolution(self.device, self.p.precision, self.channels_last)

    @property
    def total(self) -> int:
        """The epochs of the schedule: train.epochs + train.epochs_decay."""
        return self.p.epochs + self.p.epochs_decay

    @property
    def lr(self) -> float:
        """The current lr of the model's first optimizer (CycleGAN: opt_G's)."""
        return next(iter(self.model.optimizers.values())).param_groups[0]["lr"]

    def end_epoch(self, losses: dict[str, float], out: Path) -> bool:
        """Close epoch `epoch` + 1, on every rank alike (the losses are all ranks' means, the weights
        the same on every rank): stop on non-finite losses before anything of the epoch is written,
        step the lr schedules, count the epoch; when the epoch is to be saved (every train.save_every
        epochs, and the last), stop on non-finite weights too. True when it is to be saved."""
        epoch = self.epoch + 1
        check_finite(epoch, self.total, losses, self.p, out)
        for schedule in self.schedules.values():
            schedule.step()
        self.epoch = epoch
        saving = epoch % self.p.save_every == 0 or epoch == self.total
        if saving:
            check_finite_weights(self.model, epoch, self.total, self.p, out)
        return saving

    def rank_state(self) -> dict[str, Any]:
        """What is this rank's own: the model's (its pools) and the random stream they draw from."""
        return {**self.model.rank_state(), "pool": self.g_rank.get_state()}

    def epoch_file(self) -> dict[str, Any]:
        """The epoch file's content: the generators and their model config (checkpoint format)."""
        return self.model.epoch_file(self.epoch)

    def state_dict(self, other_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """last.pt's content (CPU tensors; nothing from the clock, host or process). `other_ranks`:
        ranks 1..'s rank_state(), gathered by rank 0."""
        run = run_params(self.p)
        state = self.epoch_file()
        state.update(
            {
                "run_hash": run_hash(run, self.names),
                "run_params": run,
                "data_names": self.names,
                "world_size": self.rank.world_size,
                **self.resolution,  # device, precision, memory_format
                "nets": {
                    name: {k: v.detach().cpu() for k, v in net.state_dict().items()}
                    for name, net in self.model.nets.items()
                },
                **{f"opt_{name}": opt.state_dict() for name, opt in self.model.optimizers.items()},
                **{
                    f"sched_{name}": schedule.state_dict()
                    for name, schedule in self.schedules.items()
                },
                **self.model.rank_state(),
                "other_ranks": other_ranks or [],
                "rng": {
                    "torch": torch.get_rng_state(),
                    "data": self.g_data.get_state(),
                    "pool": self.g_rank.get_state(),
                    "cuda": torch.cuda.get_rng_state(self.device)
                    if self.device.type == "cuda"
                    else None,
                },
                "history": self.history,
            }
        )
        return state

    def load_state_dict(self, state: dict[str, Any], last: Path, extended: bool = False) -> None:
        """Restore a verified last.pt state (rank 0's own state from the top level, other ranks' from
        `other_ranks`). `extended`: the schedule grew, so the lr follows the new rule from the
        resumed epoch on. Raises UserError (one line) when the state does not fit the model."""
        model = self.model
        try:
            before = stored_resolution(state)
            for name, net in model.nets.items():
                net.load_state_dict(state["nets"][name])
            for name, opt in model.optimizers.items():
                load_optimizer_state(opt, state[f"opt_{name}"])
            if extended:  # the new rule's lr for the next epoch; the stored counters kept
                first = next(iter(self.schedules))
                self.schedules = self._schedules(
                    last_epoch=state[f"sched_{first}"]["last_epoch"] - 1
                )
            for name, schedule in self.schedules.items():
                schedule.load_state_dict(
                    {
                        k: v
                        for k, v in state[f"sched_{name}"].items()
                        if not (extended and k == "_last_lr")
                    }
                )
            own = (
                state["other_ranks"][self.rank.rank - 1]
                if not self.rank.main
                else {**{k: state[k] for k in model.RANK_STATE}, "pool": state["rng"]["pool"]}
            )
            model.load_rank_state(own, self.device)
            self.g_rank.set_state(own["pool"])
            torch.set_rng_state(state["rng"]["torch"])
            self.g_data.set_state(state["rng"]["data"])
            if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:
            detail = " ".join(str(err).split())[:200]
            raise UserError(
                f"{last}: its stored state does not fit the models its train params describe "
                f"({type(err).__name__}: {detail}); it was edited or written by another version: "
                f"move {last.parent} away to start afresh"
            ) from None
        moved = [
            f"{k} {before[k]} -> {v}" for k, v in self.resolution.items() if before.get(k, v) != v
        ]
        if moved and self.rank.main:
            print(
                f"train: {last} was trained with another resolution of the same params ({', '.join(moved)}); "
                f"continuing it with its optimizer state converted (moments laid out as the weights, Adam "
                f"fused as this device runs it); its numbers will differ from a run on one setting: move "
                f"{last.parent} away to start afresh"
            )
        self.epoch = state["epoch"]
        self.history = [
            {
                "epoch": r["epoch"],
                "metrics": {
                    k: v for k, v in r["metrics"].items() if k in model.LOSS_NAMES or k == "lr"
                },
            }
            for r in state["history"]
        ]

    def save(self, out: Path, writer: Writer | None = None) -> None:
        """On every rank, when an epoch is to be saved: the ranks' own state is gathered, rank 0 writes
        out/last.pt, then out/epoch_NNN.pt (a missing epoch file is rebuilt from last.pt), and no
        rank goes on (or exits) before rank 0 holds them. With a `writer` (rank 0's), the files are
        written on its thread from a copy of the state taken now (writer.detached: the same bytes),
        so training goes on meanwhile; the caller joins the writer before the next hand-over and at
        every exit. Without one they are whole when this returns."""
        others = self.rank.gather(self.rank_state())[1:]
        if self.rank.main:
            files = (
                (self.state_dict(others), out / "last.pt"),
                (self.epoch_file(), out / f"epoch_{self.epoch:03d}.pt"),
            )
            for content, path in files:
                if writer is None:
                    checkpoint.save(content, path)
                else:
                    writer.submit(checkpoint.save, detached(content), path)
        self.rank.barrier()
