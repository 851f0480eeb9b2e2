"""Face-aware curation for face domains: keep the images with a face, optionally cropped to it.

The detector is OpenCV's frontal-face Haar cascade, whose model file ships inside the
`opencv-python-headless` wheel (cv2.data.haarcascades): nothing is downloaded at run time. It finds
frontal faces of about 24 px and more in photos; it is meant for photos from the web or a folder,
not for pre-cropped face sets (there the whole image is the face, often too tightly for the cascade).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

MODES = ("none", "filter", "crop")  # not `off`: YAML 1.1 (Hydra's composition) reads off as false
MIN_FACE = 24  # smallest face found, in pixels of the detection image
DETECT_SIDE = 512  # detection runs on a copy whose longer side is at most this


@functools.cache
def _cascade():  # noqa: ANN202 - cv2 types are not annotated
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError(
            "OpenCV's haarcascade_frontalface_default.xml did not load; reinstall "
            "opencv-python-headless (uv sync)"
        )
    return cascade


def largest_face(img: Image.Image) -> tuple[int, int, int, int] | None:
    """The largest frontal face in an RGB image as (left, top, width, height) in its pixels, or None.

    Deterministic: the cascade runs single-threaded on a grey copy scaled to at most DETECT_SIDE."""
    import cv2

    cv2.setNumThreads(1)
    scale = min(1.0, DETECT_SIDE / max(img.size))
    small = (
        img
        if scale == 1.0
        else img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BOX,
        )
    )
    grey = np.asarray(small.convert("L"))
    found = _cascade().detectMultiScale(
        grey, scaleFactor=1.1, minNeighbors=5, minSize=(MIN_FACE, MIN_FACE)
    )
    if len(found) == 0:
        return None
    x, y, w, h = max((tuple(int(v) for v in f) for f in found), key=lambda f: (f[2] * f[3], f))
    return (round(x / scale), round(y / scale), round(w / scale), round(h / scale))


def crop_to_face(img: Image.Image, face: tuple[int, int, int, int], margin: float) -> Image.Image:
    """A square around `face` grown by `margin` × the face's side on each side, clipped to the image
    (only a face cut by the edge gives a non-square box; the resize that follows makes it square)."""
    x, y, w, h = face
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    # the margin shrinks at an edge (the square stays centred on the face) but never below the face
    half = max(min(side / 2, cx, cy, img.width - cx, img.height - cy), max(w, h) / 2)
    box = (
        max(0, round(cx - half)),
        max(0, round(cy - half)),
        min(img.width, round(cx + half)),
        min(img.height, round(cy + half)),
    )
    return img.crop(box)
