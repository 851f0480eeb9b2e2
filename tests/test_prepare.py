"""The prepare stage: every decode and skip case on files made here, stable splits, atomic outputs."""

import hashlib
import io
import json
import os
import shutil
import signal
import tarfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.prepare import prepare
from unpaired.errors import UserError
from unpaired.files import VIEW_MARK, pack_dir, unpack_view
from unpaired.images import Skip, decode
from unpaired.params import ParamsError, parse
from unpaired.prepare import PrepareParams, is_test


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w=40, h=30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    arr = np.stack(
        [np.tile(x, (h, 1)), np.tile(x[::-1], (h, 1)), np.full((h, w), 90, np.uint8)], -1
    )
    return Image.fromarray(arr, "RGB")


# --- decoding -------------------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    top = np.asarray(out)[:8].mean((0, 1))  # after the rotation the red band is on top
    assert top[0] > 200 and top[1] < 80


@pytest.mark.parametrize(
    "mode_img, expected",
    [
        (Image.new("RGBA", (20, 20), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (20, 20), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (20, 20), (0, 255)), (0, 0, 0)),
    ],
)
def test_alpha_composited_on_white(mode_img, expected):
    out = decode(encode(mode_img, "PNG"))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == expected


def test_palette_with_transparency():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    img.paste(1, (10, 0, 20, 20))
    out = decode(encode(img, "PNG", transparency=0))
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((15, 5)) == (0, 255, 0)


def test_16bit_grayscale_scaled_not_clipped():
    arr = np.full((20, 20), 65535, np.uint16)
    arr[:, :10] = 32896  # about half: 128 in 8 bits
    img = Image.fromarray(arr)
    out = decode(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((15, 5)) == (255, 255, 255) and out.getpixel((2, 5)) == (128, 128, 128)


def test_cmyk_and_grayscale_become_rgb():
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(encode(cmyk, "JPEG", quality=95))
    r, g, b = out.getpixel((10, 10))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60
    gray = decode(encode(Image.new("L", (20, 20), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((3, 3)) == (77, 77, 77)


def test_gif_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode(data).getpixel((5, 5))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("PNG", {}),
        ("JPEG", {"quality": 100}),
    ],
)
def test_formats_decode_to_the_same_picture(fmt, kw):
    src = gradient()
    out = np.asarray(decode(encode(src, fmt, **kw)), np.int16)
    assert out.shape == (30, 40, 3)
    assert np.abs(out - np.asarray(src, np.int16)).max() <= (12 if fmt == "JPEG" else 0)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am text pretending to be a png\n" * 4, "not_image"),
        (encode(gradient(200, 200), "JPEG")[:600], "truncated"),
        (encode(gradient(200, 200), "PNG")[:300], "truncated"),
    ],
)
def test_bad_files_are_classified(data, reason):
    with pytest.raises(Skip) as err:
        decode(data, "x")
    assert err.value.reason == reason


# --- the stage --------------------------------------------------------------------------------------


def make_raw(root, n_a=12, n_b=10, seed=0):
    rng = np.random.default_rng(seed)
    for d, n in (("a", n_a), ("b", n_b)):
        folder = root / d
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (24 + i % 5, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"img_{i:03d}.png")
    return root


