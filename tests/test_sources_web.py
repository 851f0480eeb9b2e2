"""The web source, with the packages' real page-URL building and page parsing, against a real HTTP(S)
server on 127.0.0.1 serving result pages in each engine's format and images built here."""

import datetime
import hashlib
import html
import io
import ipaddress
import json
import socket
import ssl
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.test_sources_files import Server, run_fetch
from unpaired.params import ParamsError
from unpaired.sources import web
from unpaired.sources.base import SourceError


def picture(seed: int, size=(32, 24), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def bing_page(murls: list[str]) -> bytes:
    """The markup of https://www.bing.com/images/async: one `a.iusc` per result, its `m` attribute
    the result's JSON (HTML-escaped), `murl` the image's URL."""
    thumb = "https://tse1.mm.bing.net/th?id=OIP.x"
    items = []
    for i, (url, title) in enumerate(murls):
        m = json.dumps(
            {
                "cid": str(i),
                "purl": "https://example.org/page",
                "murl": url,
                "turl": thumb,
                "t": title,
            },
            separators=(",", ":"),
        )
        items.append(
            f'<li><div class="iuscp"><div class="imgpt"><a class="iusc" href="/images/search?view=detailV2" '
            f'm="{html.escape(m)}"><img class="mimg" src="{thumb}"></a></div></div></li>'
        )
    return f'<ul class="dgControl_list">{"".join(items)}</ul>'.encode()


@pytest.fixture
def bing(monkeypatch):
    """A Bing stand-in: page 0 of "red fox" holds twelve results, of which five usable images."""
    monkeypatch.setattr("unpaired.sources.web.sleep", lambda s: None)
    s = Server()
    good = {
        0: picture(0),
        2: picture(2, (24, 24), "PNG"),
        8: picture(8),
        9: picture(9),
        10: picture(10),
        11: picture(11),
    }
    s.images = {f"/img/{rank}.jpg": data for rank, data in good.items()}
    s.images["/img/1.jpg"] = b"<html>a page, not a picture</html>"
    s.images["/img/4.jpg"] = good[0]  # the same bytes as rank 0
    s.images["/img/5.jpg"] = picture(5, (64, 64))[:600]  # cut short (served whole)
    s.images["/img/7.jpg"] = picture(7, (8, 8))  # below min_size
    for path, data in s.images.items():
        s.routes[path] = (200, data, "")
    murls = [(f"{s.url}/img/{rank}.jpg", "a fox") for rank in range(12)]  # /img/3.jpg: 404
    murls[6] = (
        f"{s.url}/img/6.png",
        "fox.jpg",
    )  # a .png URL (404 here): icrawler's regex ran on to the title
    s.routes["/images/async?q=red+fox&first=0"] = (200, bing_page(murls), "")
    yield s
    s.close()


def test_bing_images_are_checked_deduplicated_named_by_rank_and_cached(bing, tmp_path, capsys):
    body = f"    source: web\n    keywords: red fox\n    base_url: {bing.url}/images/async\n    min_size: 12\n"
    out = run_fetch(tmp_path, body + "    count: 5\n")
    manifest = pd.read_csv(out / "manifest.csv")
    ranks = [0, 2, 8, 9, 10]
    sha = {r: hashlib.sha256(bing.images[f"/img/{r}.jpg"]).hexdigest()[:12] for r in ranks}
    assert list(manifest.file) == [f"{r:05d}_{sha[r]}.{'png' if r == 2 else 'jpg'}" for r in ranks]
    assert list(manifest.origin) == [f"{bing.url}/img/{r}.jpg" for r in ranks]
    assert (manifest.source == "web").all()
    assert (manifest.licence == "unknown: check each origin URL before use").all()
    assert all(
        (out / f).read_bytes() == bing.images[o.removeprefix(bing.url)]
        for f, o in zip(manifest.file, manifest.origin)
    )
    assert (
        "offered 12 results (0 without an image URL), 5 kept; skipped: 2 download_failed, 1 duplicate, "
        "1 not_image, 1 too_small, 1 truncated" in capsys.readouterr().out
    )
    assert "/img/11.jpg" not in bing.hits  # nothing fetched beyond need
    assert "/images/async?q=red+fox&first=20" not in bing.hits

    hits = dict(bing.hits)
    out = run_fetch(tmp_path, body + "    count: 5\n")  # the same count: no request at all
    assert bing.hits == hits and list(pd.read_csv(out / "manifest.csv").file) == list(manifest.file)
    out = run_fetch(tmp_path, body + "    count: 3\n")  # fewer: the first three, still no request
    assert bing.hits == hits and list(pd.read_csv(out / "manifest.csv").file) == list(
        manifest.file[:3]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest.file[:3], "manifest.csv"])


