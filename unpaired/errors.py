"""One-line errors for the user, and the wrapper that turns them into an exit status.

Anything a user can cause (bad params, a bad file, a failed download, missing credentials) raises a
`UserError` whose message is one line naming the key or file and what to do. Stages and the CLI run
through `main_guard`, which prints that line as `error: ...` and exits with status 2 (so does a full
disk, naming the file and the free space); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import typing
from collections.abc import Callable
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # the errnos of a full disk, quota, `ulimit -f`


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


def main_guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except UserError as err:
        print(f"error: {err}{_exp_hint()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        # A full disk where no atomic writer caught it (a library writing logs, ...): still one line.
        if err.errno not in NO_SPACE:
            raise
        print(f"error: {no_space_error(err.filename, err)}", file=sys.stderr)   # filename: None if unknown
        sys.exit(2)


def _exp_hint() -> str:
    """Under `dvc exp run` (which sets DVC_EXP_BASELINE_REV) params.yaml holds the `-S` overrides
    (DVC writes them into it, and leaves them there when a stage fails): say how to get the committed
    one back."""
    if not os.environ.get("DVC_EXP_BASELINE_REV"):
        return ""
    return "; `dvc exp run -S` wrote its overrides into params.yaml: `git checkout params.yaml` restores the committed one"


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
        return UserError(f"{subject}file too large for this process's file size limit (`ulimit -f`; "
                         f"{need}{_human(free)} free on the disk); raise the limit and re-run")
    what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on the device"
    intact = "; the previous output is intact" if path is not None else ""
    return UserError(f"{subject}{what} ({need}{_human(free)} free in {folder}); free some space "
                     f"(or point the folder elsewhere) and re-run{intact}")
