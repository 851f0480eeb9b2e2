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
- when it fails, every recorded output that is no longer what it was and whose stage DVC did not
  record a new run of is put back (removed, half removed by an interrupted DVC, or written by a
  stage DVC was interrupted while recording): the copied-aside ones by a rename, the cached ones by
  `dvc checkout <path>...` (dvc.lock's version, which a failed stage never changes; by output path,
  never by stage, so that a `persist: true` output holding files DVC has not recorded, which is
  never touched, cannot make it refuse); then one line `error: <the stage's error>; kept the
  previous ...` and a non-zero status. The stage's own `error: ` line is not passed through: the
  last line carries it.

Signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP are passed on to `dvc repro` (its own process group),
and the wrapper still puts back what was removed; a second one during `dvc checkout` stops it, and the
last line names the `uv run dvc checkout <paths>` that brings the rest back. The wrapper gets SIGTERM
when its parent dies, however (prctl PR_SET_PDEATHSIG): a `kill -9` of `make` (which starts the
wrapper as its own child, see Makefile) or of `uv run` stops the run as SIGTERM does. A `kill -9` of
the wrapper takes `dvc repro` with it (a watchdog in dvc's group sees the wrapper's pipe close), and
a `kill -9` of dvc its stage (what is left in dvc's process group is stopped when dvc ends); the
next run finds the killed run's folder, puts back what that run removed and removes the folder
first, and removes the temporaries a killed stage left next to the outputs
(files.remove_stale_temporaries).

The output passes through as it comes, but `dvc repro`'s stderr is read through a pipe (to find the
stage's `error: ` line), so DVC shows no progress bars of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from unpaired.errors import UserError, main_guard
from unpaired.files import (
    SETTLED_ENV,
    creating,
    make_dirs,
    remove_stale_temporaries,
    tree,
)
from unpaired.params import PARAMS_FILE, check_file
from unpaired.presets import stale_composition
from unpaired.torchrun import parent_death_signal

STATE = Path(".dvc/tmp/repro-kept")  # one run's record: present.json + kept/<output path>
LOCK = Path(".dvc/tmp/repro-kept.lock")  # held (flock) for the wrapper's whole run
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Watches dvc's process group (argv[1]) from a process group of its own, so that neither a signal the
# wrapper forwards to dvc's group (even one that lands while the watchdog's Python still starts) nor a
# kill of the wrapper's group reaches it. Its stdin is a pipe only the wrapper writes: EOF without the
# "done" byte means the wrapper died (kill -9), so it takes dvc and its stage down with it.
WATCHDOG = (
    "import os, signal, sys\n"
    "if sys.stdin.buffer.read(1) != b'd':\n"
    "    try:\n"
    "        os.killpg(int(sys.argv[1]), signal.SIGKILL)\n"
    "    except ProcessLookupError:\n"
    "        pass\n"
)


@dataclass(frozen=True)
class Output:
    path: str  # as dvc.yaml writes it, relative to the repository root
    stage: str  # DVC addressing, e.g. `fetch@a`
    cached: bool  # False for `cache: false` outputs (metrics)
    lock: str = ""  # digest of the stage's dvc.lock entry (its deps', params' and outs' hashes)
    state: str = ""  # fingerprint of the output on disk before the run (see `fingerprint`)


def _stage_lock(stage) -> str:
    """A digest of what dvc.lock records for `stage`: every dep's, param's and output's hash. It
    changes exactly when DVC recorded a new run of the stage."""
    items = [
        [item.def_path, item.hash_info.name, item.hash_info.value]
        for item in [*stage.deps, *stage.outs]
    ]
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def outputs(persist: bool = False) -> list[Output]:
    """Every non-persist output of every stage (persist ones DVC never deletes; with `persist`, those
    too), from DVC's index of dvc.yaml and dvc.lock, with its stage's `lock` digest."""
    from dvc.repo import Repo

    with Repo(os.getcwd()) as repo:
        return [
            Output(out.def_path, stage.addressing, bool(out.use_cache), _stage_lock(stage))
            for stage in repo.index.stages
            for out in stage.outs
            if persist or not out.persist
        ]


def fingerprint(path: str | Path) -> str:
    """What is at `path` now, cheaply: a digest of (name, size, mtime) of every file under it (one
    lstat each, no file read), or "" when nothing is there. Any file written, removed or added since
    (DVC's removal interrupted half-way, a stage's new output) changes it."""
    path = Path(path)
    if not _exists(path):
        return ""
    h = hashlib.sha256()
    if path.is_dir() and not path.is_symlink():
        for rel, is_dir in tree(path):
            st = (path / rel).lstat()
            h.update(
                f"{rel}\0{'d' if is_dir else st.st_size}\0{0 if is_dir else st.st_mtime_ns}\n".encode()
            )
    else:
        st = path.lstat()
        h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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
    """Record `present` (with each output's fingerprint) and copy its `cache: false` outputs aside
    (STATE must not exist)."""
    with creating(STATE):
        STATE.mkdir(parents=True)
    for out in present:
        if not out.cached:
            _copy(Path(out.path), STATE / "kept" / out.path)
    record = [{**out.__dict__, "state": fingerprint(out.path)} for out in present]
    (STATE / "present.json").write_text(json.dumps(record))


def put_back(signals: Signals) -> tuple[list[str], list[str]]:
    """Put back what a failed run changed: every output recorded in STATE (present before it) whose
    stage DVC did not record a new run of (its dvc.lock entry is unchanged) and which is no longer
    what it was: removed by DVC, half removed (DVC interrupted while it deleted), or written by the
    stage but never recorded (interrupted while DVC recorded it). The `cache: false` ones come back
    from their copies; the cached ones by `dvc checkout <path>...` (by output path, never by stage:
    a stage's `persist: true` output holding files DVC has not recorded, a resumable training's
    checkpoints, made `dvc checkout <stage>` refuse), after what is there now is moved aside (DVC
    refuses to overwrite files it has not recorded). Persist outputs are never touched, nor are the
    outputs a stage settled as it ended (files.mark_settled) where they exist. Returns
    (what was put back, notes: what could not be, with the command that does it). STATE is removed."""
    present = [Output(**o) for o in json.loads((STATE / "present.json").read_text())]
    now = {(o.stage, o.path): o.lock for o in outputs()}
    changed = [
        o
        for o in present
        if now.get((o.stage, o.path)) == o.lock and fingerprint(o.path) != o.state
    ]
    changed += [
        o for o in present if not o.state and not _exists(o.path)
    ]  # a record without fingerprints
    # a stage that settled its outputs as it ended (files.mark_settled: train's logs tell the epochs
    # its checkpoints hold, a fresh run's moved the earlier ones aside) keeps those it left
    settled = {p.name for p in (STATE / "settled").glob("*")}
    changed = [o for o in changed if not (o.stage in settled and _exists(o.path))]
    restored, notes = [], []
    for out in (o for o in changed if not o.cached):
        src, dst = STATE / "kept" / out.path, Path(out.path)
        aside = STATE / "aside" / out.path
        if _exists(dst):
            make_dirs(aside.parent)
            os.replace(dst, aside)
        make_dirs(dst.parent)
        os.replace(src, dst)  # same filesystem: a rename, never half a file
        restored.append(out.path)
    cached = [o for o in changed if o.cached]
    lost: list[Output] = []
    if cached:
        for out in cached:
            if _exists(out.path):
                aside = STATE / "aside" / out.path
                make_dirs(aside.parent)
                os.replace(out.path, aside)
        count = signals.forwarded
        targets = [o.path for o in cached]
        print(
            f"repro: putting back the previous {', '.join(targets)}: dvc checkout {' '.join(targets)}",
            file=sys.stderr,
            flush=True,
        )
        # A checkout that fails without being stopped gets one more try before a command is named
        # (seen once under load, right after the interrupted `dvc repro` ended; cause not caught).
        for _ in range(2):
            status = _run_dvc(["checkout", *targets], signals)
            stopped = signals.forwarded > count  # a Ctrl-C passed on to the checkout
            if status != 0 or stopped:
                repair_rwlock()
            if status == 0 or stopped:
                break
        if status == 0 and not stopped:
            restored += targets
        else:  # interrupted: an output may be half checked out, so it is named as lost
            lost = [o for o in cached if stopped or not _exists(o.path)]
            restored += [o.path for o in cached if o not in lost]
            if stopped:
                notes.append("interrupted while `dvc checkout` put back the previous outputs")
    shutil.rmtree(STATE, ignore_errors=True)
    if lost:
        command = " ".join(o.path for o in lost)
        notes.append(
            f"the previous {', '.join(o.path for o in lost)} could not be restored"
            f"{'' if signals.count else ' (not in the DVC cache)'}: "
            f"run `uv run dvc checkout {command}` (or `uv run dvc pull {command}`)"
        )
    return restored, notes


RWLOCK = Path(".dvc/tmp/rwlock")  # DVC's record of the paths its running commands hold


def repair_rwlock() -> bool:
    """Remove DVC's .dvc/tmp/rwlock when it is not valid JSON: DVC rewrites it in place (truncate,
    then write), so a dvc interrupted or killed in between leaves it empty, and every later dvc
    command then refuses to run ("Unable to read RWLock-file"). It only lists the paths held by dvc
    commands still running; the wrapper's own (the only ones it can hold, see `_exclusive`) have
    ended. True if it removed it."""
    try:
        json.loads(RWLOCK.read_text())
    except FileNotFoundError:
        return False
    except (ValueError, OSError, UnicodeDecodeError):
        with contextlib.suppress(FileNotFoundError):
            RWLOCK.unlink()
        print(
            f"repro: removed {RWLOCK}, left half-written by the interrupted dvc (every later dvc "
            f"command would refuse to read it)",
            file=sys.stderr,
            flush=True,
        )
        return True
    return False


def recover(signals: Signals) -> list[str]:
    """What a killed earlier run left: put back what it removed, then remove its folder."""
    repair_rwlock()
    if not STATE.exists():
        return []
    try:
        restored, notes = put_back(signals)
    except (OSError, ValueError, TypeError):  # killed while writing its record: nothing removed yet
        shutil.rmtree(STATE, ignore_errors=True)
        return []
    if restored:
        notes.insert(
            0, f"an earlier `make repro` was killed: put back its previous {', '.join(restored)}"
        )
    return notes


class Signals:
    """Ctrl-C, SIGTERM and SIGHUP while the wrapper runs: counted (`count`), and passed on to the
    process group of the `dvc` command running now (`group`), never raised in the wrapper, which
    always finishes putting back what was removed.

    A signal that comes within REPEAT_GRACE seconds of the last one passed on is counted but not
    passed on: a double Ctrl-C means "stop", which the first one already does, and a second one
    reaching DVC while it stops its stage (a traceback) or `dvc checkout` while it puts the outputs
    back (outputs left missing) only makes a mess. One after that is passed on (`forwarded`)."""

    REPEAT_GRACE = 3.0  # seconds

    def __init__(self) -> None:
        self.count = 0
        self.forwarded = 0  # signals passed on to a dvc command
        self.group: int | None = None
        self._last: float | None = None  # time.monotonic() of the last signal passed on
        self._old = {}

    def __enter__(self) -> Signals:
        self._old = {sig: signal.signal(sig, self._handle) for sig in FORWARDED}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        self.count += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self.REPEAT_GRACE:
            return
        if self.count == 1 or self.group is not None:
            self._last = now  # the first signal starts the grace even with no dvc command running
        if self.group is not None:
            self.forwarded += 1
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signum)


