"""StyleGAN2 synthesis images/s: the official tool's one-seed-at-a-time loop vs the `stylegan`
source's batched synthesis, same network, same device, printed side by side with the ratio.

    uv run python benchmarks/stylegan.py --device cpu --count 16
    uv run python benchmarks/stylegan.py --device cuda --count 512 --batch 64
    uv run python benchmarks/stylegan.py --network ffhq.pkl ...           # a real network pickle
    uv run python benchmarks/stylegan.py --official ~/src/stylegan2-ada-pytorch ...

(a) generate.py's loop: per seed, z = RandomState(seed).randn(1, z_dim) → G(z, psi, noise_mode) with
    the official eval-mode choices (grouped modulated convolution, fp16 blocks on CUDA, autograd on)
    → uint8 → host. With --official, that loop runs the official networks.py Generator (your checkout
    of NVlabs/stylegan2-ada-pytorch; its CUDA ops fall back to their reference code off CUDA) with
    the same weights; without it, the same loop runs this project's generator.
(b) the source on a GPU: batches of --batch seeds, batched modulated convolution, inference mode.
    (On a CPU the source goes one seed at a time, as (a): batching is slower there, see README.)
Without --network, a random network shaped like NVIDIA's FFHQ 256 px pickles (paper256 config).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from unpaired.devices import resolve_device
from unpaired.safe_pickle import load_generator
from unpaired.sources.stylegan2 import Generator, GeneratorConfig, seed_latents, to_uint8

PAPER256 = GeneratorConfig(
    z_dim=512,
    w_dim=512,
    img_resolution=256,
    mapping_layers=8,
    channel_base=16384,
    channel_max=512,
    num_fp16_res=4,
    conv_clamp=256.0,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def official_generator(root: Path, g: Generator, device: torch.device):
    sys.path.insert(0, str(root))
    from training.networks import Generator as Official  # noqa: PLC0415 - the user's checkout

    c = g.cfg
    net = Official(
        z_dim=c.z_dim,
        c_dim=0,
        w_dim=c.w_dim,
        img_resolution=c.img_resolution,
        img_channels=c.img_channels,
        mapping_kwargs={"num_layers": c.mapping_layers},
        synthesis_kwargs={
            "channel_base": c.channel_base,
            "channel_max": c.channel_max,
            "num_fp16_res": c.num_fp16_res,
            "conv_clamp": c.conv_clamp,
        },
    )
    net.load_state_dict(g.state_dict())
    return net.eval().requires_grad_(False).to(device)


def loop_one_by_one(G, seeds: list[int], psi: float, device: torch.device, official: bool) -> float:
    sync(device)
    start = time.perf_counter()
    for s in seeds:
        z = seed_latents([s], G.z_dim).to(device)
        img = G(z, None, truncation_psi=psi, noise_mode="const") if official else G(z, psi)
        to_uint8(img).cpu()
    sync(device)
    return len(seeds) / (time.perf_counter() - start)


def batched(G: Generator, seeds: list[int], psi: float, batch: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(seeds), batch):
            z = seed_latents(seeds[i : i + batch], G.z_dim).float().to(device)
            to_uint8(G(z, psi, fused=False)).cpu()
    sync(device)
    return len(seeds) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--network", type=Path, help="network pickle (default: random paper256-shaped)")
    ap.add_argument("--official", type=Path, help="a checkout of NVlabs/stylegan2-ada-pytorch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--psi", type=float, default=0.7)
    ap.add_argument(
        "--fp16-res",
        type=int,
        default=4,
        help="fp16 blocks of the random network (official code runs them in half on CPU too)",
    )
    args = ap.parse_args()
    device = resolve_device(args.device, "--device")
    torch.manual_seed(0)
    cfg = dataclasses.replace(PAPER256, num_fp16_res=args.fp16_res)
    G = (
        load_generator(args.network)
        if args.network
        else Generator(cfg).eval().requires_grad_(False)
    )
    G = G.to(device)
    seeds = list(range(args.count))
    batched(G, seeds[: min(2, args.count)], args.psi, args.batch, device)  # warm-up
    ref = official_generator(args.official, G, device) if args.official else G
    loop_one_by_one(ref, seeds[:2], args.psi, device, args.official is not None)  # warm-up
    a = loop_one_by_one(ref, seeds, args.psi, device, args.official is not None)
    ours = loop_one_by_one(G, seeds, args.psi, device, False) if args.official else a
    b = batched(G, seeds, args.psi, args.batch, device)
    c = G.cfg
    print(
        f"network: {c.img_resolution} px, z {c.z_dim}, fp16 blocks {c.num_fp16_res}, "
        f"{sum(p.numel() for p in G.parameters()):,} parameters; device {device}, "
        f"{torch.get_num_threads()} threads; {args.count} seeds"
    )
    who = "official networks.py" if args.official else "this generator"
    print(f"(a) one seed per call, {who:<22}: {a:8.2f} images/s")
    if args.official:
        print(
            f"(a') one seed per call, this generator      : {ours:8.2f} images/s   ({ours / a:.2f}x)"
        )
    print(
        f"(b) batched, batch {args.batch:<4}, this generator    : {b:8.2f} images/s   ({b / a:.2f}x)"
    )


if __name__ == "__main__":
    main()
