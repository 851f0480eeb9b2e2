"""CUT and FastCUT (Park, Efros, Zhang, Zhu, ECCV 2020, "Contrastive Learning for Unpaired
Image-to-Image Translation") as a model of this package: one generator G (A→B), one discriminator
D, the projection head F, the PatchNCE loss, one optimisation step in the reference order, the
sample grid's rows, and `CUT`, the model interface (unpaired.models.training.Model) that the shared
training code drives. FastCUT is CUT with other defaults (train.model: fastcut; TrainParams.AUTO).

Faithful to taesungp/contrastive-unpaired-translation (HEAD b3ac297), models/cut_model.py's
optimize_parameters: G translates real_A (and real_B, for the identity NCE loss), the D step
((D_fake + D_real) × 0.5, LSGAN) runs with the fakes detached, then the G step with D frozen:
G_GAN = λ_GAN · LSGAN(D(G(A)), real), NCE = the PatchNCE loss between G's encoder features of A and
of G(A) at train.nce_layers, through F at the same num_patches positions per layer (the same for
every image of the batch), averaged over layers × λ_NCE; NCE_Y the same for B and G(B);
G = G_GAN + (NCE + NCE_Y) / 2 (G_GAN + NCE without the identity loss); G and F step together.
With flip_equivariance each step flips G's input with probability ½, and flips G(A)'s features back.

Randomness: weights from torch's global stream (G, then D, then F, as the reference draws them);
the flips and the patch positions from this rank's stream (`g_rank`, stored in last.pt), drawn on
the host before each step. Losses (LOSS_NAMES, the reference's loss_names): G_GAN, D_real, D_fake,
G, NCE, NCE_Y (0 without the identity loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unpaired import checkpoint
from unpaired.models.networks import (
    PatchDiscriminator,
    PatchSampleF,
    ResnetGenerator,
    deterministic_padding,
    init_weights,
)
from unpaired.models.training import TrainParams, adam_options, compiled, ddp

LOSS_NAMES = ("G_GAN", "D_real", "D_fake", "G", "NCE", "NCE_Y")


class Translator(nn.Module):
    """G and F as one module whose one forward call runs every G and F pass of a step (the unit DDP
    wraps and compile compiles). Returns fake_B (B×3×H×W) and, per NCE loss (A, then B when
    `identity`), the (queries, keys) of PatchNCE: lists of (B·P)×nc float tensors per NCE layer,
    the queries from G's features of G(x) (flipped back when `flip`), the keys from those of x
    (computed without gradients: PatchNCE detaches them, as the reference's loss does).

    `flip`: G's input is flipped left-right (flip equivariance). `ids`: per NCE loss, per layer,
    the sampled positions (long, on the device). `batched=True` encodes both queries in one pass
    and both keys in one (instance norm is per sample: the same numbers up to float rounding);
    False the reference order, pass by pass."""

    def __init__(self, G: nn.Module, F_: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.G, self.F, self.layers = G, F_, layers

    def forward(
        self,
        real_A: torch.Tensor,
        real_B: torch.Tensor,
        identity: bool,
        flip: bool,
        ids: list[list[torch.Tensor]],
        batched: bool,
    ):
        n = len(real_A)
        real = torch.cat([real_A, real_B]) if identity else real_A
        if flip:
            real = real.flip(3)
        fake = self.G(real)
        sources = [real_A, real_B] if identity else [real_A]
        targets = list(fake.split(n)) if identity else [fake]

        def unflip(feats):
            return [f.flip(3) for f in feats] if flip else feats

        if batched:
            q_all = unflip(self.G.encode(torch.cat(targets), self.layers))
            with torch.no_grad():
                k_all = self.G.encode(torch.cat(sources), self.layers)
            q_feats = [[f[i * n : (i + 1) * n] for f in q_all] for i in range(len(sources))]
            k_feats = [[f[i * n : (i + 1) * n] for f in k_all] for i in range(len(sources))]
        else:
            q_feats, k_feats = [], []
            for src, tgt in zip(sources, targets):
                q_feats.append(unflip(self.G.encode(tgt, self.layers)))
                with torch.no_grad():
                    k_feats.append(self.G.encode(src, self.layers))
        pairs = []
        for q, k, layer_ids in zip(q_feats, k_feats, ids):
            with torch.no_grad():
                keys = self.F(k, layer_ids)
            pairs.append((self.F(q, layer_ids), keys))
        return targets[0], pairs


class Discriminator(nn.Module):
    """D for the D step (one forward per backward, for DDP): its predictions on the detached fake B
    and on real B. `batched=True` runs D(cat[fake_B, real_B]); else two calls (the reference's)."""

    def __init__(self, D: nn.Module):
        super().__init__()
        self.D = D

    def forward(self, fake_B: torch.Tensor, real_B: torch.Tensor, batched: bool):
        if batched:
            return self.D(torch.cat([fake_B, real_B])).split(len(fake_B))
        return self.D(fake_B), self.D(real_B)


@dataclass
class Models:
    """G, D, F and the modules a step calls (DDP-wrapped and compiled versions replace
    `translator`/`discriminator`/`judge`; the raw networks stay reachable). `judge`: the G step's
    D pass, D frozen (never DDP-wrapped)."""

    G: nn.Module
    D: nn.Module
    F: nn.Module
    layers: tuple[int, ...]
    translator: nn.Module | None = None
    discriminator: nn.Module | None = None
    judge: nn.Module | None = None

    def __post_init__(self):
        if self.translator is None:
            self.translator = Translator(self.G, self.F, self.layers)
        if self.discriminator is None:
            self.discriminator = Discriminator(self.D)
        if self.judge is None:
            self.judge = self.D


def build_models(p: TrainParams, crop: int) -> tuple[Models, list[int]]:
    """G, D (Xavier-normal, gain 0.02, from torch's global stream, as base_options.py's
    --init_type xavier --init_gain 0.02), then F, made at G's first forward: an encode pass of a
    1×3×`crop`×`crop` zero batch gives each NCE layer's channels (F's MLP sizes: all the
    reference's data-dependent init reads of the data) and positions H·W (what the patch draws
    range over). On the CPU, in float32; returns the models and the positions per layer."""
    antialias = p.resolved("antialias")
    G = init_weights(
        ResnetGenerator(ngf=p.ngf, n_blocks=p.n_blocks, antialias=antialias), kind="xavier"
    )
    D = init_weights(
        PatchDiscriminator(ndf=p.ndf, n_layers=p.n_layers, antialias=antialias), kind="xavier"
    )
    F_ = PatchSampleF(nc=p.netF_nc)
    with torch.no_grad():
        feats = G.encode(torch.zeros(1, 3, crop, crop), p.nce_layers)
    F_.create([f.shape[1] for f in feats])
    return Models(G, D, F_, p.nce_layers), [f.shape[2] * f.shape[3] for f in feats]


def gan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """LSGAN (the reference's --gan_mode lsgan): mean squared error to 1 (real) or 0 (fake)."""
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction.float(), target.float())


def patch_nce(q: torch.Tensor, k: torch.Tensor, batch: int, tau: float) -> torch.Tensor:
    """PatchNCE (models/patchnce.py, nce_includes_all_negatives_from_minibatch false): for each of
    the (batch·P) queries q (×C, l2-normalised, float32), the cross-entropy of picking its own key
    (k, detached) among the P keys of the same image, the other positions' similarity logits and the
    positive's divided by τ (the query's own position in the negatives masked to -10). Returns the
    per-query losses, (batch·P,) float32."""
    k = k.detach()
    n, dim = q.shape
    l_pos = torch.bmm(q.view(n, 1, -1), k.view(n, -1, 1)).view(n, 1)
    qb, kb = q.view(batch, -1, dim), k.view(batch, -1, dim)
    patches = qb.shape[1]
    l_neg = torch.bmm(qb, kb.transpose(2, 1))
    diagonal = torch.eye(patches, device=q.device, dtype=torch.bool)[None]
    l_neg = l_neg.masked_fill(diagonal, -10.0).view(-1, patches)
    logits = torch.cat([l_pos, l_neg], 1) / tau
    target = torch.zeros(len(logits), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction="none")


def nce_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]], batch: int, p: TrainParams):
    """One NCE loss (the reference's calculate_NCE_loss): the mean over layers of each layer's mean
    PatchNCE × λ_NCE, in float32."""
    lam = p.resolved("lambda_nce")
    total = sum(
        (patch_nce(q.float(), k.float(), batch, p.nce_T) * lam).mean() for q, k in zip(*pairs)
    )
    return total / len(pairs[0])


