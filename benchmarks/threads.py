"""Seconds per CPU training step by thread setting, on an idle machine and on a loaded one.

    uv run python benchmarks/threads.py [--steps 8] [--size 64] [--burners 1]

Each variant runs in its own process, because OpenMP reads its wait policy only when torch loads:
(a) torch's defaults: one thread per CPU, OpenMP's default (spinning) wait policy: also
    `train.threads: auto` when the stage starts on an idle machine;
(b) the same thread count with OMP_WAIT_POLICY=PASSIVE: `auto` when other work holds the CPUs at
    start (unpaired/threads.py);
(c) one thread fewer than the CPUs (at least 1), passive wait (`auto` before issue 27);
(d) 1 thread, when that differs from (c).
"Loaded" runs the same variants while `--burners` other processes each burn one core, as other
work on a shared machine does ("idle" means no burner: on a machine that others share, the load
average printed says how idle it really was). The default params.yaml model (ngf 16, ndf 32, 6 blocks, 64 px crops)
runs the CycleGAN step of unpaired.models.cyclegan; the printout gives s/step per variant, idle and loaded
side by side, and the ratios to (a).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import contextlib, json, sys, time, torch
from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.pool import ImagePool
threads, steps, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
m = build_models(16, 32, 6, 3, torch.device("cpu"), False)
opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
g = torch.Generator().manual_seed(0)
pools = ImagePool(50, g), ImagePool(50, g)
a, b = torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 3, size, size) * 2 - 1
times = []
for i in range(steps + 2):                       # 2 warm-up steps
    t0 = time.perf_counter()
    train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext)
    times.append(time.perf_counter() - t0)
times = sorted(times[2:])
print(json.dumps({"median": times[len(times) // 2], "mean": sum(times) / len(times)}))
"""

BURN = "while True: pass"
SPINCOUNTS: list[int] = []


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def variants() -> list[tuple[str, int, dict[str, str]]]:
    n = cores()
    auto = max(1, n - 1)
    out = [
        (f"(a) auto, idle start: {n} threads, spin wait", n, {}),
        (f"(b) auto, busy start: {n} threads, passive", n, {"OMP_WAIT_POLICY": "PASSIVE"}),
        (
            f"(c) {auto} thread{'s' if auto > 1 else ''}, passive wait",
            auto,
            {"OMP_WAIT_POLICY": "PASSIVE"},
        ),
    ]
    if auto != 1:
        out.append(("(d) 1 thread", 1, {"OMP_WAIT_POLICY": "PASSIVE"}))
    # Bounded spinning (libgomp): idle threads spin GOMP_SPINCOUNT iterations, then sleep.
    for spins in SPINCOUNTS:
        out.append((f"(s) {n} threads, GOMP_SPINCOUNT={spins}", n, {"GOMP_SPINCOUNT": str(spins)}))
    return out


def run(threads: int, extra: dict[str, str], steps: int, size: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(steps), str(size)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument(
        "--burners", type=int, default=1, help="processes burning one core each when loaded"
    )
    ap.add_argument(
        "--spincounts",
        default="",
        help="comma-separated GOMP_SPINCOUNT values to try with all cores (bounded spinning)",
    )
    args = ap.parse_args()
    SPINCOUNTS.extend(int(s) for s in args.spincounts.split(",") if s)
    print(
        f"{cores()} CPUs, load average {os.getloadavg()[0]:.2f} before the run; "
        f"{args.steps} steps of {args.size} px after 2 warm-up steps; median s/step"
    )
    results: dict[str, dict[str, float]] = {}
    for condition in ("idle", "loaded"):
        burners = (
            [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(args.burners)]
            if condition == "loaded"
            else []
        )
        try:
            time.sleep(0.5 if burners else 0)
            print(
                f"{condition}: {len(burners)} burner(s), load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            for name, threads, extra in variants():
                results.setdefault(name, {})[condition] = run(
                    threads, extra, args.steps, args.size
                )["median"]
                print(f"  {condition:6s} {name}: {results[name][condition]:.3f} s/step", flush=True)
        finally:
            for proc in burners:
                proc.kill()
                proc.wait()
    base = results[variants()[0][0]]
    print(
        f"\n{'variant':44s} {'idle s':>8s} {'loaded s':>9s} {'loaded/idle':>12s} "
        f"{'idle vs (a)':>12s} {'loaded vs (a)':>14s}"
    )
    for name, r in results.items():
        print(
            f"{name:44s} {r['idle']:8.3f} {r['loaded']:9.3f} {r['loaded'] / r['idle']:11.2f}x "
            f"{base['idle'] / r['idle']:11.2f}x {base['loaded'] / r['loaded']:13.2f}x"
        )
    print("(vs (a): > 1 means faster than torch's defaults)")


if __name__ == "__main__":
    main()
