"""CycleGAN training pieces: the image pool, the learning-rate rule (the data feeders are in
unpaired/feeding.py), the generator and discriminator pair modules (the units
DDP wraps and torch.compile compiles) and one optimisation step in the reference order (G step with
both Ds frozen, then D step), its independent passes batched by default.

Naming follows the reference implementation: G_A maps A→B, G_B maps B→A, D_A judges domain B
(real B vs G_A's fakes), D_B judges domain A. Losses: G_A, G_B (LSGAN), cycle_A, cycle_B (L1 × λ),
idt_A, idt_B (L1 × λ × λ_identity), D_A, D_B ((real + fake) × 0.5).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unpaired.cyclegan import PatchDiscriminator, ResnetGenerator, init_weights
from unpaired import params, threads
from unpaired.devices import check_device

LOSS_NAMES = ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")


class ImagePool:
    """The history buffer of generated images (Shrivastava et al.) as the reference uses it: until
    `size` images are stored, each new image is stored and returned; after that, with probability
    1/2 a random stored image is returned and replaced by the new one, else the new one is returned.
    Images of a batch are taken one after the other, as the reference does.

    Storage grows as images arrive, as the reference's list does: a buffer on the images' device
    whose capacity doubles when it is full, up to `size` (so `train.pool_size: 1000000000` costs
    only the images actually stored). The stored count is known on the host without reading the
    device (it only grows by one per image until `size`), so filling needs no device read; once
    full, the swap decision stays on the device (`torch.where` on the drawn uniform), so a query
    never reads a value back to the host. The random draws are made ahead on the CPU `generator`:
    `prepare(n)` draws the next `n` queries' randomness in one go (the stage calls it once per epoch,
    like the crops); a query past the prepared draws draws what it needs itself. Two draws per
    image, even while filling. Reproducible and resumable: `state()`/`load()`."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size = size
        self.generator = generator
        self.buffer: torch.Tensor | None = None      # capacity×C×H×W once the first image arrives
        self.stored = 0                               # images stored (<= size, <= capacity)
        self._u = torch.empty(0)                      # per-image uniform draw in [0, 1)
        self._index = torch.empty(0, dtype=torch.long)   # per-image slot draw in [0, size)

    def prepare(self, n: int, device: torch.device | None = None) -> None:
        """Draw the randomness of the next `n` images (two draws per image, even while filling)."""
        if self.size == 0:
            return
        u = torch.rand(n, generator=self.generator)
        index = torch.randint(self.size, (n,), generator=self.generator)
        device = device if device is not None else self._u.device
        self._u = torch.cat([self._u.to(device), u.to(device)])
        self._index = torch.cat([self._index.to(device), index.to(device)])

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        """Make the buffer hold at least `needed` images (capacity doubling, at most `size`)."""
        capacity = 0 if self.buffer is None else len(self.buffer)
        if needed <= capacity:
            return
        grown = like.new_zeros((min(self.size, max(needed, 2 * capacity)), *like.shape[1:]))
        if self.buffer is not None:
            grown[:capacity] = self.buffer
        self.buffer = grown

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """images: B×C×H×W (any float dtype) → B×C×H×W, each image the new one or a stored one."""
        images = images.detach()
        if self.size == 0:
            return images
        if len(self._u) < len(images):
            self.prepare(len(images) - len(self._u), images.device)
        u, index = self._u[:len(images)], self._index[:len(images)]
        self._u, self._index = self._u[len(images):], self._index[len(images):]
        filling = min(len(images), self.size - self.stored)       # the first `filling` images are stored
        if filling:
            self._reserve(self.stored + filling, images)
            self.buffer[self.stored:self.stored + filling] = images[:filling]
            self.stored += filling
        out = [images[:filling]] if filling else []
        for i in range(filling, len(images)):
            new = images[i:i + 1]
            slot = index[i:i + 1]
            swap = u[i] > 0.5
            old = self.buffer.index_select(0, slot)
            out.append(torch.where(swap, old, new))
            self.buffer.index_copy_(0, slot, torch.where(swap, new, old).to(self.buffer.dtype))
        return torch.cat(out, 0) if len(out) > 1 else out[0]

    @property
    def images(self) -> list[torch.Tensor]:
        """The stored images, 1×C×H×W each (for tests and checkpoints)."""
        if self.buffer is None:
            return []
        return list(self.buffer[:self.stored].split(1))

    def state(self) -> dict[str, torch.Tensor]:
        return {"images": self.buffer[:self.stored].clone() if self.stored else torch.empty(0),
                "u": self._u.cpu(), "index": self._index.cpu()}

    def load(self, state, device: torch.device) -> None:
        """From `state()`; also accepts the list of 1×C×H×W images older checkpoints hold."""
        if isinstance(state, list):
            state = {"images": torch.cat(state) if state else torch.empty(0)}
        images = state["images"]
        self._u = state.get("u", torch.empty(0)).to(device)
        self._index = state.get("index", torch.empty(0, dtype=torch.long)).to(device)
        self.buffer, self.stored = None, 0
        if len(images):
            images = images[:self.size].to(device)
            self._reserve(len(images), images)
            self.buffer[:len(images)] = images
            self.stored = len(images)


