"""Images/s of the prepare step with 1 worker and with all workers, side by side.

    uv run python benchmarks/prepare.py [--count 3000] [--source-size 256] [--size 64]

Generates `count` flares and `count` doodles at `source-size` px into a temp dir (not timed), then
times `stages.prepare.prepare` on them with workers=1 and workers=all, and prints the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from stages.fetch import fetch_domain
from stages.prepare import prepare
from unpaired.parallel import default_workers
from unpaired.prepare import PrepareParams


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=3000, help="images per domain")
    ap.add_argument("--source-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text(
            f"domains:\n  a: {{source: doodles, count: {args.count}, image_size: {args.source_size}}}\n"
            f"  b: {{source: flares, count: {args.count}, image_size: {args.source_size}}}\n"
        )
        for d in "ab":
            fetch_domain(d, tmp / "params.yaml", tmp / "raw", tmp / "cache")
        p = PrepareParams(image_size=args.size)
        total = 2 * args.count
        rates = {}
        for workers in (1, default_workers()):
            start = time.perf_counter()
            prepare(
                p, tmp / "raw", tmp / f"out{workers}", tmp / f"m{workers}.json", workers=workers
            )
            rates[workers] = total / (time.perf_counter() - start)
    one, many = rates[1], rates[default_workers()]
    print(f"\nprepare: {total} images {args.source_size}px -> {args.size}px")
    print(f"{'workers':>8} {'images/s':>10}")
    print(f"{1:>8} {one:>10.1f}")
    print(f"{default_workers():>8} {many:>10.1f}")
    print(f"speed-up all/1: {many / one:.2f}x")


if __name__ == "__main__":
    main()
