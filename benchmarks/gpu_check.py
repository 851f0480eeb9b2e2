"""One command for a lent GPU: every figure the CPU cannot give, in one run of at most 8 minutes.

    bash benchmarks/gpu_check.sh [--out DIR] [--reference DIR] [--parts a,b] [--limit-of PART=S] [--tiny]

Each part runs in a process of its own (a new session: on its time limit the whole process group is
killed, DataLoader workers and inductor's compile workers included); a part that fails or runs out
of time is reported and the others go on. OUT/gpu_check.json (default OUT: gpu_check/) is rewritten
after every part; a table is printed at the end; each part's output is in OUT/parts/<part>.log.

  versions       torch, CUDA, cuDNN, the card, its compute capability, native bf16 (>= 8.0), what
                 train.precision auto picks there and why (unpaired.devices.precision_for)
  grads          one step's gradients on CUDA, float32, contiguous and channels-last × reference order
                 and batched × batch 1 and 2, against float64 contiguous on the CPU (norm-wise error)
  bf16           300 steps at 256 px, ngf/ndf 64, 9 blocks, of fp32 (TF32) and bf16 autocast from the
                 same init, and fp32 from another seed (the noise): relative difference of mean losses
  memory_format  the stage's default step (train_throughput.py) at 256 px, channels-last vs contiguous
  reference      the reference's own optimize_parameters vs the stage's default step at 256 px
                 (--reference DIR or $CYCLEGAN_REFERENCE: a checkout of junyanz/pytorch-CycleGAN-and-
                 pix2pix; skipped with a line when absent)
  data           the embedded data (preset doodles2flares, procedural: no network): fetch a, b, prepare
  stage          the train stage end to end on it (python -m stages.train), twice: the epoch loss
                 lines diffed
  data_device    the stage for 2 epochs with train.data_device device, host and disk
  compile        the stage for 2 epochs with train.compile default and reduce-overhead, TORCH_LOGS=
                 recompiles (recompilations counted); inductor's cache starts empty (OUT/inductor)
Peak memory of each: torch.cuda.max_memory_allocated on CUDA and the peak RSS of the process.

Without CUDA: one line says so; the parts that need no GPU run (versions, data, and the stage twice
on the CPU for 1 epoch, its limit raised by the skipped parts' limits: the sum stays the same); the
others are skipped. The exit status is 0 unless a part that ran failed or ran out of time.

--tiny: tiny sizes everywhere (tests/test_gpu_check.py runs the no-CUDA path with it).
Part limits (PARTS) add up to at most TOTAL_LIMIT_S; they are estimates for one H100, not measured
there yet: each part's own limit stops it, never the whole run. A part of several runs (stage,
memory_format, data_device, compile) gives each run an even share of what is left of its limit, and a
run that fails is recorded while the next still runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_LIMIT_S = 8 * 60

# name -> (time limit in seconds, needs CUDA). Order is run order. Sum <= TOTAL_LIMIT_S.
PARTS = {
    "versions": (20, False),
    "grads": (30, True),
    "bf16": (65, True),
    "memory_format": (45, True),
    "reference": (40, True),
    "data": (45, False),
    "stage": (65, False),
    "data_device": (50, True),
    "compile": (120, True),  # two cold compiles (inductor's cache starts empty) and 2 epochs each
}
assert sum(limit for limit, _ in PARTS.values()) <= TOTAL_LIMIT_S

# params overrides of --tiny (as tests/helpers.py's TINY: the whole stage in seconds on a CPU)
TINY = {
    "domains": {"a": {"count": 12, "image_size": 32}, "b": {"count": 12, "image_size": 32}},
    "prepare": {"image_size": 32, "test_fraction": 0.25, "min_size": 8},
    "train": {
        "epochs": 1,
        "epochs_decay": 1,
        "ngf": 4,
        "ndf": 4,
        "n_blocks": 1,
        "load_size": 28,
        "crop_size": 24,
        "samples": 2,
        "pool_size": 4,
    },
}
CPU_STAGE = {"train": {"epochs": 1, "epochs_decay": 0}}  # the stage on a CPU: what fits its limit
TWO_EPOCHS = {"train": {"epochs": 1, "epochs_decay": 1}}
PRESET = "doodles2flares"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)  (.*)  lr (\S+)  ([0-9.]+) img/s$")


# --- what runs inside a part's process ------------------------------------------------------------


class Report:
    """The part's result, rewritten to its JSON file at every update, so a part stopped by its time
    limit still leaves what it had measured."""

    def __init__(self, path: Path, args):
        self.path, self.args, self.data = path, args, {}

    def __call__(self, **kw) -> None:
        self.data.update(kw)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def peak_memory(device=None) -> dict:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and device.type == "cuda":
        out["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def versions(args, report: Report) -> str:
    import platform

    import torch

    from unpaired.devices import BF16_NATIVE_CAPABILITY, cpu_bf16_native, precision_for

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": cuda,
        "cpu_bf16_native": cpu_bf16_native(),
    }
    device = torch.device(
        args.device if cuda and args.device.startswith("cuda") else "cuda" if cuda else "cpu"
    )
    if cuda:
        cap = torch.cuda.get_device_capability(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            capability=f"{cap[0]}.{cap[1]}",
            native_bf16=tuple(cap) >= BF16_NATIVE_CAPABILITY,
            is_bf16_supported=torch.cuda.is_bf16_supported(),
            memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    info["precision_auto"] = precision_for(device, "auto").why
    report(**info)
    if not cuda:
        return f"torch {info['torch']}, no CUDA (CUDA build {info['cuda_build']}); {info['precision_auto']}"
    return (
        f"torch {info['torch']}, CUDA {info['cuda_build']}, cuDNN {info['cudnn']}, {info['device']}, "
        f"capability {info['capability']}, native bf16 {info['native_bf16']}"
    )


def one_step(models, a, b, batched):
    import contextlib as cl

    import torch

    from unpaired.models.cyclegan import optimizers, train_step
    from unpaired.models.pool import ImagePool

    m = copy.deepcopy(models)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(1)
    pools = ImagePool(3, g), ImagePool(3, g)
    # one step from the same weights (later steps amplify rounding through Adam)
    train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, cl.nullcontext, batched)
    return {
        n: [p.grad.double().cpu() for p in getattr(m, n).parameters()]
        for n in ("G_A", "G_B", "D_A", "D_B")
    }


def relative(x, ref) -> float:
    """Norm-wise relative error of a network's whole gradient, ||x - ref|| / ||ref||: a wrong kernel
    is off by O(1); float32 rounding, amplified where instance norm sees a near-constant map, stays
    well below 1e-2 (a few elements' max-abs error can reach 5e-2 there at 64 px)."""
    import torch

    x, ref = torch.cat([t.flatten() for t in x]), torch.cat([t.flatten() for t in ref])
    return ((x - ref).norm() / ref.norm()).item()


def grads(args, report: Report) -> str:
    """As tests/test_accel.py on the CPU, on CUDA: max relative gradient error per case, and what
    channels_last_ok (the stage's check before using channels-last) says."""
    import torch

    from unpaired.models.cyclegan import build_models
    from unpaired.models.training import channels_last_ok

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m64 = build_models(8, 8, 2, 3, torch.device("cpu"), False, dtype=torch.float64)
    cases = {}
    for batch in (1, 2):
        g = torch.Generator().manual_seed(0)
        a, b = (
            torch.rand(batch, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2)
        )
        ref = one_step(m64, a, b, False)
        for fmt in (torch.contiguous_format, torch.channels_last):
            m = copy.deepcopy(m64)
            for net in m.nets():
                net.to(device=device, dtype=torch.float32, memory_format=fmt)
            a32, b32 = (x.float().to(device).contiguous(memory_format=fmt) for x in (a, b))
            for batched in (False, True):
                got = one_step(m, a32, b32, batched)
                key = f"{str(fmt).split('.')[-1]} {'batched' if batched else 'reference'} batch {batch}"
                cases[key] = max(relative(got[n], ref[n]) for n in ref)
    # A wrong kernel is off by O(1) (CPU channels-last at batch 1: 0.5-1.3); float32 rounding stays
    # below 0.05 here (measured on CPU: 2e-6 at batch 1, 0.043 at batch 2 through D_B(G_B(real_B))).
    right = {
        fmt: max(v for k, v in cases.items() if k.startswith(fmt)) < 0.2
        for fmt in ("contiguous_format", "channels_last")
    }
    report(
        channels_last_ok=channels_last_ok(device),
        cases=cases,
        all_right=right,
        **peak_memory(device),
    )
    return (
        f"max error contiguous {max(v for k, v in cases.items() if k.startswith('contiguous')):.1e}, "
        f"channels-last {max(v for k, v in cases.items() if k.startswith('channels_last')):.1e}; "
        f"all right {right}; channels_last_ok {channels_last_ok(device)}"
    )


def bf16(args, report: Report) -> str:
    """fp32 (TF32) and bf16 autocast from the same init on the same 64 fixed random pairs, and fp32
    from another seed (the noise): max relative difference of the mean losses over each half."""
    import contextlib as cl

    import torch

    from unpaired.models.cyclegan import build_models, optimizers, train_step
    from unpaired.models.pool import ImagePool
    from unpaired.models.training import channels_last_ok

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    size, ngf, blocks, steps = (32, 8, 2, 20) if args.tiny else (256, 64, 9, 300)
    report(steps=steps, crop=size, ngf=ngf, ndf=ngf, blocks=blocks)

    def curve(seed, use_bf16):
        torch.manual_seed(seed)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        m = build_models(ngf, ngf, blocks, 3, device, channels_last_ok(device))
        opt_G, opt_D = optimizers(m, 2e-4, 0.5, cuda)
        g = torch.Generator().manual_seed(seed)
        pools = ImagePool(50, g), ImagePool(50, g)
        gd = torch.Generator().manual_seed(100)
        a = torch.rand(64, 3, size, size, generator=gd).to(device) * 2 - 1
        b = (torch.rand(64, 3, size, size, generator=gd).to(device) * 2 - 1).clamp(-1, 0) * 2 + 1
        ac = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if use_bf16
            else cl.nullcontext
        )
        t0 = time.perf_counter()
        losses = torch.stack(
            [
                train_step(
                    m,
                    opt_G,
                    opt_D,
                    *pools,
                    a[i % 64 : i % 64 + 1],
                    b[i * 7 % 64 : i * 7 % 64 + 1],
                    10.0,
                    0.5,
                    ac,
                )
                for i in range(steps)
            ]
        ).cpu()
        return losses, {"it_per_s": steps / (time.perf_counter() - t0), **peak_memory(device)}

    runs = {}
    for name, seed, use in (("fp32", 0, False), ("bf16", 0, True), ("fp32_seed1", 1, False)):
        runs[name] = curve(seed, use)
        report(**{name: runs[name][1]})
    fp32, low, other = (runs[n][0] for n in ("fp32", "bf16", "fp32_seed1"))
    rel = lambda x, y: ((x - y).abs() / y.abs()).max().item()  # noqa: E731
    halves = (slice(0, steps // 2), slice(steps // 2, steps))
    result = {
        "finite": bool(torch.isfinite(low).all()),
        "bf16_vs_fp32": [rel(low[s].mean(0), fp32[s].mean(0)) for s in halves],
        "fp32_seed_noise": [rel(other[s].mean(0), fp32[s].mean(0)) for s in halves],
    }
    report(**result, **peak_memory())
    return (
        f"bf16 vs fp32 {max(result['bf16_vs_fp32']):.3f}, seed noise {min(result['fp32_seed_noise']):.3f}; "
        f"{runs['fp32'][1]['it_per_s']:.1f} / {runs['bf16'][1]['it_per_s']:.1f} it/s fp32 / bf16"
    )


def throughput(args, report: Report, extra: list[str], name: str, limit: float) -> dict:
    """train_throughput.py at 256 px (ngf/ndf 64, 9 blocks; --tiny: 32 px) on CUDA: its JSON."""
    out = parts_dir(args) / f"throughput_{name}.json"
    # (tiny: 6 blocks, the fewest the reference's generator names offer: resnet_6blocks, resnet_9blocks)
    size = (
        ["--size", "32", "--ngf", "8", "--ndf", "8", "--blocks", "6", "--images", "8"]
        if args.tiny
        else []
    )
    steps = ["--steps", "10" if args.tiny else "50", "--warmup", "5"]
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_throughput.py"),
        "--device",
        args.device,
        *size,
        *steps,
        "--timeout",
        str(int(limit)),
        "--json",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    print(proc.stdout + proc.stderr)
    if not out.is_file():
        raise RuntimeError(f"train_throughput.py wrote no JSON (exit {proc.returncode})")
    return json.loads(out.read_text())


def default_variant(args) -> str:
    """The variant the stage runs with the default params (train_throughput.default_variant's rule)."""
    import torch

    from unpaired.devices import bf16_for

    return "batched+bf16" if bf16_for(torch.device(args.device), "auto") else "batched"


def memory_format(args, report: Report) -> str:
    variant = default_variant(args)

    def run(fmt, seconds):
        got = throughput(
            args, report, ["--variants", variant, "--memory-format", fmt], fmt, seconds
        )
        if variant not in got["variants"]:
            raise RuntimeError(f"{variant} failed: {got.get('failed')}")
        return got

    got = each(report, ["channels_last", "contiguous"], run)
    rates = {fmt: got[fmt]["variants"][variant]["it_per_s"] for fmt in got}
    return (
        f"{variant}: channels-last {rates['channels_last']:.1f} it/s, contiguous {rates['contiguous']:.1f} it/s "
        f"({rates['channels_last'] / rates['contiguous']:.2f}x)"
    )


def reference(args, report: Report) -> str:
    variant = default_variant(args)
    got = throughput(
        args,
        report,
        ["--reference", args.reference, "--variants", variant],
        "reference",
        share(args, 1),
    )
    report(**got)
    row = got["variants"].get(variant, {})
    if "ratio_reference" not in row:
        raise RuntimeError(f"no ratio to the reference: failed {got.get('failed')}")
    return (
        f"{variant} {row['it_per_s']:.1f} it/s = {row['ratio_reference']:.2f}x the reference's "
        f"optimize_parameters ({got['variants']['reference']['it_per_s']:.1f} it/s)"
    )


def share(args, runs_left: int) -> float:
    """Seconds for the next of `runs_left` sub-runs of this part: an even share of what is left of
    the part's limit (so one slow sub-run cannot starve the others of their measurement)."""
    return max(1.0, (args.deadline - time.monotonic()) / runs_left)


def each(report: Report, names: list[str], run, independent: bool = True) -> dict:
    """run(name, seconds) for each name, each with its share of the time; one that fails is
    recorded as {"error": ...} and the others still run (unless not `independent`: then the first
    failure ends the part). Raises RuntimeError at the end if any failed."""
    got = {}
    for i, name in enumerate(names):
        try:
            got[name] = run(name, share(report.args, len(names) - i))
        except Exception as err:  # noqa: BLE001 (the part reports it; its siblings go on)
            got[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        report(**{name: got[name]})
        if "error" in got[name] and not independent:
            break
    failed = [n for n in got if "error" in got[n]]
    if failed:
        raise RuntimeError("; ".join(f"{n}: {got[n]['error']}" for n in failed))
    return got


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def parts_dir(args) -> Path:
    """OUT/parts: each part's log and JSON (gpu_check.json holds every part's JSON too)."""
    return Path(args.out).resolve() / "parts"


def work(args) -> Path:
    return Path(args.out).resolve() / "work"


def write_params(folder: Path, *overrides: dict) -> None:
    """params.yaml of preset PRESET (composed from conf/ as `unpaired preset` does) with overrides."""
    from ruamel.yaml import YAML

    from unpaired import presets

    text = presets.switch(folder / "absent.yaml", ROOT / "conf", PRESET).text
    data = YAML(typ="safe").load(text)
    for over in overrides:
        for section, values in over.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    data[section][key].update(value)
                else:
                    data[section][key] = value
    folder.mkdir(parents=True, exist_ok=True)
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with open(folder / "params.yaml", "w") as f:
        yaml.dump(data, f)


def data(args, report: Report) -> str:
    w = work(args)
    write_params(w, *([TINY] if args.tiny else []))
    steps = {
        "fetch a": ["-m", "stages.fetch", "a", "--out", "data/raw/a"],
        "fetch b": ["-m", "stages.fetch", "b", "--out", "data/raw/b"],
        "prepare": [
            "-m",
            "stages.prepare",
            "--raw",
            "data/raw/a",
            "data/raw/b",
            "--out",
            "data/prepared.tar",
            "--view",
            "data/prepared",
            "--metrics",
            "metrics/prepare.json",
            "--page",
            "metrics/data",
        ],
    }
    seconds = {}
    for name, cmd in steps.items():
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *cmd], cwd=w, env=env(), capture_output=True, text=True
        )
        print(proc.stdout + proc.stderr)
        if proc.returncode:
            raise RuntimeError(
                f"{name}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
            )
        seconds[name] = time.perf_counter() - t0
        report(seconds=seconds)
    counts = {
        d: len(list((w / "data" / "prepared" / d).glob("*.png")))
        for d in ("trainA", "trainB", "testA", "testB")
    }
    report(preset=PRESET, images=counts)
    return f"preset {PRESET}: {counts} in {sum(seconds.values()):.0f} s"


def stage_run(
    args, name: str, *overrides: dict, environ: dict | None = None, limit: float = 300
) -> dict:
    """The train stage (python -m stages.train, through stage_runner for its peak memory) in
    work/<name> with preset PRESET + overrides, on work/data: its epoch lines, `train:` lines,
    peak memory and stderr's recompilation lines."""
    w, run = work(args), work(args) / name
    run.mkdir(parents=True, exist_ok=True)
    device = (
        [] if args.device == "cuda" else [{"train": {"device": args.device}}]
    )  # cuda: the default, auto
    write_params(run, *([TINY] if args.tiny else []), *device, *overrides)
    memfile = run / "memory.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stage-runner",
        str(memfile),
        "--",
        "--data",
        str(w / "data" / "prepared.tar"),
        "--view",
        str(w / "data" / "prepared"),
        "--out",
        str(run / "checkpoints"),
        "--live",
        str(run / "live"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=run,
        env={**env(), **(environ or {})},
        capture_output=True,
        text=True,
        timeout=limit,
    )
    seconds = time.perf_counter() - t0
    (run / "stdout.txt").write_text(proc.stdout)
    (run / "stderr.txt").write_text(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"stage {name}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    epochs = [EPOCH_LINE.match(line) for line in proc.stdout.splitlines()]
    return {
        "seconds": seconds,
        "train_lines": [line for line in proc.stdout.splitlines() if line.startswith("train:")],
        "loss_lines": [f"epoch {m[1]}/{m[2]}  {m[3]}  lr {m[4]}" for m in epochs if m],
        "img_per_s": [float(m[5]) for m in epochs if m],
        "recompilations": sum("Recompiling function" in line for line in proc.stderr.splitlines()),
        **(json.loads(memfile.read_text()) if memfile.is_file() else {}),
    }


def losses_of(line: str) -> list[float]:
    return [float(x) for x in re.findall(r" (-?[0-9.]+(?:e[-+][0-9]+)?)(?=  |$)", line)]


def stage(args, report: Report) -> str:
    import torch

    cpu = args.device == "cpu" or not torch.cuda.is_available()
    over = [] if args.tiny or not cpu else [CPU_STAGE]
    got = each(
        report,
        ["run_1", "run_2"],
        lambda name, seconds: stage_run(args, name, *over, limit=seconds),
        independent=False,
    )  # the same run twice: what stops the first stops the second
    runs = [got["run_1"], got["run_2"]]
    a, b = runs[0]["loss_lines"], runs[1]["loss_lines"]
    same = sum(x == y for x, y in zip(a, b))
    diff = [f"- {x}\n+ {y}" for x, y in zip(a, b) if x != y]
    worst = max(
        (
            abs(p - q) / max(abs(q), 1e-12)
            for x, y in zip(a, b)
            for p, q in zip(losses_of(x), losses_of(y))
        ),
        default=0.0,
    )
    report(
        identical_lines=same,
        lines=len(a),
        diff=diff,
        max_relative_difference=worst,
        shortened_for_the_cpu=bool(over),
    )
    if len(a) != len(b) or not a:
        raise RuntimeError(f"runs gave {len(a)} and {len(b)} epoch lines")
    return (
        f"{same}/{len(a)} epoch loss lines identical (max relative difference {worst:.1e}); "
        f"last epoch {runs[0]['img_per_s'][-1]:.1f} / {runs[1]['img_per_s'][-1]:.1f} img/s"
    )


def data_device(args, report: Report) -> str:
    got = each(
        report,
        ["device", "host", "disk"],
        lambda place, seconds: stage_run(
            args,
            f"data_device_{place}",
            TWO_EPOCHS,
            {"train": {"data_device": place}},
            limit=seconds,
        ),
    )
    return "epoch 2 img/s: " + ", ".join(
        f"{place} {r['img_per_s'][-1]:.1f}" for place, r in got.items()
    )


def compile_(args, report: Report) -> str:
    cache = Path(args.out).resolve() / "inductor"
    environ = {"TORCH_LOGS": "recompiles", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    got = each(
        report,
        ["default", "reduce-overhead"],
        lambda mode, seconds: stage_run(
            args,
            f"compile_{mode}",
            TWO_EPOCHS,
            {"train": {"compile": mode}},
            environ=environ,
            limit=seconds,
        ),
    )
    return "epoch 2: " + "; ".join(
        f"{mode} {r['img_per_s'][-1]:.1f} img/s, {r['recompilations']} recompilation(s)"
        for mode, r in got.items()
    )


FUNCTIONS = {
    "versions": versions,
    "grads": grads,
    "bf16": bf16,
    "memory_format": memory_format,
    "reference": reference,
    "data": data,
    "stage": stage,
    "data_device": data_device,
    "compile": compile_,
}


def run_part(args) -> None:
    """One part, in this process: its JSON to OUT/<part>.json, its one-line summary last in it."""
    args.deadline = time.monotonic() + args.limit
    report = Report(parts_dir(args) / f"{args.part}.json", args)
    report(summary=FUNCTIONS[args.part](args, report))


def stage_runner(memfile: str, argv: list[str]) -> None:
    """python -m stages.train with `argv`, writing its peak memory to `memfile` when it exits. torch
    is not imported here first: the stage sets OpenMP's wait policy before it imports torch."""
    import atexit
    import runpy

    def write() -> None:
        torch = sys.modules.get("torch")
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch is not None and torch.cuda.is_initialized():
            out["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        Path(memfile).write_text(json.dumps(out))

    atexit.register(write)
    sys.argv = ["stages.train", *argv]
    runpy.run_module("stages.train", run_name="__main__", alter_sys=True)


# --- the run: each part in a process of its own ---------------------------------------------------


def skip_reason(name: str, cuda: bool | None, args) -> str | None:
    if PARTS[name][1] and cuda is False and args.device.startswith("cuda"):
        return "no CUDA"
    if name == "reference":
        if not args.reference:
            return "no reference checkout (--reference DIR or $CYCLEGAN_REFERENCE)"
        if not (Path(args.reference) / "models" / "cycle_gan_model.py").is_file():
            return f"{args.reference}: no models/cycle_gan_model.py (not a pytorch-CycleGAN-and-pix2pix checkout)"
    return None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def launch(name: str, args, limit: float) -> dict:
    """Part `name` in a new session, its output to OUT/<name>.log; on `limit` its process group is
    killed. Its result: status ok, failed (exit status and the log's last line) or timed out."""
    out = Path(args.out)
    result_file = parts_dir(args) / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        name,
        "--out",
        str(out),
        "--limit",
        str(limit),
    ]
    cmd += (["--tiny"] if args.tiny else []) + (
        ["--reference", args.reference] if args.reference else []
    )
    cmd += ["--device", args.device]
    t0 = time.perf_counter()
    with open(parts_dir(args) / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        code = None
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pass
        finally:  # on its limit, and when this run is stopped (Ctrl-C, kill): nothing of it stays
            with contextlib.suppress(
                ProcessLookupError
            ):  # whatever it left running (workers, a stage run)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    got = {"seconds": round(time.perf_counter() - t0, 1), "limit_s": limit}
    with contextlib.suppress(OSError, ValueError):
        got["result"] = json.loads(result_file.read_text())
    if code is None:
        got["status"], got["error"] = "timed out", f"stopped at its limit of {limit:g} s"
    elif code != 0:
        lines = [
            line
            for line in (parts_dir(args) / f"{name}.log").read_text(errors="replace").splitlines()
            if line.strip()
        ]
        got["status"], got["error"] = "failed", f"exit {code}: {lines[-1] if lines else ''}"[:300]
    else:
        got["status"] = "ok"
    return got


def deep_max(obj, keys: tuple[str, ...]) -> float:
    """The largest value under any of `keys` anywhere in a part's result (its runs' peaks)."""
    if isinstance(obj, dict):
        return max(
            [v for k, v in obj.items() if k in keys and isinstance(v, (int, float))]
            + [deep_max(v, keys) for v in obj.values()],
            default=0.0,
        )
    if isinstance(obj, list):
        return max((deep_max(v, keys) for v in obj), default=0.0)
    return 0.0


def table(results: dict, cuda: bool | None) -> str:
    """One row per part: status, seconds, limit, peak memory (GPU: max_memory_allocated; RSS: the
    part's largest process) and its one-line summary (or why it failed or was skipped)."""
    rows = [f"{'part':<14}{'status':<11}{'s':>6}{'limit':>7}{'GPU MiB':>9}{'RSS MiB':>9}  summary"]
    for name, r in results.items():
        res = r.get("result") or {}
        gpu = deep_max(res, ("max_allocated_mib",) + (("memory_mib",) if cuda else ()))
        rss = deep_max(res, ("peak_rss_mib",) + (() if cuda else ("memory_mib",)))
        text = r.get("skipped") or r.get("error") or res.get("summary", "")
        rows.append(
            f"{name:<14}{r['status']:<11}{r.get('seconds', 0):>6.0f}{r.get('limit_s', 0):>7.0f}"
            f"{gpu:>9.0f}{rss:>9.0f}  {text}"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT", "gpu_check"),
        help="the report folder (default $OUT, else gpu_check)",
    )
    ap.add_argument(
        "--reference",
        default=os.environ.get("CYCLEGAN_REFERENCE") or None,
        help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix (default $CYCLEGAN_REFERENCE)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny sizes everywhere (for the test of this script)"
    )
    ap.add_argument(
        "--device",
        default="cuda",
        help="where the GPU parts run (cuda, cuda:N); `cpu` runs them on "
        "the CPU: a dry run of their code, at --tiny size, whose figures mean nothing",
    )
    ap.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS)
    )
    ap.add_argument(
        "--limit-of",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="another time limit for a part (a slower card; the test of a part that runs out of time)",
    )
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--stage-runner", metavar="MEMFILE", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.stage_runner:
        stage_runner(args.stage_runner, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.reference:
        args.reference = str(Path(args.reference).expanduser().resolve())
    parts_dir(args).mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args)
        return
    chosen = [p for p in args.parts.split(",") if p]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; from: {', '.join(PARTS)}")
    limits = {name: limit for name, (limit, _) in PARTS.items()}
    for item in args.limit_of:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not re.fullmatch(r"[0-9]+(\.[0-9]+)?", seconds):
            ap.error(f"--limit-of {item}: use PART=SECONDS, PART one of {', '.join(PARTS)}")
        limits[name] = float(seconds)
    for sig in (
        signal.SIGTERM,
        signal.SIGHUP,
    ):  # stopped: as Ctrl-C, so launch() kills the running part
        signal.signal(sig, _interrupt)
    results, cuda = {}, None
    summary_file = Path(args.out) / "gpu_check.json"
    for name in PARTS:
        if name not in chosen:
            continue
        why = skip_reason(name, cuda, args)
        if why:
            results[name] = {"status": "skipped", "skipped": why}
        else:
            limit = limits[name]
            if name == "stage" and cuda is False and args.device.startswith("cuda"):
                # the GPU parts were skipped: their time goes to the stage, slower on a CPU
                limit += sum(limits[p] for p in PARTS if PARTS[p][1])
            print(f"== {name} (limit {limit} s)", file=sys.stderr, flush=True)
            results[name] = launch(name, args, limit)
            if name == "versions" and results[name]["status"] == "ok":
                cuda = bool(results[name]["result"].get("cuda_available"))
                if not cuda and args.device.startswith("cuda"):
                    v = results[name]["result"]
                    print(
                        f"gpu_check: no CUDA here (torch {v.get('torch')}): running only the parts that need "
                        f"no GPU ({', '.join(p for p in chosen if not PARTS[p][1])}"
                        f"{'' if args.tiny else '; the stage on the CPU, 1 epoch'}); skipping "
                        f"{', '.join(p for p in chosen if PARTS[p][1])}",
                        flush=True,
                    )
        tmp = summary_file.with_name(f".{summary_file.name}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "tiny": args.tiny,
                    "cuda": cuda,
                    "limits_s": limits,
                    "total_limit_s": TOTAL_LIMIT_S,
                    "load_average": os.getloadavg()[0],
                    "parts": results,
                },
                indent=2,
            )
        )
        os.replace(tmp, summary_file)
    print(table(results, cuda))
    print(f"JSON: {summary_file}")
    sys.exit(1 if any(r["status"] in ("failed", "timed out") for r in results.values()) else 0)


if __name__ == "__main__":
    try:
        main()
    except (
        KeyboardInterrupt
    ):  # Ctrl-C, kill: the running part was killed; gpu_check.json has the others
        print("interrupted", file=sys.stderr)
        sys.exit(130)
