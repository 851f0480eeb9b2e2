"""CPU threads for torch: the `train.threads` / `evaluate.threads` setting and OpenMP's wait policy.

Why: torch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels) whose idle threads
spin-wait by default. On a small machine shared with other work, spinning threads and the other
work take turns on the same cores, and one step can take 50x as long (12.7 s instead of 0.24 s on
a 2-core machine). Two measures, measured with benchmarks/threads.py:
- `passive_wait()` sets OMP_WAIT_POLICY=PASSIVE (idle threads sleep) unless the user set it. OpenMP
  reads it once, when torch loads it, so stage entry points call it before `import torch`.
- `apply(setting)` sets torch's intra-op thread count: `auto` (see `auto_threads`) or N >= 1.
  `auto` leaves one CPU to the rest of the machine: an OpenMP parallel region waits for its slowest
  thread, so one thread that shares its core with other work slows all of them down.
"""

from __future__ import annotations

import os
import sys

# OpenMP reads these once, when the library loads (at `import torch`).
WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy. Call before torch is imported;
    returns False (and changes nothing) if torch is already imported, since it would not take effect."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return True


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which taskset and containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
    follows it), else one thread fewer than the CPUs of the affinity mask, at least 1. On the shared
    2-CPU machine this was measured on (benchmarks/threads.py; README, "Train"), that 1 thread was
    the fastest setting with and without an extra core-burning process."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cpu_count() - 1)


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

    policy = os.environ.get(WAIT_POLICY, "default").lower()
    return f"{setting} ({torch.get_num_threads()} threads, {policy} wait)"
