"""CycleGAN training pieces: the image pool, the learning-rate rule, the device-resident data feeder
and one optimisation step in the reference order (G step with both Ds frozen, then D step).

Naming follows the reference implementation: G_A maps A→B, G_B maps B→A, D_A judges domain B
(real B vs G_A's fakes), D_B judges domain A. Losses: G_A, G_B (LSGAN), cycle_A, cycle_B (L1 × λ),
idt_A, idt_B (L1 × λ × λ_identity), D_A, D_B ((real + fake) × 0.5).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from unpaired.images import Skip, read_uint8

from unpaired.cyclegan import PatchDiscriminator, ResnetGenerator, init_weights
from unpaired.errors import UserError

LOSS_NAMES = ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")


class ImagePool:
    """The history buffer of generated images (Shrivastava et al.) as the reference uses it: until
    `size` images are stored, each new image is stored and returned; after that, with probability
    1/2 a random stored image is returned and replaced by the new one, else the new one is returned.
    Randomness comes from `generator` (CPU), so the pool is reproducible and resumable."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = generator

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator).item() > 0.5:
                index = int(torch.randint(self.size, (), generator=self.generator).item())
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state(self) -> list[torch.Tensor]:
        return [im.detach().cpu() for im in self.images]

    def load(self, images: list[torch.Tensor], device: torch.device) -> None:
        self.images = [im.to(device) for im in images]


def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The reference's linear rule, for 0-based `epoch`: 1.0 for the first `epochs` epochs, then
    falling linearly by 1/(epochs_decay + 1) per epoch over `epochs_decay` epochs."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


def load_folder(folder: Path, load_size: int) -> torch.Tensor:
    """All PNG/JPEG images of `folder` as one uint8 tensor N×3×load×load (decoded once, resized once
    to `load_size` with antialiasing, as the reference's per-step Resize would do every time)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UserError(f"{folder}: no training images; run the prepare stage (uv run dvc repro prepare)")
    images = []
    for f in files:
        try:
            img = read_uint8(f)
        except Skip as skip:
            raise UserError(f"{f}: {skip.reason} image in the prepared data; re-run prepare "
                            f"(uv run dvc repro prepare --force)") from None
        images.append(TF.resize(img, [load_size, load_size], antialias=True))
    return torch.stack(images)


class DeviceFeeder:
    """Batches for one epoch, drawn on the CPU generator up front (indices, crop offsets, flips: a
    few small tensors per epoch), then cut out of the device-resident uint8 images on the device. No
    per-step decode and no host-to-device copy of pixels."""

    def __init__(self, images_a: torch.Tensor, images_b: torch.Tensor, crop: int, flip: bool,
                 batch_size: int, device: torch.device, channels_last: bool):
        self.a = images_a.to(device)
        self.b = images_b.to(device)
        self.crop, self.flip, self.batch_size = crop, flip, batch_size
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(max(len(self.a), len(self.b)) / self.batch_size)

    def plan(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        """The reference's sampling: A in a shuffled order over max(|A|, |B|) (wrapping), B at random."""
        n = max(len(self.a), len(self.b))
        load = self.a.shape[-1]
        plan = {
            "a": torch.randperm(n, generator=g) % len(self.a),
            "b": torch.randint(len(self.b), (n,), generator=g),
            "offsets": torch.randint(load - self.crop + 1, (n, 2, 2), generator=g),
            "flips": (torch.rand((n, 2), generator=g) < 0.5) & self.flip,
        }
        return {k: v.to(self.device) for k, v in plan.items()}

    def _take(self, images, index, offsets, flips) -> torch.Tensor:
        # Per-image crop windows: build the gather index once per batch (all on the device).
        ar = torch.arange(self.crop, device=self.device)
        rows = (offsets[:, 0, None] + ar)[:, :, None]                   # B×crop×1
        cols = (offsets[:, 1, None] + ar)                               # B×crop
        cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, :]  # B×1×crop
        batch = images[index]                                           # B×3×L×L uint8
        b = torch.arange(len(index), device=self.device)[:, None, None]
        crops = batch.permute(0, 2, 3, 1)[b, rows, cols]                # B×crop×crop×3
        out = crops.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return out.contiguous(memory_format=self.memory_format)

    def batches(self, plan: dict[str, torch.Tensor]):
        n = len(plan["a"])
        for start in range(0, n, self.batch_size):
            sl = slice(start, min(start + self.batch_size, n))
            yield (self._take(self.a, plan["a"][sl], plan["offsets"][sl, 0], plan["flips"][sl, 0]),
                   self._take(self.b, plan["b"][sl], plan["offsets"][sl, 1], plan["flips"][sl, 1]))


