"""Near-duplicate images: the same picture re-encoded, resized or cropped slightly.

Each image gets a 256-bit perceptual hash (`imagehash.phash` with hash_size 16: the 16×16 lowest
frequencies of a 64×64 DCT of the grey image, one bit per coefficient above their median). Two images
are near-duplicates when their hashes differ in at most `max_distance` bits (Hamming distance).
Measured (tests/test_near_duplicates.py and the figures in README "Near-duplicates"): a photo
re-encoded as JPEG at quality 95 or 60 or resized to 0.8× is at 0-8; with 5 % cut off one side (or 2.5 % all
round) at 32-72 for 13 of scikit-image's 15 sample photos (the astronaut: at
most 66); distinct photos are at least 104 apart, the 240 doodles and 240 flares of the default
pipeline at least 80 and 92. Hence prepare's default `near_duplicate_distance: 72`. The 64-bit hash
(hash_size 8) separates worse: 5 %-cropped copies at up to 14 while two default flares are 10 apart.

The comparison is all pairs, vectorised: XOR and popcount (`numpy.bitwise_count`) of a block of
hashes against those after it, in C, never a Python loop over pairs, the blocks spread over one
thread per CPU (numpy releases the GIL). benchmarks/near_duplicates.py
measures it (README "Near-duplicates": images/s at 1k and 50k images). An index (BK-tree,
multi-index hashing) does not pay at this threshold: 72 of 256 bits allows pigeonhole chunks of 3
bits, whose buckets each hold an eighth of the data set, and a BK-tree visits most nodes at a radius
of over a quarter of the bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import imagehash
import numpy as np
from PIL import Image

from unpaired.threads import cpu_count

HASH_SIZE = 16  # imagehash's hash_size: HASH_SIZE² = 256 bits
BITS = HASH_SIZE * HASH_SIZE
WORDS = BITS // 64
BLOCK = 128  # rows per vectorised block, at most,
BLOCK_BYTES = (
    4 << 20
)  # and fewer past n = 4,096 hashes: a block's XOR (rows × n × 8 bytes) stays <= 4 MiB and
# all its temporaries (+ popcount, sums, masks: 13 bytes a pair) <= 7 MiB at any n


def phash(img: Image.Image) -> int:
    """The 256-bit perceptual hash of a Pillow image (any mode, any size ≥ 1×1) as an int in [0, 2**256)."""
    return int(str(imagehash.phash(img, hash_size=HASH_SIZE)), 16)


def _array(hashes: Sequence[int]) -> np.ndarray:
    """(n, WORDS) uint64: each hash's lowest BITS bits split into 64-bit words, the lowest first."""
    low = (1 << BITS) - 1
    data = b"".join((int(h) & low).to_bytes(BITS // 8, "little") for h in hashes)
    return np.frombuffer(data, dtype="<u8").astype(np.uint64).reshape(len(hashes), WORDS)


def close_pairs(
    hashes: Sequence[int],
    max_distance: int,
    others: Sequence[int] | None = None,
    workers: int | None = None,
) -> list[tuple[int, int]]:
    """Index pairs (i, j) whose hashes differ in at most `max_distance` bits (0 disables: []).

    Without `others`: pairs within `hashes`, i < j. With `others`: pairs (i in hashes, j in others).
    Sorted, so the result does not depend on the block size. `workers`: threads (default: one per
    CPU of this process)."""
    if max_distance <= 0 or not len(hashes) or (others is not None and not len(others)):
        return []
    h = _array(hashes)
    o = h if others is None else _array(others)
    rows_per_block = max(1, min(BLOCK, BLOCK_BYTES // (8 * len(o))))

    def block_pairs(start: int) -> list[tuple[int, int]]:
        block = h[start : start + rows_per_block]
        first = start if others is None else 0
        cols_o = o[first:]
        distance = np.zeros((len(block), len(cols_o)), dtype=np.uint16)
        for w in range(WORDS):
            distance += np.bitwise_count(block[:, w, None] ^ cols_o[None, :, w])
        close = distance <= max_distance
        if others is None:  # only j > i inside the block's own square
            close &= (
                np.arange(first, len(o))[None, :] > np.arange(start, start + len(block))[:, None]
            )
        rows, cols = np.nonzero(close)
        return list(zip((rows + start).tolist(), (cols + first).tolist()))

    # numpy's ufuncs release the GIL: one thread per CPU keeps every core busy, with at most that many
    # blocks' temporaries (BLOCK_BYTES each, about 7 MiB with the popcounts) in memory at a time.
    starts = range(0, len(h), rows_per_block)
    with ThreadPoolExecutor(max_workers=min(workers or cpu_count(), len(starts))) as pool:
        return sorted(pair for found in pool.map(block_pairs, starts) for pair in found)


def clusters(hashes: Sequence[int], max_distance: int, workers: int | None = None) -> list[int]:
    """For each hash, the index of its cluster's first member: clusters are the connected components
    of the near-duplicate graph (a chain a~b~c is one cluster). Singletons map to themselves."""
    parent = list(range(len(hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in close_pairs(hashes, max_distance, workers=workers):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [root(i) for i in range(len(hashes))]


def keepers(
    hashes: Sequence[int],
    pixels: Sequence[int],
    sha256: Sequence[str],
    max_distance: int,
    workers: int | None = None,
) -> list[int]:
    """For each image, the index of the image kept for its cluster: the largest (`pixels`, width ×
    height of the raw image), ties broken by the smaller SHA-256 hex, so the choice does not depend
    on file order. An image kept for itself maps to its own index."""
    best: dict[int, int] = {}
    labels = clusters(hashes, max_distance, workers)
    for i, c in enumerate(labels):
        b = best.get(c)
        if b is None or (-pixels[i], sha256[i]) < (-pixels[b], sha256[b]):
            best[c] = i
    return [best[c] for c in labels]
