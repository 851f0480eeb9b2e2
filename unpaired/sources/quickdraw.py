"""`quickdraw` source: Quick, Draw! drawings of one category (Google, CC BY 4.0), rendered here.

The category's binary file (`<base_url><category>.bin`, the documented packed record layout) is
downloaded with our downloader (status, length, retries, atomic, cached) and checked to parse
completely before the `quickdraw` package reads it: the package itself writes whatever a server
returns into its cache without looking at the status code, so an HTML error page would be cached as
drawings. The package then loads the drawings; we render the strokes ourselves at the requested size,
antialiased (drawn at 4× and downscaled), centred with a margin.
"""

from __future__ import annotations

import difflib
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from unpaired.params import COUNT, IMAGE_SIZE, SEED, Bound, Params, check, fail, parse
from unpaired.sources.base import FetchContext, SourceError
from unpaired.sources.download import download

BASE_URL = "https://storage.googleapis.com/quickdraw_dataset/full/binary/"
SUPERSAMPLE = 4


@dataclass(frozen=True)
class QuickDrawParams(Params):
    #: required: a Quick, Draw! category (dragon, cow, ...), checked against the quickdraw package's
    #: list
    category: str = ""
    count: int = 200  # drawings to render
    recognized: bool = True  # only drawings the game's classifier recognised (false: all)
    base_url: str = BASE_URL  # where <category>.bin is fetched from (Google's public files)
    image_size: int = 64  # width = height in pixels (antialiased, centred)
    stroke_width: float = 2.0  # output pixels
    margin: float = 0.1  # share of the size left free around the drawing
    seed: int = 0  # which drawings: the `count` first in an order drawn from the seed

    BOUNDS = {
        "count": COUNT,
        "image_size": IMAGE_SIZE,
        "seed": SEED,
        "stroke_width": Bound(1_024, "pixels; at most image_size / 4"),
        "margin": Bound(0.5, "a share of the side on each edge", 0, below=True),
    }

    def validate(self, prefix: str) -> None:
        from quickdraw.names import QUICK_DRAWING_NAMES

        if self.category not in QUICK_DRAWING_NAMES:
            close = difflib.get_close_matches(self.category, QUICK_DRAWING_NAMES, n=3)
            fail(
                f"{prefix}.category",
                f"unknown Quick, Draw! category {self.category!r}"
                + (
                    f"; did you mean {', '.join(close)}?"
                    if close
                    else f"; see the {len(QUICK_DRAWING_NAMES)} names in quickdraw.names"
                ),
            )
        check(self.count > 0, f"{prefix}.count", f"must be > 0, got {self.count}")
        check(self.image_size >= 8, f"{prefix}.image_size", f"must be >= 8, got {self.image_size}")
        check(
            0 < self.stroke_width <= self.image_size / 4,
            f"{prefix}.stroke_width",
            "must be in (0, image_size/4]",
        )
        check(0 <= self.margin < 0.5, f"{prefix}.margin", "must be in [0, 0.5)")
        check(
            self.base_url.startswith(("http://", "https://")),
            f"{prefix}.base_url",
            "must be an http(s) URL",
        )


def check_binary(path: Path) -> int:
    """Number of records if `path` is a complete Quick, Draw! binary file; raises ValueError."""
    data = path.read_bytes()
    pos, records = 0, 0
    while pos < len(data):
        if pos + 17 > len(data):
            raise ValueError(f"record {records} header cut short")
        (n_strokes,) = struct.unpack_from("<H", data, pos + 15)
        pos += 17
        for _ in range(n_strokes):
            if pos + 2 > len(data):
                raise ValueError(f"record {records} cut short")
            (n_points,) = struct.unpack_from("<H", data, pos)
            pos += 2 + 2 * n_points
        if pos > len(data):
            raise ValueError(f"record {records} cut short")
        records += 1
    if records == 0:
        raise ValueError("empty file")
    return records


def render(
    strokes: list[tuple[tuple[int, ...], tuple[int, ...]]], p: QuickDrawParams
) -> Image.Image:
    big = p.image_size * SUPERSAMPLE
    xs = np.concatenate([np.asarray(s[0], float) for s in strokes])
    ys = np.concatenate([np.asarray(s[1], float) for s in strokes])
    x0, y0 = xs.min(), ys.min()
    extent = max(xs.max() - x0, ys.max() - y0, 1.0)
    scale = big * (1 - 2 * p.margin) / extent
    ox = (big - (xs.max() - x0) * scale) / 2
    oy = (big - (ys.max() - y0) * scale) / 2
    canvas = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(p.stroke_width * SUPERSAMPLE))
    for sx, sy in strokes:
        pts = [(ox + (x - x0) * scale, oy + (y - y0) * scale) for x, y in zip(sx, sy)]
        if len(pts) == 1:
            pts = pts * 2
        draw.line(pts, fill=0, width=width, joint="curve")
    return canvas.resize((p.image_size, p.image_size), Image.Resampling.LANCZOS)


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    from quickdraw import QuickDrawDataGroup
    from quickdraw.names import QUICK_DRAWING_FILES

    p = parse(QuickDrawParams, raw, ctx.key)
    filename = QUICK_DRAWING_FILES[p.category]
    url = p.base_url.rstrip("/") + "/" + filename
    cache = ctx.cache_dir / "quickdraw"
    path = download(url, cache / filename, key=f"{ctx.key}.base_url")
    try:
        check_binary(path)
    except ValueError as err:
        path.unlink()
        raise SourceError(
            f"{ctx.key}.base_url: {url} is not a Quick, Draw! binary file ({err}); check base_url"
        ) from None
    # The file is in the package's cache under its own name, so the package reads it, never downloads.
    group = QuickDrawDataGroup(
        p.category,
        recognized=p.recognized or None,
        max_drawings=None,
        print_messages=False,
        cache_dir=str(cache),
    )
    drawings = sorted(
        group.drawings, key=lambda d: hashlib.sha256(f"{p.seed}:{d.key_id}".encode()).digest()
    )
    if len(drawings) < p.count:
        raise SourceError(
            f"{ctx.key}.count: only {len(drawings)} {'recognized ' if p.recognized else ''}"
            f"{p.category} drawings in {filename}; lower count"
        )
    rows = []
    for d in drawings[: p.count]:
        name = f"{p.category.replace(' ', '_')}_{d.key_id}.png"
        render(d.image_data, p).save(ctx.out_dir / name, optimize=False)
        rows.append(
            {
                "file": name,
                "source": "quickdraw",
                "origin": f"{url}#key_id={d.key_id}",
                "licence": "CC BY 4.0 (Google Quick, Draw!)",
            }
        )
    return rows
