"""prepare's library: its params (`PrepareParams`), what becomes of each raw file (`Outcome`), and
the steps stages/prepare.py runs per domain — `process_domain` (decode, check, face, resize, PNG on
all cores; exact and near-duplicates marked), `place_kept` (the stable split, kept files moved into
the tree, counts per reason and source, manifest rows) — and across domains
(`cross_domain_near_duplicates`).

Every raw file is decoded to 8-bit RGB (see unpaired/images.py), checked against `min_size`, optionally
kept only with a face or cropped to it (`faces`, unpaired/faces.py), resized to an
`image_size`×`image_size` square and written as PNG named by the first 16 hex digits of the SHA-256 of
the raw file's bytes. Exact duplicates (same hash) are kept once; near-duplicates (perceptual hashes
within `near_duplicate_distance` bits, unpaired/near_duplicates.py) once per cluster, the largest.
The split is a pure function of (seed, content hash of the image kept), so adding images never moves
existing ones between train and test, and neither a duplicate nor a near-duplicate can land in both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from PIL import ImageColor

from unpaired import faces, near_duplicates, params
from unpaired.dataset_page import dataset_thumbnail
from unpaired.errors import UserError
from unpaired.files import NO_SPACE, tree
from unpaired.images import MAX_PIXELS, SKIP_REASONS, Skip, decode_scaled, png_bytes, square
from unpaired.parallel import imap

DOMAINS = ("a", "b")
REASONS = (*SKIP_REASONS, "near_duplicate", "no_face")  # the skip reasons counted per domain
MANIFEST_COLUMNS = ["file", "domain", "split", "sha256", "width", "height", "origin"]
MIN_TEST = 2  # evaluate's FID/KID need at least two test images per domain


@dataclass(frozen=True)
class PrepareParams(params.Params):
    image_size: int = 64  # output width = height in pixels
    #: crop (shorter side to image_size, centre crop) or pad (letterbox on pad_color)
    resize: Literal["crop", "pad"] = "crop"
    pad_color: str = "white"  # letterbox colour for resize: pad (CSS name or #rrggbb)
    test_fraction: float = 0.1  # share of images held out in testA/testB, in [0, 1)
    min_size: int = 16  # skip images whose shorter side is smaller (pixels)
    seed: int = 0  # split seed (and the dataset page's seeded samples)
    #: perceptual-hash bits (of 256) within which two images are one picture (re-encoded, resized,
    #: cropped ~5 %); the largest is kept; 0: off
    near_duplicate_distance: int = 72
    #: per domain (a, b): none, filter (keep images with a face) or crop (square around the largest
    #: face, before the resize); OpenCV's Haar cascade. `none`, not `off` (YAML 1.1 reads off as
    #: false)
    faces: dict[str, str] = field(default_factory=lambda: {d: "none" for d in DOMAINS})
    face_margin: float = 0.25  # crop: margin on each side, × the face's side, in [0, 2]
    #: metrics/data/index.html: thumbnails per contact sheet and skip group (then a seeded sample)
    page_thumbnails: int = 120

    BOUNDS = {
        "image_size": params.IMAGE_SIZE,
        "test_fraction": params.Bound(1, "a share of the images", 0, below=True),
        "min_size": params.Bound(
            65_535, "pixels; no format this reads stores a longer side (JPEG's limit)"
        ),
        "seed": params.SEED,
        "near_duplicate_distance": params.Bound(
            128, "bits of a 256-bit perceptual hash; past half of them unrelated images match"
        ),
        "face_margin": params.Bound(
            2, "× the face's side on each side: past it the crop is mostly background"
        ),
        "page_thumbnails": params.Bound(
            10_000, "thumbnails per contact sheet: each is a file on the page"
        ),
    }

    def validate(self, prefix: str) -> None:
        params.check(
            self.image_size > 0, f"{prefix}.image_size", f"must be > 0, got {self.image_size}"
        )
        params.check(
            0 <= self.test_fraction < 1,
            f"{prefix}.test_fraction",
            f"must be in [0, 1), got {self.test_fraction}",
        )
        params.check(self.min_size >= 1, f"{prefix}.min_size", f"must be >= 1, got {self.min_size}")
        try:
            ImageColor.getrgb(self.pad_color)
        except ValueError:
            params.fail(
                f"{prefix}.pad_color", f"not a colour: {self.pad_color!r} (CSS name or #rrggbb)"
            )
        params.check(
            0 <= self.near_duplicate_distance <= 128,
            f"{prefix}.near_duplicate_distance",
            f"must be in [0, 128] bits of 256 (0: off; 72 catches re-encoded, resized and 5 %-cropped "
            f"copies), got {self.near_duplicate_distance}",
        )
        for d in self.faces:
            params.check(
                d in DOMAINS, f"{prefix}.faces.{d}", f"unknown domain; use {' or '.join(DOMAINS)}"
            )
        for d in DOMAINS:
            mode = self.faces.get(d, "none")
            params.check(
                mode in faces.MODES,
                f"{prefix}.faces.{d}",
                f"must be none, filter or crop, got {mode!r}"
                + (" (YAML 1.1 reads off/no/false as false: write none)" if mode is False else ""),
            )
        params.check(
            0 <= self.face_margin <= 2,
            f"{prefix}.face_margin",
            f"must be in [0, 2] (× the face's side), got {self.face_margin}",
        )
        params.check(
            self.page_thumbnails >= 1,
            f"{prefix}.page_thumbnails",
            f"must be >= 1, got {self.page_thumbnails}",
        )


@dataclass(slots=True, eq=False)
class Outcome:
    """One raw file's outcome, kept by the parent until its domain is done (near-duplicates need them
    all): about 400 bytes with its strings (sha256 hex 113, rel ~70, a 256-bit phash 60, name ~80)."""

    skip: str | None  # a REASONS entry, None while kept
    detail: str | None = None  # why it was skipped (the log and the dataset page)
    sha256: str = ""  # of the raw file's bytes, hex ("" when unreadable)
    width: int = 0  # of the raw image, pixels
    height: int = 0
    phash: int = 0  # near_duplicates.phash, 0 when that check is off
    cropped: bool = False  # cut to a face
    thumb: bool = False  # its dataset-page thumbnail was written (<index>.thumb.png)
    index: int = 0  # position among the domain's raw files: staged as <index>.png
    rel: str = ""  # path relative to the domain's raw folder, with "/"
    name: str = ""  # kept: the prepared file, trainA/<hash>.png
    kept: Outcome | None = None  # duplicate, near_duplicate: the image kept instead


def is_test(sha256: str, seed: int, test_fraction: float) -> bool:
    """Stable split: a uniform number drawn from (seed, content hash) alone."""
    u = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:16], 16) / 2**64
    return u < test_fraction


def _process(job: tuple[Path, PrepareParams, str, Path, bool]) -> Outcome:
    """Decode, check and resize one raw file, writing the PNG to `staged` (the worker writes it, so
    the parent process only renames: that keeps the parent from becoming the bottleneck), and with
    `thumbs` its dataset-page thumbnail next to it (`*.thumb.png`). Never raises for one file: an
    unexpected failure (a decoder bug on a strange file) is the skip `error` naming the file. Only a
    full disk stops the stage (atomic_dir makes it one line)."""
    try:
        return _process_one(*job)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise  # the parent's atomic_dir names the output and the free space
        return Outcome("error", f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - one file never stops the stage; it is counted and named
        return Outcome("error", f"{type(err).__name__}: {err}")


def _process_one(path: Path, p: PrepareParams, domain: str, staged: Path, thumbs: bool) -> Outcome:
    try:
        data = path.read_bytes()
    except OSError as err:
        return Outcome("unreadable", str(err))
    digest = hashlib.sha256(data).hexdigest()
    try:
        img, (width, height) = decode_scaled(data, str(path), min_side=p.image_size)
    except Skip as skip:
        return Outcome(skip.reason, str(skip), digest)
    thumb = staged.with_suffix(".thumb.png") if thumbs else None
    out = Outcome(None, sha256=digest, width=width, height=height)
    face = None
    if min(width, height) < p.min_size:
        out.skip, out.detail = "too_small", f"{width}x{height}"
    elif p.faces.get(domain, "none") != "none":
        face = faces.largest_face(img)
        if face is None:
            out.skip, out.detail = "no_face", "no frontal face found"
    if out.skip is not None:
        if thumb:
            thumb.write_bytes(dataset_thumbnail(img))
            out.thumb = True
        return out
    out.phash = near_duplicates.phash(img) if p.near_duplicate_distance else 0
    if face is not None and p.faces[domain] == "crop":
        img, out.cropped = faces.crop_to_face(img, face, p.face_margin), True
    small = square(img, p.image_size, p.resize, p.pad_color)
    staged.write_bytes(png_bytes(small))
    if thumb:
        thumb.write_bytes(dataset_thumbnail(small))
        out.thumb = True
    return out


def _raw_files(folder: Path) -> Iterator[str]:
    """The raw files under `folder`, relative with "/", sorted, one directory's names in memory at a time."""
    for rel, _ in tree(folder):
        name = rel.rpartition("/")[2]
        if name != "manifest.csv" and not name.startswith(".") and (folder / rel).is_file():
            yield rel


