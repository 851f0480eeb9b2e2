"""`make repro`: check params.yaml, run `dvc repro`, and when it fails put back what DVC removed.

    python -m unpaired.repro [DVC REPRO ARGS...]      # e.g. `python -m unpaired.repro train`

Before DVC runs a stage it deletes the stage's outputs (all but `persist: true` ones), so a stage that
then fails (a params error, a 404, Ctrl-C) would leave nothing where its last good outputs were. DVC's
maintainers declined to restore them inside `dvc repro` (their issue #1800); this wrapper does it
from outside, with DVC's own public interfaces:

- params.yaml is checked first (a missing section would make DVC remove outputs before refusing);
- the outputs present before the run are recorded, and the `cache: false` ones (metrics: not in the
  DVC cache, so `dvc checkout` cannot bring them back) are copied aside into `.dvc/tmp/repro-kept/`
  (DVC's scratch folder, ignored by git; never the DVC cache);
- `dvc repro` runs with the given arguments, its output passed through as it comes;
- when it fails, every recorded output that is now missing is put back: the copied-aside ones by a
  rename, the cached ones by `dvc checkout <targets>` (dvc.lock's version, which a failed stage never
  changes); then one line `error: <the stage's error>; kept the previous ...` and a non-zero status.

Signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP are passed on to `dvc repro` (its own process group),
and the wrapper still puts back what was removed; a second one during `dvc checkout` stops it, and the
last line names the `uv run dvc checkout ...` that brings the rest back. A `kill -9` of the wrapper
takes `dvc repro` with it (a watchdog in dvc's group sees the wrapper's pipe close); the next run
finds the killed run's folder, puts back what that run removed and removes the folder first, and
removes the temporaries a killed stage left next to the outputs (files.remove_stale_temporaries).

The output passes through as it comes, but `dvc repro`'s stderr is read through a pipe (to find the
stage's `error: ` line), so DVC shows no progress bars of its own.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from unpaired.errors import UserError, main_guard
from unpaired.files import creating, make_dirs, remove_stale_temporaries
from unpaired.params import PARAMS_FILE, check_file
from unpaired.presets import stale_composition

STATE = Path(".dvc/tmp/repro-kept")          # one run's record: present.json + kept/<output path>
LOCK = Path(".dvc/tmp/repro-kept.lock")      # held (flock) for the wrapper's whole run
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Watches dvc's process group (argv[1]) from a process group of its own, so that neither a signal the
# wrapper forwards to dvc's group (even one that lands while the watchdog's Python still starts) nor a
# kill of the wrapper's group reaches it. Its stdin is a pipe only the wrapper writes: EOF without the
# "done" byte means the wrapper died (kill -9), so it takes dvc and its stage down with it.
WATCHDOG = ("import os, signal, sys\n"
            "if sys.stdin.buffer.read(1) != b'd':\n"
            "    try:\n"
            "        os.killpg(int(sys.argv[1]), signal.SIGKILL)\n"
            "    except ProcessLookupError:\n"
            "        pass\n")


@dataclass(frozen=True)
class Output:
    path: str            # as dvc.yaml writes it, relative to the repository root
    stage: str           # DVC addressing, e.g. `fetch@a`
    cached: bool         # False for `cache: false` outputs (metrics)


def outputs(persist: bool = False) -> list[Output]:
    """Every non-persist output of every stage (persist ones DVC never deletes; with `persist`, those
    too), from DVC's index of dvc.yaml."""
    from dvc.repo import Repo
    with Repo(os.getcwd()) as repo:
        return [Output(out.def_path, stage.addressing, bool(out.use_cache))
                for stage in repo.index.stages for out in stage.outs if persist or not out.persist]


def remove_stale(everything: list[Output]) -> None:
    """The temporaries a killed stage left next to (and, for folders DVC keeps, inside) its outputs:
    removed when their writer is dead (files.remove_stale_temporaries), so none outlives this run."""
    folders = {Path(o.path).parent for o in everything} | {Path(o.path) for o in everything}
    remove_stale_temporaries(*sorted(folders))


def _exists(path: str | Path) -> bool:
    return os.path.lexists(path)


def _copy(src: Path, dst: Path) -> None:
    make_dirs(dst.parent)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


def keep(present: list[Output]) -> None:
    """Record `present` and copy its `cache: false` outputs aside (STATE must not exist)."""
    with creating(STATE):
        STATE.mkdir(parents=True)
    for out in present:
        if not out.cached:
            _copy(Path(out.path), STATE / "kept" / out.path)
    (STATE / "present.json").write_text(json.dumps([out.__dict__ for out in present]))


