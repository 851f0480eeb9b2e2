"""The kaggle source, run by the real `kaggle` package against two real HTTP servers on 127.0.0.1 that
answer what it asks when downloading a dataset:

    POST /v1/datasets.DatasetApiService/DownloadDataset  {"ownerSlug": ..., "datasetSlug": ...}
         (HTTP Basic auth from KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json, or a Bearer KAGGLE_API_TOKEN)
         → 302 to a signed URL on a storage host (the second server), which serves the zip
    POST /v1/datasets.DatasetApiService/GetDataset       → the dataset's licenseName
    POST /v1/security.OAuthService/IntrospectToken       → whether an access token is valid

The zips are laid out like kostastokis/simpsons-faces (cropped/1.png, cropped/2.png, ... and more).

Seam: kaggle 2.2.4 has no setting for its API host (KAGGLE_API_ENVIRONMENT only picks among fixed
hosts, and is read when kaggle is imported), so the tests point the SDK's host for production
(`kagglesdk.kaggle_env._env_to_endpoint`) at the local server. All of the package's code runs as is.
"""

import base64
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from kagglesdk import kaggle_env
from PIL import Image

from tests.test_sources_files import Server, run_fetch
from unpaired.params import ParamsError
from unpaired.sources.base import SourceError

DATASET = "kostastokis/simpsons-faces"
USER, KEY, TOKEN = "homer-test-user", "k3y-d0nut-5ecret-7f3a9c", "KGAT_t0ken-duff-5ecret-88e1"
SECRETS = (USER, KEY, TOKEN, base64.b64encode(f"{USER}:{KEY}".encode()).decode())
DOWNLOAD = "/v1/datasets.DatasetApiService/DownloadDataset"
NO_CREDENTIALS = (
    "domains.a.dataset: no valid Kaggle credentials: set KAGGLE_API_TOKEN, or KAGGLE_USERNAME "
    "and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ (https://www.kaggle.com/settings → API)"
)


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def simpsons_zip(n: int = 12, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(1, n + 1):
            z.writestr(f"cropped/{i}.png", png(i))
        z.writestr("simplified/1.png", png(100))
        z.writestr("simplified/2.png", png(101))
        z.writestr("README.txt", b"Simpsons faces, cropped from episodes")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


class KaggleApiServer:
    """The Kaggle API: knows `datasets` (ref -> zip bytes, served through `storage`) and accepts the
    credentials USER/KEY and TOKEN. Records every request as (path, headers, json body)."""

    def __init__(self, storage: Server):
        self.storage, self.datasets, self.requests = storage, {}, []
        self.storage_mode = (
            ""  # how storage serves the zip: "", "flaky", "short" or "stall" (see Server)
        )
        api = self
        datasets, requests = self.datasets, self.requests
        valid = {f"Basic {SECRETS[3]}", f"Bearer {TOKEN}"}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(
                    self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}"
                )
                requests.append((self.path, dict(self.headers), body))
                authorized = self.headers.get("Authorization") in valid
                ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
                if self.path == "/v1/security.OAuthService/IntrospectToken":
                    self.reply(200, {"active": authorized, "username": USER if authorized else ""})
                elif not authorized:
                    self.reply(401, {"code": 401, "message": "Unauthenticated"})
                elif ref not in datasets:
                    self.reply(404, {"code": 404, "message": "Not found"})
                elif self.path == DOWNLOAD:
                    signed = f"/kaggle-data-sets/{len(storage.routes) + 1}/archive.zip?X-Goog-Signature=0ab1"
                    # "flaky": the first signed URL answers 503 once; the client asks the API again
                    mode = (
                        "" if api.storage_mode == "flaky" and storage.routes else api.storage_mode
                    )
                    storage.routes[signed] = (200, datasets[ref], mode)
                    self.send_response(302)
                    self.send_header("Location", storage.url + signed)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/v1/datasets.DatasetApiService/GetDataset":
                    self.reply(
                        200,
                        {
                            "ref": ref,
                            "title": "Simpsons Faces",
                            "licenseName": "CC0: Public Domain",
                        },
                    )
                else:
                    self.reply(404, {"code": 404, "message": f"no route {self.path}"})

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def hits(self, path: str) -> int:
        return sum(p == path for p, _, _ in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def servers():
    """Kaggle and its storage on 127.0.0.1, shared by the tests here (a server takes ~0.5 s to stop)."""
    storage = Server()
    storage.headers = []
    base = storage.httpd.RequestHandlerClass

    class Recording(base):  # the storage host also notes the headers it receives
        def do_GET(self):  # noqa: N802
            storage.headers.append(dict(self.headers))
            super().do_GET()

    storage.httpd.RequestHandlerClass = Recording
    api = KaggleApiServer(storage)
    yield api
    api.close()
    storage.close()


@pytest.fixture
def kaggle_api(servers, tmp_path, monkeypatch):
    """The servers, fresh, knowing DATASET; no credentials anywhere (nor a real ~/.kaggle)."""
    for name in (
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_API_TOKEN",
        "KAGGLE_KERNEL_RUN_TYPE",
        "VERBOSE",
        "VERBOSE_OUTPUT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    (tmp_path / "kaggle-config").mkdir()
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, servers.url)
    for state in (
        servers.requests,
        servers.datasets,
        servers.storage.routes,
        servers.storage.hits,
        servers.storage.headers,
    ):
        state.clear()
    servers.datasets[DATASET] = simpsons_zip()
    servers.storage_mode = ""
    monkeypatch.setattr("unpaired.sources.kaggle.sleep", lambda s: None)  # no backoff waits here
    return servers


@pytest.fixture
def env_credentials(monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)


def params(dataset=DATASET, **keys) -> str:
    lines = ["source: kaggle", f"dataset: {dataset}"] + [
        f"{k}: {json.dumps(v)}" for k, v in keys.items()
    ]
    return "".join(f"    {line}\n" for line in lines)


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert not any(secret in text for secret in SECRETS), text


def test_download_with_credentials_from_env(kaggle_api, env_credentials, tmp_path, capfd):
    out = run_fetch(tmp_path, params(subdir="cropped"))
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.file) == sorted(
        f"{i}.png" for i in range(1, 13)
    )  # by name: 1, 10, 11, 12, 2, ...
    assert list(manifest.origin) == [f"kaggle:{DATASET}/cropped/{f}" for f in manifest.file]
    assert (manifest.source == "kaggle").all() and (manifest.licence == "CC0: Public Domain").all()
    assert (out / "7.png").read_bytes() == png(7)
    _, headers, body = next(r for r in kaggle_api.requests if r[0] == DOWNLOAD)
    assert body == {"ownerSlug": "kostastokis", "datasetSlug": "simpsons-faces"}
    assert headers["Authorization"] == f"Basic {SECRETS[3]}"
    assert (
        len(kaggle_api.storage.headers) == 1
        and "Authorization" not in kaggle_api.storage.headers[0]
    )
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [
        "kostastokis__simpsons-faces.json",
        "kostastokis__simpsons-faces.zip",
    ]
    captured = capfd.readouterr()
    assert captured == (
        f"fetch@a: 12 images from kaggle -> {out}\n",
        "",
    )  # nothing from the package
    assert_no_secrets(
        captured.out,
        captured.err,
        (out / "manifest.csv").read_text(),
        *(p.read_text() for p in cache.glob("*.json")),
    )


