"""Sample grids: real | translated | reconstructed, for a fixed set of test images, both directions."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from unpaired.images import read_uint8, to_float
from torchvision.utils import make_grid


def fixed_images(folder: Path, count: int, size: int) -> torch.Tensor:
    """The first `count` images of `folder` (sorted by name: stable across epochs and runs) as a
    float batch in [-1, 1], resized to `size`."""
    files = sorted(p for p in folder.glob("*.png"))[:count]
    if not files:
        return torch.empty(0, 3, size, size)
    imgs = [TF.resize(read_uint8(f), [size, size], antialias=True) for f in files]
    return to_float(torch.stack(imgs))


@torch.no_grad()
def triplets(G_A: torch.nn.Module, G_B: torch.nn.Module, real_A: torch.Tensor, real_B: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(real A, fake B, rec A) and (real B, fake A, rec B) stacked per sample: N×3×3×H×W each, in [-1, 1]."""
    fake_B = G_A(real_A)
    fake_A = G_B(real_B)
    return (torch.stack([real_A, fake_B, G_B(fake_B)], 1).float().cpu(),
            torch.stack([real_B, fake_A, G_A(fake_A)], 1).float().cpu())


def grid(rows_a: torch.Tensor, rows_b: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """One uint8 image, one row per sample: A rows first (real A | fake B | rec A), then B rows
    (real B | fake A | rec B)."""
    rows = torch.cat([rows_a, rows_b], 0)
    flat = rows.flatten(0, 1)                            # (N*3)×3×H×W, row-major
    g = make_grid(flat, nrow=3, padding=padding, pad_value=1.0, normalize=True, value_range=(-1, 1))
    return g.mul(255).round().clamp(0, 255).to(torch.uint8)
