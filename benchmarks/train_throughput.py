"""Training throughput: CycleGAN's variants side by side, as ratios to the reference-structured
loop, and CUT / FastCUT beside them (each model's default step).

    uv run python benchmarks/train_throughput.py --device cpu                 # 64 px, the stage's default nets
    uv run python benchmarks/train_throughput.py --device cuda                # 256 px, ngf/ndf 64, 9 blocks
    uv run python benchmarks/train_throughput.py --reference ~/pytorch-CycleGAN-and-pix2pix --ddp 2
    uv run python benchmarks/train_throughput.py --variants batched,cut,fastcut --cut-reference DIR

Variants (each in a fresh process, so its memory column is its own; batch 1, Adam, LSGAN, pool 50):
  reference      (--reference DIR) the reference implementation's own CycleGANModel.optimize_parameters,
                 imported from a checkout you provide (never part of this repository), fed by the loader below
  ref-structured our networks and train_step in the reference order, fed per image by a DataLoader
                 (PNG decode, Resize, RandomCrop, flip, ToTensor, Normalize), batches copied each step
  eager          the stage's feeder (images decoded once, crops cut on the device), reference order
  batched        + independent passes batched (train.batched_passes)
  batched+compile+ torch.compile (inductor, mode default; the compile time is excluded by the warm-up)
  batched+bf16   + bf16 autocast
  cut, fastcut   train.model cut / fastcut (unpaired.models.cut.CUT.step, the stage's default passes and
                 precision: bf16 where train.precision auto takes it), fed as `eager`
  cut-reference  (--cut-reference DIR) the CUT reference's own CUTModel.optimize_parameters (after its
                 data_dependent_initialize and setup, as its train.py), from a `git archive` of
                 taesungp/contrastive-unpaired-translation you provide, fed by the loader below
`--ddp N` adds data-parallel scaling of `batched`: images/s of N processes (gloo on CPU, NCCL on
CUDA), each training a DistributedDataParallel replica (unpaired.models.cyclegan.distribute, as the stage
does: gradients all-reduced every step) on its share of the images, over N × images/s of one process
with the same threads per process; and whether every rank ended with the same weights (sha256 of
all parameters), as they must when the gradients were all-reduced.
Memory: peak RSS of the variant's process on CPU (includes torch itself), max_memory_allocated on CUDA.
A variant whose process crashes, or that runs past --timeout, is reported as failed (its processes
killed) and the others go on; --json is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from unpaired.devices import autocast_for, bf16_for
from unpaired.models.cut import CUT
from unpaired.models.cyclegan import (
    build_models,
    compile_models,
    distribute,
    optimizers,
    train_step,
)
from unpaired.models.feeding import DeviceFeeder, load_folder
from unpaired.models.pool import ImagePool
from unpaired.models.training import TrainParams, channels_last_ok

VARIANTS = [
    "reference",
    "ref-structured",
    "eager",
    "batched",
    "batched+compile",
    "batched+bf16",
    "cut",
    "fastcut",
    "cut-reference",
]
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in ("reference", "cut-reference")]


class FolderPairs(Dataset):
    """The reference's unaligned dataset: A by index, B at random, decoded and augmented per item."""

    def __init__(self, a: Path, b: Path, load: int, crop: int):
        self.a, self.b = sorted(a.glob("*.png")), sorted(b.glob("*.png"))
        self.tf = T.Compose(
            [
                T.Resize((load, load), T.InterpolationMode.BICUBIC),
                T.RandomCrop(crop),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize((0.5,) * 3, (0.5,) * 3),
            ]
        )

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, i: int):
        b = self.b[np.random.randint(len(self.b))]
        return {
            "A": self.tf(Image.open(self.a[i % len(self.a)]).convert("RGB")),
            "B": self.tf(Image.open(b).convert("RGB")),
            "A_paths": "",
            "B_paths": "",
        }


