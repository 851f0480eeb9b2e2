"""The CPU train step with glibc's malloc as it comes against unpaired.allocator.keep_freed_memory,
side by side: milliseconds per step, minor page faults per step, peak RSS.

    uv run python benchmarks/allocator.py [--threads 1,2] [--steps 20] [--rounds 3] [--size 64]

Each variant runs in a fresh process (the allocator's thresholds are process-wide and cannot be
put back as glibc had them), alternating, --rounds rounds; the table gives each variant's best round
and its ratio to `glibc default` at the same thread count (> 1: faster). The step is the train
stage's CycleGAN step with the default networks (ngf 16, ndf 32, 6 blocks), torch's deterministic
algorithms on, as the stage runs it. The printed figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import contextlib, json, resource, sys, time
tuned, threads, steps, size = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from unpaired import allocator
if tuned:
    assert allocator.keep_freed_memory(), "mallopt refused"
import torch
from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.pool import ImagePool
torch.set_num_threads(threads)
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)
m = build_models(16, 32, 6, 3, torch.device("cpu"), channels_last=False)
opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
g = torch.Generator().manual_seed(0)
pool_A, pool_B = ImagePool(50, g), ImagePool(50, g)
pool_A.prepare(steps + 3, torch.device("cpu")); pool_B.prepare(steps + 3, torch.device("cpu"))
a, b = torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 3, size, size) * 2 - 1
step = lambda: train_step(m, opt_G, opt_D, pool_A, pool_B, a, b, 10.0, 0.5, contextlib.nullcontext)
for _ in range(3):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t0 = time.perf_counter()
for _ in range(steps):
    step()
took = time.perf_counter() - t0
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"ms": took / steps * 1e3, "faults": faults / steps, "rss": rss}))
"""


def run(tuned: bool, threads: int, steps: int, size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if tuned else "0", str(threads), str(steps), str(size)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="crop size, px")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    print(
        f"CPU train step, {args.size} px, {args.steps} steps, best of {args.rounds}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    best: dict[tuple[int, bool], dict] = {}
    for r in range(args.rounds):
        for threads in counts:
            for tuned in (False, True) if r % 2 == 0 else (True, False):
                got = run(tuned, threads, args.steps, args.size)
                key = (threads, tuned)
                if key not in best or got["ms"] < best[key]["ms"]:
                    best[key] = got
                print(f"  round {r + 1}: {threads} thread(s), tuned {tuned}: {got['ms']:.1f} ms")
    print(
        f"\n{'threads':>7}  {'allocator':<20} {'ms/step':>8} {'× default':>10} {'faults/step':>12} {'peak RSS MiB':>13}"
    )
    for threads in counts:
        base = best[(threads, False)]["ms"]
        for tuned in (False, True):
            got = best[(threads, tuned)]
            name = "keep_freed_memory" if tuned else "glibc default"
            print(
                f"{threads:>7}  {name:<20} {got['ms']:>8.1f} {base / got['ms']:>9.2f}x "
                f"{got['faults']:>12.0f} {got['rss']:>13.0f}"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
