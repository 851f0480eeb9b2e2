"""Face-aware curation (issue 19): a real photograph shipped in scikit-image has a face; synthetic
images do not; `filter` keeps only faces, `crop` cuts a square around the largest one."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from skimage import data

from stages.prepare import prepare
from unpaired import faces
from unpaired.prepare import PrepareParams
from unpaired.sources.doodles import DoodleParams, render


def astronaut() -> Image.Image:
    return Image.fromarray(
        data.astronaut()
    )  # 512×512 RGB, Eileen Collins' face near the top middle


def no_face_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))).convert(
        "RGB"
    )
    return [
        noise,
        ramp,
        render(DoodleParams(image_size=128), "a", 0).convert("RGB"),
        Image.fromarray(data.coffee()),
    ]


def test_the_astronaut_has_one_face_and_synthetic_images_none():
    face = faces.largest_face(astronaut())
    assert face is not None
    x, y, w, h = face
    assert 150 < x + w / 2 < 300 and 60 < y + h / 2 < 200 and 60 < w < 160  # her face, not the flag
    for img in no_face_images():
        assert faces.largest_face(img) is None


def test_crop_to_face_is_a_square_around_the_face():
    img = astronaut()
    face = faces.largest_face(img)
    crop = faces.crop_to_face(img, face, 0.25)
    assert crop.width == crop.height and crop.width >= face[2]
    assert faces.crop_to_face(img, (0, 0, 40, 40), 1.0).size == (
        40,
        40,
    )  # at the corner: no margin left
    assert faces.crop_to_face(img, face, 0.0).width == max(face[2], face[3])


def _raw(root):
    for d in "ab":
        (root / d).mkdir(parents=True)
    for i in range(6):
        render(DoodleParams(seed=3), "a", i).save(root / "a" / f"a{i}.png")
    astronaut().save(root / "b" / "astronaut.png")
    astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        root / "b" / "astronaut_mirror.jpg", quality=90
    )
    for i, img in enumerate(no_face_images()):
        img.save(root / "b" / f"none{i}.png")
    return root


def test_filter_keeps_faces_and_crop_counts_the_cropped(tmp_path):
    raw = _raw(tmp_path / "raw")
    base = dict(image_size=32, test_fraction=0.0, min_size=8, near_duplicate_distance=0)
    off = prepare(PrepareParams(**base), raw, tmp_path / "off", tmp_path / "off.json", workers=1)
    assert off["kept"]["b"]["train"] == 6 and off["skipped"]["b"]["no_face"] == 0
    kept = prepare(
        PrepareParams(**base, faces={"b": "filter"}),
        raw,
        tmp_path / "filter",
        tmp_path / "f.json",
        workers=1,
    )
    assert kept["kept"]["b"]["train"] == 2 and kept["skipped"]["b"]["no_face"] == 4
    assert kept["cropped_to_face"] == {"a": 0, "b": 0} and kept["kept"]["a"]["train"] == 6  # a: off
    crop = prepare(
        PrepareParams(**base, faces={"a": "none", "b": "crop"}, face_margin=0.25),
        raw,
        tmp_path / "crop",
        tmp_path / "c.json",
        workers=1,
    )
    assert crop["cropped_to_face"] == {"a": 0, "b": 2} and crop["skipped"]["b"]["no_face"] == 4
    manifest = pd.read_csv(tmp_path / "crop" / "manifest.csv").query("domain == 'b'")
    name = manifest[manifest.origin.str.endswith("astronaut.png")].file.item()
    whole = np.asarray(Image.open(tmp_path / "filter" / name), dtype=float)
    cropped = np.asarray(Image.open(tmp_path / "crop" / name), dtype=float)
    assert cropped.shape == whole.shape == (32, 32, 3) and np.abs(cropped - whole).mean() > 10
    # the crop is the face: skin tones in the middle, unlike the whole picture's centre (her suit)
    expected = faces.crop_to_face(astronaut(), faces.largest_face(astronaut()), 0.25).resize(
        (32, 32)
    )
    assert np.abs(cropped - np.asarray(expected, dtype=float)).mean() < 12
