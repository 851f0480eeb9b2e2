"""Where the CPU train step's time goes: torch.profiler over a few steps of unpaired.models.cyclegan.train_step.

    uv run python benchmarks/profile_step.py                       # the default params (ngf 16, ndf 32, 6 blocks, 64 px)
    uv run python benchmarks/profile_step.py --ngf 64 --ndf 64 --blocks 9 --size 128
    uv run python benchmarks/profile_step.py --reference ~/pytorch-CycleGAN-and-pix2pix   # and the reference's step

Prints the operators by self CPU time (the table torch.profiler's key_averages gives), then the same
time grouped into kinds (convolution forward/backward, instance norm, elementwise, optimizer, ...),
with `--reference DIR` side by side with the reference implementation's own optimize_parameters
(a checkout you provide; see benchmarks/train_throughput.py) on the same input images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.pool import ImagePool

KINDS = [
    ("conv backward", ("convolution_backward", "conv_transpose", "slow_conv", "backward")),
    ("conv forward", ("conv", "mkldnn")),
    ("instance norm", ("norm", "var", "mean")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "sqrt")),
    ("pad", ("pad", "reflection")),
    ("copy/alloc", ("copy", "empty", "zeros", "clone", "cat", "contiguous", "fill", "to")),
    (
        "elementwise",
        (
            "add",
            "mul",
            "sub",
            "div",
            "relu",
            "leaky",
            "tanh",
            "threshold",
            "where",
            "sum",
            "mse",
            "l1",
            "abs",
            "sign",
            "neg",
            "pow",
        ),
    ),
]


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(key in low for key in keys):
            return k
    return "other"


def reference_step(args, a, b):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import reference_options

    sys.path.insert(0, str(Path(args.reference).resolve()))
    from models.cycle_gan_model import CycleGANModel

    args.ngf, args.ndf, args.blocks = args.ngf, args.ndf, args.blocks
    opt = reference_options(args, torch.device("cpu"))
    with contextlib.redirect_stdout(io.StringIO()):
        model = CycleGANModel(opt)
        model.setup(opt)
    batch = {"A": a, "B": b, "A_paths": "", "B_paths": ""}

    def step():
        model.set_input(batch)
        model.optimize_parameters()

    return step


def profiled(steps_by_name: dict, steps: int) -> dict:
    """{name: (ms per step unprofiled, best of 5 rounds taken in turn; the profiler's per-operator
    averages)}: the variants alternate, so a shared machine's load falls on all of them alike."""
    for step in steps_by_name.values():
        for _ in range(3):
            step()
    best = dict.fromkeys(steps_by_name, float("inf"))
    for _ in range(5):
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / steps * 1000)
    out = {}
    for name, step in steps_by_name.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        out[name] = best[name], prof.key_averages()
    return out


def kinds(events, steps: int) -> dict[str, float]:
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind(e.key)] += e.self_cpu_time_total / 1000 / steps
    return by_kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--ndf", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--unbatched", action="store_true", help="the reference order instead of batched passes"
    )
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument(
        "--reference", default=None, help="a checkout of the reference CycleGAN, profiled alongside"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = build_models(args.ngf, args.ndf, args.blocks, 3, torch.device("cpu"), False)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(0)
    pools = ImagePool(50, g), ImagePool(50, g)
    a, b = (
        torch.rand(1, 3, args.size, args.size) * 2 - 1,
        torch.rand(1, 3, args.size, args.size) * 2 - 1,
    )

    def step():
        train_step(
            m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext, not args.unbatched
        )

    steps = {"ours": step}
    if args.reference:
        steps["reference"] = reference_step(args, a, b)
    results = profiled(steps, args.steps)
    print(
        f"train step, cpu, {args.threads} thread(s), ngf {args.ngf}, ndf {args.ndf}, {args.blocks} blocks, "
        f"{args.size} px, {'reference order' if args.unbatched else 'batched'}, {args.steps} steps profiled, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if args.rows:
        print(results["ours"][1].table(sort_by="self_cpu_time_total", row_limit=args.rows))
    columns = {name: kinds(events, args.steps) for name, (_, events) in results.items()}
    times = {name: ms for name, (ms, _) in results.items()}
    names = sorted(set().union(*columns.values()), key=lambda k: -columns["ours"].get(k, 0.0))
    print("self CPU time by kind, ms per step (profiled), and each kind's share")
    print(f"{'kind':<16}" + "".join(f"{c + ' ms':>16}{'share':>7}" for c in columns))
    for k in names + ["total"]:
        row = f"{k:<16}"
        for col in columns.values():
            total = sum(col.values())
            v = total if k == "total" else col.get(k, 0.0)
            row += f"{v:>16.1f}{v / total:>7.0%}"
        print(row)
    print(
        "unprofiled step, best of 5 rounds taken in turn: "
        + ", ".join(f"{c} {ms:.1f} ms" for c, ms in times.items())
        + (
            f"; ours is {times['reference'] / times['ours']:.2f}x the reference"
            if args.reference
            else ""
        )
        + f"; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
