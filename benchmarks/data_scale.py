"""Data stages at scale: fetch (procedural sources) and prepare at N images per domain, side by side.

    uv run python benchmarks/data_scale.py                    # 1000 and 10000 images per domain
    uv run python benchmarks/data_scale.py --counts 1000,10000,50000

Each count runs in a fresh temporary git + DVC repository that holds this project's params.yaml with
`domains.a.count` / `domains.b.count` set to the count; the stages run as the child processes that
dvc.yaml's cmd names (`python -m stages.fetch a --out data/raw/a`, and prepare's cmd read from
dvc.yaml, dataset page included). Per stage: wall seconds, images/s and the peak RSS of the stage's
process tree (os.wait4: the largest of the process and its reaped children). For prepare also: the
parent's own peak RSS and its pool workers' largest (VmHWM from /proc, read every 0.1 s; a worker's
counts the pages it shares with the parent it was forked from), and its CPU use: user + system
seconds of the stage and its reaped workers (RUSAGE_CHILDREN) / (wall seconds × CPUs), in % of all
cores. Then `data/prepared.tar` is tracked with `dvc add` and the wall time of `dvc status` and of
`dvc push` to a local-folder remote is printed. Timing is machine- and load-dependent: the load
average is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]


def _hwm_mb(pid: int) -> float:
    """VmHWM (peak RSS) of a live process in MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(
                (int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0
            )
    except OSError:
        return 0.0


def _watch(pid: int, peaks: dict[str, float], done: threading.Event) -> None:
    """Every 0.1 s until `done`: the peak RSS (MB) of `pid` and the largest of its child processes'."""
    while not done.wait(0.1):
        parent = _hwm_mb(pid)
        peaks["parent"] = max(peaks["parent"], parent)
        try:
            children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        except OSError:
            children = []
        for child in children:
            peaks["workers"] = max(peaks["workers"], _hwm_mb(int(child)))


def run(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run `cmd` in `cwd`; returns wall (seconds), rss (MB, the largest process of its tree), parent and
    workers (MB, peak RSS of the process and of its largest child, polled), cpu (CPU seconds of the
    process and its reaped children). Raises SystemExit naming the command on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peaks, done = {"parent": 0.0, "workers": 0.0}, threading.Event()
    watcher = threading.Thread(target=_watch, args=(proc.pid, peaks, done), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    done.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-400:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall": wall, "rss": usage.ru_maxrss / 1024, "cpu": cpu, **peaks}


def prepare_cmd() -> list[str]:
    """dvc.yaml's prepare cmd as an argument list, run by this Python."""
    cmd = shlex.split(YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]["prepare"]["cmd"])
    assert cmd[0] == "python", cmd
    return [sys.executable, *cmd[1:]]


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
        fetch = run([py, "-m", "stages.fetch", d, "--out", f"data/raw/{d}"], repo)
        r[f"fetch_{d}_s"], r[f"fetch_{d}_rss"] = fetch["wall"], fetch["rss"]
    prep = run(prepare_cmd(), repo)
    r.update(
        prepare_s=prep["wall"],
        prepare_rss=prep["rss"],
        prepare_parent=prep["parent"],
        prepare_workers=prep["workers"],
        prepare_cpu=100 * prep["cpu"] / (prep["wall"] * (os.cpu_count() or 1)),
    )
    r["tar_mb"] = (repo / "data/prepared.tar").stat().st_size / 1e6
    dvc = [py, "-m", "dvc"]
    remote = str(work / f"remote{count}")
    for cmd in (
        ["git", "init", "-q"],
        dvc + ["init", "-q"],
        dvc + ["remote", "add", "-d", "local", remote],
        dvc + ["add", "-q", "data/prepared.tar"],
    ):
        run(cmd, repo)
    r["dvc_status_s"] = run(dvc + ["status", "-q"], repo)["wall"]
    r["dvc_push_s"] = run(dvc + ["push", "-q"], repo)["wall"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--counts",
        nargs="+",
        default=["1000,10000"],
        help="images per domain: 1000,10000 or 1000 10000 (as benchmarks/near_duplicates.py takes them)",
    )
    args = ap.parse_args()
    counts = [int(c) for arg in args.counts for c in arg.split(",") if c]
    print(f"data stages, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        for c in counts:
            rows.append(one(c, Path(tmp)))
            shutil.rmtree(Path(tmp) / f"n{c}", ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    head = [
        "images/domain",
        "fetch@a img/s",
        "fetch@a RSS MB",
        "fetch@b img/s",
        "fetch@b RSS MB",
        "prepare img/s",
        "prepare CPU %",
        "prepare RSS MB",
        "prepare parent MB",
        "prepare worker MB",
        "prepared.tar MB",
        "dvc status s",
        "dvc push s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        n = r["count"]
        cells = [
            f"{n}",
            f"{n / r['fetch_a_s']:.0f}",
            f"{r['fetch_a_rss']:.0f}",
            f"{n / r['fetch_b_s']:.0f}",
            f"{r['fetch_b_rss']:.0f}",
            f"{2 * n / r['prepare_s']:.0f}",
            f"{r['prepare_cpu']:.0f}",
            f"{r['prepare_rss']:.0f}",
            f"{r['prepare_parent']:.0f}",
            f"{r['prepare_workers']:.0f}",
            f"{r['tar_mb']:.1f}",
            f"{r['dvc_status_s']:.1f}",
            f"{r['dvc_push_s']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
