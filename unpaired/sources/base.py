"""What every source gets and returns.

A source is one function `fetch(raw, ctx) -> rows`: `raw` is the domain's mapping from params.yaml
without its `source` key (the function parses it into its own params dataclass, with `ctx.key` as
the prefix for error messages), `ctx` says where to write. It writes image files directly into
`ctx.out_dir` and returns one manifest row per file (see MANIFEST_COLUMNS).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unpaired.errors import UserError

MANIFEST_COLUMNS = ["file", "source", "origin", "licence"]


@dataclass(frozen=True)
class FetchContext:
    domain: str        # the domain's name in params.yaml (a, b, ...)
    key: str           # its params key, e.g. "domains.a", for error messages
    out_dir: Path      # empty directory to write images into (renamed into data/raw/<domain> after)
    cache_dir: Path    # download cache shared by all domains, survives re-runs (data/cache);
                       # sources name what they keep there by URL / dataset / keyword
    workers: int       # processes to use


class SourceError(UserError):
    """A source failed for a reason outside params (network, credentials, bad file). One line."""


def item_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The random stream of item `index`: depends only on (seed, domain, index), so raising `count`
    leaves earlier items unchanged and items can be drawn in any order on any number of processes."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), index])
