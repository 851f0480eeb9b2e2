"""Decoding any image file a user may have into 8-bit RGB, and resizing it to a square.

Pillow does the decoding (JPEG, PNG, GIF, WebP, BMP, TIFF, ...) and the geometry (`ImageOps.fit` for
centre crops, `ImageOps.pad` for letterboxing). What is ours is the normalisation policy: EXIF
orientation applied; transparency composited on white; 16-bit scaled (not clipped) to 8 bits; CMYK,
grayscale and palette images made RGB; large JPEGs decoded at reduced scale; a decompression-bomb
guard; and a classification of every failure into a skip reason.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

RESAMPLE = Image.Resampling.LANCZOS
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
SKIP_REASONS = (
    "empty",
    "not_image",
    "truncated",
    "unreadable",
    "too_large",
    "too_small",
    "duplicate",
    "error",
)
# The decompression-bomb guard: at most this many pixels are decoded (3 bytes each, so about 300 MB).
# It is Pillow's own warning threshold (Image.MAX_IMAGE_PIXELS's default); files that claim more than
# twice that are refused by Pillow when opened. A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale
# (the DCT scaling of libjpeg, Pillow's `draft`) when a caller needs only a smaller image (prepare).
MAX_PIXELS = 89_478_485
# EXIF orientation → the transposition that makes the image upright (the EXIF 2.3 table, as
# ImageOps.exif_transpose applies it; that function also rewrites the EXIF block into the result and
# fails on malformed tags we do not need, so the lookup is done here).
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Skip(Exception):
    """This file is not used; `reason` is one of SKIP_REASONS, `detail` (also `str(skip)`) names the
    file and says why, without repeating the reason (callers print `f"{reason}: {detail}"`)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


def _to_8bit(img: Image.Image, name: str = "") -> Image.Image:
    """Integer and float modes ("I;16", "I", "F") scaled to "L" by their nominal range: 16-bit
    samples by 65535; "I" (32-bit integers) by 255 when they all lie in [0, 255], by 65535 when in
    [0, 65535] (16-bit data Pillow opened as "I"); "F" by 1 when in [0, 1], as is in [0, 255].
    Samples outside those ranges (negative, beyond 16 bits, above 255 as floats, NaN) have no range
    that says which value is white: Skip("unreadable") naming the file and the values, never an
    image clipped to white."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 65535.0 * 255.0
    elif arr.size:
        low, high = float(np.min(arr)), float(np.max(arr))
        if img.mode == "I" and 0 <= low and high <= 255:
            pass
        elif img.mode == "I" and 0 <= low and high <= 65535:
            arr = arr.astype(np.float64) / 65535.0 * 255.0
        elif img.mode == "F" and 0 <= low and high <= 1.0:
            arr = arr.astype(np.float64) * 255.0
        elif not (img.mode == "F" and 0 <= low and high <= 255):
            kind = "32-bit integer" if img.mode == "I" else "floating-point"
            shown = f"{low:,.0f} to {high:,.0f}" if img.mode == "I" else f"{low:g} to {high:g}"
            raise Skip(
                "unreadable",
                f"{name}: {kind} samples from {shown}, outside the 8-bit, 16-bit "
                f"and 0-1 ranges, so no value is known to be white; save it as an "
                f"8- or 16-bit image",
            )
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(
    img: Image.Image, background: tuple[int, int, int] = (255, 255, 255), name: str = ""
) -> Image.Image:
    """Any Pillow image → 8-bit RGB; transparent pixels composited on `background`. Raises Skip
    (naming `name`) for integer or float samples with no known range (see `_to_8bit`)."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or img.mode == "PA") else "RGB")
    if img.mode in ("LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGB", img.size, background)
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img, name)
    return img if img.mode == "RGB" else img.convert("RGB")


def _failure(err: BaseException, name: str) -> Skip:
    text = str(err).lower()
    cut = isinstance(err, EOFError) or any(
        w in text
        for w in (
            "truncated",
            "broken data stream",
            "unexpected end",
            "incomplete",
            "buffer is not large",
        )
    )
    return Skip("truncated" if cut else "unreadable", f"{name}: {err}")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8), or 1 when there is none or the EXIF block cannot be read."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if int(value) in ORIENTATION else 1
    except Exception:  # noqa: BLE001 - malformed EXIF of any kind: keep the image as decoded
        return 1


