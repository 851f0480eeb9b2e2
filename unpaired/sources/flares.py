"""Procedural festive art: random ellipses, polygons, stars, arcs, blobs and gradient discs in a
palette (red, gold and green by default) over a solid or gradient background, with random outlines.

Drawn at 2× the output size and downscaled with a Lanczos filter for smooth edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from unpaired.params import COUNT, IMAGE_SIZE, SEED, Bound, Params, check, fail, parse
from unpaired.sources.base import FetchContext, fetch_drawn, item_rng

SUPERSAMPLE = 2
FESTIVE = (
    "#b3001b",
    "#e63946",
    "#7a0010",
    "#f4c430",
    "#d4af37",
    "#ffdf6b",
    "#1b7f3b",
    "#0b4f24",
    "#57a773",
    "#fdf6e3",
)
SHAPES = ("ellipse", "polygon", "star", "arc", "blob", "gradient")


@dataclass(frozen=True)
class FlareParams(Params):
    count: int = 200  # number of images
    image_size: int = 64  # width = height in pixels
    #: min, max shapes per image: ellipses, polygons, stars, arcs, blobs, gradient discs
    shapes: tuple[int, int] = (4, 12)
    #: colours as CSS names or #rrggbb, at least two (default: festive reds, golds, greens)
    palette: tuple[str, ...] = FESTIVE
    seed: int = 0  # image i depends only on (seed, domain, i)

    BOUNDS = {
        "count": COUNT,
        "image_size": IMAGE_SIZE,
        "seed": SEED,
        "shapes": Bound(1_000, "shapes per image; each is drawn at 2× the size"),
    }

    def validate(self, prefix: str) -> None:
        check(self.count > 0, f"{prefix}.count", f"must be > 0, got {self.count}")
        check(
            self.image_size >= 8,
            f"{prefix}.image_size",
            f"must be >= 8 pixels, got {self.image_size}",
        )
        lo, hi = self.shapes
        check(
            1 <= lo <= hi,
            f"{prefix}.shapes",
            f"must be [min, max] with 1 <= min <= max, got {list(self.shapes)}",
        )
        check(len(self.palette) >= 2, f"{prefix}.palette", "needs at least 2 colours")
        for i, colour in enumerate(self.palette):
            try:
                ImageColor.getrgb(colour)
            except ValueError:
                fail(
                    f"{prefix}.palette[{i}]",
                    f"not a colour: {colour!r} (use a CSS name or #rrggbb)",
                )


def _pick(rng: np.random.Generator, palette: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    return palette[int(rng.integers(len(palette)))]


def _gradient(size: int, c0, c1, rng: np.random.Generator, radial: bool) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if radial:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / 0.75, 0, 1)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) + 0.5
        t = np.clip(t, 0, 1)
    rgb = (1 - t)[..., None] * np.array(c0, np.float32) + t[..., None] * np.array(c1, np.float32)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def _star(rng, cx, cy, r) -> list[tuple[float, float]]:
    points = int(rng.integers(5, 9))
    inner = r * rng.uniform(0.35, 0.6)
    rot = rng.uniform(0, 2 * np.pi)
    angles = rot + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, inner)
    return list(zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist()))


def _blob(rng, cx, cy, r) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    radius = np.full(64, r)
    for k in range(1, 4):  # a few random harmonics make an organic outline
        radius += r * rng.uniform(0, 0.25) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    return list(
        zip((cx + radius * np.cos(angles)).tolist(), (cy + radius * np.sin(angles)).tolist())
    )


def render(p: FlareParams, domain: str, index: int) -> Image.Image:
    rng = item_rng(p.seed, domain, index)
    palette = [ImageColor.getrgb(c)[:3] for c in p.palette]
    big = p.image_size * SUPERSAMPLE
    if rng.random() < 0.5:
        canvas = Image.new("RGB", (big, big), _pick(rng, palette))
    else:
        canvas = _gradient(
            big, _pick(rng, palette), _pick(rng, palette), rng, radial=bool(rng.random() < 0.5)
        )
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(p.shapes[0], p.shapes[1] + 1))):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        cx, cy = rng.uniform(0, big, 2)
        r = big * rng.uniform(0.06, 0.3)
        fill = _pick(rng, palette)
        outline = _pick(rng, palette) if rng.random() < 0.6 else None
        width = int(rng.integers(1, 4)) * SUPERSAMPLE
        box = [cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r * rng.uniform(0.5, 1.0)]
        if kind == "ellipse":
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif kind == "polygon":
            n = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            draw.polygon(
                list(zip((cx + r * np.cos(angles)).tolist(), (cy + r * np.sin(angles)).tolist())),
                fill=fill,
                outline=outline,
                width=width,
            )
        elif kind == "star":
            draw.polygon(_star(rng, cx, cy, r), fill=fill, outline=outline, width=width)
        elif kind == "arc":
            start = float(rng.uniform(0, 360))
            draw.arc(box, start, start + float(rng.uniform(60, 300)), fill=fill, width=width * 2)
        elif kind == "blob":
            draw.polygon(_blob(rng, cx, cy, r), fill=fill, outline=outline, width=width)
        else:  # a disc filled with a radial gradient between two palette colours
            size = max(2, int(2 * r))
            disc = _gradient(size, fill, _pick(rng, palette), rng, radial=True)
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).ellipse([0, 0, size - 1, size - 1], fill=255)
            canvas.paste(disc, (int(cx - r), int(cy - r)), mask)
    return canvas.resize((p.image_size, p.image_size), Image.Resampling.LANCZOS)


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    return fetch_drawn(render, parse(FlareParams, raw, ctx.key), ctx, "flares", "flare")
