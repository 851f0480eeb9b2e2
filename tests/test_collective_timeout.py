"""unpaired.distributed.init's collective timeout, with 2 real gloo processes on 127.0.0.1: rank 0
works alone for a while (as it does unpacking the data or verifying checkpoints) while rank 1 waits
in a barrier; the timeout given to init, or COLLECTIVE_TIMEOUT by default, decides whether rank 1
keeps waiting or gives up."""

import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from unpaired import distributed

pytestmark = pytest.mark.skipif(
    not dist.is_available() or distributed.cpu_cores() < 2,
    reason="needs torch.distributed and 2 CPU cores",
)


def _worker(rank: int, port: int, timeout_s: float, how: str, solo_s: float, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    me = distributed.Rank(rank, 2, rank, 2)
    if how == "constant":  # the default: init must read COLLECTIVE_TIMEOUT
        distributed.COLLECTIVE_TIMEOUT = timedelta(seconds=timeout_s)
        distributed.init(me, torch.device("cpu"))
    else:
        distributed.init(me, torch.device("cpu"), timeout=timedelta(seconds=timeout_s))
    dist.barrier()  # both joined
    if me.main:
        time.sleep(solo_s)  # rank 0's solo work
    t0 = time.monotonic()
    try:
        dist.barrier()
        queue.put((rank, "passed", time.monotonic() - t0))
    except RuntimeError:
        queue.put((rank, "timed out", time.monotonic() - t0))
    queue.close()
    queue.join_thread()  # the put is written before the exit
    os._exit(0)  # no goodbye: the peer may be gone


def run(timeout_s: float, how: str, solo_s: float) -> dict[int, tuple[str, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # (the workers compute nothing: a fork saves each a torch import)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, port, timeout_s, how, solo_s, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 120
    try:
        while len(got) < 2:
            try:
                rank, what, seconds = queue.get(timeout=1)
                got[rank] = (what, seconds)
            except queue_module.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not crashed and time.monotonic() < deadline, (
                    f"worker exit codes {crashed}, results {got}"
                )
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return got


@pytest.mark.parametrize("how", ["argument", "constant"])
def test_a_rank_waiting_past_the_timeout_gives_up(how):
    got = run(timeout_s=1, how=how, solo_s=5)
    assert got[1][0] == "timed out" and got[1][1] < 4, got


def test_a_rank_waiting_within_the_timeout_keeps_waiting():
    got = run(timeout_s=60, how="argument", solo_s=3)
    assert got[1][0] == "passed" and got[1][1] >= 2.5, got
    assert got[0][0] == "passed"


def test_the_default_outlasts_nccls_10_minutes():
    assert distributed.COLLECTIVE_TIMEOUT > timedelta(minutes=10)