def put_back(signals: Signals) -> tuple[list[str], list[str]]:
    """Put back what a failed run removed: STATE's record of the outputs present before it, those now
    missing. Returns (what was put back, notes: what could not be, with the command). STATE is
    removed."""
    present = [Output(**o) for o in json.loads((STATE / "present.json").read_text())]
    missing = [o for o in present if not _exists(o.path)]
    restored, notes = [], []
    for out in (o for o in missing if not o.cached):
        src, dst = STATE / "kept" / out.path, Path(out.path)
        make_dirs(dst.parent)
        os.replace(src, dst)                     # same filesystem: a rename, never half a file
        restored.append(out.path)
    cached = [o for o in missing if o.cached]
    lost: list[Output] = []
    if cached:
        count = signals.count
        targets = _targets(cached)
        print(f"repro: putting back the previous {', '.join(o.path for o in cached)}: "
              f"dvc checkout {' '.join(targets)}", file=sys.stderr, flush=True)
        status = _run_dvc(["checkout", *targets], signals)
        if status == 0 and signals.count == count:
            restored += [o.path for o in cached]
        else:            # interrupted: an output may be half checked out, so it is named as lost
            lost = [o for o in cached if signals.count > count or not _exists(o.path)]
            restored += [o.path for o in cached if o not in lost]
            if signals.count > count:
                notes.append("interrupted while `dvc checkout` put back the previous outputs")
    shutil.rmtree(STATE, ignore_errors=True)
    if lost:
        command = " ".join(_targets(lost))
        notes.append(f"the previous {', '.join(o.path for o in lost)} could not be restored"
                     f"{'' if signals.count else ' (not in the DVC cache)'}: "
                     f"run `uv run dvc checkout {command}` (or `uv run dvc pull {command}`)")
    return restored, notes


def _targets(cached: list[Output]) -> list[str]:
    """`dvc checkout` targets for the missing cached outputs: a stage's name when all of its cached
    outputs are missing (the short command to give), else the paths."""
    if not cached:
        return []
    every: dict[str, set[str]] = {}
    for out in outputs():
        if out.cached:
            every.setdefault(out.stage, set()).add(out.path)
    missing: dict[str, list[str]] = {}
    for out in cached:
        missing.setdefault(out.stage, []).append(out.path)
    targets = []
    for stage, paths in missing.items():
        targets += [stage] if set(paths) >= every.get(stage, set()) else paths
    return targets


def recover(signals: Signals) -> list[str]:
    """What a killed earlier run left: put back what it removed, then remove its folder."""
    if not STATE.exists():
        return []
    try:
        restored, notes = put_back(signals)
    except (OSError, ValueError, TypeError):        # killed while writing its record: nothing removed yet
        shutil.rmtree(STATE, ignore_errors=True)
        return []
    if restored:
        notes.insert(0, f"an earlier `make repro` was killed: put back its previous {', '.join(restored)}")
    return notes


class Signals:
    """Ctrl-C, SIGTERM and SIGHUP while the wrapper runs: counted (`count`), and passed on to the
    process group of the `dvc` command running now (`group`), never raised in the wrapper, which
    always finishes putting back what was removed."""

    def __init__(self) -> None:
        self.count = 0
        self.group: int | None = None
        self._old = {}

    def __enter__(self) -> Signals:
        self._old = {sig: signal.signal(sig, self._handle) for sig in FORWARDED}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        self.count += 1
        if self.group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signum)


def _run_dvc(args: list[str], signals: Signals, errors: list[str] | None = None) -> int:
    """`dvc ARGS` in a process group of its own with a watchdog, its output passed through (stderr's
    `error: ` lines appended to `errors`); returns its exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], process_group=0,
                            stderr=subprocess.PIPE if errors is not None else None)
    signals.group = proc.pid
    read, write = os.pipe()
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(proc.pid)], stdin=read,
                                process_group=0)
    os.close(read)
    try:
        if proc.stderr is not None and errors is not None:
            _tee(proc.stderr.fileno(), errors)
        while True:
            try:
                proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        signals.group = None
        with contextlib.suppress(BrokenPipeError):  # the watchdog is gone already: nothing to tell it
            os.write(write, b"d")
        os.close(write)
        watchdog.wait()
    return proc.returncode


def _tee(fd: int, errors: list[str]) -> None:
    """Copy `fd` to stderr as it comes (progress bars included), keeping the `error: ` lines."""
    line = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        os.write(2, chunk)
        line += chunk
        *done, line = line.replace(b"\r", b"\n").split(b"\n")
        errors += [text for raw in done if (text := raw.decode(errors="replace").strip()).startswith("error: ")]
    os.close(fd)


@contextlib.contextmanager
def _exclusive():
    make_dirs(LOCK.parent)
    with open(LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError("another `make repro` is running in this project; wait for it") from None
        yield


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    check_file()                                  # before DVC: a missing section would remove outputs
    stale = stale_composition(PARAMS_FILE)        # conf/ edited since params.yaml was composed from it
    if stale:
        print(f"warning: {stale}", flush=True)
    with _exclusive(), Signals() as signals:
        for note in recover(signals):
            print(f"note: {note}", file=sys.stderr)
        remove_stale(outputs(persist=True))
        present = [o for o in outputs() if _exists(o.path)]
        try:
            keep(present)
        except BaseException:
            shutil.rmtree(STATE, ignore_errors=True)
            raise
        if signals.count:
            shutil.rmtree(STATE, ignore_errors=True)
            raise KeyboardInterrupt
        errors: list[str] = []
        status = _run_dvc(["repro", *args], signals, errors)
        if status == 0 and not signals.count:
            shutil.rmtree(STATE, ignore_errors=True)
            return
        restored, notes = put_back(signals)
    first = errors[-1].removeprefix("error: ") if errors else (
        "interrupted" if signals.count else f"`dvc repro` failed (status {status}); see its output above")
    parts = [first]
    if restored:
        parts.append(f"kept the previous {', '.join(restored)} (put back as dvc.lock records them)")
    parts += notes
    print(f"error: {'; '.join(parts)}", file=sys.stderr)
    sys.exit(130 if signals.count else (status or 1))


if __name__ == "__main__":
    main_guard(main)
