"""The DVC stages: one module per stage of dvc.yaml, run as `python -m stages.<name>` with the paths
its `cmd` passes.

Importing this package comes first in every stage, before the stage module imports anything, so it
is the one place for what must precede the libraries:
- Ctrl-C while the stage still starts (pandas and torch take seconds to import) is one line,
  `interrupted while starting <stage>`, and status 130, not a KeyboardInterrupt traceback
  (unpaired.errors.interrupt_while_starting; main_guard takes over once main() runs). Only when a
  stage is the program (`python -m stages.<name>`): a test that imports a stage keeps its Ctrl-C.
- OpenMP's wait policy: OpenMP reads OMP_WAIT_POLICY once, when torch loads it. The policy follows
  the load as the stage starts (idle: OpenMP's default, spinning; other work holding the CPUs:
  PASSIVE), the thread count (`threads: auto`, all CPUs) the machine alone: unpaired/threads.py says
  why. Every stage therefore imports in plain order.
"""

import sys

from unpaired import errors, threads

_argv = sys.orig_argv
_module = _argv[_argv.index("-m") + 1] if "-m" in _argv[:-1] else ""
if _module.startswith(f"{__name__}."):
    errors.interrupt_while_starting(_module.removeprefix(f"{__name__}."))
threads.choose_wait_policy()