def read_sources(folder: Path) -> dict[str, tuple[str, str]]:
    """file (relative to `folder`) -> (source, origin), from the fetch stage's manifest.csv."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return {}
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if not {"file", "origin"} <= set(frame.columns):
        return {}
    sources = frame.source if "source" in frame.columns else [""] * len(frame)
    return {f: (s or "(no source)", o) for f, s, o in zip(frame.file, sources, frame.origin)}


def _drop_near_duplicates(results: list[Outcome], p: PrepareParams) -> None:
    """Mark every near-duplicate but its cluster's keeper (largest, then smallest SHA-256) as skipped
    `near_duplicate`, with `kept` pointing at the keeper's outcome (also for the exact duplicates of an
    image skipped so)."""
    usable = [r for r in results if r.skip is None]
    keep = near_duplicates.keepers(
        [r.phash for r in usable],
        [r.width * r.height for r in usable],
        [r.sha256 for r in usable],
        p.near_duplicate_distance,
    )
    for r, k in zip(usable, keep):
        if usable[k] is not r:
            r.skip, r.kept = "near_duplicate", usable[k]
    for r in results:
        while r.kept is not None and r.kept.skip is not None:
            r.kept = r.kept.kept


def process_domain(
    p: PrepareParams,
    domain: str,
    raw: Path,
    staging: Path,
    thumbs: bool,
    workers: int | None = None,
) -> list[Outcome]:
    """Every raw file of `raw` (sorted, manifest.csv and hidden files left out) through `_process` on
    `workers` processes (all cores by default): one Outcome per file, in order, with its `index` and
    `rel`. Each usable image is staged as `staging`/<index>.png (and, with `thumbs`, its dataset-page
    thumbnail <index>.thumb.png). Exact duplicates (same SHA-256) are marked `duplicate`, kept = the
    first; with prepare.near_duplicate_distance, near-duplicates are marked too."""
    rels = list(_raw_files(raw))
    jobs = ((raw / f, p, domain, staging / f"{i}.png", thumbs) for i, f in enumerate(rels))
    results: list[Outcome] = []
    seen: dict[str, Outcome] = {}  # sha256 -> the first usable image with it
    for i, r in enumerate(
        imap(_process, jobs, workers=workers, desc=f"prepare {domain}", total=len(rels))
    ):
        r.index, r.rel = i, rels[i]
        results.append(r)
        if r.skip is None and r.sha256 in seen:
            r.skip, r.kept = "duplicate", seen[r.sha256]
        elif r.skip is None:
            seen[r.sha256] = r
    del rels, seen
    if p.near_duplicate_distance:
        _drop_near_duplicates(results, p)
    return results


@dataclass
class DomainTally:
    """One domain's counts and manifest rows, from `place_kept`."""

    kept: Counter[str]  # split (train, test) -> images kept
    skipped: Counter[str]  # every REASONS entry -> raw files skipped so
    per_source: dict[str, Counter[str]]  # source -> {"kept": n, "skipped": n}
    cropped: int  # kept images cut to a face
    rows: list[tuple[Any, ...]]  # manifest rows in MANIFEST_COLUMNS order: ~100 bytes + origin
    hashes: list[int]  # perceptual hashes of the kept images, in the order of rows