def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The reference's linear rule, for 0-based `epoch`: 1.0 for the first `epochs` epochs, then
    falling linearly by 1/(epochs_decay + 1) per epoch over `epochs_decay` epochs."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


def channels_last_ok(device: torch.device) -> bool:
    """Whether `device` computes instance norm's input gradient right when the incoming gradient is
    channels-last, at batch 1 and 2 (measured wrong on CPU at batch 1 in torch 2.15: the error was
    larger than the gradient). A few small ops against a float64 contiguous computation on the CPU;
    the train stage uses channels-last only where this holds. tests/test_accel.py checks a whole
    step's gradients in every memory format and batch arrangement."""
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        x = torch.randn(batch, 8, 6, 6, generator=g, dtype=torch.float64)
        up = torch.randn(batch, 8, 6, 6, generator=g, dtype=torch.float64)
        x64 = x.clone().requires_grad_(True)
        F.instance_norm(x64).backward(up)
        xd = x.float().to(device).requires_grad_(True)
        F.instance_norm(xd).backward(up.float().to(device).contiguous(memory_format=torch.channels_last))
        err = (xd.grad.double().cpu() - x64.grad).abs().max() / x64.grad.abs().max()
        if not err < 1e-3:
            return False
    return True


class Generators(nn.Module):
    """G_A and G_B as one module whose one forward call runs every generator pass of a G step: the
    unit DistributedDataParallel wraps (DDP expects one forward per backward) and compile compiles.

    `batched=True` runs independent passes as one batch (instance norm is per sample, so the numbers
    are those of separate calls up to float rounding): G_A(cat[real_A, real_B]) gives fake_B and the
    identity image G_A(real_B); G_B(cat[real_B, real_A, fake_B]) gives fake_A, G_B(real_A) and rec_A;
    then G_A(fake_A) gives rec_B. Three calls instead of six. `batched=False` is the reference order.
    Returns (fake_B, rec_A, fake_A, rec_B, idt_A_image, idt_B_image); the last two are None when
    `identity` is False. Shapes B×3×H×W as the inputs."""

    def __init__(self, G_A: nn.Module, G_B: nn.Module):
        super().__init__()
        self.G_A, self.G_B = G_A, G_B

    def forward(self, real_A: torch.Tensor, real_B: torch.Tensor, identity: bool, batched: bool):
        n = len(real_A)
        if batched:
            if identity:
                fake_B, same_B = self.G_A(torch.cat([real_A, real_B])).split(n)
                fake_A, same_A, rec_A = self.G_B(torch.cat([real_B, real_A, fake_B])).split(n)
            else:
                fake_B, same_B, same_A = self.G_A(real_A), None, None
                fake_A, rec_A = self.G_B(torch.cat([real_B, fake_B])).split(n)
            rec_B = self.G_A(fake_A)
            return fake_B, rec_A, fake_A, rec_B, same_B, same_A
        fake_B = self.G_A(real_A)
        rec_A = self.G_B(fake_B)
        fake_A = self.G_B(real_B)
        rec_B = self.G_A(fake_A)
        same_B = self.G_A(real_B) if identity else None
        same_A = self.G_B(real_A) if identity else None
        return fake_B, rec_A, fake_A, rec_B, same_B, same_A


class Discriminators(nn.Module):
    """D_A and D_B as one module for the D step (one forward per backward, for DDP). Returns D_A's
    predictions on real B and on the pooled fake B, then D_B's on real A and pooled fake A.
    `batched=True` runs D_A(cat[real_B, fake_B]) and D_B(cat[real_A, fake_A]); else four calls."""

    def __init__(self, D_A: nn.Module, D_B: nn.Module):
        super().__init__()
        self.D_A, self.D_B = D_A, D_B

    def forward(self, real_A, real_B, fake_A, fake_B, batched: bool):
        if batched:
            n = len(real_A)
            real_b, fake_b = self.D_A(torch.cat([real_B, fake_B])).split(n)
            real_a, fake_a = self.D_B(torch.cat([real_A, fake_A])).split(n)
            return real_b, fake_b, real_a, fake_a
        return self.D_A(real_B), self.D_A(fake_B), self.D_B(real_A), self.D_B(fake_A)