def decode_scaled(
    data: bytes, name: str = "", min_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """File bytes → (upright 8-bit RGB image, its full upright (width, height)). A JPEG of more than
    MAX_PIXELS is decoded at the smallest of 1/2, 1/4, 1/8 scale whose sides are still >= `min_side`
    (None: full size only). Raises Skip: `too_large` above MAX_PIXELS decoded (or Pillow's hard
    limit), and the other reasons of SKIP_REASONS."""
    if not data:
        raise Skip("empty", name)
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS (the check below is the guard, after draft mode) and
        # about each malformed metadata tag it skips (noise in a log of thousands of files).
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Skip("not_image", name) from None
        except Image.DecompressionBombError as err:
            raise Skip("too_large", f"{name}: {err}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise _failure(err, name) from None
        try:
            img.seek(0)
            full = img.size
            if full[0] * full[1] > MAX_PIXELS and min_side is not None and img.format == "JPEG":
                img.draft(img.mode, (min_side, min_side))
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise Skip(
                    "too_large",
                    f"{name}: {full[0]}x{full[1]} pixels, more than the "
                    f"{MAX_PIXELS:,} decoded at most",
                )
            img.load()
        except Image.DecompressionBombError as err:
            raise Skip("too_large", f"{name}: {err}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise _failure(err, name) from None
        method = ORIENTATION.get(_orientation(img))
    if method is not None:
        img = img.transpose(method)
        if method in (
            Image.Transpose.TRANSPOSE,
            Image.Transpose.TRANSVERSE,
            Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_270,
        ):
            full = (full[1], full[0])
    return to_rgb(img, name=name), full


def decode(data: bytes, name: str = "") -> Image.Image:
    """File bytes → upright 8-bit RGB image at full size (first frame of animations). Raises Skip."""
    return decode_scaled(data, name)[0]


def square(img: Image.Image, size: int, mode: str, background: str = "white") -> Image.Image:
    """`crop`: scale the shorter side to `size`, centre crop. `pad`: fit inside, letterbox."""
    if mode == "crop":
        return ImageOps.fit(img, (size, size), method=RESAMPLE)
    return ImageOps.pad(img, (size, size), method=RESAMPLE, color=ImageColor.getrgb(background)[:3])


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with no metadata: same pixels → same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def read_rgb(path: str | Path) -> Image.Image:
    """Read a file as RGB for tools (translate, evaluate); raises Skip on a bad file."""
    return decode(Path(path).read_bytes(), str(path))


def to_float(images):
    """uint8 pixels (tensor) → float in [-1, 1], the generators' range."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images):
    """Float in [-1, 1] (tensor) → uint8 pixels, rounded."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).byte()


def read_uint8(path: str | Path):
    """A file as a uint8 tensor 3×H×W (RGB). (torchvision.io's decoders are deprecated since 0.29,
    so decoding goes through Pillow, which we need anyway for the formats it covers.)"""
    import torch

    return torch.from_numpy(np.array(read_rgb(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize(image, size: int):
    """An image tensor (...×3×H×W, uint8 or float) resized to size × size, bilinear with antialiasing: the same
    bytes as torchvision's `transforms.v2.functional.resize(image, [size, size], antialias=True)`
    (0.29; tests/test_train_speed.py compares them), without importing torchvision (about a second
    on a small CPU). On a CPU with AVX2 or better (or ARM), uint8 goes straight to torch's
    uint8 kernel; elsewhere through float32, rounded back."""
    import platform

    import torch
    import torch.nn.functional as F

    shape = image.shape
    channels, height, width = shape[-3:]
    if (height, width) == (size, size) or image.numel() == 0:
        return image
    x = image.reshape(-1, channels, height, width)
    native = image.device.type == "cpu" and (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    )
    strides = x.stride()
    if (
        x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[0] == 1
        and x.numel() != strides[0]
    ):  # as torchvision does: keep a channels-last single image's output channels-last
        x = x.as_strided((1, channels, height, width), [x.numel(), *strides[1:]])
    cast = image.dtype not in (torch.float32, torch.float64) and not (
        image.dtype == torch.uint8 and native
    )
    if cast:
        x = x.to(torch.float32)
    x = F.interpolate(x, size=[size, size], mode="bilinear", align_corners=False, antialias=True)
    if cast:
        x = (x.round_() if not image.dtype.is_floating_point else x).to(image.dtype)
    return x.reshape(shape[:-3] + (channels, size, size))