def _requires_grad(net: nn.Module, flag: bool) -> None:
    for w in net.parameters():
        w.requires_grad_(flag)


class Draws:
    """The step's randomness from this rank's stream `g` (CPU): whether to flip (torch.rand < ½,
    only with flip equivariance) and, per NCE loss and layer, min(num_patches, H·W) positions of
    a random permutation of H·W (the reference draws them from numpy's global stream, in the same
    order: the flip, then loss A's layers, then loss B's)."""

    def __init__(self, g: torch.Generator):
        self.g = g

    def flip(self) -> bool:
        return bool(torch.rand((), generator=self.g) < 0.5)

    def patch_ids(self, positions: list[int], num_patches: int) -> list[torch.Tensor]:
        return [torch.randperm(hw, generator=self.g)[:num_patches] for hw in positions]


def train_step(
    m: Models,
    opt_G,
    opt_D,
    opt_F,
    real_A: torch.Tensor,
    real_B: torch.Tensor,
    p: TrainParams,
    flip: bool,
    ids: list[list[torch.Tensor]],
    autocast,
) -> torch.Tensor:
    """One reference iteration (CUTModel.optimize_parameters): G's forward, the D step, then the G
    and F step with D frozen. real_A, real_B: B×3×H×W in [-1, 1]; `flip` and `ids` (per NCE loss,
    per layer, positions on the device) as Draws gives them. Returns the 6 losses (LOSS_NAMES
    order) as a detached float32 device tensor (no host sync)."""
    identity = p.resolved("nce_idt")
    batched = p.batched_passes
    with autocast():
        fake_B, pairs = m.translator(real_A, real_B, identity, flip, ids, batched)
    # D step
    _requires_grad(m.D, True)
    opt_D.zero_grad(set_to_none=True)
    with autocast():
        pred_fake, pred_real = m.discriminator(fake_B.detach(), real_B, batched)
        loss_D_fake = gan_loss(pred_fake, False)
        loss_D_real = gan_loss(pred_real, True)
    ((loss_D_fake + loss_D_real) * 0.5).backward()
    opt_D.step()
    # G and F step, D frozen
    _requires_grad(m.D, False)
    opt_G.zero_grad(set_to_none=True)
    opt_F.zero_grad(set_to_none=True)
    with autocast():
        loss_G_GAN = gan_loss(m.judge(fake_B), True) * p.lambda_gan
    n = len(real_A)
    loss_NCE = nce_loss(pairs[0], n, p)  # float32, outside autocast (bmm would run in bf16)
    if identity:
        loss_NCE_Y = nce_loss(pairs[1], n, p)
        loss_G = loss_G_GAN + (loss_NCE + loss_NCE_Y) * 0.5
    else:
        loss_NCE_Y = loss_NCE.new_zeros(())
        loss_G = loss_G_GAN + loss_NCE
    loss_G.backward()
    opt_G.step()
    opt_F.step()
    return (
        torch.stack([loss_G_GAN, loss_D_real, loss_D_fake, loss_G, loss_NCE, loss_NCE_Y])
        .detach()
        .float()
    )


