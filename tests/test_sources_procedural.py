"""The embedded procedural sources: determinism, count stability, parallel = serial, params errors."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from stages.fetch import fetch_domain
from unpaired.params import ParamsError
from unpaired.sources import doodles, flares


def write_params(path, body: str):
    path.write_text(body)
    return path


def digests(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))
    }


SPEC = {
    "doodles": "source: doodles\n    image_size: 32\n    strokes: [1, 3]\n    stroke_width: 1.5\n    seed: 7",
    "flares": "source: flares\n    image_size: 32\n    shapes: [2, 5]\n    seed: 7",
}


@pytest.mark.parametrize("source", ["doodles", "flares"])
def test_deterministic_count_stable_and_parallel(tmp_path, source):
    runs = {}
    for name, count, workers in [("small", 5, 1), ("again", 5, 2), ("more", 9, 2)]:
        pf = write_params(
            tmp_path / f"{name}.yaml", f"domains:\n  x:\n    {SPEC[source]}\n    count: {count}\n"
        )
        out = fetch_domain(
            "x", tmp_path / name / "raw" / "x", tmp_path / name / "cache", pf, workers=workers
        )
        runs[name] = digests(out)
        manifest = pd.read_csv(out / "manifest.csv")
        assert list(manifest.columns) == ["file", "source", "origin", "licence"]
        assert len(manifest) == count and set(manifest.file) == set(runs[name])
        assert (manifest.source == source).all()
    assert runs["small"] == runs["again"]  # same params -> same bytes, any workers
    assert {k: runs["more"][k] for k in runs["small"]} == runs[
        "small"
    ]  # raising count keeps images
    assert len(set(runs["more"].values())) == 9  # images differ from each other


def test_images_depend_on_domain_and_seed():
    p = doodles.DoodleParams(image_size=32, seed=1)
    a = doodles.render(p, "a", 0).tobytes()
    assert doodles.render(p, "b", 0).tobytes() != a
    assert doodles.render(doodles.DoodleParams(image_size=32, seed=2), "a", 0).tobytes() != a


def test_what_the_images_look_like():
    sketch = doodles.render(doodles.DoodleParams(image_size=48, seed=3), "a", 0)
    assert sketch.size == (48, 48) and sketch.mode == "L"
    hist = sketch.histogram()
    assert hist[255] > 0.5 * 48 * 48  # mostly white paper
    assert sum(hist[:128]) > 20  # with dark pen strokes
    art = flares.render(
        flares.FlareParams(image_size=48, seed=3, palette=("red", "#00ff00")), "b", 0
    )
    assert art.size == (48, 48) and art.mode == "RGB"
    assert (
        len(np.unique(np.asarray(art).reshape(-1, 3), axis=0)) > 10
    )  # shapes, outlines, antialiased edges


@pytest.mark.parametrize(
    "body, key",
    [
        ("source: flares\n    count: 0", "domains.x.count"),
        ("source: flares\n    palette: ['red', 'notacolour']", "domains.x.palette[1]"),
        ("source: flares\n    shapes: [5, 2]", "domains.x.shapes"),
        ("source: doodles\n    strokes: 3", "domains.x.strokes"),
        ("source: doodles\n    stroke_widht: 3", "domains.x.stroke_widht"),
        ("source: nosuch", "domains.x.source"),
        ("count: 3", "domains.x.source"),
    ],
)
def test_bad_params_one_line_no_output(tmp_path, body, key):
    pf = write_params(tmp_path / "p.yaml", f"domains:\n  x:\n    {body}\n")
    with pytest.raises(ParamsError) as err:
        fetch_domain("x", tmp_path / "raw" / "x", tmp_path / "cache", pf, workers=1)
    assert str(err.value).startswith(f"params.yaml: {key}: ")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_unknown_source_lists_known_ones(tmp_path):
    pf = write_params(tmp_path / "p.yaml", "domains:\n  x:\n    source: pinterest\n")
    with pytest.raises(ParamsError, match="known sources: .*doodles.*flares"):
        fetch_domain("x", tmp_path / "raw" / "x", tmp_path / "cache", pf, workers=1)


def test_failed_refetch_keeps_previous_output(tmp_path):
    good = write_params(
        tmp_path / "g.yaml", f"domains:\n  x:\n    {SPEC['flares']}\n    count: 3\n"
    )
    out = fetch_domain("x", tmp_path / "raw" / "x", tmp_path / "cache", good, workers=1)
    before = digests(out)
    bad = write_params(
        tmp_path / "b.yaml", f"domains:\n  x:\n    {SPEC['flares']}\n    count: -1\n"
    )
    with pytest.raises(ParamsError):
        fetch_domain("x", tmp_path / "raw" / "x", tmp_path / "cache", bad, workers=1)
    assert digests(out) == before
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["x"]  # no temp dirs left


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("domains:\n  a:\n    source: flares\n    image_size: 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.fetch", "a", "--out", "data/raw/a"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={
            "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1]),
            "PATH": "/usr/bin:/bin",
        },
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: params.yaml: domains.a.image_size: must be >= 8 pixels, got 2"
    )
    assert not (tmp_path / "data" / "raw" / "a").exists()
