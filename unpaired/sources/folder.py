"""`folder` source: your own images, copied from a local folder (`pattern` is a recursive glob).

DVC does not watch that folder: after adding images to it, run `uv run dvc repro -f fetch@<domain>`.

Every file the pattern matches is used or counted: files with an image suffix (images.IMAGE_SUFFIXES,
any case) and files with no suffix at all (prepare reads what they hold: an image is used, anything
else is skipped there as `not_image`) are copied; hidden files (a name, or a folder on the way,
starting with ".": `.DS_Store`, macOS `._photo.jpg`, `.git/`) and files with another suffix
(`notes.txt`) are not. Those are counted by reason in one line, named (the first few), and listed in
the raw folder's SKIPPED file (`file`: the path under `path`, `reason`: hidden or not_image_name),
which prepare counts in metrics/prepare.json (`skipped`).
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unpaired.files import SOURCE_SKIP_REASONS, SOURCE_SKIPPED, write_manifest
from unpaired.images import IMAGE_SUFFIXES
from unpaired.params import COUNT, Params, check, parse
from unpaired.sources.base import FetchContext, SourceError, flat_name

SKIPPED = SOURCE_SKIPPED  # in the raw folder, next to manifest.csv; prepare counts it
# reason -> words
SKIP_REASONS = dict(zip(SOURCE_SKIP_REASONS, ("hidden", "not an image file name"), strict=True))


@dataclass(frozen=True)
class FolderParams(Params):
    path: str = ""  # required: a folder of your images (~ is expanded)
    pattern: str = "**/*"  # glob under path; ** matches any depth
    count: int | None = None  # at most this many files (sorted by path); all by default
    licence: str = ""  # recorded in the manifest

    BOUNDS = {"count": COUNT}

    def validate(self, prefix: str) -> None:
        check(bool(self.path), f"{prefix}.path", "required: the folder holding your images")
        check(
            self.count is None or self.count > 0,
            f"{prefix}.count",
            f"must be > 0, got {self.count}",
        )


def skip_reason(rel: Path) -> str | None:
    """Why the file at `rel` (relative to the source folder) is not copied, a key of SKIP_REASONS,
    or None when it is: hidden (any part starts with "."), or a suffix that is not an image's."""
    if any(part.startswith(".") for part in rel.parts):
        return "hidden"
    if rel.suffix and rel.suffix.lower() not in IMAGE_SUFFIXES:
        return "not_image_name"
    return None


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    p = parse(FolderParams, raw, ctx.key)
    root = Path(p.path).expanduser()
    if not root.is_dir():
        raise SourceError(f"{ctx.key}.path: {root} is not a folder")
    files, skipped = [], []
    for f in sorted(root.glob(p.pattern)):
        if f.is_file():
            rel = f.relative_to(root)
            reason = skip_reason(rel)
            if reason is None:
                files.append(f)
            else:
                skipped.append({"file": rel.as_posix(), "reason": reason})
    if skipped:
        counts = Counter(s["reason"] for s in skipped)
        parts = []
        for reason, words in SKIP_REASONS.items():
            names = [s["file"] for s in skipped if s["reason"] == reason]
            if names:
                parts.append(
                    f"{counts[reason]} {words} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                )
        print(
            f"{ctx.key}: folder: skipped {len(skipped)} of {len(skipped) + len(files)} files under "
            f"{root}: {'; '.join(parts)}; listed in the raw folder's {SKIPPED}"
        )
        write_manifest(ctx.out_dir / SKIPPED, skipped, ["file", "reason"])
    if not files:
        raise SourceError(
            f"{ctx.key}.pattern: no image files match {p.pattern!r} under {root}"
            + (f" (skipped {len(skipped)}: hidden or not named as images)" if skipped else "")
        )
    rows = []
    for f in files[: p.count]:
        name = flat_name(f.relative_to(root))
        shutil.copyfile(f, ctx.out_dir / name)
        rows.append(
            {"file": name, "source": "folder", "origin": str(f.resolve()), "licence": p.licence}
        )
    return rows
