"""train: data/prepared → models/checkpoints/ (epoch_NNN.pt, last.pt) + metrics/train/ (dvclive).

    python -m stages.train

CycleGAN with the reference update order and defaults (see unpaired/training.py). Resumable: if
models/checkpoints/last.pt exists and was written by a run with the same train params and the same
prepared data, training continues from it; otherwise it starts afresh and says why. The dvclive logs
are rebuilt from the history stored in last.pt, so they always match the checkpoints.

With train.devices: N > 1, main() starts N copies of this stage through torch.distributed.run
(unpaired/distributed.py); each runs train() with its Rank and trains one DistributedDataParallel
model on its share of every epoch; rank 0 alone writes. Run by hand under torchrun (several nodes),
the stage skips the launch and trains as the rank torchrun says.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from unpaired import checkpoint, distributed, params
from unpaired.errors import UserError, main_guard
from unpaired.devices import resolve_device
from unpaired.files import unpack_view
from unpaired.samples import fixed_images, grid, triplets
from unpaired.distributed import Rank
from unpaired.training import (LOSS_NAMES, DeviceFeeder, ImagePool, build_models, channels_last_ok,
                               choose_data_device, compile_models, distribute, load_folder, lr_factor,
                               optimizers, train_step)

DATA = Path("data/prepared")
PACKED = Path("data/prepared.tar")
CHECKPOINTS = Path("models/checkpoints")
LIVE = Path("metrics/train")
# Params that do not change the numbers a run produces: editing them keeps a resumable last.pt.
NOT_HASHED = ("save_every", "compile", "samples", "devices", "data_device")
COMPILE_MODES = ("default", "reduce-overhead")
LOG_EVERY = 50   # steps between progress-bar loss updates (each one reads the losses from the device)


@dataclass(frozen=True)
class TrainParams(params.Params):
    epochs: int = 3                  # epochs at the initial learning rate
    epochs_decay: int = 3            # then epochs of linear decay towards 0
    lr: float = 0.0002
    beta1: float = 0.5
    lambda_cycle: float = 10.0       # λ for each cycle loss
    lambda_identity: float = 0.5     # identity loss weight, × lambda_cycle (0 disables)
    pool_size: int = 50
    ngf: int = 16
    ndf: int = 32
    n_blocks: int = 6
    n_layers: int = 3                # discriminator conv layers (3 = 70×70 PatchGAN)
    load_size: int = 72              # images are resized to this ...
    crop_size: int = 64              # ... then randomly cropped to this
    no_flip: bool = False
    batch_size: int = 1
    save_every: int = 1              # epochs between checkpoints (the last epoch is always saved)
    samples: int = 4                 # test images per direction in the per-epoch sample image
    seed: int = 0
    device: str = "auto"             # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    precision: str = "auto"          # auto (bf16 on CUDA, else fp32), bf16, fp32 (TF32 on CUDA)
    compile: bool | str = False      # false, default or reduce-overhead (torch's modes; true = default)
    batched_passes: bool = True      # run independent network passes of a step as one batch
    devices: int = 1                 # processes (one per GPU, or CPU processes) on this node, via torchrun
    lr_scaling: str = "none"         # none, linear or sqrt: lr × 1, world size, √(world size)
    data_device: str = "auto"        # auto, device or host: where the training images live (CUDA)

    def validate(self, prefix: str) -> None:
        c = params.check
        for key in ("epochs", "ngf", "ndf", "n_blocks", "n_layers", "batch_size", "save_every"):
            c(getattr(self, key) >= (0 if key == "n_blocks" else 1), f"{prefix}.{key}",
              f"must be >= {0 if key == 'n_blocks' else 1}, got {getattr(self, key)}")
        c(self.epochs_decay >= 0, f"{prefix}.epochs_decay", f"must be >= 0, got {self.epochs_decay}")
        c(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        c(0 <= self.beta1 < 1, f"{prefix}.beta1", f"must be in [0, 1), got {self.beta1}")
        c(self.lambda_cycle >= 0 and self.lambda_identity >= 0, f"{prefix}.lambda_cycle",
          "lambda_cycle and lambda_identity must be >= 0")
        c(self.pool_size >= 0, f"{prefix}.pool_size", f"must be >= 0, got {self.pool_size}")
        c(self.samples >= 0, f"{prefix}.samples", f"must be >= 0, got {self.samples}")
        c(self.crop_size >= 16 and self.crop_size % 4 == 0, f"{prefix}.crop_size",
          f"must be a multiple of 4 and >= 16 (the generator downsamples twice), got {self.crop_size}")
        c(self.crop_size <= self.load_size, f"{prefix}.crop_size",
          f"must be <= {prefix}.load_size ({self.load_size}), got {self.crop_size}")
        smallest = 3 * 2 ** self.n_layers   # the PatchGAN's last feature map must stay >= 2×2
        c(self.crop_size >= smallest, f"{prefix}.crop_size",
          f"must be >= {smallest} for a discriminator with n_layers={self.n_layers}, got {self.crop_size}")
        c(self.device == "auto" or self.device in ("cpu", "mps", "cuda")
          or (self.device.startswith("cuda:") and self.device[5:].isdigit()), f"{prefix}.device",
          f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        c(self.precision in ("auto", "bf16", "fp32"), f"{prefix}.precision",
          f"unknown precision {self.precision!r}; use auto, bf16 or fp32")
        c(isinstance(self.compile, bool) or self.compile in COMPILE_MODES, f"{prefix}.compile",
          f"unknown mode {self.compile!r}; use false, default or reduce-overhead")
        c(self.devices >= 1, f"{prefix}.devices", f"must be >= 1, got {self.devices}")
        c(self.lr_scaling in ("none", "linear", "sqrt"), f"{prefix}.lr_scaling",
          f"unknown rule {self.lr_scaling!r}; use none, linear or sqrt")
        c(self.data_device in ("auto", "device", "host"), f"{prefix}.data_device",
          f"unknown place {self.data_device!r}; use auto, device or host")

    @property
    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode."""
        return "default" if self.compile is True else (self.compile or None)

    def scaled_lr(self, world_size: int) -> float:
        """train.lr under train.lr_scaling for an effective batch of batch_size × world_size."""
        return self.lr * {"none": 1.0, "linear": world_size, "sqrt": world_size ** 0.5}[self.lr_scaling]


