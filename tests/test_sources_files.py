"""The archive and folder sources, against a real HTTP server on 127.0.0.1 serving archives built
here in the layout of the CycleGAN benchmark zips (horse2zebra.zip: horse2zebra/trainA/*.jpg ...)."""

import hashlib
import io
import json
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.fetch import fetch_domain
from unpaired.params import ParamsError
from unpaired.sources.base import SourceError


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def horse2zebra_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("trainA", "trainB", "testA"):
            for i in range(3):
                z.writestr(
                    f"horse2zebra/{split}/n0238{i:04d}_{split}.jpg", jpeg(hash(split) % 1000 + i)
                )
        z.writestr("horse2zebra/trainA/.DS_Store", b"junk")
    return buf.getvalue()


def corrupt_zip() -> bytes:
    """A zip whose directory is intact but whose first member's data is damaged (CRC fails)."""
    data = bytearray(horse2zebra_zip())
    start = data.index(b"\xff\xd8")  # the first JPEG's bytes inside the zip
    data[start + 40 : start + 80] = b"\x00" * 40
    return bytes(data)


class Server:
    """Routes: path -> (status, body, extra behaviour). Counts requests per path."""

    def __init__(self):
        self.routes, self.hits = {}, {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits[self.path] = hits.get(self.path, 0) + 1
                status, body, mode = routes.get(self.path, (404, b"not found", ""))
                if mode == "flaky" and hits[self.path] == 1:
                    status, body = 503, b"busy"
                if mode == "stall":
                    time.sleep(3)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) * (2 if mode == "short" else 1)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def run_fetch(tmp_path, body: str, workers=1):
    pf = tmp_path / "params.yaml"
    pf.write_text(f"domains:\n  a:\n{body}")
    return fetch_domain("a", tmp_path / "raw" / "a", tmp_path / "cache", pf, workers=workers)


def test_archive_from_url_member_count_and_cache(server, tmp_path):
    data = horse2zebra_zip()
    server.routes["/datasets/horse2zebra.zip"] = (200, data, "")
    sha = hashlib.sha256(data).hexdigest()
    body = (
        f"    source: archive\n    url: {server.url}/datasets/horse2zebra.zip\n"
        f"    member: horse2zebra/trainA\n    sha256: {sha}\n    licence: see dataset\n"
    )
    out = run_fetch(tmp_path, body)
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(manifest.file) == [f"n0238{i:04d}_trainA.jpg" for i in range(3)]
    assert manifest.origin.str.startswith(
        f"{server.url}/datasets/horse2zebra.zip#horse2zebra/trainA/"
    ).all()
    assert (manifest.licence == "see dataset").all()
    first = {p.name: p.read_bytes() for p in out.glob("*.jpg")}
    out = run_fetch(tmp_path, body + "    count: 2\n")  # fewer images: no new download
    assert len(list(out.glob("*.jpg"))) == 2 and server.hits["/datasets/horse2zebra.zip"] == 1
    assert all(first[p.name] == p.read_bytes() for p in out.glob("*.jpg"))


def test_retry_after_a_transient_error(server, tmp_path):
    server.routes["/h.zip"] = (200, horse2zebra_zip(), "flaky")
    out = run_fetch(
        tmp_path,
        f"    source: archive\n    url: {server.url}/h.zip\n    member: horse2zebra/trainB\n",
    )
    assert len(list(out.glob("*.jpg"))) == 3 and server.hits["/h.zip"] == 2


@pytest.mark.parametrize(
    "route, mode, status, words",
    [
        ("/missing.zip", None, None, "answered HTTP 404"),
        ("/down.zip", "", 500, "failed after 4 tries (HTTP 500)"),
        ("/short.zip", "short", 200, "body cut short"),
        ("/notzip.zip", "", 200, "something that is not a zip or tar archive (an HTML page)"),
        ("/corrupt.zip", "", 200, "corrupt archive"),
    ],
)
def test_download_failures_are_one_line_and_leave_nothing(
    server, tmp_path, monkeypatch, route, mode, status, words
):
    monkeypatch.setattr("unpaired.sources.download.sleep", lambda s: None)  # no backoff waits here
    if mode is not None:
        body = {
            "/notzip.zip": b"<html>an error page served as a zip</html>",
            "/corrupt.zip": corrupt_zip(),
        }.get(route) or horse2zebra_zip()
        server.routes[route] = (status, body, mode)
    with pytest.raises(SourceError) as err:
        run_fetch(tmp_path, f"    source: archive\n    url: {server.url}{route}\n")
    message = str(err.value)
    assert message.startswith("domains.a.url: ") and words in message and "\n" not in message
    assert not (tmp_path / "raw" / "a").exists()
    assert [p.name for p in (tmp_path / "cache").glob("*.part-*")] == []


