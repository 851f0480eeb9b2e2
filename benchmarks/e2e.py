"""The train stage's whole-process wall time against the reference's own train.py, each run with its
own defaults on the same data, and where the stage's time goes.

    uv run python benchmarks/e2e.py --reference DIR [--reference-deps DEPS] [--rounds 2]
        [--epochs 1 --epochs-decay 1] [--ours auto,1] [--conditions idle,busy] [--before REV]
    uv run python benchmarks/e2e.py --breakdown [--before REV] [--rounds 1] [--epochs 1 --epochs-decay 1]
    uv run python benchmarks/e2e.py --repro REV [REV ...] [--rounds 1]

Whole process (the default mode). Each run is a fresh process timed from its start to its exit,
as a user times `python train.py` or the train stage of `make repro`:
- `reference`: the reference's own CLI, `python DIR/train.py --model cycle_gan --dataroot VIEW`
  with the nets and sizes of params.yaml's train section (--ngf --ndf --netG resnet_Nblocks
  --load_size --crop_size --n_epochs --n_epochs_decay) and everything else its defaults: torch's
  thread count and OpenMP's default wait policy, 4 loader worker processes (--num_threads 4), its
  HTML page every 400 steps, its checkpoints every 5 epochs. DIR: an export of
  junyanz/pytorch-CycleGAN-and-pix2pix (the figures in docs/benchmarks.md: upstream commit 2a7afba,
  `git archive 2a7afba | tar -x -C DIR`). Its train.py imports `dominate` and `wandb` (never used
  unless --use_wandb), which this project does not depend on: install them into a folder of their
  own, e.g. `uv pip install --python .venv/bin/python --target /tmp/refdeps dominate wandb`, then
  delete from it what .venv already has (so the project's versions win), and pass
  `--reference-deps /tmp/refdeps` (it goes on the reference's PYTHONPATH only).
- `ours threads: X`: `python -m stages.train` as dvc.yaml runs it, in a scratch project whose
  params.yaml is this tree's with train.threads X (and --epochs/--epochs-decay for both tools); X
  `auto` is the default. A variant may add environment settings after a colon:
  `--ours "auto,2:OMP_WAIT_POLICY=ACTIVE"`.
- `before threads: auto` (--before REV): the stage of git revision REV, its own defaults.
Same data for all: data/prepared.tar, or --data TAR (as the stage reads it), and its unpacked view
for the reference; or --data DIR, a folder with trainA, trainB, testA, testB. Conditions: `idle` (nothing
of ours beside the runs: the load average printed says how idle the machine really was) and `busy`
(one other process burning a core all along, as benchmarks/threads.py does). Within a condition the
variants run in turn, --rounds times (the order rotated each round), so that a change of load hits
them alike; the table gives each variant's best wall time, its ratio to the reference's best (> 1:
faster than the reference), the median wall time and the ratio of the medians (on a machine whose
runs vary, the best alone favours whichever tool had one lucky run), and the CPU seconds of the best
run (the process and its waited-for children).

--breakdown: where the stage's wall time goes, this tree against --before REV (default HEAD),
alternating, --rounds rounds, each part timed exclusively (a part's time excludes the timed parts
inside it) on the training thread: interpreter start-up, `import stages.train` (and the slowest
modules under it, from `python -X importtime`), set-up, decoding the images, the first step, the
other steps, the rest of the epoch loop (cutting batches, progress), and per epoch: the divergence
checks, the sample grid (the generators' passes, then the PNG), the images/s file, dvclive's logs,
the checkpoints (state dict, digest, serialising and writing), waiting for the writer thread; what
runs on a writer thread is listed apart (it overlaps training). `the rest` is the wall time left
(interpreter exit included).

--repro REV ...: the whole DAG from a fresh clone, as a newcomer runs it: for each git revision
(alternating, --rounds rounds), `git clone` of this repository checked out at REV into a scratch
folder, then `make setup` (uv sync --frozen from uv's cache: the set-up, timed apart) and `make
repro` (every stage, the default preset; no DVC cache), each timed.

The printed figures depend on the machine and its load; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
BURN = "while True: pass"
OMP_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")

# Runs in the child process of a --breakdown run, sys.path[0] being the tree under test. argv:
# the parent's time.time() at launch, then the stage's arguments. Prints one JSON line at exit.
HARNESS = r"""
import time
_launched = time.time()
import functools, json, sys, threading, atexit
from collections import defaultdict

