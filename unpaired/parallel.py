"""Run a function over many items on all cores, with a progress bar, keeping input order."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from tqdm import tqdm

from unpaired.threads import cpu_count

from unpaired.errors import UserError

A = TypeVar("A")
R = TypeVar("R")


def default_workers() -> int:
    return cpu_count()


def pmap(fn: Callable[[A], R], items: Iterable[A], *, workers: int | None = None, desc: str = "",
         chunksize: int = 16) -> list[R]:
    """`[fn(x) for x in items]` on `workers` processes (all cores by default). `fn` must be a
    module-level function. With one worker it runs in this process (no pool start-up cost). A worker
    killed from outside is one `UserError` line; an exception in `fn` is raised here as it is."""
    items = list(items)
    workers = default_workers() if workers is None else workers
    bar = dict(total=len(items), desc=desc, unit="img", disable=None, leave=False)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in tqdm(items, **bar)]
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(tqdm(pool.map(fn, items, chunksize=chunksize), **bar))
    except BrokenProcessPool:
        # A worker killed from outside (the kernel's out-of-memory killer, most often): one line.
        raise UserError(f"{desc or 'a parallel step'}: a worker process was killed (out of memory?); "
                        f"free memory or use fewer cores (taskset -c 0 ...), then re-run") from None
