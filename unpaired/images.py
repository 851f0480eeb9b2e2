"""Decoding any image file a user may have into 8-bit RGB, and resizing it to a square.

Pillow does the decoding (JPEG, PNG, GIF, WebP, BMP, TIFF, ...) and the geometry (`ImageOps.fit` for
centre crops, `ImageOps.pad` for letterboxing). What is ours is the normalisation policy: EXIF
orientation applied; transparency composited on white; 16-bit scaled (not clipped) to 8 bits; CMYK,
grayscale and palette images made RGB; and a classification of every failure into a skip reason.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

RESAMPLE = Image.Resampling.LANCZOS
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
SKIP_REASONS = ("empty", "not_image", "truncated", "unreadable", "too_small", "duplicate")


class Skip(Exception):
    """This file is not used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer and float modes ("I;16", "I", "F") scaled to "L" by their nominal range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 65535.0 * 255.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr.astype(np.float64) * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow image → 8-bit RGB; transparent pixels composited on `background`."""
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or img.mode == "PA") else "RGB")
    if img.mode in ("LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        base = Image.new("RGB", img.size, background)
        base.paste(img, mask=img.getchannel("A"))
        return base
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _failure(err: BaseException, name: str) -> Skip:
    text = str(err).lower()
    cut = isinstance(err, EOFError) or any(w in text for w in (
        "truncated", "broken data stream", "unexpected end", "incomplete", "buffer is not large"))
    return Skip("truncated" if cut else "unreadable", f"{name}: {err}")


def decode(data: bytes, name: str = "") -> Image.Image:
    """File bytes → upright 8-bit RGB image (first frame of animations). Raises Skip."""
    if not data:
        raise Skip("empty", name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Skip("not_image", name) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Skip("unreadable", f"{name}: {err}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise _failure(err, name) from None
        try:
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Skip("unreadable", f"{name}: {err}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise _failure(err, name) from None
    return to_rgb(img)


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
