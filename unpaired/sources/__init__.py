"""The data sources a domain can use: `source:` in params.yaml names one of SOURCES."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unpaired.params import fail
from unpaired.sources import archive, doodles, flares, folder, kaggle, quickdraw, stylegan, web
from unpaired.sources.base import FetchContext

Source = Callable[[dict[str, Any], FetchContext], list[dict[str, Any]]]

SOURCES: dict[str, Source] = {
    "doodles": doodles.fetch,
    "flares": flares.fetch,
    "archive": archive.fetch,
    "folder": folder.fetch,
    "kaggle": kaggle.fetch,
    "quickdraw": quickdraw.fetch,
    "stylegan": stylegan.fetch,
    "web": web.fetch,
}


def get(name: Any, key: str) -> Source:
    if name not in SOURCES:
        fail(key, f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]
