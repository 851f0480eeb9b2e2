"""Where the evaluate stage's time goes, before and after a change, and which Inception settings are
faster, on this machine.

    uv run python benchmarks/evaluate.py [--before REV] [--rounds 1] [--repeats 3] [--epochs 6]
                                         [--test-a 23] [--test-b 28] [--skip-stage] [--skip-variants]

The embedded default's shape: 6 epoch checkpoints of the default generator (ngf 16, 6 residual
blocks; fresh random weights: the cost does not depend on what they learnt), 23 and 28 test images
of 64 px (what prepare kept from 240 images per domain at test_fraction 0.1), the default
EvaluateParams (kid_subsets 100, threads auto). Random pixels stand in for the images: Inception's
cost does not depend on them. The bundled Inception weights score (TORCH_HOME points at an empty folder).

1. The stage: `stages.evaluate.evaluate` on a fresh cache, once with the code of git revision
   --before (default HEAD: the last commit) and once with the working tree, alternating for
   --rounds rounds, each in its own process, so that the shared machine's load hits both alike.
   Each part is timed exclusively (a part's time excludes the timed parts it calls): Inception
   weights load, Inception on the real test images (once per run), Inception on the epochs' fakes,
   FID, KID, translation, sample grids, test-set pages (PNGs + HTML), checkpoint loading, the rest.
2. The Inception pass on one epoch's fakes (both directions, 51 images) in one process, variants
   round-robin --repeats times: 1 thread vs every CPU, NCHW vs channels_last memory format, 16 vs 32
   images a batch. Printed: median wall seconds, median CPU seconds of the process (less sensitive to
   other work on the machine; for N threads it adds up N threads' time), and the wall ratio to the
   first variant (> 1: faster).
On a shared machine compare ratios within one run, not seconds across runs; the load average is
printed before and after.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # as the stages (unpaired/threads.py), before torch

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Timer:
    """Exclusive time per part: a wrapped call's time, minus that of the wrapped calls inside it."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []  # per open call: the time its wrapped children took

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.total[name] += took - self.stack.pop()
                if self.stack:
                    self.stack[-1] += took

        return timed


def make_inputs(root: Path, epochs: int, n_a: int, n_b: int, size: int = 64) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from unpaired import checkpoint
    from unpaired.models.networks import ResnetGenerator, init_weights

    rng = np.random.default_rng(0)
    for d, n in (("A", n_a), ("B", n_b)):
        (root / "prepared" / f"test{d}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / "prepared" / f"test{d}" / f"{i:04d}.png"
            )
    (root / "checkpoints").mkdir()
    for e in range(1, epochs + 1):
        torch.manual_seed(e)
        nets = [init_weights(ResnetGenerator(ngf=16, n_blocks=6)) for _ in range(2)]
        checkpoint.save(
            checkpoint.generators_payload(e, {"ngf": 16, "n_blocks": 6}, *nets),
            root / "checkpoints" / f"epoch_{e:03d}.pt",
        )


def stage_child(root: Path, out: Path) -> None:
    """In a process whose sys.path starts with the tree under test: evaluate() on a fresh cache in
    `out`, each part timed; prints one JSON line {part: seconds}."""
    import stages.evaluate as stage
    import unpaired.evaluation as evl
    from unpaired import checkpoint, threads

    timer, in_real = Timer(), [False]
    real_features, real_real = evl.inception_features, evl.MetricsPlan.real

    def inception_features(device):
        features, facts, why = real_features(device)
        if features is None:
            return None, facts, why
        on_fakes, on_reals = (
            timer.wrap("Inception: fakes", features),
            timer.wrap("Inception: reals", features),
        )
        return (lambda images: on_reals(images) if in_real[0] else on_fakes(images)), facts, why

    def real(plan, domain):
        in_real[0] = True
        try:
            return real_real(plan, domain)
        finally:
            in_real[0] = False

    evl.inception_features = timer.wrap("Inception: weights load", inception_features)
    evl.MetricsPlan.real = real
    for attr, name in (
        ("frechet_distance", "FID"),
        ("kid_features_to_metric", "KID"),
        ("translate", "translation"),
        ("labelled_grid", "sample grids"),
        ("png_bytes", "sample grids"),
        ("write_test_set", "test-set pages"),
    ):
        setattr(evl, attr, timer.wrap(name, getattr(evl, attr)))
    checkpoint.load_generators = timer.wrap("checkpoint load", checkpoint.load_generators)
    p = stage.EvaluateParams()
    n = threads.apply(p.threads)
    paths = stage.Paths(
        checkpoints=root / "checkpoints",
        data=root / "absent.tar",
        view=root / "prepared",
        prepare_metrics=root / "absent.json",
        train_live=root / "absent",
        cache=out / "cache",
        best=out / "best",
        samples=out / "samples",
        test_set=out / "test_set",
        report=out / "report.html",
        info=out / "eval_info.json",
        epochs_csv=out / "eval_epochs.csv",
        metrics=out / "eval.json",
        plots=out / "eval_plots",
    )
    start, cpu = time.perf_counter(), time.process_time()
    stage.evaluate(p, paths)
    wall = time.perf_counter() - start
    parts = dict(timer.total)
    parts["rest"] = wall - sum(parts.values())
    parts["total (wall)"] = wall
    parts["total (CPU of the process)"] = time.process_time() - cpu
    parts["threads"] = n
    print(json.dumps(parts))