def place_kept(
    p: PrepareParams,
    domain: str,
    raw: Path,
    results: list[Outcome],
    staging: Path,
    out: Path,
    sources: Mapping[str, tuple[str, str]],
) -> DomainTally:
    """Split each kept image of `results` (`is_test`) and move its staged PNG to
    `out`/{train,test}<D>/<hash>.png (setting its `name`); count the kept and skipped files per
    reason and per source (`sources`: read_sources(raw)); print the skips that are not the file's
    fault (error, too_large), naming the file."""
    skipped: Counter[str] = Counter({reason: 0 for reason in REASONS})
    kept: Counter[str] = Counter({"train": 0, "test": 0})
    per_source: dict[str, Counter[str]] = {}
    rows: list[tuple[Any, ...]] = []
    hashes: list[int] = []
    for r in results:
        source = sources.get(r.rel, ("(not in manifest.csv)", ""))[0]
        per_source.setdefault(source, Counter({"kept": 0, "skipped": 0}))
        if r.skip is not None:
            skipped[r.skip] += 1
            per_source[source]["skipped"] += 1
            if r.skip in ("error", "too_large"):  # rare, and not the file's fault: name it
                print(f"prepare {domain}: skipped {raw / r.rel} ({r.skip}: {r.detail})")
            continue
        split = "test" if is_test(r.sha256, p.seed, p.test_fraction) else "train"
        r.name = name = f"{split}{domain.upper()}/{r.sha256[:16]}.png"
        (staging / f"{r.index}.png").rename(out / name)
        kept[split] += 1
        per_source[source]["kept"] += 1
        hashes.append(r.phash)
        rows.append(
            (
                name,
                domain,
                split,
                r.sha256,
                r.width,
                r.height,
                sources.get(r.rel, ("", (raw / r.rel).as_posix()))[1],
            )
        )
    cropped = sum(1 for r in results if r.skip is None and r.cropped)
    return DomainTally(kept, skipped, per_source, cropped, rows, hashes)


