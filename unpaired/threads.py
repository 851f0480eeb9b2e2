"""CPU threads for torch: the `train.threads` / `evaluate.threads` setting and OpenMP's wait policy.

Why: torch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels). Two rules,
measured with benchmarks/threads.py and benchmarks/e2e.py (docs/benchmarks.md, "Train"):
- The thread count, `auto`, depends on the machine alone: every CPU of the process's affinity mask
  (`auto_threads`). The thread count changes the trained bytes (oneDNN splits its reductions by
  thread), and the same params must give the same bytes on one machine, so it never follows the
  load. On an idle machine all CPUs with spinning threads is the fastest setting.
- The wait policy, which never changes a number (the threads and their shares of every loop are
  the same; only what an idle thread does differs), follows the load when the process starts
  (`choose_wait_policy`, called by stage entry points before `import torch`: OpenMP reads it once,
  when torch loads it). Idle threads spin by default, the fastest on an idle machine; but when
  other work holds the CPUs, spinning threads and the other work take turns on the cores and a
  step can take 5-30 times as long. So when other processes use at least BUSY_CPUS of this
  process's CPUs, the policy is PASSIVE (idle threads sleep), and `load_note` gives the stage its
  one line saying so. A policy the user set (OMP_WAIT_POLICY) is kept.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

# OpenMP reads these once, when the library loads (at `import torch`).
WAIT_POLICY = "OMP_WAIT_POLICY"
BUSY_CPUS = 0.5  # CPUs' worth of other work at or above which the machine counts as busy
SAMPLE_S = 0.2  # how long the load is sampled at start (the process sleeps meanwhile)


@dataclass(frozen=True)
class Start:
    """What `choose_wait_policy` found and did: `busy`, the CPUs' worth of work other processes ran
    on this process's CPUs while it sampled (None: not measurable here); `cpus`, how many CPUs it
    may use; `policy`, OMP_WAIT_POLICY as torch will read it (None: OpenMP's default, spinning);
    `chosen_by`, "user" when OMP_WAIT_POLICY was set before, else "load"."""

    busy: float | None
    cpus: int
    policy: str | None
    chosen_by: str


START: Start | None = None  # set by choose_wait_policy, read by load_note


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which taskset and containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_ticks(cpus: set[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks so far, summed over `cpus` (None: all), from /proc/stat; None
    where it cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def other_load(interval: float = SAMPLE_S) -> float | None:
    """CPUs' worth of work that other processes ran on this process's CPUs during `interval`
    seconds (it sleeps meanwhile; its own few ticks are subtracted), e.g. 1.0 while one other
    process burns a core. None where /proc/stat cannot be read."""
    try:
        mine = os.sched_getaffinity(0)
    except AttributeError:
        mine = None
    before, own0 = _cpu_ticks(mine), os.times()
    if before is None:
        return None
    time.sleep(interval)
    after, own1 = _cpu_ticks(mine), os.times()
    if after is None or after[1] <= before[1]:
        return None
    cpus = len(mine) if mine else (os.cpu_count() or 1)
    share = (after[0] - before[0]) / (after[1] - before[1])  # of all the CPUs' time
    own = (own1.user + own1.system - own0.user - own0.system) / max(
        own1.elapsed - own0.elapsed, 1e-9
    )
    return max(0.0, share * cpus - own)


def wait_policy_for(busy: float | None) -> str | None:
    """OMP_WAIT_POLICY for other processes' load `busy` (CPUs' worth): PASSIVE at BUSY_CPUS or
    more, else None (OpenMP's default: idle threads spin a while, then sleep)."""
    return "PASSIVE" if busy is not None and busy >= BUSY_CPUS else None


def choose_wait_policy(interval: float = SAMPLE_S) -> Start | None:
    """Before torch is imported: keep the user's OMP_WAIT_POLICY, else sample the load for
    `interval` seconds and set PASSIVE when other work holds the CPUs (wait_policy_for). Returns
    what it found (also kept in START); None, changing nothing, when torch is already imported (the
    policy would not take effect)."""
    global START
    if "torch" in sys.modules:
        return None
    user = os.environ.get(WAIT_POLICY)
    if user:
        START = Start(None, cpu_count(), user.upper(), "user")
        return START
    busy = other_load(interval)
    policy = wait_policy_for(busy)
    if policy:
        os.environ[WAIT_POLICY] = policy
    START = Start(busy, cpu_count(), policy, "load")
    return START


def load_note(key: str, setting: int | str) -> str | None:
    """One line for a stage to print when other work held the CPUs as it started and the run uses
    several threads (`key`: the params key, e.g. train.threads, set to `setting`); None otherwise."""
    import torch

    start, n = START, torch.get_num_threads()
    if start is None or start.busy is None or start.busy < BUSY_CPUS or n < 2:
        return None
    how = (
        "wait passively (OMP_WAIT_POLICY=PASSIVE), so they share the CPUs with it, slower, rather "
        "than collapse"
        if start.policy == "PASSIVE"
        else f"wait as OMP_WAIT_POLICY={start.policy or 'unset'} says"
    )
    return (
        f"note: other work is using {start.busy:.1f} of the {start.cpus} CPUs as this starts: its "
        f"{n} threads ({key}: {setting}) {how}; {key}: 1 may be faster beside such work, with "
        f"other bytes (the thread count changes the trained weights)"
    )


def check(setting: int | str, key: str) -> None:
    """Raise ParamsError unless `setting` is "auto" or an integer >= 1."""
    from unpaired import params

    if isinstance(setting, str):
        params.check(
            setting == "auto", key, f"use auto or a number of threads >= 1, got {setting!r}"
        )
    else:
        params.check(setting >= 1, key, f"use auto or a number of threads >= 1, got {setting}")


def auto_threads() -> int | None:
    """What `auto` means: OMP_NUM_THREADS when the user set it (None: leave torch's count, which
    follows it), else every CPU of the affinity mask: the machine alone decides, never its load."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return cpu_count()


def apply(setting: int | str) -> int:
    """Set torch's intra-op threads for `setting` ("auto" or N); returns the count in effect."""
    import torch

    n = auto_threads() if setting == "auto" else int(setting)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def describe(setting: int | str) -> str:
    """One phrase for messages: `auto (2 threads, passive wait)`."""
    import torch

    policy = (os.environ.get(WAIT_POLICY) or "default").lower()
    return f"{setting} ({torch.get_num_threads()} threads, {policy} wait)"


def passive_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy (for commands that run beside
    other work by design, e.g. translate and export). Call before torch is imported; returns False
    (and changes nothing) if torch is already imported, since it would not take effect."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return True
