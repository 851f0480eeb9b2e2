"""Training iterations/s: the reference way vs this project's fast path, same model and sizes.

    uv run python benchmarks/train_throughput.py --device cpu --size 64 --steps 30
    uv run python benchmarks/train_throughput.py --device cuda --size 256 --steps 200 [--compile]

(a) reference: a per-image Dataset that opens PNG files with Pillow, Resize(load) → RandomCrop →
    RandomHorizontalFlip → ToTensor → Normalize in a DataLoader (batch 1, shuffled), batches copied to
    the device every step, eager fp32, plain Adam.
(b) fast path (stages/train.py): images decoded once into a uint8 tensor on the device, crop and flip
    on the device, channels_last + bf16 autocast + fused Adam on CUDA, optional torch.compile.
Both run the same CycleGAN step (unpaired.training.train_step) on the same networks.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from stages.train import autocast_for
from unpaired.training import DeviceFeeder, ImagePool, build_models, load_folder, optimizers, train_step


class FolderPairs(Dataset):
    """The reference's unaligned dataset: A by index, B at random, decoded and augmented per item."""

    def __init__(self, a: Path, b: Path, load: int, crop: int):
        self.a, self.b = sorted(a.glob("*.png")), sorted(b.glob("*.png"))
        self.tf = T.Compose([T.Resize((load, load), T.InterpolationMode.BICUBIC), T.RandomCrop(crop),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, i: int):
        b = self.b[np.random.randint(len(self.b))]
        return (self.tf(Image.open(self.a[i % len(self.a)]).convert("RGB")),
                self.tf(Image.open(b).convert("RGB")))


def make_images(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for d in "AB":
        (root / d).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / d / f"{i}.png")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(args, device, root: Path) -> float:
    torch.manual_seed(0)
    m = build_models(args.ngf, 64, args.blocks, 3, device, channels_last=False)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, fused=False)
    g = torch.Generator().manual_seed(0)
    pools = ImagePool(50, g), ImagePool(50, g)
    loader = DataLoader(FolderPairs(root / "A", root / "B", args.load, args.size), batch_size=1,
                        shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    def batches():
        while True:
            yield from loader
    it = batches()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        a, b = next(it)
        train_step(m, opt_G, opt_D, *pools, a.to(device), b.to(device), 10.0, 0.5, contextlib.nullcontext)
    sync(device)
    return args.steps / (time.perf_counter() - start)


def run_fast(args, device, root: Path) -> float:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    m = build_models(args.ngf, 64, args.blocks, 3, device, channels_last=cuda)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, fused=cuda)
    if args.compile:
        for net in (m.G_A, m.G_B, m.D_A, m.D_B):
            net.compile()
    g = torch.Generator().manual_seed(0)
    pools = ImagePool(50, g), ImagePool(50, g)
    feeder = DeviceFeeder(load_folder(root / "A", args.load), load_folder(root / "B", args.load),
                          args.size, True, 1, device, channels_last=cuda)
    autocast = autocast_for(device, "auto")
    def batches():
        while True:
            yield from feeder.batches(feeder.plan(g))
    it = batches()
    sums = torch.zeros(8, device=device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        a, b = next(it)
        sums += train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, autocast)
    sums.tolist()   # the one read of the losses, as the stage does once per epoch
    return args.steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="crop size (default 256 on CUDA, 64 on CPU)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=None, help="default 9 at >= 256 px, else 6")
    ap.add_argument("--images", type=int, default=64, help="images per domain on disk")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the reference path")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast path's networks")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.size = args.size or (256 if device.type == "cuda" else 64)
    args.steps = args.steps or (200 if device.type == "cuda" else 30)
    args.blocks = args.blocks or (9 if args.size >= 256 else 6)
    args.load = int(round(args.size * 286 / 256 / 4)) * 4
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images, args.load + 8)
        ref = run_reference(args, device, Path(tmp))
        fast = run_fast(args, device, Path(tmp))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nCycleGAN train step, {name}, crop {args.size} (load {args.load}), ngf {args.ngf}, "
          f"{args.blocks} blocks, batch 1, {args.steps} steps")
    print(f"{'path':<32}{'it/s':>10}")
    print(f"{'(a) reference DataLoader, fp32':<32}{ref:>10.2f}")
    print(f"{'(b) fast path':<32}{fast:>10.2f}")
    print(f"ratio (b)/(a): {fast / ref:.2f}x")


if __name__ == "__main__":
    main()
