"""Sample grids: real | translated | reconstructed, for a fixed set of test images, both directions
(each model's rows: Model.sample_rows; CUT's: real | translated), and their PNG files, one per epoch
in out/samples/."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from unpaired.files import atomic_write_bytes, make_dirs
from unpaired.images import read_uint8, to_float


def fixed_images(folder: Path, count: int, size: int) -> torch.Tensor:
    """The first `count` images of `folder` (sorted by name: stable across epochs and runs) as a
    float batch in [-1, 1], resized to `size`."""
    files = sorted(p for p in folder.glob("*.png"))[:count]
    if not files:
        return torch.empty(0, 3, size, size)
    imgs = [TF.resize(read_uint8(f), [size, size], antialias=True) for f in files]
    return to_float(torch.stack(imgs))


def grid(rows_a: torch.Tensor, rows_b: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """One uint8 image, one row per sample: A rows first, then B rows; rows_a, rows_b N×K×3×H×W
    in [-1, 1], K images a row (CycleGAN: real A | fake B | rec A, then real B | fake A | rec B;
    CUT: real A | fake B, then real B | G(B))."""
    rows = torch.cat([rows_a, rows_b], 0)
    flat = rows.flatten(0, 1)  # (N*K)×3×H×W, row-major
    g = make_grid(
        flat,
        nrow=rows.shape[1],
        padding=padding,
        pad_value=1.0,
        normalize=True,
        value_range=(-1, 1),
    )
    return g.mul(255).round().clamp(0, 255).to(torch.uint8)


def sample_path(out: Path, epoch: int) -> Path:
    """Where epoch `epoch`'s sample grid lives: out/samples/epoch_NNN.png (uint8 RGB)."""
    return out / "samples" / f"epoch_{epoch:03d}.png"


def write_sample(out: Path, epoch: int, sample: torch.Tensor) -> None:
    """Write a 3×H×W uint8 grid as a PNG (atomically; the bytes depend on the pixels only)."""
    buf = io.BytesIO()
    Image.fromarray(sample.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    path = sample_path(out, epoch)
    make_dirs(path.parent)
    atomic_write_bytes(path, buf.getvalue())


def drop_samples_after(out: Path, epoch: int) -> None:
    """Remove sample grids of epochs past `epoch` (an interrupted run wrote them before its last.pt)."""
    for f in sorted((out / "samples").glob("epoch_*.png")):
        if f.stem[6:].isdigit() and int(f.stem[6:]) > epoch:
            f.unlink()
