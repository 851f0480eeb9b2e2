"""Safe reading of zip and tar archives: members are read as data, never extracted by the archive
library, and any member that would escape the target (absolute path, `..`, a link, a device) makes
the whole archive refused. Archives are read to their real end: a tar whose listing stops early (a
damaged header in the middle, which Python's tarfile takes for the end) is refused as corrupt.

Used by the sources (archive, kaggle) and by files.unpack_view (data/prepared.tar)."""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from unpaired.errors import SourceError
from unpaired.images import IMAGE_SUFFIXES


class ArchiveError(SourceError):
    """An archive refused (a member would escape, a link or device) or unreadable. One line."""


class CorruptArchive(ArchiveError):
    """The archive is damaged; `detail` says how (without the advice of the message)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def _read_to_end(t: tarfile.TarFile) -> None:
    """Raise tarfile.ReadError unless everything after the last member tarfile listed is the zero
    padding that ends a tar. tarfile stops silently at a header it cannot parse (its checksum fails)
    after the first one, so a damaged header in the middle would otherwise drop every later member.
    Reading a compressed stream to its end also checks its trailing CRC."""
    t.fileobj.seek(t.offset)
    position = t.offset
    while block := t.fileobj.read(1 << 20):
        rest = block.lstrip(b"\0")
        if rest:
            raise tarfile.ReadError(
                f"a damaged header at byte {position + len(block) - len(rest)} of the "
                f"tar stream: the members after it cannot be read"
            )
        position += len(block)


def _check(name: str, where: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"{where}: refused: member {name!r} would escape the target folder")
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
                        raise ArchiveError(
                            f"{where}: refused: member {info.filename!r} is a symbolic link"
                        )
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
                        raise ArchiveError(
                            f"{where}: refused: member {info.name!r} is a link or device"
                        )
                _read_to_end(t)
                for info in infos:
                    if info.isfile():
                        f = t.extractfile(info)
                        yield _check(info.name, where), f.read() if f else b""
            return
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as err:
        detail = (
            f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
        )
        raise CorruptArchive(
            f"{where}: corrupt archive {archive.name} ({detail}); delete it from "
            f"the cache and re-run, or check the URL",
            detail,
        ) from None
    raise ArchiveError(
        f"{where}: {archive.name} is not a readable zip or tar archive (corrupt, or not an "
        f"archive at all); check the URL"
    )


def images_under(
    archive: Path, folder: str, where: str
) -> list[tuple[PurePosixPath, PurePosixPath, bytes]]:
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