def make_images(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for d in "AB":
        (root / d).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / d / f"{i}.png"
            )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_batches(args, root: Path):
    loader = DataLoader(
        FolderPairs(root / "A", root / "B", args.load, args.size),
        batch_size=1,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    while True:
        yield from loader


def reference_options(args, device) -> Namespace:
    """The reference's train.py defaults for CycleGAN, with this run's sizes, under the option names
    of every release: `gpu_ids` (up to 2022: BaseModel picks the device from it) and `device` (since
    the 2025 DDP rewrite, BaseModel reads `opt.device`), `n_epochs` and the older `niter` names."""
    return Namespace(
        gpu_ids=[device.index or 0] if device.type == "cuda" else [],
        device=device,
        isTrain=True,
        checkpoints_dir=tempfile.mkdtemp(),
        name="bench",
        preprocess="resize_and_crop",
        input_nc=3,
        output_nc=3,
        ngf=args.ngf,
        ndf=args.ndf,
        netG=f"resnet_{args.blocks}blocks",
        netD="basic",
        n_layers_D=3,
        norm="instance",
        no_dropout=True,
        init_type="normal",
        init_gain=0.02,
        pool_size=50,
        gan_mode="lsgan",
        no_lsgan=False,
        lr=2e-4,
        beta1=0.5,
        lambda_A=10.0,
        lambda_B=10.0,
        lambda_identity=0.5,
        direction="AtoB",
        which_direction="AtoB",
        lr_policy="linear",
        lr_decay_iters=50,
        n_epochs=100,
        n_epochs_decay=100,
        niter=100,
        niter_decay=100,
        epoch_count=1,
        continue_train=False,
        load_iter=0,
        epoch="latest",
        which_epoch="latest",
        verbose=False,
        use_wandb=False,
        model="cycle_gan",
        dataset_mode="unaligned",
    )


def reference_step(args, device, root: Path):
    """The reference implementation's own model and optimize_parameters, built as its train.py
    does (`create_model` then `setup`: weight init, device placement, schedulers), fed by the loader
    above. Works with the current upstream code (post-2025: `opt.device`, `setup()` moves the nets)
    and with older releases (`gpu_ids`)."""
    sys.path.insert(0, str(Path(args.reference).resolve()))
    from models.cycle_gan_model import CycleGANModel

    opt = reference_options(args, device)
    with contextlib.redirect_stdout(io.StringIO()):  # its network summaries and init messages
        model = CycleGANModel(opt)
        model.setup(opt)
    for net in (model.netG_A, model.netG_B, model.netD_A, model.netD_B):
        net.to(device)
    it = loader_batches(args, root)

    def step():
        model.set_input(next(it))
        model.optimize_parameters()

    return step, [model.netG_A, model.netG_B, model.netD_A, model.netD_B]


def cut_reference_step(args, device, root: Path):
    """The CUT reference's own CUTModel (--CUT_mode CUT, its defaults, this run's sizes, parsed by
    its own options), built and initialised as its train.py does: data_dependent_initialize on the
    first batch, setup, parallelize; then optimize_parameters per batch of the loader above."""
    sys.path.insert(0, str(Path(args.cut_reference).resolve()))
    sys.argv = [
        "train.py",
        "--gpu_ids", str(device.index or 0) if device.type == "cuda" else "-1",
        "--checkpoints_dir", tempfile.mkdtemp(), "--CUT_mode", "CUT",
        "--ngf", str(args.ngf), "--ndf", str(args.ndf), "--netG", f"resnet_{args.blocks}blocks",
        "--crop_size", str(args.size), "--load_size", str(args.load),
    ]  # fmt: skip
    from models.cut_model import CUTModel
    from options.train_options import TrainOptions

    it = loader_batches(args, root)
    with contextlib.redirect_stdout(io.StringIO()):  # its options and network summaries
        opt = TrainOptions().parse()
        model = CUTModel(opt)
        model.data_dependent_initialize(next(it))
        model.setup(opt)
        model.parallelize()

    def step():
        model.set_input(next(it))
        model.optimize_parameters()

    return step, [model.netG, model.netD, model.netF]


def cut_step(args, device, root: Path, variant: str):
    """train.model `variant` (cut or fastcut) at this run's sizes, its other keys at their defaults
    (batched passes, train.precision auto), fed by the stage's feeder."""
    channels_last = memory_format(args, device)
    p = TrainParams(
        model=variant,
        ngf=args.ngf,
        ndf=args.ndf,
        n_blocks=args.blocks,
        crop_size=args.size,
        load_size=args.load,
    )
    p.validate("train")
    torch.manual_seed(0)
    model = CUT(p, device, args.world, torch.Generator().manual_seed(0), channels_last)
    if args.world > 1:
        model.distribute(device)
    feeder = DeviceFeeder(
        load_folder(root / "A", args.load),
        load_folder(root / "B", args.load),
        args.size,
        True,
        1,
        device,
        channels_last,
        rank=args.rank,
        world_size=args.world,
    )
    g = torch.Generator().manual_seed(0)
    autocast = autocast_for(device, p.precision)
    model.start_epoch(1)

    def batches():
        while True:
            yield from feeder.batches(feeder.plan(g))

    it = batches()
    sums = torch.zeros(len(CUT.LOSS_NAMES), device=device)

    def step():
        nonlocal sums
        a, b = next(it)
        sums += model.step(a, b, autocast)

    return step, list(model.nets.values())


def memory_format(args, device) -> bool:
    """Channels-last or not: --memory-format, where `auto` is the stage's rule (CUDA, where
    channels_last_ok holds)."""
    if args.memory_format == "auto":
        return device.type == "cuda" and channels_last_ok(device)
    return args.memory_format == "channels_last"


def our_step(args, device, root: Path, variant: str):
    cuda = device.type == "cuda"
    channels_last = memory_format(args, device)
    torch.manual_seed(0)
    m = build_models(args.ngf, args.ndf, args.blocks, 3, device, channels_last=channels_last)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, fused=cuda)
    if args.world > 1:  # as the stage: DDP-wrapped pair modules, then compile
        m = distribute(m, device)
    if variant == "batched+compile":
        m = compile_models(m, "default")
    g = torch.Generator().manual_seed(0)
    pools = ImagePool(50, g), ImagePool(50, g)
    batched = variant.startswith("batched")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if variant == "batched+bf16"
        else contextlib.nullcontext
    )
    if variant == "ref-structured":
        it = ((x["A"].to(device), x["B"].to(device)) for x in loader_batches(args, root))
    else:
        feeder = DeviceFeeder(
            load_folder(root / "A", args.load),
            load_folder(root / "B", args.load),
            args.size,
            True,
            1,
            device,
            channels_last,
            rank=args.rank,
            world_size=args.world,
        )

        def batches():
            while True:
                yield from feeder.batches(feeder.plan(g))

        it = batches()
    sums = torch.zeros(8, device=device)

    def step():
        nonlocal sums
        a, b = next(it)
        sums += train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, autocast, batched)

    return step, list(m.nets())


