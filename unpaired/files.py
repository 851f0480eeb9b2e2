"""Atomic outputs: every stage writes into a temporary sibling and renames it into place, so an
interrupted or failed run never leaves a partial output behind.

Temporaries are named `.<name>.tmp-<pid>-<random>` (downloads: `.part-`, replaced trees: `.old-<pid>`;
a name too long for that keeps its start and a hash of the whole, see `temp_name`) next to what they become, with the modes a plain `open()`/`mkdir` would give under the current umask
(`tempfile` makes them 0600/0700). A writer killed with -9 leaves its temporary behind: every stage calls
`remove_stale_temporaries` on its output folders first, which removes those whose writer is dead. A full
disk (or quota, or `ulimit -f`) becomes one `UserError` line naming the file and the space needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from unpaired.errors import NO_SPACE, UserError, no_space_error

# --- modes, temporaries, disk space ----------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and reset."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def creating(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while creating `path` (a folder, or a file or temporary in it) into one
    `UserError` line naming `path` and, when it differs, the part that failed: a read-only
    filesystem (EROFS), no permission (EACCES, EPERM), a file where a folder must be (ENOTDIR,
    EEXIST), a name too long... A full disk stays `no_space_error`."""
    try:
        yield
    except OSError as err:
        if err.errno in NO_SPACE:
            raise no_space_error(err.filename or path, err) from None
        where = Path(err.filename) if err.filename else None  # named when a folder above failed
        failed = (
            f" ({where}: {err.strerror})"
            if where is not None and where in Path(path).parents
            else f" ({err.strerror or type(err).__name__})"
        )
        raise UserError(
            f"{path}: cannot write here{failed}; choose another place or make it writable"
        ) from None


def make_dirs(path: str | Path) -> Path:
    """`mkdir -p path` for an output folder (the mode `mkdir` gives); one `UserError` line naming the
    path when it cannot be created (see `creating`). Returns `path` as a Path."""
    path = Path(path)
    with creating(path):
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():  # mkdir -p through a symlink to a file, or a race
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path))
    return path


# tempfile's random part: 8 characters (tempfile._RandomNameSequence), the longest suffix we add after
# the pid. Kept in one place so that every temporary name is measured with it.
_RANDOM_CHARS = 8


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the filesystem of `folder` accepts: NAME_MAX (255 on ext4,
    xfs, btrfs, tmpfs), read with pathconf where it can be, else 255."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(os.pathconf(folder if folder.is_dir() else folder.parent, "PC_NAME_MAX"))
    return 255


def temp_name(path: Path, tag: str, suffix: str = "") -> str:
    """`.<name>.<tag>-<pid>-` (+ `suffix`, which the caller appends; tempfile appends 8 random
    characters) for a temporary next to `path`, short enough that the full name fits the filesystem
    (NAME_MAX bytes, in the filesystem encoding) whatever the length of `path`'s own name: a name
    that would not fit keeps its start and gets `~<12 hex of its sha256>` instead of its end, so two
    long names never share a temporary name. The result still matches TEMPORARY."""
    pid = os.getpid()
    tail = f".{tag}-{pid}-{suffix}"
    room = _name_max(path.parent) - len(os.fsencode(f".{tail}")) - _RANDOM_CHARS
    name = path.name
    if len(os.fsencode(name)) > room:
        mark = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
        keep = os.fsencode(name)[: max(0, room - len(mark))].decode(
            sys.getfilesystemencoding(), "ignore"
        )
        name = keep.rstrip() + mark  # decode("ignore") drops a character cut in the middle
    return f".{name}{tail}"


