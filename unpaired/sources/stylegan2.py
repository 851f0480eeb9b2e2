"""The StyleGAN2(-ADA) generator in plain PyTorch: nothing to compile, runs on CPU and CUDA.

It computes what NVIDIA's stylegan2-ada-pytorch `training/networks.py` Generator computes (config
"skip" synthesis, the one every official StyleGAN2 pickle uses), with the same module and tensor
names, so an official network's parameters and buffers load into it one to one (see safe_pickle.py):

    mapping    z → normalize 2nd moment → fc0..fc{n-1} (lrelu, lr multiplier 0.01) → w,
               broadcast to num_ws, truncation w_avg + psi·(w − w_avg)
    synthesis  b4: learned const → conv1 → torgb;  b8..bN: conv0 (up 2) → conv1 → torgb;
               images summed over resolutions (skip architecture), upsampled with [1, 3, 3, 1]
    layer      style = affine(w) (bias init 1); modulated, demodulated 3×3 conv; + noise·strength;
               + bias, lrelu × √2, clamp to ±conv_clamp

Written by hand because no maintained package ships this generator without the official code's
pickled-source loading and CUDA extensions; the official ops (bias_act, upfirdn2d, conv2d_resample)
are reduced here to the few cases the generator uses, in their reference (non-CUDA) form.

Numerics follow the official code path for inference: fp16 blocks (the last `num_fp16_res`
resolutions) run in float16 on CUDA only, and `fused` picks the grouped-convolution form of the
modulated convolution (the official choice in eval mode for fp32) or the batched form (the same
maths as scale → conv → scale; faster for large batches).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class GeneratorConfig:
    """The constructor arguments of an official Generator (its pickled `_init_kwargs`)."""

    z_dim: int = 512
    w_dim: int = 512
    img_resolution: int = 1024
    img_channels: int = 3
    c_dim: int = 0
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    extra: dict[str, Any] = field(default_factory=dict)  # unused kwargs, kept for the record

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the few official ops, reference form -------------------------------------------------------


def lrelu_act(
    x: torch.Tensor, bias: torch.Tensor | None, gain: float = SQRT2, clamp: float | None = None
) -> torch.Tensor:
    """bias_act with act='lrelu' (alpha 0.2): (x + b) → leaky relu → × gain → clamp."""
    if bias is not None:
        x = x + bias.reshape([1, -1] + [1] * (x.ndim - 2))
    x = F.leaky_relu(x, 0.2)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def linear_act(
    x: torch.Tensor, bias: torch.Tensor | None, clamp: float | None = None
) -> torch.Tensor:
    if bias is not None:
        x = x + bias.reshape([1, -1] + [1] * (x.ndim - 2))
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def make_filter(taps: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The 2-D separable low-pass filter from 1-D taps, normalised to sum 1 (a [4, 4] buffer for
    [1, 3, 3, 1], stored like that in official networks)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(
    x: torch.Tensor, f: torch.Tensor, up: int, pad: tuple[int, int, int, int], gain: float
) -> torch.Tensor:
    """Upsample by zero insertion, pad (px0, px1, py0, py1), then filter with the flipped 2-D
    filter scaled by `gain`. Only the non-negative padding the generator uses is supported."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, list(pad))
    k = (f * gain).to(x.dtype).flip([0, 1])
    k = k[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, k, groups=c)


def upsample2d(img: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    fw = f.shape[-1]
    return upfirdn2d(
        img, f, 2, ((fw + 1) // 2, (fw - 2) // 2, (fw + 1) // 2, (fw - 2) // 2), gain=4
    )


def conv_up2(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor, groups: int) -> torch.Tensor:
    """3×3 convolution at twice the resolution: a stride-2 transposed convolution, then the
    [1, 3, 3, 1] filter (conv2d_resample with up=2, padding 1, flip_weight False)."""
    out_ch, in_per_group, kh, kw = w.shape
    if groups == 1:
        w = w.transpose(0, 1)
    else:
        w = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_ch // groups, kh, kw)
    fw = f.shape[-1]
    p0 = 1 + (fw + 1) // 2 - (kw - 1)
    p1 = 1 + (fw - 2) // 2 - (kw - 2)
    x = F.conv_transpose2d(x, w, stride=2, groups=groups)
    return upfirdn2d(x, f, 1, (p0, p1, p0, p1), gain=4)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None,
    up: bool,
    padding: int,
    f: torch.Tensor | None,
    demodulate: bool,
    fused: bool,
) -> torch.Tensor:
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:  # keep fp16 in range, as the official code does
        weight = weight * (
            1 / math.sqrt(in_ch * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        )
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = dcoefs = None
    if demodulate or fused:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    if not fused:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        wt = weight.to(x.dtype)
        x = conv_up2(x, wt, f, 1) if up else F.conv2d(x, wt, padding=padding)
        if demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x
    if demodulate:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_ch, kh, kw).to(x.dtype)
    x = conv_up2(x, w, f, batch) if up else F.conv2d(x, w, padding=padding, groups=batch)
    x = x.reshape(batch, -1, *x.shape[2:])
    if noise is not None:
        x = x.add_(noise)  # in place: stays in x's dtype, as in the official code
    return x


# --- layers (parameter names as in the official networks) ----------------------------------------


class FullyConnectedLayer(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        lrelu: bool = False,
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.lrelu = lrelu
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        if not self.lrelu:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return lrelu_act(x.matmul(w.t()), b)


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, num_ws: int, num_layers: int, lr_multiplier: float):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, w_dim, num_ws, num_layers
        features = [z_dim] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(
                self,
                f"fc{i}",
                FullyConnectedLayer(
                    features[i], features[i + 1], lrelu=True, lr_multiplier=lr_multiplier
                ),
            )
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> torch.Tensor:
        x = z.to(torch.float32)
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: bool,
        conv_clamp: float | None,
        resample_filter: torch.Tensor,
    ):
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.register_buffer("resample_filter", resample_filter.clone())
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str,
        fused: bool,
        generator: list[torch.Generator] | None,
    ) -> torch.Tensor:
        styles = self.affine(w)
        noise = None
        if noise_mode == "random":
            noise = (
                random_noise(x.shape[0], self.resolution, x.device, generator) * self.noise_strength
            )
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise,
            self.up,
            1,
            self.resample_filter,
            demodulate=True,
            fused=fused,
        )
        return lrelu_act(x, self.bias.to(x.dtype), SQRT2, self.conv_clamp)