@dataclass
class Models:
    """The four networks, and the two pair modules a step calls (the same networks; DDP-wrapped and
    compiled versions replace `generators`/`discriminators`, the raw networks stay reachable)."""
    G_A: nn.Module
    G_B: nn.Module
    D_A: nn.Module
    D_B: nn.Module
    generators: nn.Module | None = None
    discriminators: nn.Module | None = None

    def __post_init__(self):
        if self.generators is None:
            self.generators = Generators(self.G_A, self.G_B)
        if self.discriminators is None:
            self.discriminators = Discriminators(self.D_A, self.D_B)

    def nets(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return self.G_A, self.G_B, self.D_A, self.D_B


def build_models(ngf: int, ndf: int, n_blocks: int, n_layers: int, device: torch.device,
                 channels_last: bool, dtype: torch.dtype = torch.float32) -> Models:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nets = [init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks)),
            init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks)),
            init_weights(PatchDiscriminator(ndf=ndf, n_layers=n_layers)),
            init_weights(PatchDiscriminator(ndf=ndf, n_layers=n_layers))]
    return Models(*(n.to(device=device, dtype=dtype, memory_format=fmt) for n in nets))


def distribute(m: Models, device: torch.device) -> Models:
    """Wrap the pair modules in DistributedDataParallel (process group already initialised):
    gradients are averaged over ranks in the backward; rank 0's weights are broadcast at wrap time.
    The G step calls the raw Ds (frozen there; a DDP-wrapped module whose forward produces no
    gradients in a backward would leave its reducer waiting)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return Models(m.G_A, m.G_B, m.D_A, m.D_B,
                  DDP(m.generators, device_ids=ids),
                  DDP(m.discriminators, device_ids=ids))


def compile_cache_dir() -> Path:
    """Where torch.compile's caches (inductor's FX graph and AOT autograd caches, both on by default)
    persist: $XDG_CACHE_HOME/unpaired/torchinductor, else ~/.cache/unpaired/torchinductor. Inductor's
    own default, /tmp/torchinductor_<user>, goes with every reboot or fresh /tmp, and a cold compile
    of the CPU step takes minutes; a warm one seconds (README, "Compile")."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unpaired" / "torchinductor"


def compile_models(m: Models, mode: str, backend: str = "inductor") -> Models:
    """torch.compile the pair modules (`mode`: "default" or "reduce-overhead", as torch names them;
    reduce-overhead adds CUDA graphs on CUDA). Each pair compiles as one graph: nothing in a step's
    network passes reads a value back to the host (the pool and the losses stay on the device).
    Inductor's caches go to compile_cache_dir() unless TORCHINDUCTOR_CACHE_DIR is set."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    kw = {"mode": mode} if backend == "inductor" else {}
    return Models(m.G_A, m.G_B, m.D_A, m.D_B, torch.compile(m.generators, backend=backend, **kw),
                  torch.compile(m.discriminators, backend=backend, **kw))


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


def _l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(x.float(), y.float())


def _requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def train_step(m: Models, opt_G, opt_D, pool_A: ImagePool, pool_B: ImagePool, real_A, real_B,
               lambda_cycle: float, lambda_identity: float, autocast, batched: bool = True) -> torch.Tensor:
    """One reference iteration: the G step with both Ds frozen, then the D step (D loss × 0.5).
    real_A, real_B: B×3×H×W in [-1, 1]. Returns the 8 losses (LOSS_NAMES order) as a detached
    float32 device tensor (no host sync). `batched` groups independent passes (see Generators);
    False runs the reference order. Either way the D step runs one backward of D_A + D_B losses:
    they share no parameters, so each D's gradient is what its own backward would give, bit for bit."""
    identity = lambda_identity > 0
    # G step, discriminators frozen (called raw: see distribute).
    _requires_grad((m.D_A, m.D_B), False)
    opt_G.zero_grad(set_to_none=True)
    with autocast():
        fake_B, rec_A, fake_A, rec_B, same_B, same_A = m.generators(real_A, real_B, identity, batched)
        if identity:
            idt_A = _l1(same_B, real_B) * lambda_cycle * lambda_identity
            idt_B = _l1(same_A, real_A) * lambda_cycle * lambda_identity
        else:
            idt_A = idt_B = real_A.new_zeros((), dtype=torch.float32)
        loss_G_A = gan_loss(m.D_A(fake_B), True)
        loss_G_B = gan_loss(m.D_B(fake_A), True)
        cycle_A = _l1(rec_A, real_A) * lambda_cycle
        cycle_B = _l1(rec_B, real_B) * lambda_cycle
        loss_G = loss_G_A + loss_G_B + cycle_A + cycle_B + idt_A + idt_B
    loss_G.backward()
    opt_G.step()
    # D step.
    _requires_grad((m.D_A, m.D_B), True)
    opt_D.zero_grad(set_to_none=True)
    pooled_B = pool_B.query(fake_B)
    pooled_A = pool_A.query(fake_A)
    with autocast():
        real_b, fake_b, real_a, fake_a = m.discriminators(real_A, real_B, pooled_A, pooled_B, batched)
        loss_D_A = (gan_loss(real_b, True) + gan_loss(fake_b, False)) * 0.5
        loss_D_B = (gan_loss(real_a, True) + gan_loss(fake_a, False)) * 0.5
    (loss_D_A + loss_D_B).backward()
    opt_D.step()
    return torch.stack([loss_G_A, loss_G_B, cycle_A, cycle_B, idt_A, idt_B, loss_D_A, loss_D_B]).detach().float()


