"""CycleGAN training throughput: variants side by side, as ratios to the reference-structured loop.

    uv run python benchmarks/train_throughput.py --device cpu                 # 64 px, the stage's default nets
    uv run python benchmarks/train_throughput.py --device cuda                # 256 px, ngf/ndf 64, 9 blocks
    uv run python benchmarks/train_throughput.py --reference ~/pytorch-CycleGAN-and-pix2pix --ddp 2

Variants (each in a fresh process, so its memory column is its own; batch 1, Adam, LSGAN, pool 50):
  reference      (--reference DIR) the reference implementation's own CycleGANModel.optimize_parameters,
                 imported from a checkout you provide (never part of this repository), fed by the loader below
  ref-structured our networks and train_step in the reference order, fed per image by a DataLoader
                 (PNG decode, Resize, RandomCrop, flip, ToTensor, Normalize), batches copied each step
  eager          the stage's feeder (images decoded once, crops cut on the device), reference order
  batched        + independent passes batched (train.batched_passes)
  batched+compile+ torch.compile (inductor, mode default; the compile time is excluded by the warm-up)
  batched+bf16   + bf16 autocast
`--ddp N` adds data-parallel scaling of `batched`: images/s of N processes (gloo on CPU, NCCL on
CUDA) over N × images/s of one process with the same threads per process.
Memory: peak RSS of the variant's process on CPU (includes torch itself), max_memory_allocated on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
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

from unpaired.models.feeding import DeviceFeeder, load_folder
from unpaired.models.cyclegan import build_models, compile_models, optimizers, train_step
from unpaired.models.pool import ImagePool
from unpaired.models.training import channels_last_ok

VARIANTS = ["reference", "ref-structured", "eager", "batched", "batched+compile", "batched+bf16"]


class FolderPairs(Dataset):
    """The reference's unaligned dataset: A by index, B at random, decoded and augmented per item."""

    def __init__(self, a: Path, b: Path, load: int, crop: int):
        self.a, self.b = sorted(a.glob("*.png")), sorted(b.glob("*.png"))
        self.tf = T.Compose([T.Resize((load, load), T.InterpolationMode.BICUBIC), T.RandomCrop(crop),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, i: int):
        b = self.b[np.random.randint(len(self.b))]
        return {"A": self.tf(Image.open(self.a[i % len(self.a)]).convert("RGB")),
                "B": self.tf(Image.open(b).convert("RGB")), "A_paths": "", "B_paths": ""}


def make_images(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for d in "AB":
        (root / d).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / d / f"{i}.png")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_batches(args, root: Path):
    loader = DataLoader(FolderPairs(root / "A", root / "B", args.load, args.size), batch_size=1,
                        shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    while True:
        yield from loader


def reference_options(args, device) -> Namespace:
    """The reference's train.py defaults for CycleGAN, with this run's sizes, under the option names
    of every release: `gpu_ids` (up to 2022: BaseModel picks the device from it) and `device` (since
    the 2025 DDP rewrite, BaseModel reads `opt.device`), `n_epochs` and the older `niter` names."""
    return Namespace(
        gpu_ids=[device.index or 0] if device.type == "cuda" else [], device=device, isTrain=True,
        checkpoints_dir=tempfile.mkdtemp(), name="bench", preprocess="resize_and_crop", input_nc=3,
        output_nc=3, ngf=args.ngf, ndf=args.ndf, netG=f"resnet_{args.blocks}blocks", netD="basic",
        n_layers_D=3, norm="instance", no_dropout=True, init_type="normal", init_gain=0.02, pool_size=50,
        gan_mode="lsgan", no_lsgan=False, lr=2e-4, beta1=0.5, lambda_A=10.0, lambda_B=10.0,
        lambda_identity=0.5, direction="AtoB", which_direction="AtoB", lr_policy="linear",
        lr_decay_iters=50, n_epochs=100, n_epochs_decay=100, niter=100, niter_decay=100, epoch_count=1,
        continue_train=False, load_iter=0, epoch="latest", which_epoch="latest", verbose=False,
        use_wandb=False, model="cycle_gan", dataset_mode="unaligned")


def reference_step(args, device, root: Path):
    """The reference implementation's own model and optimize_parameters, built as its train.py
    does (`create_model` then `setup`: weight init, device placement, schedulers), fed by the loader
    above. Works with the current upstream code (post-2025: `opt.device`, `setup()` moves the nets)
    and with older releases (`gpu_ids`)."""
    sys.path.insert(0, str(Path(args.reference).resolve()))
    from models.cycle_gan_model import CycleGANModel
    opt = reference_options(args, device)
    with contextlib.redirect_stdout(io.StringIO()):   # its network summaries and init messages
        model = CycleGANModel(opt)
        model.setup(opt)
    for net in (model.netG_A, model.netG_B, model.netD_A, model.netD_B):
        net.to(device)
    it = loader_batches(args, root)

    def step():
        model.set_input(next(it))
        model.optimize_parameters()
    return step


def our_step(args, device, root: Path, variant: str):
    cuda = device.type == "cuda"
    channels_last = cuda and channels_last_ok(device)
    torch.manual_seed(0)
    m = build_models(args.ngf, args.ndf, args.blocks, 3, device, channels_last=channels_last)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, fused=cuda)
    if variant == "batched+compile":
        m = compile_models(m, "default")
    g = torch.Generator().manual_seed(0)
    pools = ImagePool(50, g), ImagePool(50, g)
    batched = variant.startswith("batched")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if variant == "batched+bf16"
                else contextlib.nullcontext)
    if variant == "ref-structured":
        it = ((x["A"].to(device), x["B"].to(device)) for x in loader_batches(args, root))
    else:
        feeder = DeviceFeeder(load_folder(root / "A", args.load), load_folder(root / "B", args.load),
                              args.size, True, 1, device, channels_last, rank=args.rank, world_size=args.world)

        def batches():
            while True:
                yield from feeder.batches(feeder.plan(g))
        it = batches()
    sums = torch.zeros(8, device=device)

    def step():
        nonlocal sums
        a, b = next(it)
        sums += train_step(m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, autocast, batched)
    return step