def _run_dvc(args: list[str], signals: Signals, errors: list[str] | None = None) -> int:
    """`dvc ARGS` in a process group of its own with a watchdog, its output passed through (stderr's
    `error: ` lines appended to `errors`); returns its exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        process_group=0,
        stderr=subprocess.PIPE if errors is not None else None,
    )
    signals.group = proc.pid
    read, write = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(proc.pid)], stdin=read, process_group=0
    )
    os.close(read)
    tee = None
    try:
        if proc.stderr is not None and errors is not None:
            # a thread: the stderr pipe stays open as long as anything in dvc's group holds it (a stage
            # whose dvc was killed), and dvc's own end must be seen first
            tee = threading.Thread(target=_tee, args=(proc.stderr.fileno(), errors), daemon=True)
            tee.start()
        while True:
            try:
                proc.wait()
                break
            except InterruptedError:
                continue
        _stop_group(proc.pid)
        if tee is not None:
            tee.join()
    finally:
        signals.group = None
        with contextlib.suppress(
            BrokenPipeError
        ):  # the watchdog is gone already: nothing to tell it
            os.write(write, b"d")
        os.close(write)
        watchdog.wait()
    return proc.returncode


def _stop_group(group: int, grace: float = 10.0) -> None:
    """Stop what is left in dvc's process group once dvc itself has ended: nothing after a normal
    end, the stage's processes when dvc was killed (kill -9 of dvc leaves its stage running on,
    writing outputs the wrapper is about to put back): SIGTERM, then SIGKILL after `grace` seconds."""
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


ERROR_LINE = b"error: "


def _tee(fd: int, errors: list[str]) -> None:
    """Copy `fd` to stderr as it comes (progress bars included), except the stage's `error: ` lines:
    those are appended to `errors` (text, stripped) and not written, since the wrapper's last line
    repeats the stage's error (it was printed twice); main prints any it does not use. A line is held
    only while it may still become one (its first 7 bytes), then passed through as it comes."""
    held = b""  # the current line so far (after its last \r), while it may be an error line
    passing = False  # the current line is not one: its bytes go through as they come
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        out = bytearray()
        for piece in re.split(rb"([\r\n])", chunk):
            if piece in (b"\r", b"\n"):
                if piece == b"\n" and held.startswith(ERROR_LINE):
                    errors.append(held.decode(errors="replace").strip())
                else:
                    out += held + piece
                held, passing = b"", False
            elif passing:
                out += piece
            else:
                held += piece
                if not (ERROR_LINE.startswith(held) or held.startswith(ERROR_LINE)):
                    out += held
                    held, passing = b"", True
        if out:
            os.write(2, out)
    if held.startswith(ERROR_LINE):  # the last line, without its newline
        errors.append(held.decode(errors="replace").strip())
    elif held:
        os.write(2, held)
    os.close(fd)


@contextlib.contextmanager
def _exclusive():
    make_dirs(LOCK.parent)
    with open(LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                "another `make repro` is running in this project; wait for it"
            ) from None
        yield


def _own_environment() -> None:
    """Put this interpreter's folder first on PATH (and name its environment in VIRTUAL_ENV), as
    `uv run` would: dvc.yaml's `python -m stages...` must run in the environment the wrapper runs
    in, which `make repro` starts directly (Makefile: no `uv run` in between)."""
    folder = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != folder:
        os.environ["PATH"] = folder + (os.pathsep + path if path else "")
    if sys.prefix != sys.base_prefix:
        os.environ["VIRTUAL_ENV"] = sys.prefix


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    # Whatever started the wrapper (make, `uv run`, a shell) dies, even by kill -9: SIGTERM, handled
    # as on Ctrl-C (passed on to dvc's group, then the outputs put back). The kill reaches dvc and
    # the stage through the wrapper, so no process of the run outlives the command the user started.
    parent_death_signal(signal.SIGTERM)
    _own_environment()
    check_file()  # before DVC: a missing section would remove outputs
    stale = stale_composition(PARAMS_FILE)  # conf/ edited since params.yaml was composed from it
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
        os.environ[SETTLED_ENV] = str((STATE / "settled").resolve())  # for files.mark_settled
        status = _run_dvc(["repro", *args], signals, errors)
        if status != 0 or signals.count:
            repair_rwlock()
        if status == 0:  # finished: every stage it ran is recorded
            shutil.rmtree(STATE, ignore_errors=True)
            for line in errors:  # withheld by _tee for a last line there is no need for
                print(line, file=sys.stderr)
            if not signals.count:
                return
            # DVC ignores Ctrl-C while a stage's command ends (dvc/stage/run.py), and went on
            print(
                "error: interrupted after `dvc repro` had finished: every stage it ran is recorded in "
                "dvc.lock; nothing to put back",
                file=sys.stderr,
            )
            sys.exit(130)
        for line in errors[:-1]:  # the last one goes into the last line
            print(line, file=sys.stderr, flush=True)
        restored, notes = put_back(signals)
    first = (
        errors[-1].removeprefix("error: ")
        if errors
        else (
            "interrupted"
            if signals.count
            else f"`dvc repro` was killed by {_signal_name(-status)}"
            if status < 0
            else f"`dvc repro` failed (status {status}); see its output above"
        )
    )
    parts = [first]
    if restored:
        parts.append(f"kept the previous {', '.join(restored)} (put back as dvc.lock records them)")
    parts += notes
    print(f"error: {'; '.join(parts)}", file=sys.stderr)
    sys.exit(130 if signals.count else (status if status > 0 else 1))


if __name__ == "__main__":
    main_guard(main)
