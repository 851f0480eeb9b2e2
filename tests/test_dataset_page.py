"""The dataset page (issue 19): metrics/data/index.html, rendered in real chromium at 1280 px —
contact sheets per domain and split (all, then a seeded sample, saying so), skipped images grouped by
reason with the image kept next to each near-duplicate, counts per source, the settings. Same bytes
on every run."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data

from stages.prepare import prepare
from tests.helpers import CHROMIUM, chromium_page
from unpaired.prepare import PrepareParams
from unpaired.sources.doodles import DoodleParams, render

CAP = 12


def make_raw(root: Path) -> Path:
    """a: 30 doodles (more than CAP) from the doodles source, an exact copy, a tiny and a broken file;
    b: the astronaut with a re-encoded and a resized copy, her mirror image, and two noise images
    (no face), from two sources."""
    for d in "ab":
        (root / d).mkdir(parents=True)
    rows = []
    for i in range(30):
        render(DoodleParams(image_size=48), "a", i).save(root / "a" / f"doodle_{i:02d}.png")
        rows.append((f"doodle_{i:02d}.png", "doodles", f"index={i}"))
    shutil.copyfile(root / "a" / "doodle_00.png", root / "a" / "copy_of_00.png")
    Image.new("RGB", (4, 4), "red").save(root / "a" / "tiny.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    pd.DataFrame(rows, columns=["file", "source", "origin"]).to_csv(
        root / "a" / "manifest.csv", index=False
    )
    photo = Image.fromarray(data.astronaut())
    photo.save(root / "b" / "astronaut.png")
    photo.save(root / "b" / "astronaut_q60.jpg", quality=60)
    photo.resize((410, 410)).save(root / "b" / "astronaut_small.png")
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "b" / "mirror.png")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            root / "b" / f"noise{i}.png"
        )
    pd.DataFrame(
        [("astronaut.png", "skimage", "data.astronaut"), ("mirror.png", "skimage", "flipped")],
        columns=["file", "source", "origin"],
    ).to_csv(root / "b" / "manifest.csv", index=False)
    return root


PARAMS = PrepareParams(
    image_size=32, test_fraction=0.25, min_size=8, faces={"b": "filter"}, page_thumbnails=CAP
)


def _digests(folder: Path) -> dict[str, str]:
    return {
        f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_the_page_is_the_same_bytes_on_every_run(tmp_path):
    raw = make_raw(tmp_path / "raw")
    prepare(PARAMS, raw, tmp_path / "o1", tmp_path / "m1.json", workers=1, page=tmp_path / "p1")
    prepare(PARAMS, raw, tmp_path / "o2", tmp_path / "m2.json", workers=2, page=tmp_path / "p2")
    one = _digests(tmp_path / "p1")
    assert one == _digests(tmp_path / "p2") and "index.html" in one and len(one) > CAP
    # no stray staging files in the prepared tree or the page
    assert not [
        f for f in (tmp_path / "o1").rglob("*") if ".thumb" in f.name or f.name.startswith(".")
    ]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)"
)
def test_dataset_page_renders_in_chromium(tmp_path):
    raw = make_raw(tmp_path / "raw")
    counts = prepare(
        PARAMS,
        raw,
        tmp_path / "prepared",
        tmp_path / "metrics" / "prepare.json",
        workers=1,
        page=tmp_path / "metrics" / "data",
    )
    assert (
        counts["skipped"]["a"]["duplicate"] == 1 and counts["skipped"]["b"]["near_duplicate"] == 2
    )
    assert counts["skipped"]["b"]["no_face"] == 2 and counts["sources"]["b"]["skimage"] == {
        "kept": 2,
        "skipped": 0,
    }
    with chromium_page((tmp_path / "metrics" / "data" / "index.html").as_uri(), 1280) as (
        page,
        errors,
    ):
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src])"
        )
        assert images and all(ok and w > 0 for ok, w, _ in images), [
            s for ok, w, s in images if not (ok and w)
        ]
        sheets = {
            (s.get_attribute("data-domain"), s.get_attribute("data-split")): s
            for s in page.locator("section.split").all()
        }
        assert sorted(sheets) == [("a", "test"), ("a", "train"), ("b", "test"), ("b", "train")]
        kept = counts["kept"]
        for (d, split), section in sheets.items():
            n = kept[d][split]
            assert section.locator("img").count() == min(n, CAP)
            heading = section.locator("h3").inner_text()
            assert (f"a sample of {CAP} of {n}" if n > CAP else f"all {n}") in heading
        assert kept["a"]["train"] > CAP  # the sample case is exercised
        groups = [g.get_attribute("data-group") for g in page.locator("section.group").all()]
        assert groups == ["unreadable", "too_small", "duplicate", "near_duplicate", "no_face"]
        pairs = page.locator("section.group[data-group=near_duplicate] .pair")
        assert pairs.count() == 2
        for i in range(2):
            pair = pairs.nth(i)
            assert pair.locator("img").count() == 2
            assert "astronaut" in pair.inner_text() and "kept: trainB/" in pair.inner_text()
        dup = page.locator("section.group[data-group=duplicate]").inner_text()
        assert (
            "doodle_00.png" in dup and "kept: trainA/" in dup
        )  # copy_of_00.png comes first, so is kept
        assert "broken.jpg" in page.locator("section.group[data-group=unreadable]").inner_text()
        assert page.locator("section.group[data-group=no_face] img").count() == 2
        sources = page.locator("#sources").inner_text()
        assert "doodles" in sources and "skimage" in sources
        settings = page.locator("#settings").inner_text()
        assert "prepare.faces" in settings and "prepare.near_duplicate_distance" in settings
        assert (
            page.evaluate("document.documentElement.scrollWidth") <= 1280
        )  # no sideways scrolling
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get(
            "UNPAIRED_DATASET_SHOT"
        ):  # to look at it: UNPAIRED_DATASET_SHOT=/tmp/x.png
            shutil.copyfile(shot, os.environ["UNPAIRED_DATASET_SHOT"])
    assert Image.open(shot).width == 1280
    assert not errors, errors


def test_the_evaluate_report_links_the_page(tmp_path):
    import json

    from unpaired.report import write_report

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "prepare.json").write_text(
        json.dumps(
            {
                "kept": {"a": {"train": 3, "test": 1}},
                "skipped": {},
                "page": str(metrics / "data" / "index.html"),
            }
        )
    )
    summary = {
        "best_epoch": 1,
        "best_reason": "last",
        "metrics_available": False,
        "metrics_skipped": "off",
    }
    write_report(
        metrics / "report.html",
        summary=summary,
        table=pd.DataFrame({"epoch": [1]}),
        grids=[],
        params_all={},
        live_dir=tmp_path / "live",
        prepare_report=metrics / "prepare.json",
    )
    assert '<a href="data/index.html">' in (metrics / "report.html").read_text()
