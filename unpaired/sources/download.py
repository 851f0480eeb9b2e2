"""Downloads for sources: into a cache that survives re-runs, atomically, with the HTTP status
checked, the body length checked against Content-Length, an optional SHA-256, timeouts, and a bounded
retry with exponential backoff for transient failures (connection errors, timeouts, short bodies,
HTTP 5xx and 429). Every failure is one `SourceError` line naming the URL and the params key.

Every download has one validation step, `check` (e.g. `is_archive`, `is_network_pickle`): a 200
answer that carries an HTML page instead of the file is refused before it reaches the cache, and a
cached file that fails it (one cached by an older version) is removed and downloaded again, so a
fixed server works on the next run."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from time import sleep
from typing import BinaryIO
from urllib.parse import urlparse

import requests

from unpaired.files import NO_SPACE, make_dirs, no_space_error, sha256_of, temp_file
from unpaired.sources.base import SourceError

RETRY_STATUS = {429, 500, 502, 503, 504}
USER_AGENT = "unpaired-dataset-builder/0.1 (+https://dvc.org)"


class _Retry(Exception):
    pass


def write_body(response: requests.Response, f: BinaryIO) -> str:
    """Stream the body into `f`; "" if complete, else what is wrong ("body cut short (...)")."""
    size = 0
    for chunk in response.iter_content(1 << 16):
        f.write(chunk)
        size += len(chunk)
    expected = response.headers.get("Content-Length")
    if (
        expected is not None
        and response.headers.get("Content-Encoding") in (None, "identity")
        and int(expected) != size
    ):
        return f"body cut short ({size} of {expected} bytes)"
    return ""


# A validation step: "" if the file at the path is what the caller expects, else what it is instead.
Check = Callable[[Path], str]


def _looks_like(path: Path) -> str:
    """What a file that failed a check starts with, for the message (an HTML page, usually)."""
    with open(path, "rb") as f:
        head = f.read(256).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML page"
    return "empty" if not head else "something else"


def is_archive(path: Path) -> str:
    """Check: a zip, or a tar (plain or compressed)."""
    if zipfile.is_zipfile(path) or tarfile.is_tarfile(path):
        return ""
    return f"not a zip or tar archive ({_looks_like(path)})"


def is_network_pickle(path: Path) -> str:
    """Check: a pickle (protocol 2 or later starts with 0x80) or a torch.save zip."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80" or head == b"PK":
        return ""
    return f"not a network pickle ({_looks_like(path)})"


def download(
    url: str,
    dest: Path,
    *,
    key: str,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    check: Check | None = None,
) -> Path:
    """`url` → `dest` (a cache path). A complete cached file is reused without a request, unless it
    fails `check` (then it is removed and downloaded again). A download that fails `check` is
    refused (one `SourceError` line) and not cached."""
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256.lower()):
        if check is None or not check(dest):
            return dest
        dest.unlink()  # cached by an older version, or by hand: fetch it again
    make_dirs(dest.parent)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        fd, tmp = temp_file(dest, "part")
        try:
            with (
                os.fdopen(fd, "wb") as f,
                requests.get(
                    url, stream=True, timeout=timeout, headers={"User-Agent": USER_AGENT}
                ) as r,
            ):
                if r.status_code in RETRY_STATUS:
                    raise _Retry(f"HTTP {r.status_code}")
                if r.status_code != 200:
                    raise SourceError(f"{key}: {url} answered HTTP {r.status_code}; check the URL")
                short = write_body(r, f)
                if short:
                    raise _Retry(short)
            if sha256 is not None and sha256_of(Path(tmp)) != sha256.lower():
                raise SourceError(
                    f"{key}: {url} does not match the sha256 in params; "
                    f"the file changed or the checksum is wrong"
                )
            wrong = check(Path(tmp)) if check is not None else ""
            if wrong:
                raise SourceError(
                    f"{key}: {url} answered with something that is {wrong}; check the URL "
                    f"(nothing was cached: the next run downloads it again)"
                )
            os.replace(tmp, dest)
            return dest
        except _Retry as err:
            last = str(err)
        except requests.exceptions.ChunkedEncodingError:
            last = "body cut short: the connection closed early"
        except (requests.ConnectionError, requests.Timeout) as err:
            last = f"{type(err).__name__}"
        except requests.RequestException as err:
            raise SourceError(f"{key}: cannot download {url}: {type(err).__name__}") from None
        except OSError as err:
            if err.errno not in NO_SPACE:
                raise
            os.unlink(tmp)  # first, so that the free space reported counts it free
            raise no_space_error(dest, err) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    raise SourceError(
        f"{key}: download of {url} failed after {retries + 1} tries ({last}); "
        f"check the network and the URL, then re-run"
    )


def locate(
    location: str,
    cache_dir: Path,
    *,
    key: str,
    sha256: str | None,
    timeout: float,
    missing: str,
    check: Check | None = None,
) -> Path:
    """A params value that is an http(s) URL (downloaded once into `cache_dir`, under a name made of
    the URL's hash and file name) or a local path; either way checked against `sha256` when given.
    `key` is the params key of `location` (its sibling `sha256` is named on a mismatch); `missing`
    ends the line for a local path that is not a file; `check` validates a download (see download)."""
    if urlparse(location).scheme in ("http", "https"):
        name = Path(urlparse(location).path).name or "download"
        cached = cache_dir / f"{hashlib.sha256(location.encode()).hexdigest()[:12]}-{name}"
        return download(location, cached, key=key, sha256=sha256, timeout=timeout, check=check)
    path = Path(location).expanduser()
    if not path.is_file():
        raise SourceError(f"{key}: {path} {missing}")
    if sha256 is not None and sha256_of(path) != sha256.lower():
        raise SourceError(
            f"{key.rsplit('.', 1)[0]}.sha256: {path} does not match the sha256 in params"
        )
    return path