def test_stalled_server_times_out(server, tmp_path, monkeypatch):
    monkeypatch.setattr("unpaired.sources.download.sleep", lambda s: None)
    server.routes["/slow.zip"] = (200, horse2zebra_zip(), "stall")
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"failed after 4 tries \(ReadTimeout\)"):
        run_fetch(
            tmp_path, f"    source: archive\n    url: {server.url}/slow.zip\n    timeout: 0.3\n"
        )
    assert time.monotonic() - start < 15


def test_sha256_mismatch(server, tmp_path):
    server.routes["/h.zip"] = (200, horse2zebra_zip(), "")
    with pytest.raises(SourceError, match="does not match the sha256"):
        run_fetch(
            tmp_path,
            f"    source: archive\n    url: {server.url}/h.zip\n    sha256: '{'0' * 64}'\n",
        )


@pytest.mark.parametrize("evil", ["../escape.jpg", "/etc/evil.jpg", "a/../../b.jpg", "link"])
def test_archives_that_escape_are_refused(tmp_path, evil):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as t:
        good = jpeg(1)
        info = tarfile.TarInfo("data/ok.jpg")
        info.size = len(good)
        t.addfile(info, io.BytesIO(good))
        if evil == "link":
            info = tarfile.TarInfo("data/link.jpg")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
        else:
            info = tarfile.TarInfo(evil)
            info.size = len(good)
            t.addfile(info, io.BytesIO(good))
    with pytest.raises(SourceError, match="refused: member"):
        run_fetch(tmp_path, f"    source: archive\n    url: {path}\n")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_zip_slip_is_refused(tmp_path):
    path = tmp_path / "slip.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/ok.jpg", jpeg(0))
        z.writestr("x/../../slip.jpg", jpeg(1))
    with pytest.raises(SourceError, match="refused: member 'x/../../slip.jpg'"):
        run_fetch(tmp_path, f"    source: archive\n    url: {path}\n")


def test_wrong_member_names_the_key(tmp_path):
    path = tmp_path / "h.zip"
    path.write_bytes(horse2zebra_zip())
    with pytest.raises(
        SourceError, match=r"^domains.a.member: no images under 'horse2zebra/trainZ'"
    ):
        run_fetch(
            tmp_path, f"    source: archive\n    url: {path}\n    member: horse2zebra/trainZ\n"
        )
    with pytest.raises(ParamsError, match=r"^params.yaml: domains.a.url: required"):
        run_fetch(tmp_path, "    source: archive\n")


def test_folder_source(tmp_path):
    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(jpeg(1))
    (photos / "2024" / "b.JPG").write_bytes(jpeg(2))
    (photos / "notes.txt").write_text("not an image")
    out = run_fetch(tmp_path, f"    source: folder\n    path: {photos}\n")
    assert sorted(pd.read_csv(out / "manifest.csv").file) == ["2024__b.JPG", "a.jpg"]
    out = run_fetch(tmp_path, f"    source: folder\n    path: {photos}\n    pattern: '*.jpg'\n")
    assert [p.name for p in out.glob("*.*") if p.name != "manifest.csv"] == ["a.jpg"]
    with pytest.raises(SourceError, match=r"^domains.a.path: .* is not a folder"):
        run_fetch(tmp_path, f"    source: folder\n    path: {tmp_path / 'nope'}\n")
    with pytest.raises(SourceError, match=r"^domains.a.pattern: no image files match"):
        run_fetch(tmp_path, f"    source: folder\n    path: {photos}\n    pattern: '*.png'\n")


# --- names unique by construction, cached downloads validated, tars read to their end ----------------


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


COLLIDING = {
    "sub/x.png": png(1),
    "sub__x.png": png(2),
    "a_/b.png": png(3),
    "a/_b.png": png(4),
    "c.png": png(5),
}


