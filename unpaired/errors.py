"""One-line errors for the user, and the wrapper that turns them into an exit status.

Anything a user can cause (bad params, a bad file, a failed download, missing credentials) raises a
`UserError` whose message is one line naming the key or file and what to do. Stages and the CLI run
through `main_guard`, which prints that line as `error: ...` and exits with status 2 (so does a full
disk, naming the file and the free space); any other exception is a bug and keeps its traceback.

Ctrl-C is one line too, whenever it comes: `interrupted while starting <stage>` while a stage still
imports its libraries (`interrupt_while_starting`, installed by the stages package before anything
else), `interrupted` once main_guard runs; either way status 130, and any later Ctrl-C is ignored
while the process exits, so that none lands in an exit handler (tqdm's, weakref's) as a second
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

NO_SPACE = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
)  # the errnos of a full disk, quota, `ulimit -f`


class UserError(Exception):
    """An error caused by input, not by a bug; str(err) is one line."""


class SourceError(UserError):
    """Data from outside failed for a reason outside params (network, credentials, a bad file or
    archive). One line. (The sources raise it; so does unpaired.safe_archive.)"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `UserError` line (`error: PROG: MESSAGE; usage: ...`, status
    2 through main_guard) instead of argparse's two lines and exit."""

    def error(self, message: str) -> typing.NoReturn:
        usage = self.format_usage().strip().removeprefix("usage: ")
        raise UserError(f"{self.prog}: {message}; usage: {usage}")


def _ignore_interrupts() -> None:
    """From now on Ctrl-C (SIGINT) is ignored: the process is already stopping on an earlier one."""
    with contextlib.suppress(ValueError):  # signals can only be set in the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that Ctrl-C does not cut short (SIGINT ignored meanwhile, then handled as before): for
    rewriting outputs whole on the way out of an interrupted or failed run."""
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to hold off
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


_starting: str | None = None  # the stage interrupt_while_starting speaks for


def _stop_while_starting(signum: int, frame: object) -> None:
    # os._exit, not an exception: one raised from a signal handler can land in a finalizer or a
    # library's catch-all mid-import and be swallowed (the stage then ran on). Nothing is written
    # before main() runs, so there is nothing to clean up.
    _ignore_interrupts()
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):  # a worker of torchrun: its launcher says it
        with contextlib.suppress(Exception):
            print(f"interrupted while starting {_starting}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(130)


def interrupt_while_starting(name: str) -> None:
    """Until main_guard runs: Ctrl-C (SIGINT) ends the process with one line on stderr, `interrupted
    while starting <name>`, and status 130, instead of the KeyboardInterrupt traceback of whatever
    library was being imported; any later Ctrl-C is ignored while it exits. A worker of torchrun
    (unpaired.torchrun) exits with status 130 and prints nothing: its launcher, which the terminal's
    Ctrl-C reaches too, prints `interrupted` once for the run. The stages package installs it first
    thing."""
    global _starting
    _starting = name
    signal.signal(signal.SIGINT, _stop_while_starting)


def main_guard(fn: Callable[[], None]) -> None:
    """Run a program's main `fn`: a UserError is its one line `error: ...` (status 2), Ctrl-C is
    `interrupted` (status 130), a full disk one line (status 2); a bug keeps its traceback. Takes
    Ctrl-C over from interrupt_while_starting."""
    with contextlib.suppress(ValueError):
        if signal.getsignal(signal.SIGINT) is _stop_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fn()
    except UserError as err:
        print(f"error: {err}{_exp_hint()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _ignore_interrupts()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        # A full disk where no atomic writer caught it (a library writing logs, ...): still one line.
        if err.errno not in NO_SPACE:
            raise
        print(
            f"error: {no_space_error(err.filename, err)}", file=sys.stderr
        )  # filename: None if unknown
        sys.exit(2)


def end_process() -> None:
    """End a program that finished its work without the interpreter's teardown: the exit handlers
    (atexit) run, stdout and stderr are flushed, then os._exit(0). Why: a process that imported
    torch spends 0.7-1.5 s after its last line tearing down its modules (measured on a 2-core
    machine: `python -c "import torch"` takes 0.7 s longer to exit than to run, while its exit
    handlers take under 0.01 s; the train stage 1.4 s), time each `make repro` would wait for
    nothing. Only where nothing is left to finish: when another thread that Python would wait for
    (not a daemon) or a child process (multiprocessing) is still alive, the interpreter exits as
    usual. The stages close every file they write before they return."""
    import atexit
    import multiprocessing
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or multiprocessing.active_children():
        return
    atexit._run_exitfuncs()  # what a normal exit runs first (no public name for it)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _exp_hint() -> str:
    """Under `dvc exp run` (which sets DVC_EXP_BASELINE_REV) params.yaml holds the `-S` overrides
    (DVC writes them into it, and leaves them there when a stage fails): say how to get the committed
    one back."""
    if not os.environ.get("DVC_EXP_BASELINE_REV"):
        return ""
    return (
        "; `dvc exp run -S` wrote its overrides into params.yaml and removed the failed stage's "
        "outputs: `git checkout params.yaml` restores the committed params, then `git checkout "
        "metrics && uv run dvc checkout` the outputs"
    )


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def no_space_error(path: str | Path | None, err: OSError, needed: int | None = None) -> UserError:
    """One line for a write that failed for lack of space (ENOSPC, EDQUOT) or a file size limit
    (EFBIG): the file (None: unknown, e.g. a buffered write failing on flush), the bytes needed when
    known, and the space free where it was written (shutil.disk_usage)."""
    target = Path(path) if path is not None else Path.cwd() / "-"
    folder = next((p for p in (target.parent, *target.parents) if p.is_dir()), Path("."))
    free = shutil.disk_usage(folder).free
    need = f"{_human(needed)} needed, " if needed is not None else ""
    subject = f"{path}: " if path is not None else "a write failed: "
    if err.errno == errno.EFBIG:
        return UserError(
            f"{subject}file too large for this process's file size limit (`ulimit -f`; "
            f"{need}{_human(free)} free on the disk); raise the limit and re-run"
        )
    what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on the device"
    intact = "; the previous output is intact" if path is not None else ""
    return UserError(
        f"{subject}{what} ({need}{_human(free)} free in {folder}); free some space "
        f"(or point the folder elsewhere) and re-run{intact}"
    )