started = float(sys.argv[1])
totals = defaultdict(float)   # part -> seconds, training thread
off = defaultdict(float)      # part -> seconds, other threads (overlapping the training)
local = threading.local()
main_thread = threading.main_thread()
totals["interpreter start-up"] = _launched - started

def wrap(owner, attr, name, first=None):
    fn = getattr(owner, attr, None)
    if fn is None:
        return
    calls = [0]
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        stack = local.__dict__.setdefault("stack", [])
        stack.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.perf_counter() - t0
            inner = stack.pop()
            part = first if first and calls[0] == 0 else name
            calls[0] += 1
            where = totals if threading.current_thread() is main_thread else off
            where[part] += took - inner
            if stack:
                stack[-1] += took
    setattr(owner, attr, timed)

t0 = time.perf_counter()
import stages.train as stage
totals["import stages.train"] = time.perf_counter() - t0

import unpaired.checkpoint as checkpoint
import unpaired.models.feeding as feeding
import unpaired.models.live as live
import unpaired.models.loop as loop
import unpaired.models.state as state
from unpaired.models.cyclegan import CycleGAN
try:
    import unpaired.models.writer as writer
except ImportError:
    writer = None

wrap(stage, "main", "set-up: params, device, lock, data view")
wrap(stage, "train", "set-up: listing, placement, feeder, progress")
wrap(stage, "unpack_view", "set-up: data view (tar check)")
wrap(stage, "setup_device", "set-up: device, threads")
wrap(stage, "start_run", "set-up: models, resume check")
wrap(feeding, "load_folder", "decoding the images")
wrap(live.RunLog, "start", "set-up: logs, sample images")
wrap(CycleGAN, "step", "steps after the first", first="first step")
wrap(loop, "train_epoch", "epoch loop: batches, progress")
wrap(state, "check_finite", "per epoch: divergence checks")
wrap(state, "check_finite_weights", "per epoch: divergence checks")
wrap(state.TrainState, "end_epoch", "per epoch: lr schedule, counting")
wrap(CycleGAN, "sample_rows", "per epoch: sample grid (generator passes)")
wrap(live, "grid", "per epoch: sample grid (generator passes)")
wrap(live.RunLog, "publish", "per epoch: history, epoch line")
wrap(live, "write_sample", "per epoch: sample grid (PNG write)")
wrap(live, "write_speeds", "per epoch: images/s file")
wrap(live, "write_live", "per epoch: dvclive logs")
wrap(live, "append_live", "per epoch: dvclive logs")
wrap(live, "settle_logs", "end: settle logs")
wrap(state.TrainState, "save", "per epoch: checkpoints (gather, hand-off)")
wrap(state.TrainState, "state_dict", "per epoch: checkpoints (state dict)")
wrap(state.TrainState, "snapshot", "per epoch: checkpoints (state dict)")
wrap(checkpoint, "content_digest", "per epoch: checkpoints (digest)")
wrap(checkpoint, "save", "per epoch: checkpoints (serialise, write)")
if writer is not None:
    wrap(writer.Writer, "join", "waiting for the writer thread")

@atexit.register
def report():
    print("BREAKDOWN " + json.dumps({"main": totals, "off": off}), flush=True)