def weights_digest(nets) -> str:
    """sha256 of every parameter's bytes, network by network (the same on two ranks only when
    their weights are bit for bit the same)."""
    h = hashlib.sha256()
    for net in nets:
        for p in net.parameters():
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def measure(args, variant: str, root: Path) -> tuple[float, float, float, str]:
    """(steps/s, peak memory MiB, seconds of the first step, weights_digest at the end) of one
    variant, in this (fresh) process."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if variant == "reference":
        step, nets = reference_step(args, device, root)
    elif variant == "cut-reference":
        step, nets = cut_reference_step(args, device, root)
    elif variant in ("cut", "fastcut"):
        step, nets = cut_step(args, device, root, variant)
    else:
        step, nets = our_step(args, device, root, variant)
    t0 = time.perf_counter()
    step()  # the first step: compiles, when the variant does
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.world > 1:
        torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    if args.world > 1:
        torch.distributed.barrier()
    rate = args.steps / (time.perf_counter() - start)
    mem = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**20
    return rate, mem, first, weights_digest(nets)


class VariantFailed(Exception):
    """A variant's process crashed or ran past --timeout (the message says which)."""


def _ddp_worker(rank: int, args, root: Path, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=args.world
    )
    args.rank = rank
    _measured(rank, args, "batched", root, queue)
    torch.distributed.destroy_process_group()