class CUT:
    """CUT (or FastCUT: train.model) behind the model interface (unpaired.models.training.Model):
    G, D and F (`models`, built by build_models at train.crop_size), Adam for G (opt_G), D (opt_D)
    and then F (opt_F, made after F as the reference makes it), each at train.lr scaled for
    `world_size` processes and β (train.beta1, 0.999). The flips and patch positions draw from
    `g_rank` (Draws). No rank state of its own: its random stream is stored by TrainState."""

    LOSS_NAMES = LOSS_NAMES
    NETS = ("G", "D", "F")
    OPTIMIZERS = ("G", "D", "F")
    RANK_STATE = ()
    GENERATORS = ("G_AB",)

    def __init__(
        self,
        p: TrainParams,
        device: torch.device,
        world_size: int,
        g_rank: torch.Generator,
        channels_last: bool,
    ):
        self.p, self.device = p, device
        models, self.positions = build_models(p, p.crop_size)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for net in (models.G, models.D, models.F):
            net.to(device=device, memory_format=fmt)
        if p.deterministic and device.type == "cuda":  # torch's CUDA reflection-pad backward
            deterministic_padding(models.G)
            deterministic_padding(models.D)
        self.models = models
        self.nets = dict(zip(self.NETS, (models.G, models.D, models.F)))
        kw = adam_options(p.scaled_lr(world_size), p.beta1, fused=device.type == "cuda")
        self.optimizers = {
            name: torch.optim.Adam(net.parameters(), **kw) for name, net in self.nets.items()
        }
        self.draws = Draws(g_rank)

    def epoch_file(self, epoch: int) -> dict[str, Any]:
        """G as G_AB and its model config, with kind (cut/fastcut) and antialias (checkpoint format)."""
        p = self.p
        cfg: dict[str, Any] = {
            "ngf": p.ngf,
            "n_blocks": p.n_blocks,
            "in_channels": 3,
            "out_channels": 3,
            "kind": p.model,
        }
        if p.resolved("antialias"):
            cfg["antialias"] = True
        return checkpoint.generators_payload(epoch, cfg, self.models.G)

    def start_epoch(self, images: int) -> None:
        """Training mode (the draws are made step by step)."""
        for net in self.nets.values():
            net.train()

    def step(self, real_A: torch.Tensor, real_B: torch.Tensor, autocast) -> torch.Tensor:
        """One training step (train_step) on B×3×H×W batches; the 6 losses on the device."""
        p = self.p
        flip = self.draws.flip() if p.resolved("flip_equivariance") else False
        drawn = [
            self.draws.patch_ids(self.positions, p.num_patches)
            for _ in range(2 if p.resolved("nce_idt") else 1)
        ]  # one copy to the device for all of them
        flat = (
            torch.cat([i for ids in drawn for i in ids])
            .to(self.device)
            .split([len(i) for ids in drawn for i in ids])
        )
        n = len(self.positions)
        ids = [list(flat[k * n : (k + 1) * n]) for k in range(len(drawn))]
        return train_step(
            self.models, *self.optimizers.values(), real_A, real_B, p, flip, ids, autocast
        )

    def rank_state(self) -> dict[str, Any]:
        return {}

    def load_rank_state(self, state: dict[str, Any], device: torch.device) -> None:
        pass

    def distribute(self, device: torch.device) -> None:
        """DDP for the translator (G and F) and the D step's discriminator; the G step's D pass
        stays unwrapped (frozen there)."""
        m = self.models
        self.models = Models(
            m.G,
            m.D,
            m.F,
            m.layers,
            ddp(m.translator, device),
            ddp(m.discriminator, device),
            m.judge,
        )

    def compile(self, mode: str) -> None:
        m = self.models
        self.models = Models(
            m.G,
            m.D,
            m.F,
            m.layers,
            compiled(m.translator, mode),
            compiled(m.discriminator, mode),
            compiled(m.judge, mode),
        )

    def sample_rows(
        self, real_A: torch.Tensor, real_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(real A, fake B) and (real B, G(B)) rows, N×2×3×H×W each, G in eval mode (G(B): what the
        identity NCE loss keeps close to B)."""
        G = self.models.G
        G.eval()
        with torch.no_grad():
            return (
                torch.stack([real_A, G(real_A)], 1).float().cpu(),
                torch.stack([real_B, G(real_B)], 1).float().cpu(),
            )