sys.argv = ["python -m stages.train", *sys.argv[2:]]
stage.main(sys.argv[1:])
"""


def load() -> str:
    """The 1-, 5- and 15-minute load averages, as printed with every figure."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def clean_env(extra: dict[str, str] | None = None, path: str | None = None) -> dict[str, str]:
    """The environment a user would have: no OpenMP/MKL settings of ours, `extra` added."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS and k != "PYTHONPATH"}
    env.pop("VIRTUAL_ENV", None)
    if path:
        env["PYTHONPATH"] = path
    env.update(extra or {})
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Run `cmd` to its exit: (wall s, CPU s of it and its waited-for children, stdout tail)."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); its output:\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


class Setup:
    """The shared inputs: the data (tar + view), the train params, the trees under test."""

    def __init__(self, args, tmp: Path):
        from ruamel.yaml import YAML

        self.args, self.tmp = args, tmp
        yaml = YAML()
        self.params = yaml.load((ROOT / "params.yaml").read_text())
        t = self.params["train"]
        if args.epochs is not None:
            t["epochs"] = args.epochs
        if args.epochs_decay is not None:
            t["epochs_decay"] = args.epochs_decay
        self.train = t
        self.view = tmp / "prepared"
        data = Path(args.data) if args.data else ROOT / "data" / "prepared.tar"
        if data.is_dir():
            shutil.copytree(data, self.view)
            self.tar = tmp / "absent.tar"  # no tar: the stage skips its unpack
        else:
            tar = data
            if not tar.is_file():
                sys.exit(f"{tar}: missing; run `make repro` first, or pass --data TAR_OR_DIR")
            self.tar = tmp / "prepared.tar"
            shutil.copy(tar, self.tar)
            sys.path.insert(0, str(ROOT))
            from unpaired.files import unpack_view

            unpack_view(self.tar, self.view)
        self.trees = {"ours": ROOT}
        if args.before:
            tree = tmp / "before"
            tree.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            self.trees["before"] = tree
        self.runs = 0

    def project(self, threads: str) -> Path:
        """A fresh scratch project: params.yaml with train.threads `threads`; the data beside it."""
        from ruamel.yaml import YAML

        self.runs += 1
        proj = self.tmp / f"run{self.runs}"
        proj.mkdir()
        params = self.params
        params["train"]["threads"] = int(threads) if threads.isdigit() else threads
        with open(proj / "params.yaml", "w") as f:
            YAML().dump(params, f)
        return proj

    def stage_cmd(self, proj: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stages.train",
            "--data",
            str(self.tar),
            "--view",
            str(self.view),
            "--out",
            str(proj / "checkpoints"),
            "--live",
            str(proj / "live"),
        ]

    def ours(self, tree: str, threads: str, extra: dict[str, str]) -> tuple[float, float, str]:
        proj = self.project(threads)
        env = clean_env(extra, str(self.trees[tree]))
        return timed(self.stage_cmd(proj), proj, env, proj / "out.log")

    def reference(self) -> tuple[float, float, str]:
        ref, t = Path(self.args.reference).resolve(), self.train
        self.runs += 1
        proj = self.tmp / f"run{self.runs}"
        proj.mkdir()
        if t["n_blocks"] not in (6, 9):
            sys.exit(f"the reference's generators have 6 or 9 blocks, not {t['n_blocks']}")
        cmd = [
            sys.executable,
            "train.py",
            "--dataroot",
            str(self.view),
            "--name",
            "e2e",
            "--checkpoints_dir",
            str(proj),
            "--model",
            "cycle_gan",
            "--ngf",
            str(t["ngf"]),
            "--ndf",
            str(t["ndf"]),
            "--netG",
            f"resnet_{t['n_blocks']}blocks",
            "--load_size",
            str(t["load_size"]),
            "--crop_size",
            str(t["crop_size"]),
            "--n_epochs",
            str(t["epochs"]),
            "--n_epochs_decay",
            str(t["epochs_decay"]),
        ]
        deps = self.args.reference_deps
        env = clean_env(path=str(Path(deps).resolve()) if deps else None)
        return timed(cmd, ref, env, proj / "out.log")


def parse_ours(spec: str) -> list[tuple[str, str, dict[str, str]]]:
    """`auto,1,2:OMP_WAIT_POLICY=ACTIVE` -> [(label, threads, env)]."""
    out = []
    for item in filter(None, spec.split(",")):
        threads, _, extra = item.partition(":")
        env = dict(kv.split("=", 1) for kv in filter(None, extra.split(";")))
        label = f"ours, threads: {threads}" + (f" ({extra})" if extra else "")
        out.append((label, threads, env))
    return out


def whole(setup: Setup, args) -> None:
    variants: list[tuple[str, object]] = []
    if args.reference:
        variants.append(("reference, its defaults", setup.reference))
    for label, threads, env in parse_ours(args.ours):
        variants.append((label, lambda t=threads, e=env: setup.ours("ours", t, e)))
    if args.before:
        variants.append(
            (
                f"before ({args.before}), threads: auto",
                lambda: setup.ours("before", "auto", {}),
            )
        )
    t = setup.train
    print(
        f"{cpus()} CPUs; ngf {t['ngf']} ndf {t['ndf']} {t['n_blocks']} blocks, {t['load_size']} -> "
        f"{t['crop_size']} px, {t['epochs']} + {t['epochs_decay']} epochs, "
        f"{len(list((setup.view / 'trainA').iterdir()))} + "
        f"{len(list((setup.view / 'trainB').iterdir()))} training images; "
        f"best of {args.rounds}; load average {load()}",
        flush=True,
    )
    results: dict[str, dict[str, list[tuple[float, float, str]]]] = {}
    for condition in args.conditions.split(","):
        burners = [subprocess.Popen([sys.executable, "-c", BURN])] if condition == "busy" else []
        try:
            time.sleep(1.0 if burners else 0)
            for r in range(args.rounds):
                k = r % len(variants)
                for label, run in variants[k:] + variants[:k]:
                    before = load()
                    wall, cpu, _ = run()
                    results.setdefault(condition, {}).setdefault(label, []).append(
                        (wall, cpu, f"{before} -> {load()}")
                    )
                    print(
                        f"  {condition:4s} round {r + 1}: {label:44s} {wall:7.1f} s wall "
                        f"{cpu:7.1f} s CPU  load {before} -> {load()}",
                        flush=True,
                    )
        finally:
            for proc in burners:
                proc.kill()
                proc.wait()
    print()
    print(
        "| condition | run | best wall s | × reference | median wall s | × reference (medians) "
        "| CPU s | load (1/5/15 min) before -> after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for condition, rows in results.items():
        ref = min(rows[variants[0][0]])[0] if args.reference else None
        ref_median = median(w for w, _, _ in rows[variants[0][0]]) if args.reference else None
        for label, runs in rows.items():
            wall, cpu, loads = min(runs)
            mid = median(w for w, _, _ in runs)
            ratio = f"{ref / wall:.2f}×" if ref else "-"
            ratio_mid = f"{ref_median / mid:.2f}×" if ref_median else "-"
            print(
                f"| {condition} | {label} | {wall:.1f} | {ratio} | {mid:.1f} | {ratio_mid} "
                f"| {cpu:.1f} | {loads} |"
            )
    print(f"load average at the end {load()}")


def importtime(tree: Path, top: int) -> list[tuple[str, float]]:
    """The slowest modules directly or indirectly imported by stages.train, by cumulative time
    (`python -X importtime`), only those not nested in a listed one."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import stages.train"],
        cwd=tree,
        env=clean_env(path=str(tree)),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit():
            depth = (len(name) - len(name.lstrip())) // 2
            rows.append((depth, name.strip(), int(cumulative) / 1e6))
    # the top-level imports of stages.train and of the unpaired modules it loads, heaviest first
    picked = [
        (n, s)
        for d, n, s in rows
        if d <= 3 and not n.startswith(("unpaired", "stages", "encodings", "_"))
    ]
    picked.sort(key=lambda r: -r[1])
    seen: list[tuple[str, float]] = []
    for n, s in picked:
        if not any(n.startswith(f"{m}.") for m, _ in seen) and n not in {m for m, _ in seen}:
            seen.append((n, s))
    return seen[:top]