def measure(args, variant: str, root: Path) -> tuple[float, float, float]:
    """(steps/s, peak memory MiB, seconds of the first step) of one variant, in this (fresh) process."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step = reference_step(args, device, root) if variant == "reference" else our_step(args, device, root, variant)
    t0 = time.perf_counter()
    step()                                       # the first step: compiles, when the variant does
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
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    return rate, mem, first


def _ddp_worker(rank: int, args, root: Path, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world)
    args.rank = rank
    rate, mem, _ = measure(args, "batched", root)
    if rank == 0:
        queue.put((rate, mem))
    torch.distributed.destroy_process_group()


def _isolated_worker(args, variant: str, root: Path, queue) -> None:
    queue.put(measure(args, variant, root))


def run_isolated(args, variant: str, root: Path) -> tuple[float, float, float]:
    """measure() in a fresh process (not a Pool's daemon: the DataLoader starts workers)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_worker, args=(args, variant, root, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_ddp(args, root: Path) -> tuple[float, float]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ddp_args = Namespace(**{**vars(args), "world": args.ddp})
    procs = [ctx.Process(target=_ddp_worker, args=(r, ddp_args, root, port, queue)) for r in range(args.ddp)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def default_variant(device: torch.device) -> str:
    """The variant `python -m stages.train` runs with the default params (train.compile false,
    train.batched_passes true, train.precision auto: bf16 autocast on CUDA, float32 elsewhere)."""
    return "batched+bf16" if device.type == "cuda" else "batched"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="crop size (default 256 on CUDA, 64 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on CUDA, 20 on CPU)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ngf", type=int, default=None, help="default 64 on CUDA, 16 on CPU (the stage's default)")
    ap.add_argument("--ndf", type=int, default=None, help="default 64 on CUDA, 32 on CPU")
    ap.add_argument("--blocks", type=int, default=None, help="default 9 at >= 256 px, else 6")
    ap.add_argument("--images", type=int, default=64, help="images per domain on disk")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader-fed variants")
    ap.add_argument("--reference", default=None, help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix")
    ap.add_argument("--variants", default=",".join(VARIANTS[1:]), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--ddp", type=int, default=0, help="also measure N data-parallel processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all cores)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the variants; the best of each is kept")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
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
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {args.threads} threads"
    load = os.getloadavg()[0]
    print(f"CycleGAN train step, {name}, crop {args.size} (load {args.load}), ngf {args.ngf}, ndf {args.ndf}, "
          f"{args.blocks} blocks, batch 1, {args.steps} steps after {args.warmup} warm-up, best of {args.repeats}; "
          f"load average {load:.2f} at the start")
    mem_name = "max alloc MiB" if cuda else "peak RSS MiB"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images, args.load + 8)
        # Round-robin repeats, best of each: on a shared machine the slowest runs measure the others.
        ddp = None
        per = Namespace(**{**vars(args), "threads": max(1, args.threads // max(1, args.ddp))})
        for r in range(args.repeats):
            for v in variants:
                rate, mem, first = run_isolated(args, v, Path(tmp))
                best = rows.get(v, (0.0, 0.0))
                rows[v] = (max(best[0], rate), max(best[1], mem))
                print(f"  round {r + 1}: {v}: {rate:.2f} it/s (first step {first:.1f} s)", flush=True)
            if args.ddp > 1:
                one, many = run_isolated(per, "batched", Path(tmp))[:2], run_ddp(per, Path(tmp))
                print(f"  round {r + 1}: ddp: one process {one[0]:.2f}, {args.ddp} processes "
                      f"{many[0] * args.ddp:.2f} img/s", flush=True)
                ddp = (one, many) if ddp is None else (max(ddp[0], one), max(ddp[1], many))
    base = rows.get("ref-structured", next(iter(rows.values())))[0]
    ref = rows.get("reference", (None,))[0]
    print(f"\n{'variant':<18}{'it/s':>9}{'× ref-structured':>18}" + (f"{'× reference':>13}" if ref else "")
          + f"{mem_name:>16}")
    default = default_variant(device)
    for v, (rate, mem) in rows.items():
        print(f"{v + (' *' if v == default else ''):<18}{rate:>9.2f}{rate / base:>17.2f}x" + (f"{rate / ref:>12.2f}x" if ref else "") + f"{mem:>16.0f}")
    print(f"* the variant python -m stages.train runs with the default params; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    if ddp:
        (one, _), (many, mem) = ddp
        per_threads = max(1, args.threads // args.ddp)
        print(f"\nDDP, batched, {args.ddp} processes × {per_threads} thread(s): one process {one:.2f} img/s, "
              f"{args.ddp} processes {many * args.ddp:.2f} img/s in all; scaling efficiency "
              f"{many * args.ddp / (args.ddp * one):.2f} (rank 0 {mem_name} {mem:.0f})")
    if args.json:
        default = default_variant(device)
        out = {"device": name, "crop": args.size, "ngf": args.ngf, "ndf": args.ndf, "blocks": args.blocks,
               "steps": args.steps, "threads": args.threads, "repeats": args.repeats, "memory": mem_name,
               "load_average": load,
               "variants": {v: {"it_per_s": r, "ratio_ref_structured": r / base, "memory_mib": m,
                                **({"ratio_reference": r / ref} if ref else {}),
                                **({"default": True} if v == default else {})}
                            for v, (r, m) in rows.items()}}
        if ddp:
            out["ddp"] = {"processes": args.ddp, "one_process_img_per_s": ddp[0][0],
                          "all_img_per_s": ddp[1][0] * args.ddp,
                          "efficiency": ddp[1][0] * args.ddp / (args.ddp * ddp[0][0])}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
