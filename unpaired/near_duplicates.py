"""Near-duplicate images: the same picture re-encoded, resized or cropped slightly.

Each image gets a 64-bit perceptual hash (`imagehash.phash`: the low frequencies of a 32×32 DCT of
the grey image, one bit per coefficient above the median). Two images are near-duplicates when their
hashes differ in at most `max_distance` bits (Hamming distance). Measured on this project's data
(tests/test_near_duplicates.py): a photo re-encoded as JPEG at quality 95 or 60, or resized to 0.8×,
is at distance 0; with 5 % cut from one corner, 6-8; 200 distinct procedural doodles are at least
12 apart. Hence prepare's default `near_duplicate_distance: 10`.

The comparison is all pairs, vectorised: XOR and popcount (`numpy.bitwise_count`) of one block of
hashes against the rest, in C. benchmarks/near_duplicates.py measures it: see README "Near-duplicates"
for the figures (it stays a small share of decoding the same images). An index (BK-tree, multi-index
hashing) does not pay at this threshold: 10 of 64 bits means 11 chunks of under 6 bits for the
pigeonhole split, whose buckets hold most of the data set.
"""
from __future__ import annotations

from collections.abc import Sequence

import imagehash
import numpy as np
from PIL import Image

BLOCK = 1024     # rows per vectorised block: BLOCK × n distances (uint8) in memory at a time


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of a Pillow image (any mode, any size ≥ 1×1) as an int in [0, 2**64)."""
    return int(str(imagehash.phash(img)), 16)


def _array(hashes: Sequence[int]) -> np.ndarray:
    return np.asarray([int(h) for h in hashes], dtype=np.uint64)


def close_pairs(hashes: Sequence[int], max_distance: int,
                others: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Index pairs (i, j) whose hashes differ in at most `max_distance` bits (0 disables: []).

    Without `others`: pairs within `hashes`, i < j. With `others`: pairs (i in hashes, j in others).
    Sorted, so the result does not depend on the block size."""
    if max_distance <= 0 or not len(hashes) or (others is not None and not len(others)):
        return []
    h = _array(hashes)
    o = h if others is None else _array(others)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(h), BLOCK):
        block = h[start:start + BLOCK, None]
        close = np.bitwise_count(block ^ o[None, :]) <= max_distance
        if others is None:      # only j > i: the upper triangle
            close &= np.arange(len(o))[None, :] > np.arange(start, start + len(block))[:, None]
        rows, cols = np.nonzero(close)
        pairs.extend(zip((rows + start).tolist(), cols.tolist()))
    return sorted(pairs)


def clusters(hashes: Sequence[int], max_distance: int) -> list[int]:
    """For each hash, the index of its cluster's first member: clusters are the connected components
    of the near-duplicate graph (a chain a~b~c is one cluster). Singletons map to themselves."""
    parent = list(range(len(hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in close_pairs(hashes, max_distance):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [root(i) for i in range(len(hashes))]


def keepers(hashes: Sequence[int], pixels: Sequence[int], sha256: Sequence[str],
            max_distance: int) -> list[int]:
    """For each image, the index of the image kept for its cluster: the largest (`pixels`, width ×
    height of the raw image), ties broken by the smaller SHA-256 hex, so the choice does not depend
    on file order. An image kept for itself maps to its own index."""
    best: dict[int, int] = {}
    labels = clusters(hashes, max_distance)
    for i, c in enumerate(labels):
        b = best.get(c)
        if b is None or (-pixels[i], sha256[i]) < (-pixels[b], sha256[b]):
            best[c] = i
    return [best[c] for c in labels]