def tree(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_stage_outputs_and_skip_report(tmp_path):
    raw = make_raw(tmp_path / "raw")
    a = raw / "a"
    (a / "dup.png").write_bytes((a / "img_000.png").read_bytes())
    (a / "empty.jpg").write_bytes(b"")
    (a / "notes.png").write_text("not an image")
    (a / "cut.jpg").write_bytes(encode(gradient(200, 200), "JPEG")[:500])
    Image.new("RGB", (8, 40)).save(a / "thin.png")
    (a / "manifest.csv").write_text(
        "file,source,origin,licence\nimg_001.png,folder,https://x/1.png,cc0\n"
    )
    p = PrepareParams(image_size=16, test_fraction=0.3, min_size=12)
    report = prepare(p, raw, tmp_path / "prepared", tmp_path / "prepare.json", workers=2)
    assert report["skipped"]["a"] == {
        "empty": 1,
        "not_image": 1,
        "truncated": 1,
        "unreadable": 0,
        "too_large": 0,
        "too_small": 1,
        "duplicate": 1,
        "error": 0,
        "near_duplicate": 0,
        "no_face": 0,
        "hidden": 0,  # what a source left out of the raw folder (the folder source's .skipped.csv)
        "not_image_name": 0,
    }
    assert sum(report["kept"]["a"].values()) == 12 and sum(report["kept"]["b"].values()) == 10
    assert json.loads((tmp_path / "prepare.json").read_text()) == report
    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv")
    assert list(manifest.columns) == [
        "file",
        "domain",
        "split",
        "sha256",
        "width",
        "height",
        "origin",
    ]
    assert len(manifest) == 22 and manifest.sha256.is_unique
    for row in manifest.itertuples():
        img = Image.open(tmp_path / "prepared" / row.file)
        assert img.size == (16, 16) and img.mode == "RGB"
        assert row.file.startswith(f"{row.split}{row.domain.upper()}/")
        assert row.split == ("test" if is_test(row.sha256, 0, 0.3) else "train")
    assert manifest.set_index("file").origin.str.endswith("img_001.png").any()
    assert "https://x/1.png" in set(manifest.origin)


def test_same_inputs_same_bytes_any_workers(tmp_path):
    raw = make_raw(tmp_path / "raw")
    p = PrepareParams(image_size=16, resize="pad", pad_color="#102030")
    prepare(p, raw, tmp_path / "one", tmp_path / "one.json", workers=1)
    prepare(p, raw, tmp_path / "two", tmp_path / "two.json", workers=2)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()


def test_pad_letterboxes_on_the_colour(tmp_path):
    raw = tmp_path / "raw"
    for d in "ab":
        (raw / d).mkdir(parents=True)
        Image.new("RGB", (40, 20), (200, 0, 0)).save(raw / d / "wide.png")
    prepare(
        PrepareParams(
            image_size=20, resize="pad", pad_color="#00ff00", test_fraction=0.0, min_size=4
        ),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    img = next((tmp_path / "out" / "trainA").glob("*.png"))
    px = Image.open(img)
    assert px.getpixel((10, 1)) == (0, 255, 0) and px.getpixel((10, 10)) == (200, 0, 0)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"image_size": 0}, "prepare.image_size"),
        ({"test_fraction": 1.0}, "prepare.test_fraction"),
        ({"test_fraction": -0.1}, "prepare.test_fraction"),
        ({"resize": "stretch"}, "prepare.resize"),
        ({"pad_color": "blurple"}, "prepare.pad_color"),
        ({"min_size": 0}, "prepare.min_size"),
    ],
)
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ParamsError, match=f"^params.yaml: {key}: "):
        parse(PrepareParams, raw, "prepare")


def test_empty_domain_fails_and_leaves_previous_output(tmp_path):
    raw = make_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare(PrepareParams(image_size=16), raw, out, tmp_path / "m.json", workers=1)
    before = tree(out)
    for f in (raw / "b").iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(
        UserError,
        match=r"raw/b: no usable training images for domain b: 10 of its 10 files are "
        r"not usable images \(not images\); check domains\.b \(where they come from\)$",
    ):
        prepare(PrepareParams(image_size=16), raw, out, tmp_path / "m.json", workers=1)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "prepared", "raw"]


def test_missing_raw_folder(tmp_path):
    with pytest.raises(UserError, match=r"raw/a: missing; run the fetch stage first"):
        prepare(PrepareParams(), tmp_path / "raw", tmp_path / "out", tmp_path / "m.json")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=30, unique=True),
    st.lists(st.binary(min_size=1, max_size=8), max_size=30),
    st.integers(0, 2**32),
    st.floats(0, 0.99),
)
def test_split_is_stable_when_images_are_added(existing, added, seed, fraction):
    def splits(contents):
        return {
            hashlib.sha256(c).hexdigest(): is_test(hashlib.sha256(c).hexdigest(), seed, fraction)
            for c in contents
        }

    before, after = splits(existing), splits(existing + added)
    assert all(after[h] == s for h, s in before.items())


