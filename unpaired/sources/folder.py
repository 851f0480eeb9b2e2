"""`folder` source: your own images, copied from a local folder (`pattern` is a recursive glob).

DVC does not watch that folder: after adding images to it, run `uv run dvc repro -f fetch@<domain>`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unpaired.images import IMAGE_SUFFIXES
from unpaired.params import COUNT, Params, check, parse
from unpaired.sources.base import FetchContext, SourceError, flat_name


@dataclass(frozen=True)
class FolderParams(Params):
    path: str = ""                # required: a folder of your images (~ is expanded)
    pattern: str = "**/*"         # glob under path; ** matches any depth
    count: int | None = None      # at most this many files (sorted by path); all by default
    licence: str = ""             # recorded in the manifest

    BOUNDS = {"count": COUNT}

    def validate(self, prefix: str) -> None:
        check(bool(self.path), f"{prefix}.path", "required: the folder holding your images")
        check(self.count is None or self.count > 0, f"{prefix}.count", f"must be > 0, got {self.count}")


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    p = parse(FolderParams, raw, ctx.key)
    root = Path(p.path).expanduser()
    if not root.is_dir():
        raise SourceError(f"{ctx.key}.path: {root} is not a folder")
    files = sorted(f for f in root.glob(p.pattern)
                   if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
    if not files:
        raise SourceError(f"{ctx.key}.pattern: no image files match {p.pattern!r} under {root}")
    rows = []
    for f in files[:p.count]:
        name = flat_name(f.relative_to(root))
        shutil.copyfile(f, ctx.out_dir / name)
        rows.append({"file": name, "source": "folder", "origin": str(f.resolve()), "licence": p.licence})
    return rows
