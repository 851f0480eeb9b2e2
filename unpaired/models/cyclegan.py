"""CycleGAN (Zhu et al. 2017) as a model of this package: the generator and discriminator pair modules
(the units DDP wraps and torch.compile compiles), its losses, one optimisation step in the reference
order (G step with both Ds frozen, then D step) with its independent passes batched by default, the
sample grid's rows, and `CycleGAN`, the model interface (unpaired.models.training.Model) that the
shared training code drives.

Naming follows the reference implementation: G_A maps A→B, G_B maps B→A, D_A judges domain B
(real B vs G_A's fakes), D_B judges domain A. Losses: G_A, G_B (LSGAN), cycle_A, cycle_B (L1 × λ),
idt_A, idt_B (L1 × λ × λ_identity), D_A, D_B ((real + fake) × 0.5).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unpaired import checkpoint
from unpaired.models.networks import (
    PatchDiscriminator,
    ResnetGenerator,
    deterministic_padding,
    init_weights,
)
from unpaired.models.pool import ImagePool
from unpaired.models.training import TrainParams, adam_options, compiled, ddp

LOSS_NAMES = ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B")


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


class FrozenDiscriminators(nn.Module):
    """D_A and D_B as the G step calls them, weights frozen: D_A(fake_B), D_B(fake_A). A module of
    its own so that torch.compile compiles these passes too; never DDP-wrapped (see distribute)."""

    def __init__(self, D_A: nn.Module, D_B: nn.Module):
        super().__init__()
        self.D_A, self.D_B = D_A, D_B

    def forward(
        self, fake_B: torch.Tensor, fake_A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.D_A(fake_B), self.D_B(fake_A)


@dataclass
class Models:
    """The four networks, and the three pair modules a step calls (the same networks; DDP-wrapped and
    compiled versions replace `generators`/`discriminators`/`judges`, the raw networks stay
    reachable). `judges`: the G step's D passes (FrozenDiscriminators)."""

    G_A: nn.Module
    G_B: nn.Module
    D_A: nn.Module
    D_B: nn.Module
    generators: nn.Module | None = None
    discriminators: nn.Module | None = None
    judges: nn.Module | None = None

    def __post_init__(self):
        if self.generators is None:
            self.generators = Generators(self.G_A, self.G_B)
        if self.discriminators is None:
            self.discriminators = Discriminators(self.D_A, self.D_B)
        if self.judges is None:
            self.judges = FrozenDiscriminators(self.D_A, self.D_B)

    def nets(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return self.G_A, self.G_B, self.D_A, self.D_B


def build_models(
    ngf: int,
    ndf: int,
    n_blocks: int,
    n_layers: int,
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
    antialias: bool = False,
) -> Models:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    G = lambda: ResnetGenerator(ngf=ngf, n_blocks=n_blocks, antialias=antialias)  # noqa: E731
    D = lambda: PatchDiscriminator(ndf=ndf, n_layers=n_layers, antialias=antialias)  # noqa: E731
    nets = [init_weights(G()), init_weights(G()), init_weights(D()), init_weights(D())]
    return Models(*(n.to(device=device, dtype=dtype, memory_format=fmt) for n in nets))


def distribute(m: Models, device: torch.device) -> Models:
    """Wrap the pair modules in DistributedDataParallel (training.ddp; process group already
    initialised). The G step's D passes (`judges`) stay unwrapped (frozen there; a DDP-wrapped
    module whose forward produces no gradients in a backward would leave its reducer waiting)."""
    return Models(
        m.G_A,
        m.G_B,
        m.D_A,
        m.D_B,
        ddp(m.generators, device),
        ddp(m.discriminators, device),
        m.judges,
    )


def compile_models(m: Models, mode: str, backend: str = "inductor") -> Models:
    """torch.compile the pair modules (training.compiled): the generators, the D step's
    discriminators and the G step's D passes. Each compiles as one graph: nothing in a step's
    network passes reads a value back to the host (the pool and the losses stay on the device)."""
    return Models(
        m.G_A,
        m.G_B,
        m.D_A,
        m.D_B,
        compiled(m.generators, mode, backend),
        compiled(m.discriminators, mode, backend),
        compiled(m.judges, mode, backend),
    )


def optimizers(
    m: Models, lr: float, beta1: float, fused: bool
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the generators and for the discriminators, with training.adam_options (`fused`:
    torch's fused kernels, on CUDA; else foreach)."""
    kw = adam_options(lr, beta1, fused)
    return (
        torch.optim.Adam(itertools.chain(m.G_A.parameters(), m.G_B.parameters()), **kw),
        torch.optim.Adam(itertools.chain(m.D_A.parameters(), m.D_B.parameters()), **kw),
    )


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


def train_step(
    m: Models,
    opt_G,
    opt_D,
    pool_A: ImagePool,
    pool_B: ImagePool,
    real_A,
    real_B,
    lambda_cycle: float,
    lambda_identity: float,
    autocast,
    batched: bool = True,
) -> torch.Tensor:
    """One reference iteration: the G step with both Ds frozen, then the D step (D loss × 0.5).
    real_A, real_B: B×3×H×W in [-1, 1]. Returns the 8 losses (LOSS_NAMES order) as a detached
    float32 device tensor (no host sync). `batched` groups independent passes (see Generators);
    False runs the reference order. Either way the D step runs one backward of D_A + D_B losses:
    they share no parameters, so each D's gradient is what its own backward would give, bit for bit."""
    identity = lambda_identity > 0
    # G step, discriminators frozen (never DDP-wrapped: see distribute).
    _requires_grad((m.D_A, m.D_B), False)
    opt_G.zero_grad(set_to_none=True)
    with autocast():
        fake_B, rec_A, fake_A, rec_B, same_B, same_A = m.generators(
            real_A, real_B, identity, batched
        )
        if identity:
            idt_A = _l1(same_B, real_B) * lambda_cycle * lambda_identity
            idt_B = _l1(same_A, real_A) * lambda_cycle * lambda_identity
        else:
            idt_A = idt_B = real_A.new_zeros((), dtype=torch.float32)
        judged_B, judged_A = m.judges(fake_B, fake_A)
        loss_G_A = gan_loss(judged_B, True)
        loss_G_B = gan_loss(judged_A, True)
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
        real_b, fake_b, real_a, fake_a = m.discriminators(
            real_A, real_B, pooled_A, pooled_B, batched
        )
        loss_D_A = (gan_loss(real_b, True) + gan_loss(fake_b, False)) * 0.5
        loss_D_B = (gan_loss(real_a, True) + gan_loss(fake_a, False)) * 0.5
    (loss_D_A + loss_D_B).backward()
    opt_D.step()
    return (
        torch.stack([loss_G_A, loss_G_B, cycle_A, cycle_B, idt_A, idt_B, loss_D_A, loss_D_B])
        .detach()
        .float()
    )


@torch.no_grad()
def triplets(
    G_A: torch.nn.Module, G_B: torch.nn.Module, real_A: torch.Tensor, real_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real A, fake B, rec A) and (real B, fake A, rec B) stacked per sample: N×3×3×H×W each, in [-1, 1]."""
    fake_B = G_A(real_A)
    fake_A = G_B(real_B)
    return (
        torch.stack([real_A, fake_B, G_B(fake_B)], 1).float().cpu(),
        torch.stack([real_B, fake_A, G_A(fake_A)], 1).float().cpu(),
    )


class CycleGAN:
    """CycleGAN behind the model interface (unpaired.models.training.Model): the four networks
    (`models`), Adam for the generators (opt_G) and for the discriminators (opt_D), and this rank's
    two image pools, which draw from `g_rank`. Built in that order from train params `p` (torch's
    global seed set: the weights' initialisation draws from it); the lr is train.lr scaled for
    `world_size` processes (TrainParams.scaled_lr)."""

    LOSS_NAMES = LOSS_NAMES
    NETS = ("G_A", "G_B", "D_A", "D_B")
    OPTIMIZERS = ("G", "D")
    RANK_STATE = ("pool_A", "pool_B")
    GENERATORS = ("G_AB", "G_BA")

    def __init__(
        self,
        p: TrainParams,
        device: torch.device,
        world_size: int,
        g_rank: torch.Generator,
        channels_last: bool,
    ):
        self.p, self.device = p, device
        self.models = build_models(
            p.ngf,
            p.ndf,
            p.n_blocks,
            p.n_layers,
            device,
            channels_last=channels_last,
            antialias=p.resolved("antialias"),
        )
        if (
            p.deterministic and device.type == "cuda"
        ):  # torch's CUDA reflection-pad backward would raise
            for G in (self.models.G_A, self.models.G_B):
                deterministic_padding(G)
        self.nets = dict(zip(self.NETS, self.models.nets()))
        self.optimizers = dict(
            zip(
                self.OPTIMIZERS,
                optimizers(
                    self.models, p.scaled_lr(world_size), p.beta1, fused=device.type == "cuda"
                ),
            )
        )
        self.pool_A, self.pool_B = ImagePool(p.pool_size, g_rank), ImagePool(p.pool_size, g_rank)

    def epoch_file(self, epoch: int) -> dict[str, Any]:
        """Both generators (G_AB = G_A, G_BA = G_B) and their model config (checkpoint format)."""
        cfg = {"ngf": self.p.ngf, "n_blocks": self.p.n_blocks, "in_channels": 3, "out_channels": 3}
        if self.p.resolved("antialias"):  # (absent when off: the files of earlier versions)
            cfg["antialias"] = True
        return checkpoint.generators_payload(epoch, cfg, self.models.G_A, self.models.G_B)

    def start_epoch(self, images: int) -> None:
        """Training mode; both pools draw the randomness of `images` queries (ImagePool.prepare)."""
        for net in self.models.nets():
            net.train()
        self.pool_A.prepare(images, self.device)
        self.pool_B.prepare(images, self.device)

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor, autocast) -> torch.Tensor:
        """One training step (train_step) on B×3×H×W batches; the 8 losses on the device."""
        p = self.p
        opt_G, opt_D = self.optimizers.values()
        return train_step(
            self.models,
            opt_G,
            opt_D,
            self.pool_A,
            self.pool_B,
            real_A,
            real_B,
            p.lambda_cycle,
            p.lambda_identity,
            autocast,
            p.batched_passes,
        )

    def rank_state(self) -> dict[str, Any]:
        return {"pool_A": self.pool_A.state(), "pool_B": self.pool_B.state()}

    def load_rank_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.pool_A.load(state["pool_A"], device)
        self.pool_B.load(state["pool_B"], device)

    def distribute(self, device: torch.device) -> None:
        self.models = distribute(self.models, device)

    def compile(self, mode: str) -> None:
        self.models = compile_models(self.models, mode)

    def sample_rows(
        self, real_A: torch.Tensor, real_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(real A, fake B, rec A) and (real B, fake A, rec B) rows (triplets), generators in eval mode."""
        self.models.G_A.eval()
        self.models.G_B.eval()
        return triplets(self.models.G_A, self.models.G_B, real_A, real_B)