def breakdown(setup: Setup, args) -> None:
    trees = list(setup.trees)[::-1]  # before first, when given
    print(
        f"{cpus()} CPUs; {setup.train['epochs']} + {setup.train['epochs_decay']} epochs; "
        f"{args.rounds} round(s), alternating {', '.join(trees)}; load average {load()}",
        flush=True,
    )
    got: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            proj = setup.project("auto")
            env = clean_env(path=str(setup.trees[tree]))
            cmd = [sys.executable, "-c", HARNESS, repr(time.time()), *setup.stage_cmd(proj)[3:]]
            before = load()
            wall, cpu, text = timed(cmd, proj, env, proj / "out.log")
            parts = json.loads(text.rsplit("BREAKDOWN ", 1)[1].splitlines()[0])
            parts["wall"], parts["cpu"], parts["load"] = wall, cpu, f"{before} -> {load()}"
            got[tree].append(parts)
            print(
                f"  round {r + 1} {tree:6s}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, "
                f"load {parts['load']}",
                flush=True,
            )
    best = {t: min(runs, key=lambda p: p["wall"]) for t, runs in got.items()}
    names: list[str] = []
    for t in trees:
        for name in best[t]["main"]:
            if name not in names:
                names.append(name)
    print("\nthe fastest run of each, seconds on the training thread (each part exclusive):")
    print("| part | " + " | ".join(trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for name in names:
        print(
            f"| {name} | " + " | ".join(f"{best[t]['main'].get(name, 0):.2f}" for t in trees) + " |"
        )
    for t in trees:
        best[t]["rest"] = best[t]["wall"] - sum(best[t]["main"].values())
    print(
        "| the rest (unwrapped code, interpreter exit) | "
        + " | ".join(f"{best[t]['rest']:.2f}" for t in trees)
        + " |"
    )
    print("| **wall** | " + " | ".join(f"**{best[t]['wall']:.2f}**" for t in trees) + " |")
    print("| CPU s (process) | " + " | ".join(f"{best[t]['cpu']:.1f}" for t in trees) + " |")
    print("| load before -> after | " + " | ".join(best[t]["load"] for t in trees) + " |")
    off = sorted({n for t in trees for n in best[t]["off"]})
    if off:
        print("\non a writer thread (overlapping the training), seconds:")
        for name in off:
            print(
                f"  {name:48s} "
                + "  ".join(f"{t} {best[t]['off'].get(name, 0):.2f}" for t in trees)
            )
    print("\nslowest imports under stages.train (python -X importtime, cumulative s, one run):")
    for t in trees:
        listed = ", ".join(f"{n} {s:.2f}" for n, s in importtime(setup.trees[t], args.top))
        print(f"  {t}: {listed}")
    print(f"load average at the end {load()}")


def repro(args, tmp: Path) -> None:
    print(
        f"{cpus()} CPUs; fresh clones of {', '.join(args.repro)}; load average {load()}", flush=True
    )
    rows: dict[str, list[tuple[float, float, str]]] = {}
    for r in range(args.rounds):
        for rev in args.repro:
            clone = tmp / f"clone{r}-{rev.replace('/', '_')}"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
            env = clean_env()
            before = load()
            setup, _, _ = timed(["make", "setup"], clone, env, tmp / "setup.log")
            whole, _, _ = timed(["make", "repro"], clone, env, tmp / "repro.log")
            rows.setdefault(rev, []).append((whole, setup, f"{before} -> {load()}"))
            print(
                f"  round {r + 1} {rev}: make setup {setup:.1f} s, then make repro {whole:.1f} s; "
                f"load {before} -> {load()}",
                flush=True,
            )
            shutil.rmtree(clone, ignore_errors=True)
    print("\n| revision | make setup s | make repro s (set-up done) | load before -> after |")
    print("|---|---:|---:|---|")
    for rev, runs in rows.items():
        whole, setup, loads = min(runs)
        print(f"| {rev} | {setup:.1f} | {whole:.1f} | {loads} |")
    print(f"load average at the end {load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", help="an export of junyanz/pytorch-CycleGAN-and-pix2pix")
    ap.add_argument(
        "--reference-deps",
        help="a folder holding dominate and wandb for the reference (its PYTHONPATH)",
    )
    ap.add_argument("--ours", default="auto,1", help="our train.threads variants (see above)")
    ap.add_argument("--before", help="also run the stage of this git revision (its defaults)")
    ap.add_argument("--conditions", default="idle,busy", help="idle, busy or both")
    ap.add_argument("--rounds", type=int, default=2, help="runs per variant; the best is shown")
    ap.add_argument("--epochs", type=int, default=1, help="train.epochs for every tool")
    ap.add_argument("--epochs-decay", type=int, default=1, help="train.epochs_decay for every tool")
    ap.add_argument(
        "--data",
        help="prepare's tar, or a folder with trainA, trainB, testA, testB "
        "(default: data/prepared.tar)",
    )
    ap.add_argument(
        "--breakdown", action="store_true", help="where the stage's time goes (see above)"
    )
    ap.add_argument("--top", type=int, default=8, help="--breakdown: slowest imports listed")
    ap.add_argument(
        "--repro", nargs="+", metavar="REV", help="make repro from fresh clones (see above)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (printed)")
    args = ap.parse_args()
    if args.breakdown and not args.before:
        args.before = "HEAD"
    if not args.breakdown and not args.repro and not args.reference and not args.ours:
        ap.error("nothing to run: pass --reference DIR and/or --ours")
    if args.reference and not (Path(args.reference) / "train.py").is_file():
        ap.error(f"--reference {args.reference}: no train.py there")
    tmp = Path(tempfile.mkdtemp(prefix="e2e-"))
    try:
        if args.repro:
            return repro(args, tmp)
        setup = Setup(args, tmp)
        (breakdown if args.breakdown else whole)(setup, args)
    finally:
        if args.keep:
            print(f"scratch folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