def _isolated_worker(args, variant: str, root: Path, queue) -> None:
    _measured(0, args, variant, root, queue)


def _measured(index: int, args, variant: str, root: Path, queue) -> None:
    """measure() onto the queue as (index, result), or (index, {"error": its one line}) when it
    raises (the traceback still goes to stderr, and the process exits 1)."""
    try:
        result = measure(args, variant, root)
    except Exception as err:
        queue.put((index, {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}))
        raise
    queue.put((index, result))


def collect(procs, queue, timeout: float) -> list:
    """The result each of `procs` puts on `queue` as (index, result), in index order. Raises
    VariantFailed when one of them reports an error, ends without putting its result (a crash) or
    `timeout` seconds pass; every process still running is then killed (none is left waiting in a
    collective)."""
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout

    def take(i: int, result) -> None:
        if isinstance(result, dict) and "error" in result:
            raise VariantFailed(f"failed in process {i}: {result['error']}")
        got[i] = result

    try:
        while len(got) < len(procs):
            try:
                take(*queue.get(timeout=1))
                continue
            except queue_module.Empty:
                pass
            ended = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in got]
            if ended:  # a result written just before its process ended is in the pipe by now
                with contextlib.suppress(queue_module.Empty):
                    while True:
                        take(*queue.get(timeout=0.5))
                ended = [i for i in ended if i not in got]
            if ended:
                codes = ", ".join(f"process {i} exit code {procs[i].exitcode}" for i in ended)
                raise VariantFailed(f"crashed ({codes})")
            if time.monotonic() > deadline:
                raise VariantFailed(f"timed out after {timeout:.0f} s")
    finally:
        for p in procs:
            if p.exitcode is None and len(got) < len(procs):
                p.kill()
            p.join(timeout=30)
    return [got[i] for i in range(len(procs))]


def run_isolated(args, variant: str, root: Path) -> tuple[float, float, float, str]:
    """measure() in a fresh process (not a Pool's daemon: the DataLoader starts workers)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_worker, args=(args, variant, root, queue))
    proc.start()
    return collect([proc], queue, args.timeout)[0]


def run_ddp(args, root: Path) -> tuple[float, float, bool]:
    """(steps/s and peak memory of rank 0, whether every rank ended with the same weights) of
    `batched` in args.ddp processes, each with a DDP replica."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ddp_args = Namespace(**{**vars(args), "world": args.ddp})
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, ddp_args, root, port, queue))
        for r in range(args.ddp)
    ]
    for p in procs:
        p.start()
    results = collect(procs, queue, args.timeout)
    rate, mem = results[0][:2]
    return rate, mem, len({r[3] for r in results}) == 1