COMPILE_MODES = ("default", "reduce-overhead")


DATA_PLACES = ("auto", "device", "host", "disk")   # train.data_device; see unpaired.feeding.place_images


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
    data_device: str = "auto"        # auto, device, host or disk: where the training images live
    threads: int | str = "auto"      # CPU threads: auto (CPUs - 1, at least 1) or N; passive OpenMP wait

    BOUNDS = {   # generous: the paper trains 100 + 100 epochs at 256 px, ngf = ndf = 64, 9 blocks
        "epochs": params.Bound(10_000, "each epoch adds an epoch file, a sample grid and a log row"),
        "epochs_decay": params.Bound(10_000, "each epoch adds an epoch file, a sample grid and a log row"),
        "lr": params.Bound(1.0, "Adam moves each weight by about lr per step; the paper uses 0.0002"),
        "beta1": params.Bound(1, "Adam's momentum: a decay rate", 0, below=True),
        "lambda_cycle": params.Bound(1_000, "past it the GAN loss no longer counts; the paper uses 10"),
        "lambda_identity": params.Bound(100, "× lambda_cycle; the paper uses 0.5"),
        "pool_size": params.Bound(10_000, "fake images kept per direction on the training device; "
                                          "the paper keeps 50"),
        "ngf": params.Bound(256, "weights grow with its square: 256 is ~180 M per generator at 9 blocks"),
        "ndf": params.Bound(256, "weights grow with its square; the paper uses 64"),
        "n_blocks": params.Bound(64, "residual blocks; the paper uses 9"),
        "n_layers": params.Bound(8, "crop_size must be >= 3 × 2^n_layers, and crop_size <= 1024"),
        "load_size": params.Bound(2048, "every training image is resized to load_size² before the crop"),
        "crop_size": params.Bound(1024, "activations grow with its square: a step at 1024 px "
                                        "needs 16× the memory of one at 256"),
        "batch_size": params.Bound(1024, "images per step per process; the paper uses 1"),
        "save_every": params.Bound(20_000, "epochs; past epochs + epochs_decay only the last is saved"),
        "samples": params.SAMPLES,
        "seed": params.SEED,
        "devices": params.Bound(64, "processes on one node, each with its own copy of the models"),
        "threads": params.THREADS,
    }
    POOL_BYTES = 4 * 2 ** 30   # both pools together, fp32 on the training device

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
        pool = 2 * self.pool_size * 3 * self.crop_size ** 2 * 4   # both directions, fp32 at most
        c(pool <= self.POOL_BYTES, f"{prefix}.pool_size",
          f"{self.pool_size:,} images per direction at crop_size {self.crop_size} need {pool / 2 ** 30:.1f} "
          f"GiB on the training device, over {self.POOL_BYTES // 2 ** 30} GiB; use at most "
          f"{self.POOL_BYTES // (24 * self.crop_size ** 2):,} (the paper keeps 50)")
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
        threads.check(self.threads, f"{prefix}.threads")
        c(isinstance(self.compile, bool) or self.compile in COMPILE_MODES, f"{prefix}.compile",
          f"unknown mode {self.compile!r}; use false, default or reduce-overhead")
        c(self.devices >= 1, f"{prefix}.devices", f"must be >= 1, got {self.devices}")
        c(self.lr_scaling in ("none", "linear", "sqrt"), f"{prefix}.lr_scaling",
          f"unknown rule {self.lr_scaling!r}; use none, linear or sqrt")
        c(self.data_device in DATA_PLACES, f"{prefix}.data_device",
          f"unknown place {self.data_device!r}; use {', '.join(DATA_PLACES)}")

    @property
    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode."""
        return "default" if self.compile is True else (self.compile or None)

    def scaled_lr(self, world_size: int) -> float:
        """train.lr under train.lr_scaling for an effective batch of batch_size × world_size."""
        return self.lr * {"none": 1.0, "linear": world_size, "sqrt": world_size ** 0.5}[self.lr_scaling]
