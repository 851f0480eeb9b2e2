"""The DVC stages: one module per stage of dvc.yaml, run as `python -m stages.<name>` with the paths
its `cmd` passes.

Importing this package sets OpenMP's wait policy before any stage module loads torch: OpenMP reads
OMP_WAIT_POLICY once, when torch loads it, so this is the one place that may come first
(unpaired/threads.py says why the policy matters). Every stage therefore imports in plain order.
"""

from unpaired import threads

threads.passive_wait()
