"""Run a function over many items on all cores, with a progress bar, keeping input order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import TypeVar

from tqdm import tqdm

from unpaired.errors import UserError
from unpaired.threads import cpu_count

A = TypeVar("A")
R = TypeVar("R")
AHEAD = 4  # chunks in flight per worker: enough to keep every core busy, few enough to bound memory


def default_workers() -> int:
    return cpu_count()


def _chunk(fn: Callable[[A], R], items: list[A]) -> list[R]:
    return [fn(x) for x in items]


def imap(
    fn: Callable[[A], R],
    items: Iterable[A],
    *,
    workers: int | None = None,
    desc: str = "",
    chunksize: int = 16,
    total: int | None = None,
) -> Iterator[R]:
    """`fn(x) for x in items`, lazily and in input order, on `workers` processes (all cores by
    default). `items` is read as the workers need it: at most workers × AHEAD chunks of `chunksize`
    items (and their results) are in flight, so memory does not grow with the item count (unlike
    Executor.map, which submits every item at once). `fn` must be a module-level function; with one
    worker it runs in this process. `total`: the item count for the progress bar, if known. A worker
    killed from outside is one `UserError` line; an exception in `fn` is raised here as it is."""
    workers = default_workers() if workers is None else workers
    bar = tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)
    with bar:
        if workers <= 1:
            for x in items:
                yield fn(x)
                bar.update()
            return
        source = iter(items)
        try:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending: deque[Future[list[R]]] = deque()
                while True:
                    while len(pending) < workers * AHEAD and (
                        chunk := list(islice(source, chunksize))
                    ):
                        pending.append(pool.submit(_chunk, fn, chunk))
                    if not pending:
                        return
                    results = pending.popleft().result()
                    bar.update(len(results))
                    yield from results
        except BrokenProcessPool:
            # A worker killed from outside (the kernel's out-of-memory killer, most often): one line.
            raise UserError(
                f"{desc or 'a parallel step'}: a worker process was killed (out of memory?); "
                f"free memory or use fewer cores (taskset -c 0 ...), then re-run"
            ) from None


def pmap(
    fn: Callable[[A], R],
    items: Iterable[A],
    *,
    workers: int | None = None,
    desc: str = "",
    chunksize: int = 16,
) -> list[R]:
    """`[fn(x) for x in items]` on `workers` processes (all cores by default), as a list (see imap:
    the same errors). With one worker, or one item, it runs in this process (no pool start-up cost)."""
    items = list(items)
    workers = default_workers() if workers is None else workers
    return list(
        imap(
            fn,
            items,
            workers=1 if len(items) <= 1 else workers,
            desc=desc,
            chunksize=chunksize,
            total=len(items),
        )
    )
