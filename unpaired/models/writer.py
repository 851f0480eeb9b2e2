"""Rank 0's writes off the training thread: each epoch's sample grid PNG, images/s file, dvclive
logs and checkpoints are written by one background thread, in the order they are handed over (the
order the stage wrote them in before), while the next epoch trains.

What is handed over is the epoch's own: a copy of every tensor's storage (`detached`), so the
training that goes on cannot change what is written, and the bytes are those a write on the
training thread gives (tests/test_train_speed.py compares them). The training thread waits for the writer (`join`) before it hands over the next
epoch's writes and at every end of the run, so at most one epoch's writes are in flight and every
file is whole when the stage exits. A write that fails stops the writes after it (a checkpoint is
never written after a failed sample or last.pt) and its error is raised on the training thread by
the next `join`, as it would have been raised there: one line for a UserError (a full disk, ...).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


def detached(obj: Any, _copies: dict[int, Any] | None = None) -> Any:
    """`obj` (dicts, lists, tuples of tensors and plain values) with every tensor's storage copied
    once, on its device, and each tensor rebuilt on its copy with the same offset, shape and strides:
    what a write on another thread may read while training updates the originals in place.
    Tensors that shared a storage share its copy, so torch.save writes the same bytes as for `obj`."""
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        storage = tensor.untyped_storage()
        copy = copies.get(storage._cdata)
        if copy is None:
            copy = copies[storage._cdata] = storage.clone()
        return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
            copy, tensor.storage_offset(), tensor.size(), tensor.stride()
        )
    if isinstance(obj, dict):
        return {k: detached(v, copies) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detached(v, copies) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detached(v, copies) for v in obj)
    return obj


class Writer:
    """One background thread that runs the writes it is given (`submit`), in order. `join` waits
    until all of them have run and raises the first error one of them raised (then forgets it);
    after an error the writes still queued are skipped. The thread is a daemon: a process that ends
    without `join` (killed) leaves what atomic writes leave, the old file or the new one."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on the writer thread after the writes submitted before it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="unpaired-writer", daemon=True)
            self._thread.start()
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, args = item
                if self._error is None:
                    fn(*args)
            except BaseException as err:  # raised on the training thread by join()
                self._error = err
            finally:
                self._queue.task_done()

    def join(self) -> None:
        """Wait for every submitted write; raise the first error one raised, if any."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> BaseException | None:
        """At the end of the run, however it ends: wait for the writes, stop the thread, and return
        (not raise) the error one raised, for a caller that is already raising another."""
        self._queue.join()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error
