"""One-line errors for the user, and the wrapper that turns them into an exit status.

Anything a user can cause (bad params, a bad file, a failed download, missing credentials) raises a
`UserError` whose message is one line naming the key or file and what to do. Stages and the CLI run
through `main_guard`, which prints that line as `error: ...` and exits with status 2 (so does a full
disk, naming the file and the free space); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error caused by input, not by a bug; str(err) is one line."""


def main_guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        # A full disk where no atomic writer caught it (a library writing logs, ...): still one line.
        from unpaired.files import NO_SPACE, no_space_error
        if err.errno not in NO_SPACE:
            raise
        print(f"error: {no_space_error(err.filename, err)}", file=sys.stderr)   # filename: None if unknown
        sys.exit(2)
