"""The checks benchmarks/gpu_check.sh runs on a CUDA machine that CI cannot: JSON to stdout.

    uv run python benchmarks/gpu_check.py grads          # one step's gradients, every memory format × arrangement
    uv run python benchmarks/gpu_check.py bf16 --steps 300   # bf16 vs fp32 loss curves on the same data

grads: as tests/test_accel.py on the CPU: float32 on CUDA (contiguous and channels-last; reference
order and batched; batch 1 and 2) against float64 contiguous on the CPU, max relative gradient
error per case, and what channels_last_ok (the stage's check before using channels-last) says.
bf16: ngf/ndf 32, 3 blocks, 128 px crops of 64 fixed random pairs, fp32 (TF32) and bf16 autocast
from the same init, and a second fp32 run with another seed (the noise): max relative difference of
the mean losses over each half of the run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json

import torch

from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.pool import ImagePool
from unpaired.models.training import channels_last_ok


def one_step(models, a, b, batched):
    m = copy.deepcopy(models)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(1)
    pools = ImagePool(3, g), ImagePool(3, g)
    for _ in range(1):     # one step from the same weights (later steps amplify rounding through Adam)
        train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, contextlib.nullcontext, batched)
    return {n: [p.grad.double().cpu() for p in getattr(m, n).parameters()] for n in ("G_A", "G_B", "D_A", "D_B")}


def relative(x, ref) -> float:
    """Norm-wise relative error of a network's whole gradient, ||x - ref|| / ||ref||: a wrong kernel
    is off by O(1); float32 rounding, amplified where instance norm sees a near-constant map, stays
    well below 1e-2 (a few elements' max-abs error can reach 5e-2 there at 64 px)."""
    x, ref = torch.cat([t.flatten() for t in x]), torch.cat([t.flatten() for t in ref])
    return ((x - ref).norm() / ref.norm()).item()


def grads(device: torch.device) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m64 = build_models(8, 8, 2, 3, torch.device("cpu"), False, dtype=torch.float64)
    out = {"channels_last_ok": channels_last_ok(device), "cases": {}}
    for batch in (1, 2):
        g = torch.Generator().manual_seed(0)
        a, b = (torch.rand(batch, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
        ref = one_step(m64, a, b, False)
        for fmt in (torch.contiguous_format, torch.channels_last):
            m = copy.deepcopy(m64)
            for net in m.nets():
                net.to(device=device, dtype=torch.float32, memory_format=fmt)
            a32, b32 = (x.float().to(device).contiguous(memory_format=fmt) for x in (a, b))
            for batched in (False, True):
                got = one_step(m, a32, b32, batched)
                key = f"{str(fmt).split('.')[-1]} {'batched' if batched else 'reference'} batch {batch}"
                out["cases"][key] = max(relative(got[n], ref[n]) for n in ref)
    # A wrong kernel is off by O(1) (CPU channels-last at batch 1: 0.5-1.3); float32 rounding stays
    # below 0.05 here (measured on CPU: 2e-6 at batch 1, 0.043 at batch 2 through D_B(G_B(real_B))).
    out["all_right"] = {fmt: max(v for k, v in out["cases"].items() if k.startswith(fmt)) < 0.2
                        for fmt in ("contiguous_format", "channels_last")}
    return out


def bf16(device: torch.device, steps: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def curve(seed, use_bf16):
        torch.manual_seed(seed)
        m = build_models(32, 32, 3, 3, device, channels_last_ok(device))
        opt_G, opt_D = optimizers(m, 2e-4, 0.5, device.type == "cuda")
        g = torch.Generator().manual_seed(seed)
        pools = ImagePool(50, g), ImagePool(50, g)
        gd = torch.Generator().manual_seed(100)
        a = torch.rand(64, 3, 128, 128, generator=gd).to(device) * 2 - 1
        b = (torch.rand(64, 3, 128, 128, generator=gd).to(device) * 2 - 1).clamp(-1, 0) * 2 + 1
        ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
        return torch.stack([train_step(m, opt_G, opt_D, *pools, a[i % 64:i % 64 + 1], b[i * 7 % 64:i * 7 % 64 + 1],
                                       10.0, 0.5, ac) for i in range(steps)]).cpu()
    fp32, low, other = curve(0, False), curve(0, True), curve(1, False)
    rel = lambda x, y: ((x - y).abs() / y.abs()).max().item()  # noqa: E731
    half = steps // 2
    return {"steps": steps, "finite": bool(torch.isfinite(low).all()),
            "bf16_vs_fp32": [rel(low[s].mean(0), fp32[s].mean(0)) for s in (slice(0, half), slice(half, steps))],
            "fp32_seed_noise": [rel(other[s].mean(0), fp32[s].mean(0)) for s in (slice(0, half), slice(half, steps))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["grads", "bf16"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(json.dumps(grads(device) if args.check == "grads" else bf16(device, args.steps), indent=2))


if __name__ == "__main__":
    main()
