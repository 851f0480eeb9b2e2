"""Push/pull time of many small prepared images through DVC remotes, and what packing buys.

    uv run python benchmarks/remote.py [--count 5000] [--size 64]

Builds a scratch git+DVC repo holding `count` prepared-size PNGs (flares at `size` px) and times, for
a local-directory remote and a real S3 server (SeaweedFS `weed` on 127.0.0.1):
  (a) the browsable layout: a directory output of `count` files (what `data/prepared` is);
  (b) the same images packed into one uncompressed tar (one object).
Each figure is a fresh `dvc push` into an empty remote and a `dvc pull` into an empty cache.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = 8
sys.path.insert(0, str(ROOT))

from stages.fetch import fetch_domain  # noqa: E402
from tests.helpers import VENV_BIN, env  # noqa: E402
from tests.s3server import WEED, make_bucket, weed_s3  # noqa: E402


def sh(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, env=env(), check=True, capture_output=True)


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    sh(cmd, cwd)
    return time.perf_counter() - start


def measure(repo: Path, target: str, remote_args: list[list[str]]) -> tuple[float, float]:
    dvc = str(VENV_BIN / "dvc")
    for args in remote_args:
        sh([dvc, *args], repo)
    push = timed([dvc, "push", "-j", str(JOBS), target], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / target) if (repo / target).is_dir() else (repo / target).unlink()
    pull = timed([dvc, "pull", "-j", str(JOBS), target], repo)
    return push, pull


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument(
        "--jobs", type=int, default=8, help="dvc push/pull --jobs (DVC's default: 4 x cores)"
    )
    args = ap.parse_args()
    global JOBS
    JOBS = args.jobs
    dvc = str(VENV_BIN / "dvc")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text(
            f"domains:\n  a: {{source: flares, count: {args.count}, image_size: {args.size}}}\n"
        )
        images = fetch_domain("a", tmp / "params.yaml", tmp / "raw", tmp / "cache")
        for layout in ("files", "tar"):
            for kind in ("local", "s3"):
                if kind == "s3" and not Path(WEED).exists():
                    continue
                repo = tmp / f"repo-{layout}-{kind}"
                repo.mkdir()
                sh(["git", "init", "-q"], repo)
                sh([dvc, "init", "-q"], repo)
                if layout == "files":
                    shutil.copytree(images, repo / "prepared")
                    target = "prepared"
                else:
                    with tarfile.open(repo / "prepared.tar", "w", format=tarfile.PAX_FORMAT) as tar:
                        for f in sorted(images.glob("*.png")):
                            tar.add(f, arcname=f"trainA/{f.name}")
                    target = "prepared.tar"
                sh([dvc, "add", "-q", target], repo)
                if kind == "local":
                    results[(layout, kind)] = measure(
                        repo, target, [["remote", "add", "-d", "r", str(tmp / f"store-{layout}")]]
                    )
                else:
                    with weed_s3(tmp / f"weed-{layout}") as endpoint:
                        make_bucket(endpoint, "bench", "k", "s")
                        results[(layout, kind)] = measure(
                            repo,
                            target,
                            [
                                ["remote", "add", "-d", "r", "s3://bench/x"],
                                ["remote", "modify", "r", "endpointurl", endpoint],
                                ["remote", "modify", "--local", "r", "access_key_id", "k"],
                                ["remote", "modify", "--local", "r", "secret_access_key", "s"],
                            ],
                        )
    print(
        f"\n{args.count} PNGs of {args.size} px: dvc push / pull -j {args.jobs} seconds (fresh remote, empty cache)"
    )
    print(f"{'remote':<8}{'layout':<26}{'push s':>9}{'pull s':>9}")
    for (layout, kind), (push, pull) in results.items():
        name = f"{args.count} files (browsable)" if layout == "files" else "one tar"
        print(f"{kind:<8}{name:<26}{push:>9.2f}{pull:>9.2f}")
    for kind in ("local", "s3"):
        if ("files", kind) in results and ("tar", kind) in results:
            f, t = results[("files", kind)], results[("tar", kind)]
            print(f"{kind}: files/tar time ratio: push {f[0] / t[0]:.1f}x, pull {f[1] / t[1]:.1f}x")


if __name__ == "__main__":
    main()