def bf16_for(device: torch.device, precision: str) -> bool:
    """bf16 autocast: asked for, or `auto` on CUDA (tests/test_accel.py: bf16 loss curves stay well
    within the seed-to-seed noise of fp32 ones on CPU autocast; gpu_check.sh measures CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    if not bf16_for(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def run_hash(p: TrainParams, data: Path) -> str:
    """What a resumable last.pt must match: the params that change results, and the data (prepared
    file names are content hashes, so the sorted names identify the data)."""
    names = sorted(f.relative_to(data).as_posix() for f in data.glob("train*/*.png"))
    payload = {k: v for k, v in params.as_dict(p).items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps([payload, names], sort_keys=True).encode()).hexdigest()


def _load_resume(out: Path, expected: str, rank: Rank) -> dict[str, Any] | None:
    last = out / "last.pt"
    if not last.exists():
        return None
    say = print if rank.main else (lambda *a: None)
    try:
        state = checkpoint.load(last)
    except UserError as err:
        say(f"train: starting afresh: {err}")
        return None
    if state.get("run_hash") != expected:
        say(f"train: starting afresh: {last} was written with other train params or data")
        return None
    written = state.get("world_size", 1)
    if written != rank.world_size:
        say(f"train: starting afresh: {last} was written by {written} process(es), this run has "
            f"{rank.world_size} (train.devices); each process's pool and random streams cannot be split "
            f"or merged exactly")
        return None
    return state


def _log_epoch(live, record: dict[str, Any]) -> None:
    live.step = record["epoch"]
    for name, value in record["metrics"].items():
        live.log_metric(name, value)
    if record.get("sample") is not None:
        live.log_image(f"samples/epoch_{record['epoch']:03d}.png",
                       Image.fromarray(record["sample"].permute(1, 2, 0).numpy()))
    live.make_summary()


def _rank_state(pool_A: ImagePool, pool_B: ImagePool, g_pool: torch.Generator) -> dict[str, Any]:
    """What is this rank's own: its pools and the random stream they draw from."""
    return {"pool_A": pool_A.state(), "pool_B": pool_B.state(), "pool": g_pool.get_state()}


