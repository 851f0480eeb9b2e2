"""The train stage's start-up with many images, by `train.data_device`, side by side.

    uv run python benchmarks/train_startup.py [--count 10000] [--size 256] [--load 286] [--steps 50]

Writes `count` procedural 256 px PNGs per domain (trainA, trainB; not timed, kept in a temp folder),
then runs each variant in a fresh process and prints the wall seconds from the file listing to the
first batch, the peak RSS of that process (os.wait4), and the images/s at which the feeder then
delivers `steps` batches of 1 (no training: the data path alone, to compare with a step's time):
- `stack (before)`: the loader this replaced: every image decoded into a list, then torch.stack
  (two copies at the peak);
- `device`: every image decoded into one tensor allocated once (data_device: device, or auto when
  the images fit half of the available memory);
- `disk`: nothing decoded up front; each batch read and resized one batch ahead in a background
  thread (data_device: disk, or auto when they do not fit).
The machine's CPUs, available memory and load average are printed; timing depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import torch
from torchvision.transforms.v2 import functional as TF
from unpaired.models.feeding import DeviceFeeder, DiskFeeder, decode, image_files, load_folder
from unpaired.images import read_uint8
variant, data, load, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
t_import = time.perf_counter()
fa, fb = image_files(data / "trainA"), image_files(data / "trainB")
cpu = torch.device("cpu")
if variant == "stack (before)":
    a = torch.stack([TF.resize(read_uint8(f), [load, load], antialias=True) for f in fa])
    b = torch.stack([TF.resize(read_uint8(f), [load, load], antialias=True) for f in fb])
    feeder = DeviceFeeder(a, b, load - 30, True, 1, cpu, False)
elif variant == "device":
    feeder = DeviceFeeder(load_folder(fa, load), load_folder(fb, load), load - 30, True, 1, cpu, False)
else:
    feeder = DiskFeeder(fa, fb, load, load - 30, True, 1, cpu, False)
it = feeder.batches(feeder.plan(torch.Generator().manual_seed(0)))
next(it)
t_first = time.perf_counter()
for _ in range(steps):
    next(it)
t_end = time.perf_counter()
print(json.dumps({"startup_s": t_first - t_import, "images_per_s": 2 * steps / (t_end - t_first)}))
"""

VARIANTS = ("stack (before)", "device", "disk")


def write_images(folder: Path, count: int, size: int, seed: int) -> None:
    """`count` smooth procedural RGB PNGs (a gradient and a few ellipses; they compress like photos
    rather than like noise) of `size` px."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(count):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (ramp[None, :, None] + ramp[:, None, None]) / 510
        img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(size // 16, size // 4))
            draw.ellipse(
                [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
            )
        img.save(folder / f"{i:06d}.png")


def run(variant: str, data: Path, load: int, steps: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, variant, str(data), str(load), str(steps)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"error: variant {variant!r} failed")
    r = json.loads(out.strip().splitlines()[-1])
    r.update(wall_s=time.perf_counter() - t, peak_rss_mib=usage.ru_maxrss / 1024)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=10_000, help="images per domain")
    ap.add_argument("--size", type=int, default=256, help="prepared image side, px")
    ap.add_argument("--load", type=int, default=286, help="train.load_size")
    ap.add_argument("--steps", type=int, default=50, help="batches of 1 drawn after the first")
    args = ap.parse_args()
    decoded = 2 * args.count * 3 * args.load**2 / 2**30
    print(
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().available / 2**30:.1f} GiB available, load "
        f"average {os.getloadavg()[0]:.2f}; {args.count} images per domain at {args.size} px, load_size "
        f"{args.load}: {decoded:.2f} GiB decoded",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="train_startup_") as tmp:
        data = Path(tmp)
        t = time.perf_counter()
        for i, d in enumerate("AB"):
            write_images(data / f"train{d}", args.count, args.size, seed=i)
        on_disk = sum(f.stat().st_size for f in data.rglob("*.png")) / 2**20
        print(
            f"wrote {2 * args.count} PNGs ({on_disk:.0f} MiB) in {time.perf_counter() - t:.0f} s (not timed)",
            flush=True,
        )
        rows = {v: run(v, data, args.load, args.steps) for v in VARIANTS}
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    base = rows["stack (before)"]
    print(
        f"{'variant':16s} {'start-up s':>10s} {'× before':>9s} {'peak RSS MiB':>13s} {'× before':>9s} "
        f"{'feeder img/s':>13s}"
    )
    for name, r in rows.items():
        print(
            f"{name:16s} {r['startup_s']:10.1f} {base['startup_s'] / r['startup_s']:8.2f}x "
            f"{r['peak_rss_mib']:13.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:8.2f}x {r['images_per_s']:13.0f}"
        )
    print(
        "(start-up: file listing to the first batch; × before: > 1 means faster, resp. more memory)"
    )


if __name__ == "__main__":
    main()
