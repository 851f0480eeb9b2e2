"""What every source gets and returns.

A source is one function `fetch(raw, ctx) -> rows`: `raw` is the domain's mapping from params.yaml
without its `source` key (the function parses it into its own params dataclass, with `ctx.key` as
the prefix for error messages), `ctx` says where to write. It writes image files directly into
`ctx.out_dir` and returns one manifest row per file (see MANIFEST_COLUMNS).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from unpaired.errors import SourceError
from unpaired.parallel import pmap

MANIFEST_COLUMNS = ["file", "source", "origin", "licence"]


@dataclass(frozen=True)
class FetchContext:
    domain: str  # the domain's name in params.yaml (a, b, ...)
    key: str  # its params key, e.g. "domains.a", for error messages
    out_dir: Path  # empty directory to write images into (renamed into data/raw/<domain> after)
    cache_dir: Path  # download cache shared by all domains, survives re-runs (data/cache);
    # sources name what they keep there by URL / dataset / keyword
    workers: int  # processes to use


__all__ = [
    "MANIFEST_COLUMNS",
    "FetchContext",
    "SourceError",
    "item_rng",
    "flat_name",
    "fetch_drawn",
]


def item_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The random stream of item `index`: depends only on (seed, domain, index), so raising `count`
    leaves earlier items unchanged and items can be drawn in any order on any number of processes."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), index])


def _escape_part(part: str) -> str:
    """`%` → `%25`, and every `_` that touches another `_` or an end of the part → `%5F`: the result
    never contains `__` and never starts or ends with `_`."""
    part = part.replace("%", "%25")
    return re.sub(r"(?<![^_])_|_(?![^_])", "%5F", part)


def flat_name(rel: PurePath) -> str:
    """A file name for `rel` (a path relative to the source's folder) in the flat raw folder: its
    parts joined by `__`, each escaped by `_escape_part`. Two different paths always give two
    different names (`sub/x.png` → `sub__x.png`, `sub__x.png` → `sub%5F%5Fx.png`): inside a part
    underscores come alone and never at its ends, so every `__` is a separator and escaping is
    undone by splitting there and un-percenting. Ordinary names (`n02381460_1001.jpg`,
    `trainA/1.jpg` → `trainA__1.jpg`) are unchanged."""
    return "__".join(_escape_part(part) for part in rel.parts)


class Procedural(Protocol):
    """What a procedural source's params have in common."""

    count: int  # images to draw
    seed: int  # with the domain and the index, the one input of an image's random stream


P = TypeVar("P", bound=Procedural)


def _write_drawn(
    job: tuple[Callable[[Any, str, int], Image.Image], Any, str, int, Path, str, str],
) -> dict[str, Any]:
    draw, p, domain, index, out_dir, source, stem = job
    name = f"{stem}_{index:06d}.png"
    draw(p, domain, index).save(out_dir / name, optimize=False)
    return {
        "file": name,
        "source": source,
        "origin": f"seed={p.seed} domain={domain} index={index}",
        "licence": "generated",
    }


def fetch_drawn(
    draw: Callable[[P, str, int], Image.Image], p: P, ctx: FetchContext, source: str, stem: str
) -> list[dict[str, Any]]:
    """Draw images 0 .. p.count-1 with `draw(p, domain, index)` (a module-level function: it runs in
    worker processes) into ctx.out_dir as `<stem>_<index:06d>.png` (PNG, not optimised, so the bytes
    depend only on the pixels); returns their manifest rows (`licence: generated`)."""
    jobs = [(draw, p, ctx.domain, i, ctx.out_dir, source, stem) for i in range(p.count)]
    return pmap(_write_drawn, jobs, workers=ctx.workers, desc=f"{source} {ctx.domain}")