def default_variant(device: torch.device) -> str:
    """The variant `python -m stages.train` runs with the default params (train.compile false,
    train.batched_passes true, train.precision auto: bf16 autocast where unpaired.devices's rule
    says so, i.e. CUDA at compute capability >= 8.0, float32 elsewhere)."""
    return "batched+bf16" if bf16_for(device, "auto") else "batched"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--size", type=int, default=None, help="crop size (default 256 on CUDA, 64 on CPU)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 200 on CUDA, 20 on CPU)"
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--ngf", type=int, default=None, help="default 64 on CUDA, 16 on CPU (the stage's default)"
    )
    ap.add_argument("--ndf", type=int, default=None, help="default 64 on CUDA, 32 on CPU")
    ap.add_argument("--blocks", type=int, default=None, help="default 9 at >= 256 px, else 6")
    ap.add_argument("--images", type=int, default=64, help="images per domain on disk")
    ap.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for the loader-fed variants"
    )
    ap.add_argument(
        "--reference", default=None, help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix"
    )
    ap.add_argument(
        "--cut-reference",
        default=None,
        help="a git archive of taesungp/contrastive-unpaired-translation (adds cut-reference)",
    )
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    ap.add_argument("--ddp", type=int, default=0, help="also measure N data-parallel processes")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: all cores)"
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds over the variants; the best of each is kept"
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the figures to this JSON file (rewritten after every variant)",
    )
    ap.add_argument(
        "--memory-format",
        choices=["auto", "contiguous", "channels_last"],
        default="auto",
        help="auto: the stage's choice (channels-last on CUDA where channels_last_ok holds)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds one variant (all its processes) may run before it is killed and reported failed",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or (256 if cuda else 64)
    args.steps = args.steps or (200 if cuda else 20)
    args.ngf = args.ngf or (64 if cuda else 16)
    args.ndf = args.ndf or (64 if cuda else 32)
    args.blocks = args.blocks or (9 if args.size >= 256 else 6)
    args.load = int(round(args.size * 286 / 256 / 4)) * 4
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.rank, args.world = 0, 1
    variants = [v for v in args.variants.split(",") if v]
    if args.reference and "reference" not in variants:
        variants.insert(0, "reference")
    if args.cut_reference and "cut-reference" not in variants:
        variants.append("cut-reference")
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {args.threads} threads"
    load = os.getloadavg()[0]
    print(
        f"Train step (CycleGAN's variants, CUT's), {name}, crop {args.size} (load {args.load}), ngf {args.ngf}, ndf {args.ndf}, "
        f"{args.blocks} blocks, batch 1, {args.steps} steps after {args.warmup} warm-up, best of {args.repeats}; "
        f"load average {load:.2f} at the start"
    )
    mem_name = "max alloc MiB" if cuda else "peak RSS MiB"
    default = default_variant(device)
    rows: dict[str, tuple[float, float]] = {}  # variant -> best (it/s, memory MiB)
    failed: dict[str, str] = {}  # variant -> why its last failed run failed
    ddp: dict = {}

    def write_json() -> (
        None
    ):  # after every variant: a later crash or a killed run keeps what was measured
        if not args.json:
            return
        base = rows.get("ref-structured", next(iter(rows.values()), (None,)))[0]
        ref = rows.get("reference", (None,))[0]
        out = {
            "device": name,
            "crop": args.size,
            "ngf": args.ngf,
            "ndf": args.ndf,
            "blocks": args.blocks,
            "steps": args.steps,
            "threads": args.threads,
            "repeats": args.repeats,
            "memory": mem_name,
            "memory_format": args.memory_format,
            "load_average": load,
            "variants": {
                v: {
                    "it_per_s": r,
                    "memory_mib": m,
                    **({"ratio_ref_structured": r / base} if base else {}),
                    **({"ratio_reference": r / ref} if ref else {}),
                    **(
                        {"ratio_cut_reference": r / rows["cut-reference"][0]}
                        if v in ("cut", "fastcut") and "cut-reference" in rows
                        else {}
                    ),
                    **({"default": True} if v == default else {}),
                }
                for v, (r, m) in rows.items()
            },
            "failed": {v: why for v, why in failed.items() if v not in rows},
        }
        if ddp.get("one") and ddp.get("many"):
            one, (many, mem, _) = ddp["one"], ddp["many"]
            out["ddp"] = {
                "processes": args.ddp,
                "threads_per_process": per.threads,
                "one_process_img_per_s": one,
                "all_img_per_s": many * args.ddp,
                "efficiency": many * args.ddp / (args.ddp * one),
                "rank0_memory_mib": mem,
                "ranks_identical": ddp["identical"],
            }
        tmp_json = args.json.with_name(f".{args.json.name}.tmp")
        tmp_json.write_text(json.dumps(out, indent=2))
        os.replace(tmp_json, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images, args.load + 8)
        # Round-robin repeats, best of each: on a shared machine the slowest runs measure the others.
        per = Namespace(**{**vars(args), "threads": max(1, args.threads // max(1, args.ddp))})
        for r in range(args.repeats):
            for v in variants:
                try:
                    rate, mem, first, _ = run_isolated(args, v, Path(tmp))
                except VariantFailed as err:
                    failed[v] = str(err)
                    print(f"  round {r + 1}: {v}: failed: {err}", flush=True)
                    write_json()
                    continue
                best = rows.get(v, (0.0, 0.0))
                rows[v] = (max(best[0], rate), max(best[1], mem))
                print(
                    f"  round {r + 1}: {v}: {rate:#.3g} it/s (first step {first:.1f} s)", flush=True
                )
                write_json()
            if args.ddp > 1:
                try:
                    one = run_isolated(per, "batched", Path(tmp))[0]
                    many = run_ddp(per, Path(tmp))
                except VariantFailed as err:
                    failed["ddp"] = str(err)
                    print(f"  round {r + 1}: ddp: failed: {err}", flush=True)
                    write_json()
                    continue
                print(
                    f"  round {r + 1}: ddp: one process {one:.2f}, {args.ddp} processes "
                    f"{many[0] * args.ddp:.2f} img/s; ranks' weights identical: {many[2]}",
                    flush=True,
                )
                ddp["one"] = max(ddp.get("one", 0.0), one)
                ddp["many"] = max(ddp.get("many", (0.0, 0.0, True)), many)
                ddp["identical"] = ddp.get("identical", True) and many[2]
                write_json()
    base = rows.get("ref-structured", next(iter(rows.values()), (None,)))[0]
    ref = rows.get("reference", (None,))[0]
    print(
        f"\n{'variant':<18}{'it/s':>9}{'× ref-structured':>18}"
        + (f"{'× reference':>13}" if ref else "")
        + f"{mem_name:>16}"
    )
    for v, (rate, mem) in rows.items():
        print(
            f"{v + (' *' if v == default else ''):<18}{rate:>#9.3g}{rate / base:>17.2f}x"
            + (f"{rate / ref:>12.2f}x" if ref else "")
            + f"{mem:>16.0f}"
        )
    if "cut" in rows and "cut-reference" in rows:
        print(
            f"cut ÷ cut-reference (the CUT reference's own step): {rows['cut'][0] / rows['cut-reference'][0]:.2f}x"
        )
    for v, why in failed.items():
        if v not in rows and v != "ddp":
            print(f"{v + (' *' if v == default else ''):<18} failed: {why}")
    print(
        f"* the variant python -m stages.train runs with the default params; load average "
        f"{os.getloadavg()[0]:.2f} at the end"
    )
    if ddp.get("many"):
        one, (many, mem, _) = ddp["one"], ddp["many"]
        print(
            f"\nDDP, batched, {args.ddp} processes × {per.threads} thread(s): one process {one:.2f} img/s, "
            f"{args.ddp} processes {many * args.ddp:.2f} img/s in all; scaling efficiency "
            f"{many * args.ddp / (args.ddp * one):.2f} (rank 0 {mem_name} {mem:.0f}); every rank ended with "
            f"the same weights: {ddp['identical']}"
        )
    elif "ddp" in failed:
        print(f"\nDDP failed: {failed['ddp']}")
    write_json()


if __name__ == "__main__":
    main()