def assert_one_file_per_input(out, origin_of):
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == len(COLLIDING) and manifest.file.is_unique
    written = {f: (out / f).read_bytes() for f in manifest.file}
    assert sorted(written.values()) == sorted(COLLIDING.values())  # every image, once
    for f, origin in zip(manifest.file, manifest.origin):
        assert written[f] == COLLIDING[origin_of(origin)]
    assert set(manifest.file) >= {"sub__x.png", "c.png"}  # ordinary names unchanged


def test_folder_names_never_collide(tmp_path):
    """`sub/x.png` and `sub__x.png` were both written as `sub__x.png`: one image lost, two rows."""
    root = tmp_path / "mine"
    for rel, data in COLLIDING.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = run_fetch(tmp_path, f"    source: folder\n    path: {root}\n")
    assert_one_file_per_input(
        out, lambda origin: Path(origin).relative_to(root.resolve()).as_posix()
    )


def test_archive_names_never_collide(tmp_path):
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as z:
        for rel, data in COLLIDING.items():
            z.writestr(f"set/trainA/{rel}", data)
    out = run_fetch(tmp_path, f"    source: archive\n    url: {path}\n    member: set/trainA\n")
    assert_one_file_per_input(out, lambda origin: origin.split("#set/trainA/")[1])


def test_kaggle_names_never_collide(tmp_path):
    """From a cached dataset zip, which the kaggle source reads without credentials or a request."""
    (tmp_path / "cache").mkdir()
    with zipfile.ZipFile(tmp_path / "cache" / "owner__faces.zip", "w") as z:
        for rel, data in COLLIDING.items():
            z.writestr(f"cropped/{rel}", data)
    out = run_fetch(tmp_path, "    source: kaggle\n    dataset: owner/faces\n    subdir: cropped\n")
    assert_one_file_per_input(out, lambda origin: origin.split("kaggle:owner/faces/cropped/")[1])


def test_an_html_page_served_for_an_archive_is_not_cached(server, tmp_path):
    """A URL that answers 200 with an HTML page, then (the server fixed) the archive: the page is
    refused and never cached, so the next run downloads the archive."""
    server.routes["/h.zip"] = (200, b"<!DOCTYPE html><html><body>Service moved</body></html>", "")
    body = f"    source: archive\n    url: {server.url}/h.zip\n    member: horse2zebra/trainA\n"
    with pytest.raises(
        SourceError,
        match=r"^domains.a.url: .*/h.zip answered with something that is not a zip "
        r"or tar archive \(an HTML page\); check the URL",
    ):
        run_fetch(tmp_path, body)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    server.routes["/h.zip"] = (200, horse2zebra_zip(), "")
    out = run_fetch(tmp_path, body)
    assert len(list(out.glob("*.jpg"))) == 3 and server.hits["/h.zip"] == 2


def test_a_bad_file_already_cached_is_downloaded_again(server, tmp_path):
    """One cached by an older version (before the validation step): removed and fetched again."""
    from unpaired.sources.download import download, is_network_pickle

    server.routes["/h.zip"] = (200, horse2zebra_zip(), "")
    body = f"    source: archive\n    url: {server.url}/h.zip\n    member: horse2zebra/trainA\n"
    run_fetch(tmp_path, body)
    [cached] = (tmp_path / "cache").iterdir()
    cached.write_bytes(b"<html>an error page cached by an older version</html>")
    out = run_fetch(tmp_path, body)
    assert len(list(out.glob("*.jpg"))) == 3 and server.hits["/h.zip"] == 2
    # a network pickle: the same step, with the check the stylegan source passes
    server.routes["/ffhq.pkl"] = (200, b"<html><head><title>503</title></head></html>", "")
    dest = tmp_path / "cache" / "ffhq.pkl"
    with pytest.raises(
        SourceError,
        match=r"^k: .*/ffhq.pkl answered with something that is not a network "
        r"pickle \(an HTML page\)",
    ):
        download(f"{server.url}/ffhq.pkl", dest, key="k", check=is_network_pickle)
    assert not dest.exists()
    server.routes["/ffhq.pkl"] = (200, b"\x80\x04N.", "")
    assert (
        download(f"{server.url}/ffhq.pkl", dest, key="k", check=is_network_pickle).read_bytes()
        == b"\x80\x04N."
    )


