"""Downloads for sources: into a cache that survives re-runs, atomically, with the HTTP status
checked, the body length checked against Content-Length, an optional SHA-256, timeouts, and a bounded
retry with exponential backoff for transient failures (connection errors, timeouts, short bodies,
HTTP 5xx and 429). Every failure is one `SourceError` line naming the URL and the params key."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from time import sleep
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import requests

from unpaired.files import sha256_of
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
    if expected is not None and response.headers.get("Content-Encoding") in (None, "identity") \
            and int(expected) != size:
        return f"body cut short ({size} of {expected} bytes)"
    return ""


def download(url: str, dest: Path, *, key: str, sha256: str | None = None, timeout: float = 30.0,
             retries: int = 3, backoff: float = 1.0) -> Path:
    """`url` → `dest` (a cache path). A complete cached file is reused without a request."""
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f, requests.get(url, stream=True, timeout=timeout,
                                                        headers={"User-Agent": USER_AGENT}) as r:
                if r.status_code in RETRY_STATUS:
                    raise _Retry(f"HTTP {r.status_code}")
                if r.status_code != 200:
                    raise SourceError(f"{key}: {url} answered HTTP {r.status_code}; check the URL")
                short = write_body(r, f)
                if short:
                    raise _Retry(short)
            if sha256 is not None and sha256_of(Path(tmp)) != sha256.lower():
                raise SourceError(f"{key}: {url} does not match the sha256 in params; "
                                  f"the file changed or the checksum is wrong")
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
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    raise SourceError(f"{key}: download of {url} failed after {retries + 1} tries ({last}); "
                      f"check the network and the URL, then re-run")


def locate(location: str, cache_dir: Path, *, key: str, sha256: str | None, timeout: float,
           missing: str) -> Path:
    """A params value that is an http(s) URL (downloaded once into `cache_dir`, under a name made of
    the URL's hash and file name) or a local path; either way checked against `sha256` when given.
    `key` is the params key of `location` (its sibling `sha256` is named on a mismatch); `missing`
    ends the line for a local path that is not a file."""
    if urlparse(location).scheme in ("http", "https"):
        name = Path(urlparse(location).path).name or "download"
        cached = cache_dir / f"{hashlib.sha256(location.encode()).hexdigest()[:12]}-{name}"
        return download(location, cached, key=key, sha256=sha256, timeout=timeout)
    path = Path(location).expanduser()
    if not path.is_file():
        raise SourceError(f"{key}: {path} {missing}")
    if sha256 is not None and sha256_of(path) != sha256.lower():
        raise SourceError(f"{key.rsplit('.', 1)[0]}.sha256: {path} does not match the sha256 in params")
    return path
