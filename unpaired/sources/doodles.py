"""Procedural sketches in the Quick, Draw! style: a few black pen strokes on white.

Each stroke is either a smoothed random walk (a pen that turns a little at every step) or a cubic
Bézier curve. Strokes are drawn at 4× the output size and downscaled with a Lanczos filter, which
gives the antialiased look of a rendered sketch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from unpaired.params import COUNT, IMAGE_SIZE, SEED, Bound, Params, check, parse
from unpaired.sources.base import FetchContext, fetch_drawn, item_rng

SUPERSAMPLE = 4


@dataclass(frozen=True)
class DoodleParams(Params):
    count: int = 200  # number of images
    image_size: int = 64  # width = height in pixels
    #: min, max pen strokes per image (smoothed random walks or Bézier curves)
    strokes: tuple[int, int] = (2, 5)
    #: pen width in output pixels (drawn at 4× and downscaled; at most image_size / 4)
    stroke_width: float = 2.0
    seed: int = 0  # image i depends only on (seed, domain, i)

    BOUNDS = {
        "count": COUNT,
        "image_size": IMAGE_SIZE,
        "seed": SEED,
        "strokes": Bound(1_000, "strokes per image; each is drawn at 4× the size"),
        "stroke_width": Bound(1_024, "pixels; at most image_size / 4"),
    }

    def validate(self, prefix: str) -> None:
        check(self.count > 0, f"{prefix}.count", f"must be > 0, got {self.count}")
        check(
            self.image_size >= 8,
            f"{prefix}.image_size",
            f"must be >= 8 pixels, got {self.image_size}",
        )
        lo, hi = self.strokes
        check(
            1 <= lo <= hi,
            f"{prefix}.strokes",
            f"must be [min, max] with 1 <= min <= max, got {list(self.strokes)}",
        )
        check(
            0 < self.stroke_width <= self.image_size / 4,
            f"{prefix}.stroke_width",
            f"must be in (0, image_size/4], got {self.stroke_width}",
        )


def _walk(rng: np.random.Generator, big: int) -> np.ndarray:
    steps = int(rng.integers(20, 60))
    heading = rng.uniform(0, 2 * np.pi)
    turn = np.cumsum(rng.normal(0, 0.25, steps))  # smooth: turning rate is itself a walk
    headings = heading + np.cumsum(turn * 0.1)
    step = big * rng.uniform(0.01, 0.03)
    start = rng.uniform(0.25, 0.75, 2) * big
    path = start + np.cumsum(np.stack([np.cos(headings), np.sin(headings)], 1) * step, 0)
    return np.vstack([start, path])


def _bezier(rng: np.random.Generator, big: int) -> np.ndarray:
    ctrl = rng.uniform(0.12, 0.88, (4, 2)) * big
    t = np.linspace(0, 1, 48)[:, None]
    return (
        (1 - t) ** 3 * ctrl[0]
        + 3 * (1 - t) ** 2 * t * ctrl[1]
        + 3 * (1 - t) * t**2 * ctrl[2]
        + t**3 * ctrl[3]
    )


def render(p: DoodleParams, domain: str, index: int) -> Image.Image:
    rng = item_rng(p.seed, domain, index)
    big = p.image_size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(p.stroke_width * SUPERSAMPLE))
    for _ in range(int(rng.integers(p.strokes[0], p.strokes[1] + 1))):
        points = _walk(rng, big) if rng.random() < 0.5 else _bezier(rng, big)
        points = np.clip(points, width, big - 1 - width)
        draw.line(
            [tuple(pt) for pt in points.round(1).tolist()], fill=0, width=width, joint="curve"
        )
    return canvas.resize((p.image_size, p.image_size), Image.Resampling.LANCZOS)


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    return fetch_drawn(render, parse(DoodleParams, raw, ctx.key), ctx, "doodles", "doodle")
