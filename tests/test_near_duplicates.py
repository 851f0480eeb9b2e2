"""Near-duplicates (issue 19): edits of one photo are caught, distinct drawings are not, the largest
of a cluster is kept, no cluster straddles the split, the same picture in both domains is warned."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import replace

import pandas as pd
import pytest
import yaml
from PIL import Image
from ruamel.yaml import YAML
from skimage import data

from stages.prepare import prepare
from unpaired import near_duplicates as nd
from unpaired.errors import UserError
from unpaired.params import ParamsError, parse
from unpaired.prepare import PrepareParams
from unpaired.sources.doodles import DoodleParams, render

DEFAULT = PrepareParams().near_duplicate_distance


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def edits(img: Image.Image) -> dict[str, Image.Image]:
    """The copies a web scrape holds: re-encoded at JPEG quality 95 and 60, resized to 0.8×, 5 % cut off
    one side, 5 % of each side cut centred (2.5 % all round). Not caught reliably: 5 % cut off two sides
    at once (a corner: 64-100 bits for these photos)."""
    w, h = img.size
    return {
        "q95": _jpeg(img, 95),
        "q60": _jpeg(img, 60),
        "small": img.resize((round(w * 0.8), round(h * 0.8))),
        "crop": img.crop((round(w * 0.05), 0, w, h)),
        "centre": img.crop(
            (round(w * 0.025), round(h * 0.025), w - round(w * 0.025), h - round(h * 0.025))
        ),
    }


def test_edits_of_a_photo_are_within_the_default_distance():
    photo = Image.fromarray(data.astronaut())
    base = nd.phash(photo)
    for name, copy in edits(photo).items():
        distance = bin(base ^ nd.phash(copy)).count("1")
        assert distance <= DEFAULT, (name, distance)


def test_200_distinct_doodles_are_not_near_duplicates():
    hashes = [nd.phash(render(DoodleParams(), "a", i)) for i in range(200)]
    assert nd.close_pairs(hashes, DEFAULT) == []
    assert len(set(nd.keepers(hashes, [1] * 200, [f"{i:04d}" for i in range(200)], DEFAULT))) == 200


def test_keepers_largest_then_smallest_hash_and_chains():
    # 0~1~2 chain (distances 1), 3 far away; 1 and 2 are the largest, tie broken by the hash
    hashes = [0b0, 0b1, 0b11, 2**256 - 1]
    assert (
        nd.close_pairs([0, 1 << 200], 1) == [(0, 1)] and nd.close_pairs([0, 0b11 << 200], 1) == []
    )
    assert nd.close_pairs(hashes, 1) == [(0, 1), (1, 2)]
    assert nd.keepers(hashes, [10, 20, 20, 5], ["c", "b", "a", "d"], 1) == [2, 2, 2, 3]
    assert nd.keepers(hashes, [10, 20, 20, 5], ["c", "b", "a", "d"], 0) == [0, 1, 2, 3]  # 0: off
    assert nd.close_pairs(hashes, 2, others=[0b10]) == [(0, 0), (1, 0), (2, 0)]
    rng = random.Random(0)
    many = [rng.getrandbits(256) for _ in range(nd.BLOCK * 3 + 7)]  # several blocks, words used
    naive = [
        (i, j)
        for i in range(len(many))
        for j in range(i + 1, len(many))
        if (many[i] ^ many[j]).bit_count() <= 110
    ]
    assert naive and nd.close_pairs(many, 110) == naive
    other = many[:50]
    assert nd.close_pairs(many, 110, others=other) == sorted(
        (i, j)
        for i in range(len(many))
        for j in range(50)
        if (many[i] ^ other[j]).bit_count() <= 110
    )


PHOTOS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "clock",
    "moon",
    "coins",
    "immunohistochemistry",
)


def _raw_with_clusters(root, clusters: int = len(PHOTOS)):
    """Domain a: `clusters` of scikit-image's photos, each with its 5 edits (6 files each); b: 8 doodles."""
    for d in "ab":
        (root / d).mkdir(parents=True)
    for i, name in enumerate(PHOTOS[:clusters]):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.save(root / "a" / f"c{i:02d}_orig.png")
        for name, copy in edits(img).items():
            copy.save(root / "a" / f"c{i:02d}_{name}.png")
    for i in range(8):
        render(DoodleParams(seed=9), "b", i).save(root / "b" / f"b{i}.png")
    return root


def test_prepare_keeps_one_per_cluster_the_largest_and_never_splits_one(tmp_path):
    raw = _raw_with_clusters(tmp_path / "raw")
    p = PrepareParams(image_size=32, test_fraction=0.5, min_size=8)
    counts = prepare(p, raw, tmp_path / "out", tmp_path / "m.json", workers=1)
    assert counts["kept"]["a"]["train"] + counts["kept"]["a"]["test"] == len(PHOTOS)
    assert counts["skipped"]["a"]["near_duplicate"] == 5 * len(PHOTOS)
    assert counts["kept"]["a"]["test"] > 0 and counts["kept"]["a"]["train"] > 0
    assert json.loads((tmp_path / "m.json").read_text())["skipped"]["a"][
        "near_duplicate"
    ] == 5 * len(PHOTOS)
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    a = manifest[manifest.domain == "a"]
    # of each cluster the largest is kept; the original and its two re-encodings tie: the smaller SHA-256
    for i, name in enumerate(PHOTOS):
        full = [raw / "a" / f"c{i:02d}_{e}.png" for e in ("orig", "q95", "q60")]
        expected = min(full, key=lambda f: hashlib.sha256(f.read_bytes()).hexdigest())
        assert (a.origin == expected.as_posix()).sum() == 1, name
    off = prepare(
        PrepareParams(image_size=32, test_fraction=0.5, min_size=8, near_duplicate_distance=0),
        raw,
        tmp_path / "off",
        tmp_path / "off.json",
        workers=1,
    )
    assert (
        sum(off["kept"]["a"].values()) == 6 * len(PHOTOS)
        and off["skipped"]["a"]["near_duplicate"] == 0
    )


