"""Safe reading of zip and tar archives: members are read as data, never extracted by the archive
library, and any member that would escape the target (absolute path, `..`, a link, a device) makes
the whole archive refused."""
from __future__ import annotations

import tarfile
import zlib
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from unpaired.images import IMAGE_SUFFIXES
from unpaired.sources.base import SourceError


def _check(name: str, where: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise SourceError(f"{where}: refused: member {name!r} would escape the target folder")
    return path


def members(archive: Path, where: str) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(path, bytes) of every regular file in a zip or tar archive, after checking all members."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
                for info in infos:
                    _check(info.filename, where)
                    mode = info.external_attr >> 16
                    if (mode & 0o170000) == 0o120000:
                        raise SourceError(f"{where}: refused: member {info.filename!r} is a symbolic link")
                for info in infos:
                    if not info.is_dir():
                        yield _check(info.filename, where), z.read(info)
            return
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                infos = t.getmembers()
                for info in infos:
                    _check(info.name, where)
                    if not (info.isfile() or info.isdir()):
                        raise SourceError(f"{where}: refused: member {info.name!r} is a link or device")
                for info in infos:
                    if info.isfile():
                        f = t.extractfile(info)
                        yield _check(info.name, where), f.read() if f else b""
            return
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as err:
        raise SourceError(f"{where}: corrupt archive {archive.name} ({type(err).__name__}); delete it from "
                          f"the cache and re-run, or check the URL") from None
    raise SourceError(f"{where}: {archive.name} is not a readable zip or tar archive (corrupt, or not an "
                      f"archive at all); check the URL")


def images_under(archive: Path, folder: str, where: str) -> list[tuple[PurePosixPath, PurePosixPath, bytes]]:
    """(member path, path relative to `folder`, bytes) of every image under `folder` ("" = all) of
    an archive, sorted by member path; hidden files (.DS_Store ...) are not images."""
    prefix = PurePosixPath(folder.strip("/")) if folder.strip("/") else None
    found = []
    for member, data in members(archive, where):
        if prefix is not None and prefix not in member.parents:
            continue
        if member.suffix.lower() in IMAGE_SUFFIXES and not member.name.startswith("."):
            found.append((member, member.relative_to(prefix) if prefix else member, data))
    return sorted(found, key=lambda m: m[0].as_posix())