def random_noise(
    batch: int, resolution: int, device: torch.device, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """Per-image noise: from the global RNG like the official code, or from one generator per image
    (so each image's noise depends only on its own seed, whatever the batch)."""
    if generators is None:
        return torch.randn([batch, 1, resolution, resolution], device=device)
    return torch.stack(
        [torch.randn([1, resolution, resolution], generator=g, device=g.device) for g in generators]
    ).to(device)


class ToRGBLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(
            x, self.weight, styles, None, False, 0, None, demodulate=False, fused=fused
        )
        return linear_act(x, self.bias.to(x.dtype), self.conv_clamp)


class SynthesisBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        use_fp16: bool,
        conv_clamp: float | None,
        resample_filter: torch.Tensor,
    ):
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        self.register_buffer("resample_filter", resample_filter.clone())
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, w_dim, resolution, True, conv_clamp, resample_filter
            )
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, w_dim, resolution, False, conv_clamp, resample_filter
        )
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str,
        fused: bool | None,
        allow_fp16: bool,
        generator: list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w_iter = iter(ws.unbind(dim=1))
        dtype = torch.float16 if self.use_fp16 and allow_fp16 else torch.float32
        if fused is None:  # the official eval-mode choice
            fused = dtype == torch.float32 or ws.shape[0] == 1
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode, fused, generator)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), noise_mode, fused, generator)
            x = self.conv1(x, next(w_iter), noise_mode, fused, generator)
        if img is not None:
            img = upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter), fused).to(torch.float32)
        return x, (img + y if img is not None else y)


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        log2 = int(math.log2(cfg.img_resolution))
        if 2**log2 != cfg.img_resolution or log2 < 2:
            raise ValueError(
                f"img_resolution must be a power of two >= 4, got {cfg.img_resolution}"
            )
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        channels = {r: min(cfg.channel_base // r, cfg.channel_max) for r in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8)
        f = make_filter(cfg.resample_filter)
        self.num_ws = 0
        for r in self.block_resolutions:
            block = SynthesisBlock(
                channels[r // 2] if r > 4 else 0,
                channels[r],
                cfg.w_dim,
                r,
                cfg.img_channels,
                r >= fp16_resolution,
                cfg.conv_clamp,
                f,
            )
            self.num_ws += block.num_conv
            setattr(self, f"b{r}", block)
        self.num_ws += 1  # the last block's toRGB

    def forward(
        self,
        ws: torch.Tensor,
        noise_mode: str = "const",
        fused: bool | None = None,
        allow_fp16: bool = True,
        generator: list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        x = img = None
        w_idx = 0
        for r in self.block_resolutions:
            block = getattr(self, f"b{r}")
            x, img = block(
                x,
                img,
                ws.narrow(1, w_idx, block.num_conv + 1),
                noise_mode,
                fused,
                allow_fp16 and ws.device.type == "cuda",
                generator,
            )
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        if cfg.c_dim != 0:
            raise ValueError("conditional generators (c_dim > 0) are not supported")
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.synthesis = SynthesisNetwork(cfg)
        self.mapping = MappingNetwork(
            cfg.z_dim,
            cfg.w_dim,
            self.synthesis.num_ws,
            cfg.mapping_layers,
            cfg.mapping_lr_multiplier,
        )

    def forward(
        self,
        z: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "const",
        fused: bool | None = None,
        allow_fp16: bool = True,
        generator: list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """z [N, z_dim] → images [N, C, H, W], roughly in [-1, 1]."""
        ws = self.mapping(z, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, noise_mode, fused, allow_fp16, generator)


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    """z of each seed as the official generate.py draws it: RandomState(seed).randn(z_dim)."""
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds]))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in about [-1, 1] → [N, H, W, C] uint8, rounding as the official generate.py."""
    return (images.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