def test_cluster_on_one_side_for_every_seed(tmp_path):
    raw = _raw_with_clusters(tmp_path / "raw", clusters=4)
    for seed in range(3):
        out = tmp_path / f"out{seed}"
        prepare(
            PrepareParams(image_size=16, test_fraction=0.5, min_size=8, seed=seed),
            raw,
            out,
            tmp_path / f"m{seed}.json",
            workers=1,
        )
        a = pd.read_csv(out / "manifest.csv").query("domain == 'a'")
        stems = [o.rsplit("/", 1)[-1].split("_")[0] for o in a.origin]
        assert len(stems) == len(set(stems)) == 4  # one image per cluster: one split per cluster


def test_same_picture_in_both_domains_is_warned_with_names(tmp_path, capsys):
    raw = _raw_with_clusters(tmp_path / "raw", clusters=3)
    Image.fromarray(data.camera()).convert("RGB").resize((300, 300)).save(raw / "b" / "stolen.png")
    counts = prepare(
        PrepareParams(image_size=16, test_fraction=0.0, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    err = capsys.readouterr().err
    assert "near-duplicate pair(s) across domains a and b" in err
    pairs = counts["cross_domain_near_duplicates"]
    assert (
        len(pairs) == 1 and pairs[0][0].startswith("trainA/") and pairs[0][1].startswith("trainB/")
    )
    assert pairs[0][0] in err and pairs[0][1] in err


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"near_duplicate_distance": -1}, "prepare.near_duplicate_distance"),
        ({"near_duplicate_distance": 129}, "prepare.near_duplicate_distance"),
        ({"near_duplicate_distance": 2.5}, "prepare.near_duplicate_distance"),
        ({"faces": {"b": False}}, "prepare.faces.b"),
        ({"faces": {"b": "blur"}}, "prepare.faces.b"),
        ({"faces": {"c": "crop"}}, "prepare.faces.c"),
        ({"faces": "crop"}, "prepare.faces"),
        ({"face_margin": -0.1}, "prepare.face_margin"),
        ({"page_thumbnails": 0}, "prepare.page_thumbnails"),
    ],
)
def test_new_params_fail_in_one_line_naming_the_key(raw, key):
    with pytest.raises(ParamsError) as err:
        parse(PrepareParams, raw, "prepare")
    assert str(err.value).startswith(key + ":") or f"{key}:" in str(err.value)
    assert "\n" not in str(err.value)
    if raw.get("faces") == {"b": False}:
        assert "write none" in str(err.value)


def test_new_params_read_the_same_in_yaml_1_1_and_1_2():
    from tests.helpers import ROOT

    for name in (
        "conf/config.yaml",
        "conf/preset/simpsons2faces.yaml",
    ):  # what Hydra composes (1.1)
        conf = (ROOT / name).read_text()
        assert yaml.safe_load(conf)["prepare"] == YAML(typ="safe").load(conf)["prepare"], name
    text = (ROOT / "params.yaml").read_text()
    v11 = yaml.safe_load(text)["prepare"]
    v12 = YAML(typ="safe").load(text)["prepare"]
    assert v11 == v12
    assert v12["faces"] == {"a": "none", "b": "none"} and v12["near_duplicate_distance"] == DEFAULT
    assert parse(PrepareParams, v12, "prepare") == PrepareParams()
    for key in v12:
        assert key not in ("size", "nfiles")


def test_a_domain_left_without_training_images_names_what_took_them(tmp_path):
    """Issue 24.11: when near-duplicate removal took most of a domain, the line says so and names
    prepare.near_duplicate_distance, in plain words (it advised min_size, test_fraction and faces
    and printed a Python dict of the counts)."""
    raw = tmp_path / "raw"
    for d in ("a", "b"):
        (raw / d).mkdir(parents=True)
    photo = Image.fromarray(data.astronaut()).convert("RGB").resize((128, 128))
    photo.save(raw / "a" / "orig.png")
    for name, copy in edits(photo).items():
        copy.save(raw / "a" / f"{name}.png")
    Image.new("RGB", (4, 40)).save(raw / "a" / "thin.png")
    for i in range(4):
        render(DoodleParams(seed=9), "b", i).save(raw / "b" / f"b{i}.png")
    p = PrepareParams(image_size=32, test_fraction=0.99, min_size=8)
    with pytest.raises(UserError) as err:
        prepare(p, raw, tmp_path / "out", tmp_path / "m.json", workers=1)
    assert str(err.value) == (
        f"{raw / 'a'}: no usable training images for domain a: 5 of its 7 files are near-duplicates of "
        f"another image (within prepare.near_duplicate_distance: {DEFAULT} bits of 256); lower "
        f"prepare.near_duplicate_distance (0 turns the check off) or add different images (the others: 1 too "
        f"small, 1 held out for test)"
    )
    (raw / "a" / "thin.png").unlink()
    for name in edits(photo):
        (raw / "a" / f"{name}.png").unlink()
    with pytest.raises(UserError) as err:  # the split took the most: test_fraction is named
        prepare(
            replace(p, near_duplicate_distance=0),
            raw,
            tmp_path / "out",
            tmp_path / "m.json",
            workers=1,
        )
    assert str(err.value) == (
        f"{raw / 'a'}: no usable training images for domain a: 1 of its 1 files went to "
        f"testA (prepare.test_fraction: 0.99); lower prepare.test_fraction or add images"
    )