def test_bing_more_than_the_results_hold(bing, tmp_path, capsys):
    bing.routes["/images/async?q=red+fox&first=20"] = (
        200,
        bing_page([]),
        "",
    )  # the end of the results
    out = run_fetch(
        tmp_path,
        f"    source: web\n    keywords: [red fox]\n    count: 50\n"
        f"    base_url: {bing.url}/images/async\n",
    )
    assert len(pd.read_csv(out / "manifest.csv")) == 7  # 6 good, and the 8x8 one
    assert "only 7 of 50: the results ran out" in capsys.readouterr().out


@pytest.mark.parametrize(
    "names",
    [
        ["0.png", "1.png", "2.png", "3.png"],
        ["0.jpeg", "1.JPG", "2.webp", "3"],  # any extension, or none
    ],
)
def test_bing_results_of_any_extension_are_read(tmp_path, capsys, names):
    """icrawler's parser kept only URLs ending in .jpg: a page of four PNG results gave "no image
    results". Every result's full image URL is read now, and what the page offered is counted."""
    s = Server()
    try:
        formats = {"png": "PNG", "webp": "WEBP"}
        for i, name in enumerate(names):
            s.routes[f"/img/{name}"] = (
                200,
                picture(30 + i, fmt=formats.get(name.rsplit(".")[-1].lower(), "JPEG")),
                "",
            )
        page = bing_page([(f"{s.url}/img/{name}", "a fox") for name in names])
        page = page.replace(
            b"</ul>",
            b'<li><div class="imgpt"><a class="iusc" m="{&quot;t&quot;:&quot;no murl&quot;}">'
            b"</a></div></li></ul>",
        )  # a fifth result without an image URL
        s.routes["/images/async?q=red+fox&first=0"] = (200, page, "")
        s.routes["/images/async?q=red+fox&first=20"] = (200, bing_page([]), "")
        out = run_fetch(
            tmp_path,
            f"    source: web\n    keywords: red fox\n    count: 10\n"
            f"    base_url: {s.url}/images/async\n",
        )
        manifest = pd.read_csv(out / "manifest.csv")
        assert list(manifest.origin) == [f"{s.url}/img/{name}" for name in names]
        assert "offered 5 results (1 without an image URL), 4 kept" in capsys.readouterr().out
    finally:
        s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, pattern",
    [
        (
            "empty",
            r"^domains\.a\.keywords: bing returned no image results for 'red fox' \(.*\); check the phrase",
        ),
        (
            "500",
            r"^domains\.a\.engine: the bing image search is unreachable or refused \(HTTP 500 for ",
        ),
        (
            "down",
            r"^domains\.a\.engine: the bing image search is unreachable or refused \(ConnectionError for ",
        ),
    ],
)
def test_search_failures_are_one_line(bing, tmp_path, case, pattern):
    page = "/images/async?q=red+fox&first=0"
    base = f"{bing.url}/images/async"
    if case == "empty":
        bing.routes[page] = (200, b"<html><body>There are no results for red fox</body></html>", "")
    elif case == "500":
        bing.routes[page] = (500, b"oops", "")
    else:
        base = f"http://127.0.0.1:{closed_port()}/images/async"
    with pytest.raises(SourceError, match=pattern) as err:
        run_fetch(
            tmp_path,
            f"    source: web\n    keywords: red fox\n    count: 3\n    base_url: {base}\n",
        )
    assert "\n" not in str(err.value) and not (tmp_path / "raw" / "a").exists()
    if case == "500":
        assert bing.hits[page] == web.PAGE_TRIES
    assert list((tmp_path / "cache").rglob("page-*.html")) == []  # nothing cached to trip a re-run


