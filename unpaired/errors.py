"""One-line errors for the user, and the wrapper that turns them into an exit status.

Anything a user can cause (bad params, a bad file, a failed download, missing credentials) raises a
`UserError` whose message is one line naming the key or file and what to do. Stages and the CLI run
through `main_guard`, which prints that line as `error: ...` and exits with status 2; any other
exception is a bug and keeps its traceback.
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
