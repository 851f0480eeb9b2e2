"""torch.compile's first step cold and warm, side by side: the cost `train.compile` pays once per
machine when inductor's caches persist (unpaired.models.training.compile_cache_dir).

    uv run python benchmarks/compile_cache.py [--size 64] [--ngf 16] [--ndf 32] [--blocks 6]

Runs the compiled CycleGAN step (unpaired.models.cyclegan.compile_models, mode default) in two fresh
processes that share one empty cache folder (a temp folder standing in for
~/.cache/unpaired/torchinductor): the first compiles from nothing, the second finds the first's
FX graph and AOT autograd caches. Prints the seconds of the first step (compile included) and of
a later step in each, and the ratio. CPU only; the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import contextlib, json, sys, time, torch
from unpaired.models.cyclegan import build_models, compile_models, optimizers, train_step
from unpaired.models.pool import ImagePool
size, ngf, ndf, blocks = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(1)
torch.manual_seed(0)
m = compile_models(build_models(ngf, ndf, blocks, 3, torch.device("cpu"), False), "default")
opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
g = torch.Generator().manual_seed(0)
pools = ImagePool(50, g), ImagePool(50, g)
a, b = torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 3, size, size) * 2 - 1
times = []
for _ in range(4):
    t = time.perf_counter()
    train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext)
    times.append(time.perf_counter() - t)
print(json.dumps({"first": times[0], "later": min(times[1:])}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--ndf", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=6)
    args = ap.parse_args()
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.size} px, ngf {args.ngf}, "
        f"ndf {args.ndf}, {args.blocks} blocks, 1 thread",
        flush=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory(prefix="compile_cache_") as cache:
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            OMP_WAIT_POLICY="PASSIVE",
            TORCHINDUCTOR_CACHE_DIR=cache,
        )
        for name in ("cold", "warm"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(args.size),
                    str(args.ngf),
                    str(args.ndf),
                    str(args.blocks),
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name}: first step {rows[name]['first']:.1f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    print(f"{'cache':6s} {'first step s':>13s} {'later step s':>13s}")
    for name, r in rows.items():
        print(f"{name:6s} {r['first']:13.1f} {r['later']:13.3f}")
    print(f"warm first step: {rows['cold']['first'] / rows['warm']['first']:.1f}x faster than cold")


if __name__ == "__main__":
    main()