def temp_file(path: Path, tag: str = "tmp") -> tuple[int, str]:
    """`tempfile.mkstemp` next to `path`, named `.<name>.<tag>-<pid>-<random>` (the name shortened
    to fit the filesystem, see `temp_name`), with the mode `open()` would give (0666 & ~umask)
    instead of mkstemp's 0600. Returns (fd, name). A folder that cannot be written to is one
    `UserError` line naming `path`."""
    with creating(path):
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path, tag), dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def temp_dir(path: Path) -> Path:
    """`tempfile.mkdtemp` next to `path` (named as `temp_file` names its file), with the mode `mkdir`
    would give (0777 & ~umask). A folder that cannot be written to is one `UserError` line naming
    `path`."""
    with creating(path):
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(path, "tmp"), dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextlib.contextmanager
def space_guard(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a disk-full / quota / size-limit OSError inside the block into `no_space_error`. Put the
    removal of the partial temporary inside the block, so that the free space reported counts it free."""
    try:
        yield
    except OSError as err:
        if err.errno in NO_SPACE:
            raise no_space_error(path, err, needed) from None
        raise


@contextlib.contextmanager
def _removed_on_error(tmp: str | Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# `.<name>.tmp-<pid>-<random>`, `.<name>.part-<pid>-<random>`, `.<name>.old-<pid>`; older names had no
# pid (`.<name>.tmp-<random>`, and `.<name>.tmp` written by hand): those are always stale.
TEMPORARY = re.compile(r"\..+\.(?:(?:tmp|part|old)-(?:(?P<pid>\d+)(?:-.*)?|.*)|tmp)", re.DOTALL)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(*folders: str | Path, recursive: bool = False) -> list[Path]:
    """Remove this project's temporaries (see TEMPORARY) in `folders` whose writing process is no
    longer running (a `kill -9`, a power cut), so that DVC never commits them into an output. Returns
    what it removed. A stage calls it first on every folder it writes into."""
    removed: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for root, dirs, files in os.walk(folder):
            for name in [*dirs, *files]:
                m = TEMPORARY.fullmatch(name)
                if m is None or (m["pid"] is not None and _alive(int(m["pid"]))):
                    continue
                path = Path(root) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with creating(path), contextlib.suppress(FileNotFoundError):
                        path.unlink()
                removed.append(path)
            dirs[:] = [d for d in dirs if recursive and not TEMPORARY.fullmatch(d)]
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target` (mode as `mkdir` gives); on success it
    replaces `target` (rename, so readers see the old or the new tree, never a mix); on error it is
    removed and `target` is left as it was. A full disk inside the block is one `UserError` line."""
    target = Path(target)
    make_dirs(target.parent)
    tmp = temp_dir(target)
    with space_guard(target):
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    old = None
    if target.exists():
        old = target.parent / temp_name(target, "old").removesuffix("-")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    """Write `data` to `path` through a temporary file, fsync and rename; the file gets the mode a
    plain `open()` would. Out of space: one `UserError` line, the previous file intact."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = temp_file(path)
    with space_guard(path, len(data)):
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


def write_manifest(
    path: str | Path, rows: list[dict[str, Any]] | list[tuple[Any, ...]], columns: list[str]
) -> None:
    """A CSV with a fixed column order, sorted by the first column, byte-stable across runs. `rows`:
    dicts keyed by `columns`, or tuples in their order (a 7-field tuple takes 96 bytes, a dict 360)."""
    import pandas as pd  # here: pandas takes a second to import, and most users of files.py never write a CSV

    frame = pd.DataFrame(rows, columns=columns)
    if len(frame):
        frame = frame.sort_values(columns[0], kind="stable")
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode())


# Set by `make repro`'s wrapper (unpaired.repro) for the stages it runs: a folder where a stage
# says, by a file named after it, that it left its outputs telling one run at its exit.
SETTLED_ENV = "UNPAIRED_REPRO_SETTLED"


def mark_settled(stage: str) -> None:
    """Tell `make repro`'s wrapper that `stage` (its name in dvc.yaml) left its outputs consistent
    with its persist outputs as it ended, finished or not (train: the logs tell the epochs the
    checkpoints hold), so that the wrapper's put-back after a failure keeps the outputs that are
    there rather than restoring dvc.lock's beside persist outputs that moved on. Does nothing
    outside the wrapper (plain `dvc repro`, `dvc exp run`)."""
    folder = os.environ.get(SETTLED_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        Path(folder, stage).touch()


# A raw folder's list of the files its source left out (columns file, reason), next to manifest.csv;
# hidden, so never read as an image. The folder source writes it; prepare counts it in prepare.json.
SOURCE_SKIPPED = ".skipped.csv"
SOURCE_SKIP_REASONS = ("hidden", "not_image_name")  # its reasons, counted in prepare.json's skipped


def read_source_skipped(raw: str | Path) -> dict[str, int]:
    """reason -> files a source left out of the raw folder `raw`, from its SOURCE_SKIPPED file
    (sorted by reason; {} when there is none)."""
    path = Path(raw) / SOURCE_SKIPPED
    if not path.is_file():
        return {}
    import pandas as pd

    reasons = pd.read_csv(path, dtype=str, keep_default_na=False)["reason"]
    return {r: int(n) for r, n in sorted(reasons.value_counts().items())}


def tree(folder: str | Path) -> Iterator[tuple[str, bool]]:
    """(name relative to `folder` with "/", is a directory) for everything under it, in the order of
    `sorted(Path(folder).rglob("*"))` (a directory before its content, names compared part by part),
    entering directories but not symlinks to them, as rglob does. Holds one directory's sorted names
    at a time (about 80 bytes each), never the whole tree. Raises OSError if `folder` is unreadable."""

    def walk(path: str, prefix: str) -> Iterator[tuple[str, bool]]:
        dirs: dict[str, bool] = {}  # directory (or link to one) -> enter it (not a link)
        names: list[str] = []
        with os.scandir(path) as it:
            for e in it:
                names.append(e.name)
                if e.is_dir():
                    dirs[e.name] = not e.is_symlink()
        names.sort()
        for name in names:
            yield prefix + name, name in dirs
            if dirs.get(name):
                yield from walk(os.path.join(path, name), f"{prefix}{name}/")

    yield from walk(os.fspath(folder), "")


# --- packed outputs: one tar for DVC and its remote, a browsable folder for people --------------
# A DVC directory output of thousands of small images costs one remote object (and one request)
# per file: pushing/pulling 5,000 prepared images took 4-6x as long as one tar of them
# (benchmarks/remote.py). So prepare's DVC output is data/prepared.tar, and data/prepared/ is a
# view of it: written by prepare, rebuilt from the tar whenever it is missing or out of date
# (train, evaluate and `unpaired unpack` call unpack_view), never tracked itself.

VIEW_MARK = ".packed-from"  # inside the view: the sha256 of the tar it was unpacked from
SUMS = "SHA256SUMS"  # the tar's last member: `<sha256>  <name>` of every file before it


def pack_dir(folder: str | Path, tar_path: str | Path) -> str:
    """Write every file under `folder` (sorted, relative names, no owner or time: the same files
    give the same bytes) into an uncompressed tar, atomically, followed by a SHA256SUMS member that
    `unpack_view` checks every file against; mark `folder` as its view. Returns the tar's sha256.
    PNGs do not compress further, and an uncompressed tar extracts fastest. Streams: one file in
    memory at a time, the SHA256SUMS lines in an unnamed temporary file beside the tar, and no
    TarInfo kept per member (tarfile's `members` list is emptied after each), so memory does not grow
    with the file count beyond one directory's names (see `tree`). A full disk is one UserError line."""
    folder, tar_path = Path(folder), Path(tar_path)
    make_dirs(tar_path.parent)
    skip = (VIEW_MARK, SUMS)
    needed = (
        sum(
            (folder / rel).stat().st_size + 1024
            for rel, _ in tree(folder)
            if rel.rpartition("/")[2] not in skip and (folder / rel).is_file()
        )
        + 10240
    )
    fd, tmp = temp_file(tar_path)
    with space_guard(tar_path, needed), _removed_on_error(tmp):
        with (
            os.fdopen(fd, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
            tempfile.TemporaryFile(dir=tar_path.parent) as sums,
        ):
            for rel, is_dir in tree(folder):
                path = folder / rel
                if path.name in skip:
                    continue
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                if is_dir:  # kept, so that an empty split folder survives the round trip
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    data = path.read_bytes()
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                    sums.write(f"{hashlib.sha256(data).hexdigest()}  {info.name}\n".encode())
                tar.members.clear()  # addfile keeps a copy of every TarInfo (~500 bytes), needed only to read
            info = tarfile.TarInfo(SUMS)
            info.mtime, info.size, info.mode = 0, sums.tell(), 0o644
            sums.seek(0)
            tar.addfile(info, sums)
        os.replace(tmp, tar_path)
    digest = sha256_of(tar_path)
    atomic_write_bytes(folder / VIEW_MARK, (digest + "\n").encode())
    return digest


def unpack_view(tar_path: str | Path, folder: str | Path) -> bool:
    """Make `folder` the unpacked content of `tar_path` unless it already is (its mark names the
    tar's sha256 and `view_drift` finds no hand edit; an edited view is unpacked again, with a note
    on stderr saying why and where data is changed instead). Atomic; members that would escape the folder are refused. The tar is read to its
    real end and every file is checked against its SHA256SUMS: a damaged tar is refused with one
    `UserError` line and the previous view is left as it was. True if it unpacked."""
    from unpaired.safe_archive import CorruptArchive, members  # safe reading, shared with sources

    tar_path, folder = Path(tar_path), Path(folder)
    digest = sha256_of(tar_path)
    mark = folder / VIEW_MARK
    if mark.is_file() and mark.read_text().strip() == digest:
        drift = view_drift(tar_path, folder)
        if drift is None:
            return False
        import sys

        print(
            f"note: {folder}/ differs from {tar_path} ({drift}); unpacking it again. The view is "
            f"rebuilt from the tar, so an edit there is not part of the data version (dvc.lock "
            f"records the tar): to change the data, edit the raw images (data/raw/<domain>, or the "
            f"folder a `folder` source reads) and re-run prepare (`make repro`)",
            file=sys.stderr,
        )
    restore = (
        f"restore it with `uv run dvc checkout {tar_path}` (or `uv run dvc pull`), or rebuild it "
        f"with `uv run dvc repro -f prepare`"
    )
    with atomic_dir(folder) as tmp:
        try:
            with tarfile.open(tar_path) as tar:
                dirs = [info.name for info in tar.getmembers() if info.isdir()]
            files: dict[str, str] = {}
            listing = None
            for name, data in members(
                tar_path, str(tar_path)
            ):  # checks every name before any is used
                if name.as_posix() == SUMS:
                    listing = data.decode("utf-8", "replace")
                    continue
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
                files[name.as_posix()] = hashlib.sha256(data).hexdigest()
        except CorruptArchive as err:
            raise UserError(
                f"{tar_path}: damaged, cannot be unpacked ({err.detail}); {restore}"
            ) from None
        except tarfile.TarError as err:
            raise UserError(
                f"{tar_path}: damaged, cannot be unpacked ({type(err).__name__}: {err}); {restore}"
            ) from None
        if (
            listing is not None
        ):  # tars packed before SHA256SUMS existed have only the tar's own checks
            expected = dict(
                reversed(line.split("  ", 1)) for line in listing.splitlines() if "  " in line
            )
            bad = sorted(
                n for n in expected.keys() | files.keys() if expected.get(n) != files.get(n)
            )
            if bad:
                raise UserError(
                    f"{tar_path}: damaged: {len(bad)} file(s) do not match its SHA256SUMS "
                    f"(first: {bad[0]}); {restore}"
                )
        for name in dirs:
            (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / VIEW_MARK).write_text(digest + "\n")
    return True


def view_drift(tar_path: str | Path, folder: str | Path) -> str | None:
    """How the view `folder` differs from the files of `tar_path` (which it is marked as unpacked
    from), or None when it matches: a file or folder missing, one added, a size that differs, or a
    file written after the view was (its mtime later than the mark's: an edit that kept the size).
    Cheap: the tar's index (headers only, the data is skipped) against one stat per file of the view;
    no file is read. The phrase names the first difference and how many there are."""
    tar_path, folder = Path(tar_path), Path(folder)
    expected: dict[str, int | None] = {}  # relative name -> size (None: a folder)
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if info.name != SUMS:
                expected[info.name.rstrip("/")] = None if info.isdir() else info.size
            tar.members.clear()  # the index only: one TarInfo at a time
    marked = (folder / VIEW_MARK).stat().st_mtime_ns
    differ: list[str] = []
    seen = set()
    for rel, is_dir in tree(folder):
        if rel == VIEW_MARK:
            continue
        seen.add(rel)
        if rel not in expected:
            differ.append(f"{rel}: not in the tar")
        elif is_dir != (expected[rel] is None):
            differ.append(f"{rel}: a {'folder' if is_dir else 'file'} here, not in the tar")
        elif not is_dir:
            st = (folder / rel).stat()
            if st.st_size != expected[rel]:
                differ.append(f"{rel}: {st.st_size:,} bytes here, {expected[rel]:,} in the tar")
            elif st.st_mtime_ns > marked:
                differ.append(f"{rel}: changed after it was unpacked")
    differ += [f"{rel}: missing" for rel in sorted(set(expected) - seen)]
    if not differ:
        return None
    return differ[0] + (f"; {len(differ) - 1} more difference(s)" if len(differ) > 1 else "")


def view_is_stale(tar_path: str | Path, folder: str | Path) -> bool:
    """True if `tar_path` exists and `folder` is not its view as it is now: missing, unmarked,
    unpacked from another tar (after a `git checkout` + `dvc checkout`, which change only the tar),
    or edited by hand since (`view_drift`)."""
    mark = Path(folder) / VIEW_MARK
    if not Path(tar_path).is_file():
        return False
    if not mark.is_file() or mark.read_text().strip() != sha256_of(tar_path):
        return True
    return view_drift(tar_path, folder) is not None


def refresh_view_for(
    inputs: Iterable[str | Path], tar_path: str | Path, folder: str | Path
) -> bool:
    """For readers given paths by a user (`unpaired translate data/prepared/testA`): if any input is
    inside the view `folder` and the view was unpacked from another tar than `tar_path` is now (a
    `git checkout` + `dvc checkout` changed the tar, not its view) or was edited by hand, unpack it
    again and say so on stderr. True if it did."""
    import sys

    root = os.path.abspath(folder)
    if not any(
        os.path.abspath(str(i)) == root or os.path.abspath(str(i)).startswith(root + os.sep)
        for i in inputs
    ):
        return False
    if not view_is_stale(tar_path, folder):
        return False
    mark = Path(folder) / VIEW_MARK
    if not mark.is_file() or mark.read_text().strip() != sha256_of(
        tar_path
    ):  # (an edit: unpack_view says so)
        print(
            f"note: {folder}/ is not the view of {tar_path} as it is now (after a `dvc checkout`?); "
            f"unpacking it again (what `uv run unpaired unpack` does)",
            file=sys.stderr,
        )
    return unpack_view(tar_path, folder)
