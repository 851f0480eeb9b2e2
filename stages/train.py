"""train: data/prepared → models/checkpoints/ (epoch_NNN.pt, last.pt) + metrics/train/ (dvclive).

    python -m stages.train

CycleGAN with the reference update order and defaults (see unpaired/training.py). Resumable: if
models/checkpoints/last.pt exists and was written by a run with the same train params and the same
prepared data, training continues from it; otherwise it starts afresh and says why. The dvclive logs
are rebuilt from the history stored in last.pt, so they always match the checkpoints.
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

from unpaired import checkpoint, params
from unpaired.errors import UserError, main_guard
from unpaired.devices import check_device, resolve_device
from unpaired.files import remove_stale_temporaries, unpack_view
from unpaired.samples import fixed_images, grid, triplets
from unpaired.training import (LOSS_NAMES, DeviceFeeder, ImagePool, build_models, load_folder,
                               lr_factor, optimizers, train_step)

DATA = Path("data/prepared")
PACKED = Path("data/prepared.tar")
CHECKPOINTS = Path("models/checkpoints")
LIVE = Path("metrics/train")
# Params that do not change the numbers a run produces: editing them keeps a resumable last.pt.
NOT_HASHED = ("save_every", "compile", "samples")
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
    precision: str = "auto"          # auto (bf16 on CUDA, else fp32), bf16, fp32
    compile: bool = False            # torch.compile the networks (CUDA)

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
        check_device(self.device, f"{prefix}.device")
        c(self.precision in ("auto", "bf16", "fp32"), f"{prefix}.precision",
          f"unknown precision {self.precision!r}; use auto, bf16 or fp32")


def autocast_for(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def run_hash(p: TrainParams, data: Path) -> str:
    """What a resumable last.pt must match: the params that change results, and the data (prepared
    file names are content hashes, so the sorted names identify the data)."""
    names = sorted(f.relative_to(data).as_posix() for f in data.glob("train*/*.png"))
    payload = {k: v for k, v in params.as_dict(p).items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps([payload, names], sort_keys=True).encode()).hexdigest()


def _load_resume(out: Path, expected: str) -> dict[str, Any] | None:
    last = out / "last.pt"
    if not last.exists():
        return None
    try:
        state = checkpoint.load(last)
    except UserError as err:
        print(f"train: starting afresh: {err}")
        return None
    if state.get("run_hash") != expected:
        print(f"train: starting afresh: {last} was written with other train params or data")
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


def train(p: TrainParams, data: Path = DATA, out: Path = CHECKPOINTS, live_dir: Path = LIVE,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train to p.epochs + p.epochs_decay (or stop after epoch `stop_after`, for tests that
    simulate an interruption). Returns the final history record."""
    from dvclive import Live  # imported here: dvclive pulls in dvc, slow to import for other users

    device = resolve_device(p.device)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cuda
    images_A = load_folder(data / "trainA", p.load_size)
    images_B = load_folder(data / "trainB", p.load_size)
    expected = run_hash(p, data)
    state = _load_resume(out, expected)
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
    g_data = torch.Generator().manual_seed(p.seed + 1)
    g_pool = torch.Generator().manual_seed(p.seed + 2)
    models = build_models(p.ngf, p.ndf, p.n_blocks, p.n_layers, device, channels_last=cuda)
    opt_G, opt_D = optimizers(models, p.lr, p.beta1, fused=cuda)
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
        pool_A.load(state["pool_A"], device)
        pool_B.load(state["pool_B"], device)
        torch.set_rng_state(state["rng"]["torch"])
        g_data.set_state(state["rng"]["data"])
        g_pool.set_state(state["rng"]["pool"])
        if cuda and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        history = state["history"]
        start = state["epoch"]
        print(f"train: resuming from {out / 'last.pt'} at epoch {start}")
    if p.compile:
        for net in (models.G_A, models.G_B, models.D_A, models.D_B):
            net.compile()

    feeder = DeviceFeeder(images_A, images_B, p.crop_size, not p.no_flip, p.batch_size, device, cuda)
    sample_A = fixed_images(data / "testA", p.samples, p.crop_size).to(device)
    sample_B = fixed_images(data / "testB", p.samples, p.crop_size).to(device)
    autocast = autocast_for(device, p.precision)
    model_cfg = {"ngf": p.ngf, "n_blocks": p.n_blocks, "in_channels": 3, "out_channels": 3}

    if live_dir.exists():
        shutil.rmtree(live_dir)
    live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None)
    for record in history:
        _log_epoch(live, record)

    total = p.epochs + p.epochs_decay
    end = total if stop_after is None else min(total, stop_after)
    for epoch in range(start + 1, end + 1):
        for net in (models.G_A, models.G_B, models.D_A, models.D_B):
            net.train()
        plan = feeder.plan(g_data)
        sums = torch.zeros(len(LOSS_NAMES), device=device)
        lr = opt_G.param_groups[0]["lr"]
        t0 = time.perf_counter()
        bar = tqdm(feeder.batches(plan), total=feeder.steps_per_epoch, desc=f"epoch {epoch}/{total}",
                   unit="it", leave=False, disable=None)
        for step, (real_A, real_B) in enumerate(bar, 1):
            sums += train_step(models, opt_G, opt_D, pool_A, pool_B, real_A, real_B,
                               p.lambda_cycle, p.lambda_identity, autocast)
            if step % LOG_EVERY == 0 and not bar.disable:   # one device read per LOG_EVERY steps
                bar.set_postfix({k: f"{v:.2f}" for k, v in zip(LOSS_NAMES, (sums / step).tolist())})
        means = (sums / feeder.steps_per_epoch).tolist()          # the one host sync of the epoch
        seconds = time.perf_counter() - t0
        sched_G.step()
        sched_D.step()
        metrics = dict(zip(LOSS_NAMES, means))
        metrics["lr"] = lr
        metrics["images_per_s"] = len(plan["a"]) / seconds
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
        if epoch % p.save_every == 0 or epoch == total:
            payload = checkpoint.generators_payload(epoch, model_cfg, models.G_A, models.G_B)
            checkpoint.save(payload, out / f"epoch_{epoch:03d}.pt")
            full = dict(payload)
            full.update({
                "run_hash": expected,
                "nets": {name: {k: v.detach().cpu() for k, v in getattr(models, name).state_dict().items()}
                         for name in ("G_A", "G_B", "D_A", "D_B")},
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "sched_G": sched_G.state_dict(), "sched_D": sched_D.state_dict(),
                "pool_A": pool_A.state(), "pool_B": pool_B.state(),
                "rng": {"torch": torch.get_rng_state(), "data": g_data.get_state(),
                        "pool": g_pool.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if cuda else None},
                "history": history,
            })
            checkpoint.save(full, out / "last.pt")
    live.end()
    return history[-1] if history else {}


def main() -> None:
    remove_stale_temporaries(CHECKPOINTS, DATA.parent)    # what a killed run left (.last.pt.tmp-*)
    p = params.parse(TrainParams, params.section(params.load(), "train"), "train")
    if PACKED.is_file():       # after a `dvc pull` only the tar is there
        unpack_view(PACKED, DATA)
    train(p)


if __name__ == "__main__":
    from unpaired.restore import keep_outputs   # under dvc repro: a failure keeps the previous outputs
    main_guard(keep_outputs(main))