@dataclass
class Models:
    G_A: nn.Module
    G_B: nn.Module
    D_A: nn.Module
    D_B: nn.Module


def build_models(ngf: int, ndf: int, n_blocks: int, n_layers: int, device: torch.device,
                 channels_last: bool) -> Models:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nets = [init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks)),
            init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks)),
            init_weights(PatchDiscriminator(ndf=ndf, n_layers=n_layers)),
            init_weights(PatchDiscriminator(ndf=ndf, n_layers=n_layers))]
    return Models(*(n.to(device=device, memory_format=fmt) for n in nets))


def optimizers(m: Models, lr: float, beta1: float, fused: bool) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    kw = dict(lr=lr, betas=(beta1, 0.999))
    if fused:
        kw["fused"] = True
    return (torch.optim.Adam(itertools.chain(m.G_A.parameters(), m.G_B.parameters()), **kw),
            torch.optim.Adam(itertools.chain(m.D_A.parameters(), m.D_B.parameters()), **kw))


def gan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """LSGAN: mean squared error to 1 (real) or 0 (fake)."""
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction.float(), target.float())


def _requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def train_step(m: Models, opt_G, opt_D, pool_A: ImagePool, pool_B: ImagePool, real_A, real_B,
               lambda_cycle: float, lambda_identity: float, autocast) -> torch.Tensor:
    """One reference iteration; returns the 8 losses (LOSS_NAMES order) as a detached device tensor."""
    # G step, discriminators frozen.
    _requires_grad((m.D_A, m.D_B), False)
    opt_G.zero_grad(set_to_none=True)
    with autocast():
        fake_B = m.G_A(real_A)
        rec_A = m.G_B(fake_B)
        fake_A = m.G_B(real_B)
        rec_B = m.G_A(fake_A)
        if lambda_identity > 0:
            idt_A = F.l1_loss(m.G_A(real_B).float(), real_B.float()) * lambda_cycle * lambda_identity
            idt_B = F.l1_loss(m.G_B(real_A).float(), real_A.float()) * lambda_cycle * lambda_identity
        else:
            idt_A = idt_B = real_A.new_zeros((), dtype=torch.float32)
        loss_G_A = gan_loss(m.D_A(fake_B), True)
        loss_G_B = gan_loss(m.D_B(fake_A), True)
        cycle_A = F.l1_loss(rec_A.float(), real_A.float()) * lambda_cycle
        cycle_B = F.l1_loss(rec_B.float(), real_B.float()) * lambda_cycle
        loss_G = loss_G_A + loss_G_B + cycle_A + cycle_B + idt_A + idt_B
    loss_G.backward()
    opt_G.step()
    # D step.
    _requires_grad((m.D_A, m.D_B), True)
    opt_D.zero_grad(set_to_none=True)
    with autocast():
        pooled_B = pool_B.query(fake_B)
        loss_D_A = (gan_loss(m.D_A(real_B), True) + gan_loss(m.D_A(pooled_B.detach()), False)) * 0.5
    loss_D_A.backward()
    with autocast():
        pooled_A = pool_A.query(fake_A)
        loss_D_B = (gan_loss(m.D_B(real_A), True) + gan_loss(m.D_B(pooled_A.detach()), False)) * 0.5
    loss_D_B.backward()
    opt_D.step()
    return torch.stack([loss_G_A, loss_G_B, cycle_A, cycle_B, idt_A, idt_B, loss_D_A, loss_D_B]).detach().float()
