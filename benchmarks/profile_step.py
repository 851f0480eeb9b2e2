"""Where the CPU train step's time goes: torch.profiler over a few steps of unpaired.training.train_step.

    uv run python benchmarks/profile_step.py                       # the default params (ngf 16, ndf 32, 6 blocks, 64 px)
    uv run python benchmarks/profile_step.py --ngf 64 --ndf 64 --blocks 9 --size 128

Prints the operators by self CPU time (the table torch.profiler's key_averages gives), then the same
time grouped into kinds (convolution forward/backward, instance norm, elementwise, optimizer, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from unpaired.training import ImagePool, build_models, optimizers, train_step

KINDS = [("conv backward", ("convolution_backward", "conv_transpose", "slow_conv", "backward")),
         ("conv forward", ("conv", "mkldnn")),
         ("instance norm", ("norm", "var", "mean")),
         ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "sqrt")),
         ("pad", ("pad", "reflection")),
         ("copy/alloc", ("copy", "empty", "zeros", "clone", "cat", "contiguous", "fill", "to")),
         ("elementwise", ("add", "mul", "sub", "div", "relu", "leaky", "tanh", "threshold", "where", "sum",
                          "mse", "l1", "abs", "sign", "neg", "pow"))]


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(key in low for key in keys):
            return k
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--ndf", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unbatched", action="store_true", help="the reference order instead of batched passes")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m = build_models(args.ngf, args.ndf, args.blocks, 3, torch.device("cpu"), False)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(0)
    pools = ImagePool(50, g), ImagePool(50, g)
    a, b = torch.rand(1, 3, args.size, args.size) * 2 - 1, torch.rand(1, 3, args.size, args.size) * 2 - 1

    def step():
        train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext, not args.unbatched)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(f"train step, cpu, {args.threads} thread(s), ngf {args.ngf}, ndf {args.ndf}, {args.blocks} blocks, "
          f"{args.size} px, {'reference order' if args.unbatched else 'batched'}, {args.steps} steps profiled, "
          f"load average {os.getloadavg()[0]:.2f}")
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind(e.key)] += e.self_cpu_time_total
    total = sum(by_kind.values())
    print(f"{'kind':<16}{'ms/step':>10}{'share':>8}")
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{k:<16}{us / 1000 / args.steps:>10.1f}{us / total:>8.0%}")


if __name__ == "__main__":
    main()
