"""Run a function over many items on all cores, with a progress bar, keeping input order."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

A = TypeVar("A")
R = TypeVar("R")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pmap(fn: Callable[[A], R], items: Iterable[A], *, workers: int | None = None, desc: str = "",
         chunksize: int = 16) -> list[R]:
    """`[fn(x) for x in items]` on `workers` processes (all cores by default). `fn` must be a
    module-level function. With one worker it runs in this process (no pool start-up cost)."""
    items = list(items)
    workers = default_workers() if workers is None else workers
    bar = dict(total=len(items), desc=desc, unit="img", disable=None, leave=False)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in tqdm(items, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=chunksize), **bar))
