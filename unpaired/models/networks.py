"""The networks every model here is built from: CycleGAN's (Zhu et al. 2017), as the reference
implementation's defaults, and CUT's (Park et al. 2020) variants of them, as its reference's
(taesungp/contrastive-unpaired-translation, models/networks.py). The losses and the step are each
model's: unpaired/models/cyclegan.py, unpaired/models/cut.py.

- ResnetGenerator: reflection pad + 7×7 conv, two stride-2 downsamples, `n_blocks` residual blocks
  (9 at 256 px, 6 for small images), two transposed-conv upsamples, 7×7 conv, tanh. Instance norm
  without affine parameters, no dropout. ngf=64: 11,378,179 parameters (9 blocks), 7,837,699 (6).
  `antialias=True` (CUT's default): each downsample is a stride-1 conv, norm, ReLU, then a blurred
  stride-2 subsampling (Downsample); each upsample a blurred ×2 upsampling (Upsample) then a 3×3
  conv: the same parameter count. `encode` returns the outputs of chosen layers (CUT's NCE layers).
- PatchDiscriminator: the 70×70 PatchGAN, ndf=64, 3 layers, LeakyReLU 0.2, no norm on the first
  layer. ndf=64: 2,764,737 parameters (antialiased or not: Downsample has none).
- PatchSampleF: CUT's F, a 2-layer MLP per NCE layer over sampled feature positions, l2-normalised;
  its MLPs are made at its first call (`create`), sized by the features it is given.
- init_weights: N(0, 0.02) for conv weights, zero biases (the reference's `init_type=normal`);
  `kind="xavier"`: Xavier-normal with gain 0.02 for conv and linear weights (CUT's default).
- count_parameters: the number of parameters of a network.
- deterministic_padding: the generators' reflection padding with a deterministic backward, for
  CUDA runs under torch.use_deterministic_algorithms (train.deterministic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            _norm(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            _norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _binomial(size: int) -> torch.Tensor:
    """The normalised size×size binomial filter (size 3: [1, 2, 1]ᵀ[1, 2, 1] / 16), float32."""
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float64)
    filt = torch.outer(row, row)
    return (filt / filt.sum()).float()


class Downsample(nn.Module):
    """Antialiased ×½ subsampling (Zhang 2019, as CUT's reference Downsample with its defaults):
    reflection pad 1, a fixed 3×3 binomial blur per channel, stride 2. B×C×H×W → B×C×⌊(H-1)/2+1⌋×…
    The filter is a non-persistent buffer (a constant: never in a state dict)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer(
            "filt", _binomial(3)[None, None].repeat(channels, 1, 1, 1), persistent=False
        )
        self.pad = nn.ReflectionPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.filt, stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Antialiased ×2 upsampling (CUT's reference Upsample with its defaults): replication pad 1,
    a transposed conv with the fixed 4×4 binomial filter × 4 per channel, stride 2, cropped to
    exactly B×C×2H×2W. The filter is a non-persistent buffer."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer(
            "filt", (_binomial(4) * 4)[None, None].repeat(channels, 1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # replication pad 1 as concatenated edges: the same values as nn.ReplicationPad2d, and a
        # backward without atomics (CUDA's replication_pad2d_backward has none deterministic)
        x = torch.cat([x[..., :1], x, x[..., -1:]], -1)
        x = torch.cat([x[..., :1, :], x, x[..., -1:, :]], -2)
        up = F.conv_transpose2d(x, self.filt, stride=2, padding=2, groups=x.shape[1])
        return up[:, :, 1:-1, 1:-1]


def generator_depth(n_blocks: int, antialias: bool) -> int:
    """The number of layers of ResnetGenerator's `model` (the indices `encode` takes are below it)."""
    return 4 + 2 * (4 if antialias else 3) + n_blocks + 2 * (4 if antialias else 3) + 3


class ResnetGenerator(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        antialias: bool = False,
    ):
        super().__init__()
        # Instance norm has no affine shift, so conv biases are kept, as the reference does.
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=True),
            _norm(ngf),
            nn.ReLU(True),
        ]
        ch = ngf
        for _ in range(2):
            layers += [
                nn.Conv2d(ch, ch * 2, 3, stride=1 if antialias else 2, padding=1, bias=True),
                _norm(ch * 2),
                nn.ReLU(True),
                *([Downsample(ch * 2)] if antialias else []),
            ]
            ch *= 2
        layers += [ResnetBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            if antialias:
                layers += [Upsample(ch), nn.Conv2d(ch, ch // 2, 3, padding=1, bias=True)]
            else:
                layers += [
                    nn.ConvTranspose2d(
                        ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=True
                    )
                ]
            layers += [_norm(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def encode(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """The outputs of `model[i]` for each i in `layers` (sorted, below generator_depth), in
        that order, running only the layers up to the last of them (CUT's encode_only)."""
        feats = []
        for i, layer in enumerate(self.model[: layers[-1] + 1]):
            x = layer(x)
            if i in layers:
                feats.append(x)
        return feats


class PatchDiscriminator(nn.Module):
    def __init__(
        self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, antialias: bool = False
    ):
        super().__init__()
        stride = 1 if antialias else 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=stride, padding=1),
            nn.LeakyReLU(0.2, True),
            *([Downsample(ndf)] if antialias else []),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True),
                _norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
                *([Downsample(ndf * mult)] if antialias else []),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=True),
            _norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02, kind: str = "normal") -> nn.Module:
    """Conv (and, for "xavier", linear) weights drawn from torch's global stream, zero biases;
    norm layers here have no affine parameters. `kind` "normal": N(0, gain) (CycleGAN's reference,
    init_type normal); "xavier": Xavier-normal with `gain` (CUT's reference: base_options.py
    --init_type xavier --init_gain 0.02), visiting the modules in the reference's order
    (nn.Module.apply: children before their parent)."""
    layers = (nn.Conv2d, nn.ConvTranspose2d) + ((nn.Linear,) if kind == "xavier" else ())
    visited: list[nn.Module] = []
    net.apply(visited.append)
    for m in visited:
        if isinstance(m, layers):
            if kind == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            else:
                nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class PatchSampleF(nn.Module):
    """CUT's F (the reference's PatchSampleF with netF mlp_sample): for each NCE layer's features
    B×C×H×W, the features at `num_patches` positions (the same positions for every image of the
    batch), each through that layer's MLP (Linear C→nc, ReLU, Linear nc→nc), l2-normalised
    (x / (‖x‖ + 1e-7); a zero vector stays zero, with a finite gradient): (B·num_patches)×nc
    float. Its MLPs are made by `create` from the first features it sees (channels only; the
    reference's data-dependent init) and initialised by init_weights(kind="xavier"). ngf=64,
    nc=256, layers 0,4,8,12,16: 560,384 parameters."""

    def __init__(self, nc: int = 256, gain: float = 0.02):
        super().__init__()
        self.nc, self.gain = nc, gain
        self.mlps = nn.ModuleList()

    def create(self, channels: list[int]) -> None:
        """One MLP per feature layer of `channels` channels, built and initialised in the reference's
        order (torch's default init, then Xavier over all of them: the same draws)."""
        for c in channels:
            self.mlps.append(
                nn.Sequential(nn.Linear(c, self.nc), nn.ReLU(), nn.Linear(self.nc, self.nc))
            )
        init_weights(self, self.gain, kind="xavier")

    def forward(
        self, feats: list[torch.Tensor], patch_ids: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """`feats[i]` (B×C×H×W) sampled at positions `patch_ids[i]` (long, on the device, each an
        index into H·W in row-major order) and projected by MLP i."""
        out = []
        for feat, ids, mlp in zip(feats, patch_ids, self.mlps):
            x = feat.permute(0, 2, 3, 1).flatten(1, 2)[:, ids, :].flatten(0, 1)
            x = mlp(x)
            # The reference's x.pow(2).sum(1).pow(0.5): the same norm (within 3e-8 after the
            # division), but its gradient at a zero vector is NaN (0 · ∞), and a patch whose
            # features are all zero after a ReLU gives one (seen at ngf 4: every loss NaN in the
            # first epoch). vector_norm's gradient there is 0, and the same elsewhere.
            out.append(x.div(torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-7))
        return out


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class _ReflectionPad(torch.autograd.Function):
    """F.pad(mode="reflect") forward; a backward of slices, flips and adds only. torch's CUDA
    reflection_pad2d_backward accumulates with atomicAdd and raises under
    torch.use_deterministic_algorithms; no library offers a deterministic one, hence this."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
        ctx.padding = padding
        return F.pad(x, padding, mode="reflect")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, right, top, bottom = ctx.padding
        h, w = grad.shape[-2] - top - bottom, grad.shape[-1] - left - right
        # Output column j < left copies input column left - j, column left + w + j copies w - 2 - j:
        # each padded column's gradient goes back onto the column it copies (rows likewise, after).
        cols = grad[..., left : left + w].clone()
        if left:
            cols[..., 1 : left + 1] += grad[..., :left].flip(-1)
        if right:
            cols[..., w - 1 - right : w - 1] += grad[..., left + w :].flip(-1)
        out = cols[..., top : top + h, :].clone()
        if top:
            out[..., 1 : top + 1, :] += cols[..., :top, :].flip(-2)
        if bottom:
            out[..., h - 1 - bottom : h - 1, :] += cols[..., top + h :, :].flip(-2)
        return out, None


class DeterministicReflectionPad2d(nn.ReflectionPad2d):
    """nn.ReflectionPad2d (the same padding, the same output) whose backward is deterministic on
    every device: the padded borders' gradients are added back with slices and flips, no atomics.
    Its input gradient equals ReflectionPad2d's up to the order of at most four additions per
    element (tests/test_gpu_ready.py compares them in float64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReflectionPad.apply(x, tuple(self.padding))


def deterministic_padding(net: nn.Module) -> nn.Module:
    """`net` with each nn.ReflectionPad2d in it replaced by DeterministicReflectionPad2d (in place;
    no parameters change, so state dicts are the same)."""
    for module in list(net.modules()):
        for name, child in module.named_children():
            if type(child) is nn.ReflectionPad2d:
                setattr(module, name, DeterministicReflectionPad2d(child.padding))
    return net