def test_split_fraction_is_respected():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    share = np.mean([is_test(h, 3, 0.25) for h in hashes])
    assert 0.23 < share < 0.27
    assert not any(is_test(h, 3, 0.0) for h in hashes)


def test_packed_output_and_its_view(tmp_path):
    raw = make_raw(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare(
        PrepareParams(image_size=16, test_fraction=0.0), raw, out, tmp_path / "m.json", workers=1
    )
    assert (out / "testA").is_dir() and not any((out / "testA").iterdir())
    digest = pack_dir(out, tmp_path / "p.tar")
    first = (tmp_path / "p.tar").read_bytes()
    assert hashlib.sha256(first).hexdigest() == digest
    files = tree(out)
    pack_dir(out, tmp_path / "p.tar")  # same files, same bytes
    assert (tmp_path / "p.tar").read_bytes() == first
    view = tmp_path / "view"
    assert unpack_view(tmp_path / "p.tar", view) is True
    assert tree(view) == files and (view / "testA").is_dir()  # empty split kept
    assert unpack_view(tmp_path / "p.tar", view) is False  # up to date: untouched
    (view / "trainA" / next((view / "trainA").iterdir()).name).unlink()
    shutil.copytree(out, tmp_path / "other")  # a changed tar: view rebuilt
    (tmp_path / "other" / "extra.txt").write_bytes(b"")
    pack_dir(tmp_path / "other", tmp_path / "q.tar")
    assert unpack_view(tmp_path / "q.tar", view) is True
    assert {k: v for k, v in tree(view).items() if k not in ("extra.txt", VIEW_MARK)} == {
        k: v for k, v in files.items() if k != VIEW_MARK
    }
    assert (view / VIEW_MARK).read_text().strip() == hashlib.sha256(
        (tmp_path / "q.tar").read_bytes()
    ).hexdigest()


def test_a_packed_tar_with_an_escaping_member_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        t.addfile(tarfile.TarInfo("trainA/ok.png"))
        t.addfile(tarfile.TarInfo("../escape.png"))
    (tmp_path / "view").mkdir()
    (tmp_path / "view" / "keep.png").write_bytes(b"x")
    with pytest.raises(UserError, match="refused: member '../escape.png'"):
        unpack_view(evil, tmp_path / "view")
    assert [p.name for p in (tmp_path / "view").iterdir()] == ["keep.png"]  # left as it was
    assert not (tmp_path / "escape.png").exists()


# --- broken EXIF, large photos, degenerate splits -------------------------------------------------


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF IFD0 as a JPEG's APP1 payload; each entry (tag, type, count, 4-byte value)."""
    import struct

    ifd = (
        struct.pack("<H", len(entries))
        + b"".join(struct.pack("<HHI4s", *e) for e in entries)
        + b"\0" * 4
    )
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd


def banded_jpeg(exif: bytes) -> bytes:
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    return encode(img, "JPEG", exif=exif, quality=95)


ORIENTATION_6 = (0x0112, 3, 1, b"\x06\x00\x00\x00")  # SHORT 6: "rotate 90 CW to display"
XRES_ASCII = (0x011A, 2, 3, b"72\x00\x00")  # XResolution stored as ASCII text


def test_malformed_exif_tag_still_gets_its_orientation(tmp_path):
    data = banded_jpeg(exif_block([ORIENTATION_6, XRES_ASCII]))
    out = decode(data, "x.jpg")  # ImageOps.exif_transpose raised TypeError here
    assert out.size == (20, 40)
    top = np.asarray(out)[:8].mean((0, 1))
    assert top[0] > 200 and top[1] < 80
    raw = make_raw(tmp_path / "raw", n_a=3, n_b=3)
    (raw / "a" / "exif.jpg").write_bytes(data)
    report = prepare(
        PrepareParams(image_size=16, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=2,
    )
    assert sum(report["kept"]["a"].values()) == 4 and report["skipped"]["a"]["error"] == 0


def test_fuzzed_exif_never_stops_prepare(tmp_path):
    """Bytes flipped at random in the EXIF block of an ordinary JPEG: every file is kept or counted
    under a skip reason; no worker raises."""
    from unpaired.images import SKIP_REASONS
    from unpaired.prepare import _process

    base = banded_jpeg(
        exif_block(
            [
                ORIENTATION_6,
                (0x011A, 5, 1, b"\x1a\x00\x00\x00"),
                (0x010F, 2, 4, b"abc\x00"),
                (0x8769, 4, 1, b"\x1a\x00\x00\x00"),
            ]
        )
    )
    start = base.index(b"Exif\x00\x00")
    length = int.from_bytes(base[start - 2 : start], "big") - 2
    rng = np.random.default_rng(0)
    raw = make_raw(tmp_path / "raw", n_a=2, n_b=2)
    reasons = []
    for i in range(400):
        data = bytearray(base)
        for pos in rng.integers(start + 6, start + length, rng.integers(1, 6)):
            data[pos] = int(rng.integers(0, 256))
        (raw / "a" / f"fuzz_{i:03d}.jpg").write_bytes(bytes(data))
        r = _process(
            (
                raw / "a" / f"fuzz_{i:03d}.jpg",
                PrepareParams(image_size=16, min_size=8),
                "a",
                tmp_path / "s.png",
                False,
            )
        )
        reasons.append(r.skip)
        assert r.skip is None or r.skip in SKIP_REASONS
    assert reasons.count(None) > 300  # the pixels are intact: most stay usable
    report = prepare(
        PrepareParams(image_size=16, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=2,
    )
    assert sum(report["kept"]["a"].values()) + sum(report["skipped"]["a"].values()) == 402


@pytest.fixture(scope="module")
def photo_12000x9000():
    """A genuine 12000x9000 JPEG (108 megapixels, 1.7 MB): above Pillow's 89 MP warning threshold."""
    img = Image.linear_gradient("L").resize((12000, 9000)).convert("RGB")
    return encode(img, "JPEG", quality=50)


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path, photo_12000x9000):
    from unpaired.images import decode_scaled

    img, full = decode_scaled(photo_12000x9000, "big.jpg", min_side=64)
    assert full == (12000, 9000) and img.size == (1500, 1125)  # 1/8 scale: still >= 64 px
    raw = make_raw(tmp_path / "raw", n_a=2, n_b=2)
    (raw / "a" / "big.jpg").write_bytes(photo_12000x9000)
    prepare(
        PrepareParams(image_size=16, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    row = manifest[manifest.sha256 == hashlib.sha256(photo_12000x9000).hexdigest()].iloc[0]
    assert (row.width, row.height) == (12000, 9000)
    assert Image.open(tmp_path / "out" / row.file).size == (16, 16)
    with pytest.raises(Skip) as err:  # full size was asked for (translate): too large
        decode(photo_12000x9000, "big.jpg")
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("side", [10000, 20000])  # 100 MP: our guard; 400 MP: Pillow's hard limit
def test_decompression_bombs_are_too_large(tmp_path, side):
    bomb = encode(Image.new("1", (side, side)), "PNG")  # a few KB that would decode to side² pixels
    assert len(bomb) < 200_000
    with pytest.raises(Skip) as err:
        decode(bomb, "bomb.png")
    assert err.value.reason == "too_large"
    raw = make_raw(tmp_path / "raw", n_a=2, n_b=2)
    (raw / "a" / "bomb.png").write_bytes(bomb)
    report = prepare(
        PrepareParams(image_size=16, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    assert report["skipped"]["a"]["too_large"] == 1


def test_a_test_split_evaluate_cannot_use_is_warned(tmp_path, capsys):
    raw = make_raw(tmp_path / "raw", n_a=1, n_b=6)  # domain a: a single image
    report = prepare(
        PrepareParams(image_size=16, min_size=8, test_fraction=0.0),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    err = capsys.readouterr().err
    assert "warning: prepare a: testA has 0 image(s); evaluate needs at least 2" in err
    assert "prepare.test_fraction" in err and "warning: prepare b: testB has 0 image(s)" in err
    assert report["test_too_small"] == {"a": 0, "b": 0}
    assert json.loads((tmp_path / "m.json").read_text())["test_too_small"] == {"a": 0, "b": 0}
    report = prepare(
        PrepareParams(image_size=16, min_size=8, test_fraction=0.5),
        make_raw(tmp_path / "r2", 20, 20),
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    assert report["test_too_small"] == {}


def _killed_at_5(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return x


def test_a_killed_worker_is_one_line():
    from unpaired.parallel import pmap

    with pytest.raises(
        UserError, match=r"^prepare a: a worker process was killed \(out of memory\?\)"
    ):
        pmap(_killed_at_5, range(20), workers=2, desc="prepare a")


# --- issue 24.13: samples with no known range, and the skip line's reason -----------------------------


def tiff(arr) -> bytes:
    return encode(Image.fromarray(arr), "TIFF")


@pytest.mark.parametrize(
    "arr",
    [
        np.linspace(0, 2**31 - 1, 400).reshape(20, 20).astype(np.int32),  # a full-range int32 TIFF
        np.linspace(-1000, 1000, 400).reshape(20, 20).astype(np.int32),  # signed
        np.linspace(0, 4000, 400, dtype=np.float32).reshape(20, 20),  # floats past 255
    ],
    ids=["int32", "negative", "float"],
)
def test_samples_with_no_known_range_are_skipped_with_the_reason(tmp_path, capsys, arr):
    """An int32 (`I` mode) TIFF from a folder source became an all-white image and was kept for
    training (its values were clipped at 65535). Now it is skipped as unreadable, with the values."""
    with pytest.raises(Skip) as err:
        decode(tiff(arr), "deep.tif")
    assert err.value.reason == "unreadable"
    assert str(err.value).startswith("deep.tif: ") and "save it as an 8- or 16-bit image" in str(
        err.value
    )
    raw = make_raw(tmp_path / "raw", n_a=3, n_b=3)
    (raw / "a" / "deep.tif").write_bytes(tiff(arr))
    report = prepare(
        PrepareParams(image_size=16, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    assert report["skipped"]["a"]["unreadable"] == 1 and sum(report["kept"]["a"].values()) == 3


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((20, 20), 128, np.int32), 128),  # 8-bit values held as 32-bit integers
        (np.full((20, 20), 32896, np.int32), 128),  # 16-bit values held as 32-bit integers
        (np.full((20, 20), 0.5, np.float32), 128),  # floats in [0, 1]
        (np.full((20, 20), 77.0, np.float32), 77),  # floats in [0, 255]
    ],
)
def test_deep_samples_within_a_known_range_are_scaled(arr, expected):
    assert decode(tiff(arr)).getpixel((3, 3)) == (expected,) * 3


def test_a_skip_line_names_its_reason_once(tmp_path, capsys):
    """The line was `prepare a: skipped raw/a/bomb.png (too_large: too_large: raw/a/bomb.png: ...)`."""
    bomb = encode(Image.new("1", (10000, 10000)), "PNG")
    raw = make_raw(tmp_path / "raw", n_a=2, n_b=2)
    (raw / "a" / "bomb.png").write_bytes(bomb)
    prepare(
        PrepareParams(image_size=16, min_size=8),
        raw,
        tmp_path / "out",
        tmp_path / "m.json",
        workers=1,
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if "bomb.png" in x)
    path = raw / "a" / "bomb.png"
    assert line == (
        f"prepare a: skipped {path} (too_large: {path}: 10000x10000 pixels, more than the "
        f"89,478,485 decoded at most)"
    )
