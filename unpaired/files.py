"""Atomic outputs: every stage writes into a temporary sibling and renames it into place, so an
interrupted or failed run never leaves a partial output behind."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target`; on success it replaces `target`
    (rename, so readers see the old or the new tree, never a mix); on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_manifest(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A CSV with a fixed column order, sorted by the first column, byte-stable across runs."""
    frame = pd.DataFrame(rows, columns=columns)
    if len(frame):
        frame = frame.sort_values(columns[0], kind="stable")
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode())


# --- packed outputs: one tar for DVC and its remote, a browsable folder for people --------------
# A DVC directory output of thousands of small images costs one remote object (and one request)
# per file: pushing/pulling 5,000 prepared images took 4-6x as long as one tar of them
# (benchmarks/remote.py). So prepare's DVC output is data/prepared.tar, and data/prepared/ is a
# view of it: written by prepare, rebuilt from the tar whenever it is missing or out of date
# (train, evaluate and `unpaired unpack` call unpack_view), never tracked itself.

VIEW_MARK = ".packed-from"   # inside the view: the sha256 of the tar it was unpacked from


def pack_dir(folder: str | Path, tar_path: str | Path) -> str:
    """Write every file under `folder` (sorted, relative names, no owner or time: the same files
    give the same bytes) into an uncompressed tar, atomically; mark `folder` as its view. Returns
    the tar's sha256. PNGs do not compress further, and an uncompressed tar extracts fastest."""
    folder, tar_path = Path(folder), Path(tar_path)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{tar_path.name}.tmp-", dir=tar_path.parent)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(p for p in folder.rglob("*") if p.name != VIEW_MARK):
                info = tarfile.TarInfo(path.relative_to(folder).as_posix())
                info.mtime = 0
                if path.is_dir():    # kept, so that an empty split folder survives the round trip
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    continue
                info.size, info.mode = path.stat().st_size, 0o644
                with open(path, "rb") as data:
                    tar.addfile(info, data)
        os.replace(tmp, tar_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    digest = sha256_of(tar_path)
    (folder / VIEW_MARK).write_text(digest + "\n")
    return digest


def unpack_view(tar_path: str | Path, folder: str | Path) -> bool:
    """Make `folder` the unpacked content of `tar_path` unless it already is (its mark names the
    tar's sha256). Atomic; members that would escape the folder are refused. True if it unpacked."""
    from unpaired.sources.archives import members   # safe member reading, shared with sources
    tar_path, folder = Path(tar_path), Path(folder)
    digest = sha256_of(tar_path)
    mark = folder / VIEW_MARK
    if mark.is_file() and mark.read_text().strip() == digest:
        return False
    with atomic_dir(folder) as tmp:
        with tarfile.open(tar_path) as tar:
            dirs = [info.name for info in tar.getmembers() if info.isdir()]
        for name, data in members(tar_path, str(tar_path)):   # checks every name before any is used
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        for name in dirs:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / VIEW_MARK).write_text(digest + "\n")
    return True