def run_stage(tree: Path, root: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_HOME": str(root / "torch-home")}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(root), str(out)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"the stage failed in {tree}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stage_comparison(root: Path, before: str, rounds: int) -> None:
    tree = root / "before"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", before], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in range(rounds):
        for label, code in ((f"before ({before})", tree), ("after (working tree)", ROOT)):
            print(
                f"round {r + 1}/{rounds}: stage, {label} ... (load average {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            out = root / f"run-{sum(map(len, runs.values()))}"  # a fresh cache for every run
            runs[label].append(run_stage(code, root, out))
    med = {
        label: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for label, xs in runs.items()
    }
    parts = list(dict.fromkeys(k for m in med.values() for k in m))
    print(f"\n{'part (exclusive s, median)':30s}" + "".join(f"{label:>24s}" for label in med))
    for part in parts:
        print(f"{part:30s}" + "".join(f"{m.get(part, 0.0):24.2f}" for m in med.values()))
    first = next(iter(med.values()))["total (wall)"]
    print(
        f"{'speed-up (wall) vs before':30s}"
        + "".join(f"{first / m['total (wall)']:23.2f}x" for m in med.values())
    )
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)


def inception_variants(root: Path, repeats: int) -> None:
    import torch

    import unpaired.evaluation as evl
    from unpaired import checkpoint, inception, threads

    net = inception.bundled_inception()
    test = evl.EvalImages.load(root / "prepared")
    cpu = torch.device("cpu")
    G_A, G_B, _ = checkpoint.load_generators(root / "checkpoints" / "epoch_001.pt", cpu)
    fakes = torch.cat([evl.translate(G_A, test.A, 16, cpu), evl.translate(G_B, test.B, 16, cpu)])
    nets = {
        "NCHW": net,
        "channels_last": inception.bundled_inception().to(memory_format=torch.channels_last),
    }

    @torch.no_grad()
    def one_pass(model, chunk):
        return torch.cat([model(fakes[i : i + chunk])[0] for i in range(0, len(fakes), chunk)])

    variants = {
        f"{n} thr, {layout}, batch {chunk}": (n, nets[layout], chunk)
        for n in dict.fromkeys((1, threads.cpu_count()))
        for layout in nets
        for chunk in (16, 32)
    }
    ref = one_pass(net, 32)
    for layout, model in nets.items():
        print(
            f"  {layout}: largest |feature difference| vs NCHW batch 32: "
            f"{(one_pass(model, 16) - ref).abs().max().item():.2g}",
            flush=True,
        )
    wall: dict[str, list[float]] = defaultdict(list)
    cpu_s: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats):
        for name, (n, model, chunk) in variants.items():
            torch.set_num_threads(n)
            start, c = time.perf_counter(), time.process_time()
            one_pass(model, chunk)
            wall[name].append(time.perf_counter() - start)
            cpu_s[name].append(time.process_time() - c)
        print(
            f"  round {r + 1}/{repeats}, wall: "
            + ", ".join(f"{wall[k][-1]:.1f}" for k in variants)
            + f" (load average {os.getloadavg()[0]:.2f})",
            flush=True,
        )
    base = statistics.median(next(iter(wall.values())))
    print(f"\n  {'variant (51 images)':34s} {'wall s':>8s} {'CPU s':>8s} {'wall vs first':>14s}")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu_s[name])
        print(f"  {name:34s} {w:8.2f} {c:8.2f} {base / w:13.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        stage_child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--before", default="HEAD", help="the git revision to compare the working tree with"
    )
    ap.add_argument("--rounds", type=int, default=1, help="before/after stage runs, alternating")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the Inception variants")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--test-a", type=int, default=23)
    ap.add_argument("--test-b", type=int, default=28)
    ap.add_argument("--skip-stage", action="store_true")
    ap.add_argument("--skip-variants", action="store_true")
    args = ap.parse_args()
    from unpaired import threads

    print(
        f"{threads.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.epochs} epochs, "
        f"{args.test_a} + {args.test_b} test images",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root, args.epochs, args.test_a, args.test_b)
        if not args.skip_stage:
            stage_comparison(root, args.before, args.rounds)
        if not args.skip_variants:
            print("\nThe Inception pass on one epoch's fakes, round-robin:", flush=True)
            inception_variants(root, args.repeats)


if __name__ == "__main__":
    main()
