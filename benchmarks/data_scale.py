"""Data stages at scale: fetch (procedural sources) and prepare at N images per domain, side by side.

    uv run python benchmarks/data_scale.py                    # 1000 and 10000 images per domain
    uv run python benchmarks/data_scale.py --counts 1000,10000,50000

Each count runs in a fresh temporary git + DVC repository that holds this project's params.yaml with
`domains.a.count` / `domains.b.count` set to the count; the stages run as the child processes that
dvc.yaml's cmd names (`python -m stages.fetch a --out data/raw/a`, `python -m stages.prepare ...`).
Per stage: wall seconds, images/s and the peak RSS of that stage's process (os.wait4). Then
`data/prepared.tar` is tracked with `dvc add` and the wall time of `dvc status` and of `dvc push` to a
local-folder remote is printed. Timing is machine- and load-dependent: the load average is printed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd` in `cwd`; returns (wall seconds, peak RSS in MB of that process). Raises on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-400:]}")
    return wall, usage.ru_maxrss / 1024


def one(count: int, work: Path) -> dict[str, float]:
    repo = work / f"n{count}"
    repo.mkdir()
    yaml = YAML()
    params = yaml.load(ROOT / "params.yaml")
    for d in ("a", "b"):
        params["domains"][d]["count"] = count
    yaml.dump(params, repo / "params.yaml")
    py = sys.executable
    r: dict[str, float] = {"count": count}
    for d in ("a", "b"):
        wall, rss = run([py, "-m", "stages.fetch", d, "--out", f"data/raw/{d}"], repo)
        r[f"fetch_{d}_s"], r[f"fetch_{d}_rss"] = wall, rss
    wall, rss = run([py, "-m", "stages.prepare", "--raw", "data/raw/a", "data/raw/b", "--out", "data/prepared.tar",
                     "--view", "data/prepared", "--metrics", "metrics/prepare.json"], repo)
    r["prepare_s"], r["prepare_rss"] = wall, rss
    r["tar_mb"] = (repo / "data/prepared.tar").stat().st_size / 1e6
    dvc = [py, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["remote", "add", "-d", "local", str(work / f"remote{count}")],
                dvc + ["add", "-q", "data/prepared.tar"]):
        run(cmd, repo)
    r["dvc_status_s"], _ = run(dvc + ["status", "-q"], repo)
    r["dvc_push_s"], _ = run(dvc + ["push", "-q"], repo)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1000,10000", help="images per domain, comma-separated")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(f"data stages, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        for c in counts:
            rows.append(one(c, Path(tmp)))
            shutil.rmtree(Path(tmp) / f"n{c}", ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    head = ["images/domain", "fetch@a img/s", "fetch@a RSS MB", "fetch@b img/s", "fetch@b RSS MB",
            "prepare img/s", "prepare RSS MB", "prepared.tar MB", "dvc status s", "dvc push s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        n = r["count"]
        cells = [f"{n}", f"{n / r['fetch_a_s']:.0f}", f"{r['fetch_a_rss']:.0f}", f"{n / r['fetch_b_s']:.0f}",
                 f"{r['fetch_b_rss']:.0f}", f"{2 * n / r['prepare_s']:.0f}", f"{r['prepare_rss']:.0f}",
                 f"{r['tar_mb']:.1f}", f"{r['dvc_status_s']:.1f}", f"{r['dvc_push_s']:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
