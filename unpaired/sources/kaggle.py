"""`kaggle` source: the images in one folder of a Kaggle dataset — e.g. the Simpsons faces
(`dataset: kostastokis/simpsons-faces`, `subdir: cropped`).

Kaggle needs an account. The `kaggle` package finds the credentials in its standard places:
KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY, or kaggle.json in ~/.kaggle/ (or in
$KAGGLE_CONFIG_DIR). They are never params, so they never reach dvc.lock, and nothing here writes or
prints them: the package's own output (which, with VERBOSE set, includes request headers) is swallowed,
and its errors become one `SourceError` line that names no credential.

The package authenticates and asks the API for the dataset's zip; Kaggle answers with a redirect to a
signed storage URL, whose body is streamed into the domain's cache under a temporary name and renamed
when complete. The licence Kaggle reports for the dataset is kept next to it. A cached zip is reused
without any request (or credentials), so changing `subdir`, `exclude` or `count` never downloads again;
delete data/cache/<owner>__<name>.zip to get a newer version of the dataset. The zip is read with the safe reader
of unpaired/safe_archive.py, which refuses members that would escape the target folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import Any, BinaryIO

import requests

from unpaired.files import NO_SPACE, atomic_write_bytes, make_dirs, space_guard, temp_file
from unpaired.params import COUNT, TIMEOUT, Params, check, parse
from unpaired.safe_archive import images_under
from unpaired.sources.base import FetchContext, SourceError, flat_name
from unpaired.sources.download import RETRY_STATUS, write_body

DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
RETRIES, BACKOFF = 3, 1.0  # as downloads of other sources (download.py)
CREDENTIALS = (
    "set KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ "
    "(https://www.kaggle.com/settings → API)"
)


@dataclass(frozen=True)
class KaggleParams(Params):
    dataset: str = ""  # owner/name, as in https://www.kaggle.com/datasets/<owner>/<name>
    subdir: str = ""  # folder inside the dataset, e.g. cropped ("" = all)
    count: int | None = None  # at most this many images (sorted by name); all by default
    exclude: tuple[
        str, ...
    ] = ()  # file names (10.png) or paths in the dataset (cropped/10.png) to drop
    licence: str = ""  # recorded in the manifest; by default what Kaggle says
    timeout: float = 60.0  # seconds without data before a download attempt is abandoned

    BOUNDS = {"count": COUNT, "timeout": TIMEOUT}

    def validate(self, prefix: str) -> None:
        check(
            bool(DATASET.fullmatch(self.dataset)),
            f"{prefix}.dataset",
            f"must be owner/name as in https://www.kaggle.com/datasets/<owner>/<name>, got {self.dataset!r}",
        )
        check(
            self.count is None or self.count > 0,
            f"{prefix}.count",
            f"must be > 0, got {self.count}",
        )
        check(self.timeout > 0, f"{prefix}.timeout", f"must be > 0, got {self.timeout}")


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    p = parse(KaggleParams, raw, ctx.key)
    key = f"{ctx.key}.dataset"
    owner, name = p.dataset.split("/")
    cached = ctx.cache_dir / f"{owner}__{name}.zip"
    about = (
        ctx.cache_dir / f"{owner}__{name}.json"
    )  # what Kaggle says about the dataset (its licence)
    if cached.is_file() and not zipfile.is_zipfile(cached):
        cached.unlink()  # not a zip (cached by hand or by an older version): download it again
    if not cached.is_file():
        _download(p.dataset, cached, about, key=key, timeout=p.timeout)
    licence = p.licence or _licence(about) or f"see https://www.kaggle.com/datasets/{p.dataset}"

    selected = images_under(cached, p.subdir, key)
    if not selected:
        raise SourceError(
            f"{ctx.key}.subdir: no images under {p.subdir or 'the dataset root'!r} in "
            f"{p.dataset}; check the folder name on https://www.kaggle.com/datasets/{p.dataset}"
        )
    for i, entry in enumerate(p.exclude):
        if not any(entry in (member.name, member.as_posix()) for member, _, _ in selected):
            raise SourceError(
                f"{ctx.key}.exclude[{i}]: no image {entry!r} under "
                f"{p.subdir or 'the dataset root'!r} in {p.dataset}"
            )
    kept = [s for s in selected if s[0].name not in p.exclude and s[0].as_posix() not in p.exclude]
    rows = []
    for member, rel, data in kept[: p.count]:
        file = flat_name(rel)
        (ctx.out_dir / file).write_bytes(data)
        rows.append(
            {
                "file": file,
                "source": "kaggle",
                "origin": f"kaggle:{p.dataset}/{member.as_posix()}",
                "licence": licence,
            }
        )
    return rows


def _download(dataset: str, dest: Path, about: Path, *, key: str, timeout: float) -> None:
    """The dataset's zip → `dest` (atomically), and what Kaggle says about it → `about`."""
    make_dirs(dest.parent)
    fd, tmp = temp_file(dest, "part")
    with space_guard(dest):  # outside the try: the free space is reported without the partial file
        _download_into(dataset, dest, about, fd, tmp, key=key, timeout=timeout)