def train(p: TrainParams, data: Path = DATA, out: Path = CHECKPOINTS, live_dir: Path = LIVE,
          stop_after: int | None = None, rank: Rank = Rank()) -> dict[str, Any]:
    """Train to p.epochs + p.epochs_decay (or stop after epoch `stop_after`, for tests that
    simulate an interruption). Returns the final history record.

    `rank`: this process's place in a data-parallel job (joins the process group if not yet done,
    see unpaired.distributed); by default the only process. Every rank trains on its share of each
    epoch; rank 0 alone writes checkpoints, logs and samples."""
    from dvclive import Live  # imported here: dvclive pulls in dvc, slow to import for other users

    device = resolve_device(p.device)
    if rank.distributed:
        device = distributed.init(rank, device)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cuda
    if cuda and not bf16_for(device, p.precision):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images_A = load_folder(data / "trainA", p.load_size)
    images_B = load_folder(data / "trainB", p.load_size)
    expected = run_hash(p, data)
    state = _load_resume(out, expected, rank)
    rank.barrier()                      # every rank has read last.pt before rank 0 touches the folder
    if rank.main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            stale = sorted(checkpoint.epoch_files(out).values()) + ([out / "last.pt"] if (out / "last.pt").exists() else [])
            for f in stale:
                f.unlink()
        else:
            for e, f in checkpoint.epoch_files(out).items():
                if e > state["epoch"]:
                    f.unlink()

    torch.manual_seed(p.seed)
    g_data = torch.Generator().manual_seed(p.seed + 1)          # the epoch plan: the same on every rank
    g_pool = torch.Generator().manual_seed(p.seed + 2 + 1_000_003 * rank.rank)   # (seed, rank)
    channels_last = cuda and channels_last_ok(device)
    models = build_models(p.ngf, p.ndf, p.n_blocks, p.n_layers, device, channels_last=channels_last)
    lr = p.scaled_lr(rank.world_size)
    opt_G, opt_D = optimizers(models, lr, p.beta1, fused=cuda)
    rule = lambda e: lr_factor(e, p.epochs, p.epochs_decay)  # noqa: E731
    sched_G = torch.optim.lr_scheduler.LambdaLR(opt_G, rule)
    sched_D = torch.optim.lr_scheduler.LambdaLR(opt_D, rule)
    pool_A, pool_B = ImagePool(p.pool_size, g_pool), ImagePool(p.pool_size, g_pool)
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        for name in ("G_A", "G_B", "D_A", "D_B"):
            getattr(models, name).load_state_dict(state["nets"][name])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        sched_G.load_state_dict(state["sched_G"])
        sched_D.load_state_dict(state["sched_D"])
        own = ({"pool_A": state["pool_A"], "pool_B": state["pool_B"], "pool": state["rng"]["pool"]}
               if rank.main else state["other_ranks"][rank.rank - 1])
        pool_A.load(own["pool_A"], device)
        pool_B.load(own["pool_B"], device)
        g_pool.set_state(own["pool"])
        torch.set_rng_state(state["rng"]["torch"])
        g_data.set_state(state["rng"]["data"])
        if cuda and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        history = state["history"]
        start = state["epoch"]
        if rank.main:
            print(f"train: resuming from {out / 'last.pt'} at epoch {start}")
    if rank.distributed:
        models = distribute(models, device)
    if p.compile_mode:
        models = compile_models(models, p.compile_mode)

    data_device, why = choose_data_device(p.data_device, device, images_A.nbytes + images_B.nbytes)
    feeder = DeviceFeeder(images_A, images_B, p.crop_size, not p.no_flip, p.batch_size, device,
                          channels_last, data_device, rank.rank, rank.world_size)
    if rank.main:
        print(f"train: {why}")
        if rank.distributed:
            print(f"train: {rank.world_size} processes ({'NCCL' if cuda else 'gloo'}), batch {p.batch_size} "
                  f"each: effective batch {p.batch_size * rank.world_size}, lr {lr:.2e} "
                  f"(train.lr_scaling: {p.lr_scaling})")
    sample_A = fixed_images(data / "testA", p.samples, p.crop_size).to(device)
    sample_B = fixed_images(data / "testB", p.samples, p.crop_size).to(device)
    autocast = autocast_for(device, p.precision)
    model_cfg = {"ngf": p.ngf, "n_blocks": p.n_blocks, "in_channels": 3, "out_channels": 3}

    live = None
    if rank.main:
        if live_dir.exists():
            shutil.rmtree(live_dir)
        live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)
        for record in history:
            _log_epoch(live, record)

    total = p.epochs + p.epochs_decay
    end = total if stop_after is None else min(total, stop_after)
    for epoch in range(start + 1, end + 1):
        for net in models.nets():
            net.train()
        plan = feeder.plan(g_data)
        pool_A.prepare(feeder.images_per_epoch, device)
        pool_B.prepare(feeder.images_per_epoch, device)
        sums = torch.zeros(len(LOSS_NAMES), device=device)
        lr = opt_G.param_groups[0]["lr"]
        t0 = time.perf_counter()
        bar = tqdm(feeder.batches(plan), total=feeder.steps_per_epoch, desc=f"epoch {epoch}/{total}",
                   unit="it", leave=False, disable=None if rank.main else True)
        for step, (real_A, real_B) in enumerate(bar, 1):
            sums += train_step(models, opt_G, opt_D, pool_A, pool_B, real_A, real_B,
                               p.lambda_cycle, p.lambda_identity, autocast, p.batched_passes)
            if step % LOG_EVERY == 0 and not bar.disable:   # one device read per LOG_EVERY steps
                bar.set_postfix({k: f"{v:.2f}" for k, v in zip(LOSS_NAMES, (sums / step).tolist())})
        rank.sum(sums)                                            # losses of all ranks, for the log
        means = (sums / (feeder.steps_per_epoch * rank.world_size)).tolist()   # the epoch's one host sync
        seconds = time.perf_counter() - t0
        sched_G.step()
        sched_D.step()
        metrics = dict(zip(LOSS_NAMES, means))
        metrics["lr"] = lr
        metrics["images_per_s"] = feeder.images_per_epoch * rank.world_size / seconds
        saving = epoch % p.save_every == 0 or epoch == total
        others = rank.gather(_rank_state(pool_A, pool_B, g_pool))[1:] if saving else []
        if not rank.main:
            if saving:
                rank.barrier()              # wait for rank 0's checkpoint (see below)
            continue
        sample = None
        if len(sample_A) and len(sample_B):
            models.G_A.eval()
            models.G_B.eval()
            sample = grid(*triplets(models.G_A, models.G_B, sample_A, sample_B))
        record = {"epoch": epoch, "metrics": metrics, "sample": sample}
        history.append(record)
        _log_epoch(live, record)
        print(f"epoch {epoch}/{total}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                     if k in LOSS_NAMES)
              + f"  lr {lr:.2e}  {metrics['images_per_s']:.1f} img/s")
        if saving:
            payload = checkpoint.generators_payload(epoch, model_cfg, models.G_A, models.G_B)
            checkpoint.save(payload, out / f"epoch_{epoch:03d}.pt")
            full = dict(payload)
            full.update({
                "run_hash": expected,
                "world_size": rank.world_size,
                "nets": {name: {k: v.detach().cpu() for k, v in getattr(models, name).state_dict().items()}
                         for name in ("G_A", "G_B", "D_A", "D_B")},
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "sched_G": sched_G.state_dict(), "sched_D": sched_D.state_dict(),
                "pool_A": pool_A.state(), "pool_B": pool_B.state(),
                "other_ranks": others,          # ranks 1.. : their pools and pool streams
                "rng": {"torch": torch.get_rng_state(), "data": g_data.get_state(),
                        "pool": g_pool.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if cuda else None},
                "history": history,
            })
            checkpoint.save(full, out / "last.pt")
            rank.barrier()                  # no rank goes on (or exits) before the files are whole
    if live is not None:
        live.end()
    return history[-1] if history else {}


def main() -> None:
    p = params.parse(TrainParams, params.section(params.load(), "train"), "train")
    rank = distributed.from_env()
    if rank is None and p.devices > 1:
        # This process is the launcher: check, unpack once, then run p.devices copies of the stage.
        distributed.check_devices(p.devices, resolve_device(p.device))
        if PACKED.is_file():
            unpack_view(PACKED, DATA)
        distributed.launch(p.devices, "stages.train")
        return
    rank = rank or Rank()
    if rank.distributed:          # run by torchrun (by the launcher above, or by hand on each node)
        distributed.init(rank, resolve_device(p.device))
    if PACKED.is_file() and rank.main:       # after a `dvc pull` only the tar is there
        unpack_view(PACKED, DATA)
    rank.barrier()                           # (several nodes share one filesystem: rank 0 unpacks)
    try:
        train(p, rank=rank)
    finally:
        distributed.finish(rank)


if __name__ == "__main__":
    main_guard(main)