def no_training_images(
    p: PrepareParams, domain: str, raw: Path, files: int, tally: DomainTally
) -> UserError:
    """The one line for domain `domain` left without training images by its `files` raw files:
    what took the most of them (a skip reason, or the test split), in plain words, with the params
    key that decides it and what to change; then the other reasons' counts."""
    where = f"{raw}: no usable training images for domain {domain}"
    if not files:
        return UserError(
            f"{where}: the folder holds no image files; check domains.{domain} and run "
            f"`uv run dvc repro fetch@{domain}`"
        )
    mode = p.faces.get(domain, "none")
    unusable = f"are not usable images ({{what}}); check domains.{domain} (where they come from)"
    why = {  # reason -> (its words in the list of the others, the sentence for the one that took the most)
        "empty": ("empty", unusable.format(what="empty files")),
        "not_image": ("not images", unusable.format(what="not images")),
        "truncated": ("truncated", unusable.format(what="truncated files")),
        "unreadable": ("unreadable", unusable.format(what="unreadable")),
        "error": (
            "failed to decode",
            "failed to decode (named in the lines above); check those files",
        ),
        "too_large": ("too large", f"are larger than {MAX_PIXELS:,} pixels; scale them down"),
        "too_small": (
            "too small",
            f"are smaller than prepare.min_size ({p.min_size} px on the shorter "
            f"side); lower prepare.min_size or add larger images",
        ),
        "duplicate": ("exact copies", "are exact copies of another file; add different images"),
        "near_duplicate": (
            "near-duplicates",
            f"are near-duplicates of another image (within "
            f"prepare.near_duplicate_distance: {p.near_duplicate_distance} "
            f"bits of 256); lower prepare.near_duplicate_distance (0 turns "
            f"the check off) or add different images",
        ),
        "no_face": (
            "without a face",
            f"have no face found (prepare.faces.{domain}: {mode}); set "
            f"prepare.faces.{domain} to none or add images with faces",
        ),
        "test": (
            "held out for test",
            f"went to test{domain.upper()} (prepare.test_fraction: "
            f"{p.test_fraction}); lower prepare.test_fraction or add images",
        ),
    }
    counts = {r: n for r, n in tally.skipped.items() if n}
    if tally.kept["test"]:
        counts["test"] = tally.kept["test"]
    top = max(counts, key=lambda r: counts[r])  # the first of equal counts, in REASONS order
    others = ", ".join(f"{n} {why[r][0]}" for r, n in counts.items() if r != top)
    return UserError(
        f"{where}: {counts[top]} of its {files} files {why[top][1]}"
        + (f" (the others: {others})" if others else "")
    )


def cross_domain_near_duplicates(
    tallies: Mapping[str, DomainTally], distance: int
) -> list[list[str]]:
    """[prepared file in A, prepared file in B] for each pair of kept images within `distance` bits
    of each other across the domains (the same picture in both), sorted; [] when `distance` is 0."""
    a, b = ([row[0] for row in tallies[d].rows] for d in DOMAINS)  # their prepared files
    across = near_duplicates.close_pairs(tallies["a"].hashes, distance, tallies["b"].hashes)
    return [[a[i], b[j]] for i, j in across]