def test_a_tar_with_a_bad_header_in_the_middle_is_refused(tmp_path):
    """tarfile takes a header whose checksum fails for the end of the archive: 3 of 6 images, exit 0."""
    path = tmp_path / "set.tar"
    with tarfile.open(path, "w") as t:
        for i in range(6):
            data = jpeg(i)
            info = tarfile.TarInfo(f"set/{i}.jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as t:
        fourth = t.getmembers()[3].offset
    data = bytearray(path.read_bytes())
    data[fourth + 10] ^= 0xFF  # one byte of the 4th member's name: its checksum fails
    path.write_bytes(bytes(data))
    with pytest.raises(
        SourceError,
        match=r"^domains.a.url: corrupt archive set.tar \(ReadError: a damaged header "
        rf"at byte {fourth} of the tar stream",
    ):
        run_fetch(tmp_path, f"    source: archive\n    url: {path}\n")
    assert not (tmp_path / "raw" / "a").exists()
    gz = tmp_path / "set.tar.gz"  # the same inside gzip: the decompressed stream is checked
    with tarfile.open(gz, "w:gz") as t, tarfile.open(path, ignore_zeros=True) as src:
        for info in src.getmembers()[:3]:
            t.addfile(info, src.extractfile(info))
    cut = gz.read_bytes()
    gz.write_bytes(cut[:-12])  # the gzip trailer (CRC, length) cut off
    with pytest.raises(SourceError, match=r"corrupt archive set.tar.gz"):
        run_fetch(tmp_path, f"    source: archive\n    url: {gz}\n")


# --- issue 24.14: every file a folder source's pattern matches is used or counted ----------------------


def test_folder_source_counts_and_names_every_file_it_leaves_out(tmp_path, capsys):
    """`.hidden.png` and files without an extension were ignored and counted nowhere. Files with no
    suffix are copied now (prepare reads what they hold: an image is used, other bytes are counted as
    not_image in prepare.json); hidden files and other suffixes are counted by reason, named, and
    listed in the raw folder for prepare."""
    from stages.prepare import PrepareParams, prepare
    from unpaired.files import read_source_skipped
    from unpaired.sources.folder import SKIPPED

    photos = tmp_path / "photos"
    (photos / ".git").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(jpeg(1))
    (photos / "b.jpg").write_bytes(jpeg(3))
    (photos / ".hidden.png").write_bytes(png(2))
    (photos / "scan").write_bytes(png(4))  # an image without an extension
    (photos / "README").write_text("not an image")  # no extension, not an image
    (photos / "notes.txt").write_text("not an image")
    (photos / ".git" / "config").write_text("[core]\n")
    out = run_fetch(tmp_path, f"    source: folder\n    path: {photos}\n")
    assert sorted(pd.read_csv(out / "manifest.csv").file) == ["README", "a.jpg", "b.jpg", "scan"]
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (
        f"domains.a: folder: skipped 3 of 7 files under {photos}: 2 hidden (.git/config, "
        f".hidden.png); 1 not an image file name (notes.txt); listed in the raw folder's {SKIPPED}"
    )
    listed = pd.read_csv(out / SKIPPED)
    assert list(zip(listed.file, listed.reason)) == [
        (".git/config", "hidden"),
        (".hidden.png", "hidden"),
        ("notes.txt", "not_image_name"),
    ]
    assert read_source_skipped(out) == {"hidden": 2, "not_image_name": 1}
    b = tmp_path / "raw" / "b"
    b.mkdir()
    for i in range(3):
        (b / f"{i}.png").write_bytes(png(10 + i))
    report = prepare(
        PrepareParams(image_size=8, min_size=8, test_fraction=0.0),
        tmp_path / "raw",
        tmp_path / "prepared",
        tmp_path / "prepare.json",
        workers=1,
    )
    assert report["skipped"]["a"]["not_image"] == 1  # README, named on the page
    # the files the source left out are counted as prepare.json's skip reasons too
    assert report["skipped"]["a"]["hidden"] == 2 and report["skipped"]["a"]["not_image_name"] == 1
    assert report["skipped"]["b"]["hidden"] == 0 and report["total_skipped"] == 4
    assert json.loads((tmp_path / "prepare.json").read_text())["skipped"]["a"]["hidden"] == 2
    assert report["kept"]["a"]["train"] == 3  # a.jpg, b.jpg and scan
