"""The quickdraw source against a loopback server serving .bin files in the documented binary
record layout (key_id u64, countrycode 2 bytes, recognized i8, timestamp u32, n_strokes u16, then per
stroke n_points u16, x bytes, y bytes; little-endian)."""

import struct

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.helpers import TINY, clone_project, dvc
from tests.test_sources_files import Server, run_fetch
from unpaired.params import ParamsError
from unpaired.sources.base import SourceError


def record(key_id: int, recognized: bool, strokes) -> bytes:
    out = struct.pack("<Q2sbIH", key_id, b"NO", int(recognized), 1_700_000_000, len(strokes))
    for xs, ys in strokes:
        out += struct.pack("<H", len(xs)) + bytes(xs) + bytes(ys)
    return out


def binary(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    data = b""
    for i in range(n):
        strokes = [
            (rng.integers(0, 256, 6).tolist(), rng.integers(0, 256, 6).tolist())
            for _ in range(int(rng.integers(1, 4)))
        ]
        data += record(1000 + i, i % 4 != 3, strokes)  # every 4th drawing unrecognised
    return data


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def qd(server, count=5, extra=""):
    return (
        f"    source: quickdraw\n    category: dragon\n    count: {count}\n    image_size: 32\n"
        f"    base_url: {server.url}/binary/\n{extra}"
    )


def test_fetch_renders_recognized_drawings_deterministically(server, tmp_path):
    server.routes["/binary/dragon.bin"] = (200, binary(12), "")
    out = run_fetch(tmp_path, qd(server, count=6))
    manifest = pd.read_csv(out / "manifest.csv")
    ids = sorted(int(f.split("_")[1].split(".")[0]) for f in manifest.file)
    assert len(ids) == 6 and all((i - 1000) % 4 != 3 for i in ids)  # recognised only
    assert (manifest.licence == "CC BY 4.0 (Google Quick, Draw!)").all()
    img = Image.open(out / manifest.file[0])
    arr = np.asarray(img)
    assert img.size == (32, 32) and arr.min() < 80 and arr[0].min() > 200  # strokes inside a margin
    assert len(np.unique(arr)) > 5  # antialiased
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    out = run_fetch(tmp_path, qd(server, count=6))  # cached: no new request
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    assert server.hits["/binary/dragon.bin"] == 1
    out = run_fetch(tmp_path, qd(server, count=12, extra="    recognized: false\n"))
    assert len(list(out.glob("*.png"))) == 12


@pytest.mark.parametrize(
    "body, status, words",
    [
        (
            b"<html><body>Error 404 (Not Found)</body></html>",
            200,
            "is not a Quick, Draw! binary file",
        ),
        (binary(3)[:-5], 200, "cut short"),
        (b"", 404, "answered HTTP 404"),
    ],
)
def test_bad_downloads_are_refused_and_not_cached(server, tmp_path, body, status, words):
    server.routes["/binary/dragon.bin"] = (status, body, "")
    with pytest.raises(SourceError) as err:
        run_fetch(tmp_path, qd(server))
    assert str(err.value).startswith("domains.a.base_url: ") and words in str(err.value)
    assert not (tmp_path / "raw" / "a").exists()
    assert not (tmp_path / "cache" / "quickdraw" / "dragon.bin").exists()


def test_too_few_drawings_and_unknown_category(server, tmp_path):
    server.routes["/binary/dragon.bin"] = (200, binary(4), "")
    with pytest.raises(SourceError, match=r"^domains.a.count: only 3 recognized dragon drawings"):
        run_fetch(tmp_path, qd(server, count=10))
    with pytest.raises(
        ParamsError,
        match=r"domains.a.category: unknown Quick, Draw! category 'dragons'; "
        r"did you mean dragon",
    ):
        run_fetch(tmp_path, "    source: quickdraw\n    category: dragons\n")


def test_dvc_repro_with_quickdraw_domain(server, tmp_path):
    server.routes["/binary/dragon.bin"] = (200, binary(40), "")
    repo = clone_project(tmp_path / "project", TINY)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["domains"]["a"] = {
        "source": "quickdraw",
        "category": "dragon",
        "count": 12,
        "image_size": 32,
        "base_url": f"{server.url}/binary/",
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "prepare")
    assert len(list((repo / "data" / "prepared").glob("*A/*.png"))) == 12