def test_download_with_kaggle_json_and_licence_override(kaggle_api, tmp_path, capfd):
    config = tmp_path / "kaggle-config" / "kaggle.json"
    config.write_text(json.dumps({"username": USER, "key": KEY}))
    config.chmod(0o600)
    out = run_fetch(tmp_path, params(subdir="simplified", licence="fan art, research use only"))
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.file) == ["1.png", "2.png"]
    assert (manifest.licence == "fan art, research use only").all()
    assert kaggle_api.hits(DOWNLOAD) == 1
    captured = capfd.readouterr()
    assert_no_secrets(captured.out, captured.err, (out / "manifest.csv").read_text())


def test_download_with_an_access_token(kaggle_api, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    out = run_fetch(tmp_path, params(subdir="cropped", count=3))
    assert len(pd.read_csv(out / "manifest.csv")) == 3
    assert (
        next(h for p, h, _ in kaggle_api.requests if p == DOWNLOAD)["Authorization"]
        == f"Bearer {TOKEN}"
    )


def test_subdir_exclude_count_and_the_cache(kaggle_api, env_credentials, tmp_path, monkeypatch):
    out = run_fetch(
        tmp_path, params(subdir="cropped", exclude=["2.png", "cropped/10.png"], count=4)
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["1.png", "11.png", "12.png", "3.png"]
    monkeypatch.delenv("KAGGLE_KEY")  # a cached zip needs neither requests nor credentials
    out = run_fetch(tmp_path, params(subdir="cropped", exclude=["2.png"], count=2))
    assert sorted(p.name for p in out.glob("*.png")) == ["1.png", "10.png"]
    out = run_fetch(tmp_path, params(subdir="cropped", count=50))
    assert len(list(out.glob("*.png"))) == 12
    out = run_fetch(tmp_path, params())
    assert sorted(pd.read_csv(out / "manifest.csv").file)[:3] == [
        "cropped__1.png",
        "cropped__10.png",
        "cropped__11.png",
    ]
    assert (pd.read_csv(out / "manifest.csv").licence == "CC0: Public Domain").all()
    assert kaggle_api.hits(DOWNLOAD) == 1 and sum(kaggle_api.storage.hits.values()) == 1
    with pytest.raises(
        SourceError, match=r"^domains.a.exclude\[0\]: no image '99.png' under 'cropped'"
    ):
        run_fetch(tmp_path, params(subdir="cropped", exclude=["99.png"]))
    with pytest.raises(SourceError, match=r"^domains.a.subdir: no images under 'crop'"):
        run_fetch(tmp_path, params(subdir="crop"))


@pytest.mark.parametrize("kaggle_json", [None, "{not json", json.dumps({"username": USER})])
def test_missing_credentials_say_how_to_sign_in(kaggle_api, tmp_path, capfd, kaggle_json):
    if kaggle_json is not None:
        (tmp_path / "kaggle-config" / "kaggle.json").write_text(kaggle_json)
    with pytest.raises(SourceError) as err:
        run_fetch(tmp_path, params(subdir="cropped"))
    assert str(err.value) == NO_CREDENTIALS
    assert kaggle_api.hits(DOWNLOAD) == 0
    assert not (tmp_path / "raw" / "a").exists() and list((tmp_path / "cache").iterdir()) == []
    assert capfd.readouterr() == ("", "")  # the package's own help text is not printed


def test_invalid_access_token_says_how_to_sign_in(kaggle_api, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_revoked-token")
    with pytest.raises(SourceError) as err:
        run_fetch(tmp_path, params())
    assert str(err.value) == NO_CREDENTIALS and "revoked" not in capfd.readouterr().out


def test_rejected_credentials_are_one_line(kaggle_api, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY + "-wrong")
    with pytest.raises(SourceError) as err:  # not SystemExit
        run_fetch(tmp_path, params())
    message = str(err.value)
    assert message.startswith(
        "domains.a.dataset: Kaggle rejected the credentials (HTTP 401): set KAGGLE_API_TOKEN"
    )
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__
    assert not (tmp_path / "raw" / "a").exists() and list((tmp_path / "cache").iterdir()) == []
    captured = capfd.readouterr()
    assert_no_secrets(message, captured.out, captured.err)


def test_unknown_dataset(kaggle_api, env_credentials, tmp_path):
    with pytest.raises(
        SourceError,
        match=r"^domains.a.dataset: Kaggle has no dataset 'nobody/no-such-faces' "
        r"\(HTTP 404\)",
    ):
        run_fetch(tmp_path, params(dataset="nobody/no-such-faces"))
    assert not (tmp_path / "raw" / "a").exists()


@pytest.mark.parametrize(
    "dataset", ["simpsons-faces", "https://www.kaggle.com/datasets/a/b", "a/b/c", "../x"]
)
def test_dataset_must_be_owner_slash_name(kaggle_api, tmp_path, dataset):
    with pytest.raises(ParamsError, match=r"^params.yaml: domains.a.dataset: must be owner/name"):
        run_fetch(tmp_path, params(dataset=dataset))
    assert kaggle_api.requests == []


def corrupt(data: bytes) -> bytes:
    """Damage the first image's bytes inside the zip: its directory stays intact, its CRC fails."""
    data = bytearray(data)
    start = data.index(b"\x89PNG")
    data[start + 30 : start + 60] = b"\x00" * 30
    return bytes(data)


@pytest.mark.parametrize(
    "body, words, cached",
    [
        (
            corrupt(simpsons_zip()),
            "domains.a.dataset: corrupt archive kostastokis__simpsons-faces.zip",
            True,
        ),
        (
            b"<html>Too many requests</html>",
            "domains.a.dataset: Kaggle sent something that is not a zip",
            False,
        ),
        (
            simpsons_zip(extra={"cropped/../../../evil.png": png(0)}),
            "domains.a.dataset: refused: member 'cropped/../../../evil.png' would escape",
            True,
        ),
    ],
)
def test_bad_zips_are_one_line_and_leave_no_images(
    kaggle_api, env_credentials, tmp_path, body, words, cached
):
    kaggle_api.datasets[DATASET] = body
    with pytest.raises(SourceError) as err:
        run_fetch(tmp_path, params(subdir="cropped"))
    assert str(err.value).startswith(words) and "\n" not in str(err.value)
    assert not (tmp_path / "raw" / "a").exists()
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cache == (
        ["kostastokis__simpsons-faces.json", "kostastokis__simpsons-faces.zip"] if cached else []
    )


@pytest.mark.parametrize(
    "mode, words",
    [
        (
            "short",
            "domains.a.dataset: the download of kostastokis/simpsons-faces from Kaggle was cut short; re-run",
        ),
        (
            "stall",
            "domains.a.dataset: the connection to Kaggle failed (ReadTimeout); check the network and re-run",
        ),
    ],
)
def test_broken_downloads_leave_nothing_in_the_cache(
    kaggle_api, env_credentials, tmp_path, mode, words
):
    kaggle_api.storage_mode = mode
    with pytest.raises(SourceError) as err:
        run_fetch(tmp_path, params(timeout=0.3))
    assert str(err.value) == words
    assert not (tmp_path / "raw" / "a").exists() and list((tmp_path / "cache").iterdir()) == []


def test_a_transient_storage_error_is_retried(kaggle_api, env_credentials, tmp_path):
    kaggle_api.storage_mode = "flaky"  # 503 on the first request, then the zip
    out = run_fetch(tmp_path, params(subdir="cropped", count=2))
    assert len(list(out.glob("*.png"))) == 2
    assert sorted(kaggle_api.storage.hits.values()) == [1, 1]  # two signed URLs, one each
    assert [r[0] for r in kaggle_api.requests].count(DOWNLOAD) == 2


def test_a_cached_file_that_is_not_a_zip_is_downloaded_again(kaggle_api, env_credentials, tmp_path):
    """An HTML page cached as the dataset's zip (by hand, or by an older version): removed and
    downloaded again, rather than failing every run as a corrupt archive."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kostastokis__simpsons-faces.zip").write_bytes(
        b"<html>Too many requests</html>"
    )
    out = run_fetch(tmp_path, params(subdir="cropped", count=3))
    assert len(pd.read_csv(out / "manifest.csv")) == 3 and kaggle_api.hits(DOWNLOAD) == 1
