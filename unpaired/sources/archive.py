"""`archive` source: the images in one folder of a zip or tar, at a URL or a local path — e.g. the
CycleGAN benchmark sets (`https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/<name>.zip`, member
`<name>/trainA`). A URL is downloaded once into the domain's cache; members are checked before any
is used (see unpaired/safe_archive.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unpaired.params import COUNT, TIMEOUT, Params, check, parse
from unpaired.safe_archive import images_under
from unpaired.sources.base import FetchContext, SourceError, flat_name
from unpaired.sources.download import is_archive, locate

CYCLEGAN_DATASETS = "https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{name}.zip"


@dataclass(frozen=True)
class ArchiveParams(Params):
    url: str = ""  # http(s) URL or local path of a .zip / .tar(.gz)
    member: str = ""  # folder inside the archive, e.g. horse2zebra/trainA ("" = all)
    sha256: str | None = None  # optional checksum of the archive
    count: int | None = None  # at most this many images (sorted by name); all by default
    licence: str = ""  # recorded in the manifest
    timeout: float = 60.0  # seconds without data before a download attempt is abandoned

    BOUNDS = {"count": COUNT, "timeout": TIMEOUT}

    def validate(self, prefix: str) -> None:
        check(
            bool(self.url),
            f"{prefix}.url",
            "required: a URL or a local path of a zip or tar archive",
        )
        check(
            self.count is None or self.count > 0,
            f"{prefix}.count",
            f"must be > 0, got {self.count}",
        )
        check(
            self.sha256 is None
            or (len(self.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in self.sha256)),
            f"{prefix}.sha256",
            "must be 64 hex digits",
        )


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    p = parse(ArchiveParams, raw, ctx.key)
    path = locate(
        p.url,
        ctx.cache_dir,
        key=f"{ctx.key}.url",
        sha256=p.sha256,
        timeout=p.timeout,
        missing="is not a file; give a URL or an existing archive path",
        check=is_archive,
    )
    selected = images_under(path, p.member, f"{ctx.key}.url")
    if not selected:
        raise SourceError(
            f"{ctx.key}.member: no images under {p.member or 'the archive root'!r} in "
            f"{path.name}; check the folder name inside the archive"
        )
    rows = []
    for member, rel, data in selected[: p.count]:
        name = flat_name(rel)
        (ctx.out_dir / name).write_bytes(data)
        rows.append(
            {
                "file": name,
                "source": "archive",
                "origin": f"{p.url}#{member.as_posix()}",
                "licence": p.licence,
            }
        )
    return rows
