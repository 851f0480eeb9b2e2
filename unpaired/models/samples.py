"""Sample grids: real | translated | reconstructed, for a fixed set of test images, both directions
(each model's rows: Model.sample_rows; CUT's: real | translated), and their PNG files, one per epoch
in out/samples/."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from unpaired.files import atomic_write_bytes, make_dirs
from unpaired.images import read_uint8, resize, to_float


def fixed_images(folder: Path, count: int, size: int) -> torch.Tensor:
    """The first `count` images of `folder` (sorted by name: stable across epochs and runs) as a
    float batch in [-1, 1], resized to `size`."""
    files = sorted(p for p in folder.glob("*.png"))[:count]
    if not files:
        return torch.empty(0, 3, size, size)
    imgs = [resize(read_uint8(f), size) for f in files]
    return to_float(torch.stack(imgs))


def grid(rows_a: torch.Tensor, rows_b: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """One uint8 image, one row per sample: A rows first, then B rows; `rows_a`, `rows_b`:
    N×K×C×H×W in [-1, 1], K images a row (CycleGAN: real A | fake B | rec A, then real B | fake A |
    rec B; CUT: real A | fake B, then real B | G(B)). Each image is clamped to [-1, 1] and mapped to
    [0, 1], laid out K a row with `padding` white pixels around each, as torchvision's
    make_grid(nrow=K, pad_value=1, normalize=True, value_range=(-1, 1)) does (same bytes; torchvision
    is not imported: it takes about a second)."""
    per_row = rows_a.shape[1]
    flat = torch.cat([rows_a, rows_b], 0).flatten(0, 1)  # (N*K)×C×H×W, row-major
    flat = flat.clamp(-1.0, 1.0).sub_(-1.0).div_(2.0)
    count, channels, height, width = flat.shape
    if count == 1:
        g = flat[0]
    else:
        rows = -(-count // per_row)
        h, w = height + padding, width + padding
        g = flat.new_full((channels, h * rows + padding, w * min(per_row, count) + padding), 1.0)
        for k, image in enumerate(flat):
            y, x = divmod(k, per_row)
            g[:, y * h + padding : (y + 1) * h, x * w + padding : (x + 1) * w].copy_(image)
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