def _download_into(
    dataset: str, dest: Path, about: Path, fd: int, tmp: str, *, key: str, timeout: float
) -> None:
    try:
        with os.fdopen(fd, "wb") as f, _quiet(), _client(key, timeout) as client:
            for attempt in range(RETRIES + 1):  # transient failures: bounded retry with backoff
                if attempt:
                    sleep(BACKOFF * 2 ** (attempt - 1))
                    f.seek(0)
                    f.truncate()
                try:
                    short = _stream(client, dataset, f)
                except Exception as err:  # noqa: BLE001 - anything from the package becomes one line
                    if isinstance(err, OSError) and err.errno in NO_SPACE:
                        raise  # a full disk: _download's space_guard says so
                    if attempt < RETRIES and _transient(err):
                        continue
                    raise SourceError(_explain(err, dataset, key)) from None
                if not short:
                    break
                if attempt == RETRIES:
                    raise SourceError(
                        f"{key}: the download of {dataset} from Kaggle failed after "
                        f"{RETRIES + 1} tries: {short}; re-run"
                    )
            licence = _dataset_licence(client, dataset)
        if not zipfile.is_zipfile(tmp):
            raise SourceError(
                f"{key}: Kaggle sent something that is not a zip archive for {dataset}; "
                f"re-run later"
            )
        if licence:
            atomic_write_bytes(about, (json.dumps({"licence": licence}) + "\n").encode())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _transient(err: BaseException) -> bool:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status in RETRY_STATUS or isinstance(
        err, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    )


def _stream(client: Any, dataset: str, f: BinaryIO) -> str:
    """The dataset's zip into `f`; "" if complete, else what went wrong."""
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

    request = ApiDownloadDatasetRequest()
    request.owner_slug, request.dataset_slug = dataset.split("/")
    # The API answers with a redirect to the zip on signed storage, which requests follows (without the
    # credentials, as the host differs): the response is that zip, not yet read.
    with client.datasets.dataset_api_client.download_dataset(request) as response:
        return write_body(response, f)


def _dataset_licence(client: Any, dataset: str) -> str:
    """The licence on the dataset's Kaggle page, or "" if Kaggle does not say."""
    from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetRequest

    request = ApiGetDatasetRequest()
    request.owner_slug, request.dataset_slug = dataset.split("/")
    try:
        return client.datasets.dataset_api_client.get_dataset(request).license_name
    except Exception:  # noqa: BLE001 - the licence is a nicety; the default names the dataset page
        return ""


@contextlib.contextmanager
def _client(key: str, timeout: float) -> Iterator[Any]:
    """A signed-in client of the `kaggle` package, or one SourceError line saying how to sign in."""
    try:
        # Importing kaggle already tries to authenticate once (and prints help when it cannot).
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        config_dir = os.environ.get("KAGGLE_CONFIG_DIR")
        if config_dir:  # the package reads this once, on import; read it again for this call
            api.config_dir, api.config = config_dir, os.path.join(config_dir, api.config_file)
        api.authenticate()
    except SystemExit:  # how kaggle 2.x says it found no usable credentials
        raise SourceError(f"{key}: no valid Kaggle credentials: {CREDENTIALS}") from None
    except Exception as err:  # noqa: BLE001 - e.g. an access token Kaggle refused while checking it
        raise SourceError(_explain(err, "", key)) from None
    with api.build_kaggle_client() as client:
        # The package sends its requests without a timeout; give its session one.
        session = client.http_client()._session
        for scheme in ("http://", "https://"):
            session.mount(scheme, _TimeoutAdapter(timeout))
        yield client


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["timeout"] = kwargs.get("timeout") or self.timeout
        return super().send(request, **kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow what the package prints: help texts, version nags, and in VERBOSE mode request headers."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _explain(err: BaseException, dataset: str, key: str) -> str:
    """One line for a failure of the package. Never includes str(err): it may echo a request."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return f"{key}: Kaggle rejected the credentials (HTTP 401): {CREDENTIALS}"
    if status == 403 and dataset:
        return (
            f"{key}: Kaggle refused access to {dataset} (HTTP 403); open "
            f"https://www.kaggle.com/datasets/{dataset}, accept its rules if it has any, and re-run"
        )
    if status == 404 and dataset:
        return (
            f"{key}: Kaggle has no dataset {dataset!r} (HTTP 404); copy owner/name from the dataset's "
            f"URL, https://www.kaggle.com/datasets/<owner>/<name>"
        )
    if status is not None:
        return f"{key}: Kaggle answered HTTP {status}{f' for {dataset}' if dataset else ''}; re-run later"
    if isinstance(err, requests.exceptions.ChunkedEncodingError) and dataset:
        return f"{key}: the download of {dataset} from Kaggle was cut short; re-run"
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return f"{key}: the connection to Kaggle failed ({type(err).__name__}); check the network and re-run"
    return f"{key}: the Kaggle download{f' of {dataset}' if dataset else ''} failed ({type(err).__name__})"


def _licence(about: Path) -> str:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads(about.read_text()).get("licence") or "")
    return ""
