"""The networks every model here is built from: CycleGAN's (Zhu et al. 2017), as the reference
implementation's defaults (the losses and the step are each model's: unpaired/models/cyclegan.py).

- ResnetGenerator: reflection pad + 7×7 conv, two stride-2 downsamples, `n_blocks` residual blocks
  (9 at 256 px, 6 for small images), two transposed-conv upsamples, 7×7 conv, tanh. Instance norm
  without affine parameters, no dropout. ngf=64: 11,378,179 parameters (9 blocks), 7,837,699 (6).
- PatchDiscriminator: the 70×70 PatchGAN, ndf=64, 3 layers, LeakyReLU 0.2, no norm on the first
  layer. ndf=64: 2,764,737 parameters.
- init_weights: N(0, 0.02) for conv weights, zero biases (the reference's `init_type=normal`).
- count_parameters: the number of parameters of a network.
- deterministic_padding: the generators' reflection padding with a deterministic backward, for
  CUDA runs under torch.use_deterministic_algorithms (train.deterministic).
"""

from __future__ import annotations

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


class ResnetGenerator(nn.Module):
    def __init__(
        self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9
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
                nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=True),
                _norm(ch * 2),
                nn.ReLU(True),
            ]
            ch *= 2
        layers += [ResnetBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(
                    ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=True
                ),
                _norm(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=True),
                _norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
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


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """N(0, gain) conv weights and zero biases; norm layers here have no affine parameters."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


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
