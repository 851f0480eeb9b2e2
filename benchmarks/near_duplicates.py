"""Images/s of prepare's near-duplicate check (unpaired/near_duplicates.py) at 1k and 50k images.

    uv run python benchmarks/near_duplicates.py [--counts 1000 50000] [--distance 72]

The check is `keepers()`: every pair of 256-bit perceptual hashes compared (XOR + popcount, vectorised
in blocks), clusters by union-find, the largest of each kept. Its input is synthetic: random hashes,
a tenth of them with a near-duplicate (a copy with a few bits flipped), as a scrape would hold. The
hashes themselves are computed by prepare's workers while they decode each image; their cost is
printed separately (`phash` of one decoded 512×512 photo), next to that of decoding a PNG, to put the
check in proportion. It runs with 1 thread and with one per CPU, side by side. The load average is printed: on a shared machine the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from unpaired import near_duplicates as nd  # noqa: E402


def synthetic(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    hashes = [rng.getrandbits(nd.BITS) for _ in range(n - n // 10)]
    for h in hashes[: n // 10]:  # a near copy of a tenth of them
        hashes.append(h ^ sum(1 << rng.randrange(nd.BITS) for _ in range(8)))
    return hashes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--counts",
        nargs="+",
        default=["1000", "50000"],
        help="hash counts: 1000 50000 or 1000,50000 (as benchmarks/data_scale.py takes them)",
    )
    ap.add_argument("--distance", type=int, default=72)
    args = ap.parse_args()
    args.counts = [int(c) for arg in args.counts for c in arg.split(",") if c]
    workers = nd.cpu_count()
    print(
        f"load average before: {os.getloadavg()[0]:.1f} on {workers} CPUs; numpy, 1 thread vs {workers}"
    )
    for n in args.counts:
        hashes = synthetic(n)
        took = {}
        for threads in (1, workers):
            start = time.perf_counter()
            keep = nd.keepers(
                hashes, [1] * n, [f"{i:08d}" for i in range(n)], args.distance, workers=threads
            )
            took[threads] = time.perf_counter() - start
        dropped = sum(1 for i, k in enumerate(keep) if i != k)
        for threads, t in took.items():
            print(
                f"{n:>7} images, {threads} thread(s): near-duplicate check {t:8.2f} s = {n / t:10,.0f} "
                f"images/s ({n * (n - 1) // 2 / t / 1e6:,.0f} M pairs/s; {took[1] / t:.2f}x 1 thread)"
            )
        print(f"{n:>7} images: {dropped} near-duplicates found")
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    reps = 50
    start = time.perf_counter()
    for _ in range(reps):
        nd.phash(photo)
    hash_s = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):
        Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    decode_s = (time.perf_counter() - start) / reps
    print(
        f"per image, in prepare's workers: phash {hash_s * 1e3:.1f} ms; PNG decode {decode_s * 1e3:.1f} ms "
        f"(512×512 photo)"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
