"""unpaired.allocator: a CPU train step stops mapping and faulting in fresh memory every step, in real
processes (the allocator's settings are process-wide), and a user's own malloc settings win."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="unpaired.allocator tunes glibc's malloc; this C library is not glibc",
)

CHILD = r"""
import contextlib, json, resource, sys
from unpaired import allocator
tuned = allocator.keep_freed_memory() if sys.argv[1] == "1" else None
if sys.argv[2:] == ["no-steps"]:
    print(json.dumps({"tuned": tuned}))
    sys.exit()
import torch
from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.pool import ImagePool
torch.set_num_threads(1)
torch.manual_seed(0)
m = build_models(16, 32, 6, 3, torch.device("cpu"), channels_last=False)
opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
g = torch.Generator().manual_seed(0)
pools = ImagePool(50, g), ImagePool(50, g)
for pool in pools:
    pool.prepare(8, torch.device("cpu"))
a, b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
step = lambda: train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _run(tuned: bool, *args: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if tuned else "0", *args],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_train_step_reuses_freed_memory_instead_of_faulting_it_in():
    """glibc as it comes maps a step's large activations afresh (over a thousand minor page faults
    per step of the default model, measured); with keep_freed_memory the heap keeps them."""
    default, tuned = _run(False), _run(True)
    assert tuned["tuned"] is True
    assert default["faults"] > 200, default  # what the setting is for: else this test shows nothing
    assert tuned["faults"] < default["faults"] / 4, (default, tuned)


def test_the_users_own_malloc_settings_are_left_alone():
    assert _run(True, "no-steps")["tuned"] is True
    assert _run(True, "no-steps", MALLOC_TRIM_THRESHOLD_="1000000")["tuned"] is False
    tunables = "glibc.malloc.mmap_threshold=1000000"
    assert _run(True, "no-steps", GLIBC_TUNABLES=tunables)["tuned"] is False