def test_nothing_usable_and_bad_params(bing, tmp_path):
    bing.routes["/images/async?q=red+fox&first=0"] = (
        200,
        bing_page([(f"{bing.url}/img/1.jpg", "")]),
        "",
    )
    bing.routes["/images/async?q=red+fox&first=20"] = (200, bing_page([]), "")
    with pytest.raises(
        SourceError,
        match=r"^domains\.a\.keywords: none of the bing results could be used "
        r"\(skipped: 1 not_image\); try other keywords$",
    ):
        run_fetch(
            tmp_path,
            f"    source: web\n    keywords: red fox\n    base_url: {bing.url}/images/async\n",
        )
    with pytest.raises(
        ParamsError, match=r"^params\.yaml: domains\.a\.engine: must be one of 'bing', 'google'"
    ):
        run_fetch(tmp_path, "    source: web\n    keywords: fox\n    engine: altavista\n")
    with pytest.raises(ParamsError, match=r"^params\.yaml: domains\.a\.keywords: required"):
        run_fetch(tmp_path, "    source: web\n    count: 3\n")


def self_signed(tmp_path):
    """A certificate for 127.0.0.1, and an SSL context serving it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return cert_file, context


def test_google_over_https(tmp_path, monkeypatch):
    """google-images-download's parser only takes https image URLs, so this server speaks TLS, with
    a certificate that requests trusts through REQUESTS_CA_BUNDLE."""
    cert_file, context = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    s = Server()
    s.httpd.socket = context.wrap_socket(s.httpd.socket, server_side=True)
    base = s.url.replace("http://", "https://")
    try:
        images = {
            "/g/0.jpg": picture(20),
            "/g/1.jpg": b"not an image",
            "/g/2.jpg": picture(22),
            "/g/3.jpg": picture(23),
        }
        for path, data in images.items():
            s.routes[path] = (200, data, "")
        for word, paths in (
            ("fox", ["/g/0.jpg", "/g/1.jpg", "/g/2.jpg"]),
            ("owl", ["/g/0.jpg", "/g/3.jpg"]),
        ):
            items = ",".join(f'["{base}{p}",300,200]' for p in paths)
            page = f"<script>AF_initDataCallback({{key: 'ds:1', data:[null,[{items}]]}});</script>".encode()
            url = urlsplit(web.rebase(web.google_pages(word)[0], f"{base}/search"))
            s.routes[f"{url.path}?{url.query}"] = (200, page, "")
        out = run_fetch(
            tmp_path,
            f"    source: web\n    engine: google\n    keywords: [fox, owl]\n"
            f"    count: 4\n    base_url: {base}/search\n",
        )
        manifest = pd.read_csv(out / "manifest.csv")
        sha = {p: hashlib.sha256(d).hexdigest()[:12] for p, d in images.items()}
        assert list(manifest.file) == [
            f"fox_00000_{sha['/g/0.jpg']}.jpg",
            f"fox_00002_{sha['/g/2.jpg']}.jpg",
            f"owl_00001_{sha['/g/3.jpg']}.jpg",
        ]  # owl's first is fox's first
        assert list(manifest.origin) == [f"{base}/g/0.jpg", f"{base}/g/2.jpg", f"{base}/g/3.jpg"]
    finally:
        s.close()
