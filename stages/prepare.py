"""prepare: data/raw/{a,b} → data/prepared/{trainA,trainB,testA,testB}/*.png + manifest.csv,
packed into data/prepared.tar (the DVC output: one remote object instead of thousands; the folder
is its browsable view, see unpaired/files.py), metrics/prepare.json (kept and skipped counts) and
the dataset page metrics/data/index.html (contact sheets, skipped images by reason, counts per source).

    python -m stages.prepare --raw data/raw/a data/raw/b --out data/prepared.tar \
        --view data/prepared --metrics metrics/prepare.json --page metrics/data     # dvc.yaml's cmd

Every raw file is decoded to 8-bit RGB (see unpaired/images.py), checked against `min_size`, optionally
kept only with a face or cropped to it (`faces`, unpaired/faces.py), resized to an
`image_size`×`image_size` square and written as PNG named by the first 16 hex digits of the SHA-256 of
the raw file's bytes. Exact duplicates (same hash) are kept once; near-duplicates (perceptual hashes
within `near_duplicate_distance` bits, unpaired/near_duplicates.py) once per cluster, the largest.
The split is a pure function of (seed, content hash of the image kept), so adding images never moves
existing ones between train and test, and neither a duplicate nor a near-duplicate can land in both.
Decoding runs on all cores; the tree is built in a temporary directory and renamed.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import ImageColor

from unpaired import faces, near_duplicates, params, report
from unpaired.errors import ArgumentParser, UserError, main_guard
from unpaired.files import (NO_SPACE, atomic_dir, atomic_write_json, pack_dir, remove_stale_temporaries, tree,
                            write_manifest)
from unpaired.images import SKIP_REASONS, Skip, decode_scaled, png_bytes, square
from unpaired.parallel import imap

DOMAINS = ("a", "b")
REASONS = (*SKIP_REASONS, "near_duplicate", "no_face")     # the skip reasons counted per domain
MANIFEST_COLUMNS = ["file", "domain", "split", "sha256", "width", "height", "origin"]
MIN_TEST = 2           # evaluate's FID/KID need at least two test images per domain


@dataclass(frozen=True)
class PrepareParams(params.Params):
    image_size: int = 64                  # output width = height in pixels
    resize: str = "crop"                  # crop: shorter side to image_size, centre crop; pad: letterbox
    pad_color: str = "white"              # letterbox colour for resize: pad
    test_fraction: float = 0.1            # share of images in testA/testB, in [0, 1)
    min_size: int = 16                    # images whose shorter side is smaller are skipped
    seed: int = 0                         # split seed (and the dataset page's samples)
    near_duplicate_distance: int = 72     # perceptual-hash bits (of 256) within which images are one; 0: off
    faces: dict[str, str] = field(default_factory=lambda: {d: "none" for d in DOMAINS})  # none|filter|crop
    face_margin: float = 0.25             # crop: margin around the face, × the face's side, per side
    page_thumbnails: int = 120            # dataset page: thumbnails per contact sheet / skip group

    BOUNDS = {
        "image_size": params.IMAGE_SIZE,
        "test_fraction": params.Bound(1, "a share of the images", 0, below=True),
        "min_size": params.Bound(65_535, "pixels; no format this reads stores a longer side (JPEG's limit)"),
        "seed": params.SEED,
        "near_duplicate_distance": params.Bound(128, "bits of a 256-bit perceptual hash; past half of "
                                                     "them unrelated images match"),
        "face_margin": params.Bound(2, "× the face's side on each side: past it the crop is mostly background"),
        "page_thumbnails": params.Bound(10_000, "thumbnails per contact sheet: each is a file on the page"),
    }

    def validate(self, prefix: str) -> None:
        params.check(self.image_size > 0, f"{prefix}.image_size", f"must be > 0, got {self.image_size}")
        params.check(self.resize in ("crop", "pad"), f"{prefix}.resize",
                     f"unknown resize mode {self.resize!r}; use crop or pad")
        params.check(0 <= self.test_fraction < 1, f"{prefix}.test_fraction",
                     f"must be in [0, 1), got {self.test_fraction}")
        params.check(self.min_size >= 1, f"{prefix}.min_size", f"must be >= 1, got {self.min_size}")
        try:
            ImageColor.getrgb(self.pad_color)
        except ValueError:
            params.fail(f"{prefix}.pad_color", f"not a colour: {self.pad_color!r} (CSS name or #rrggbb)")
        params.check(0 <= self.near_duplicate_distance <= 128, f"{prefix}.near_duplicate_distance",
                     f"must be in [0, 128] bits of 256 (0: off; 72 catches re-encoded, resized and 5 %-cropped "
                     f"copies), got {self.near_duplicate_distance}")
        for d in self.faces:
            params.check(d in DOMAINS, f"{prefix}.faces.{d}", f"unknown domain; use {' or '.join(DOMAINS)}")
        for d in DOMAINS:
            mode = self.faces.get(d, "none")
            params.check(mode in faces.MODES, f"{prefix}.faces.{d}",
                         f"must be none, filter or crop, got {mode!r}" + (
                             " (YAML 1.1 reads off/no/false as false: write none)" if mode is False else ""))
        params.check(0 <= self.face_margin <= 2, f"{prefix}.face_margin",
                     f"must be in [0, 2] (× the face's side), got {self.face_margin}")
        params.check(self.page_thumbnails >= 1, f"{prefix}.page_thumbnails",
                     f"must be >= 1, got {self.page_thumbnails}")


@dataclass(slots=True, eq=False)
class Outcome:
    """One raw file's outcome, kept by the parent until its domain is done (near-duplicates need them
    all): about 400 bytes with its strings (sha256 hex 113, rel ~70, a 256-bit phash 60, name ~80)."""
    skip: str | None                  # a REASONS entry, None while kept
    detail: str | None = None         # why it was skipped (the log and the dataset page)
    sha256: str = ""                  # of the raw file's bytes, hex ("" when unreadable)
    width: int = 0                    # of the raw image, pixels
    height: int = 0
    phash: int = 0                    # near_duplicates.phash, 0 when that check is off
    cropped: bool = False             # cut to a face
    thumb: bool = False               # its dataset-page thumbnail was written (<index>.thumb.png)
    index: int = 0                    # position among the domain's raw files: staged as <index>.png
    rel: str = ""                     # path relative to the domain's raw folder, with "/"
    name: str = ""                    # kept: the prepared file, trainA/<hash>.png
    kept: Outcome | None = None       # duplicate, near_duplicate: the image kept instead


def is_test(sha256: str, seed: int, test_fraction: float) -> bool:
    """Stable split: a uniform number drawn from (seed, content hash) alone."""
    u = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:16], 16) / 2 ** 64
    return u < test_fraction


def _process(job: tuple[Path, PrepareParams, str, Path, bool]) -> Outcome:
    """Decode, check and resize one raw file, writing the PNG to `staged` (the worker writes it, so
    the parent process only renames: that keeps the parent from becoming the bottleneck), and with
    `thumbs` its dataset-page thumbnail next to it (`*.thumb.png`). Never raises for one file: an
    unexpected failure (a decoder bug on a strange file) is the skip `error` naming the file. Only a
    full disk stops the stage (atomic_dir makes it one line)."""
    path = job[0]
    try:
        return _process_one(*job)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise      # the parent's atomic_dir names the output and the free space
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
            thumb.write_bytes(report.dataset_thumbnail(img))
            out.thumb = True
        return out
    out.phash = near_duplicates.phash(img) if p.near_duplicate_distance else 0
    if face is not None and p.faces[domain] == "crop":
        img, out.cropped = faces.crop_to_face(img, face, p.face_margin), True
    small = square(img, p.image_size, p.resize, p.pad_color)
    staged.write_bytes(png_bytes(small))
    if thumb:
        thumb.write_bytes(report.dataset_thumbnail(small))
        out.thumb = True
    return out


def _raw_files(folder: Path) -> Iterator[str]:
    """The raw files under `folder`, relative with "/", sorted, one directory's names in memory at a time."""
    for rel, _ in tree(folder):
        name = rel.rpartition("/")[2]
        if name != "manifest.csv" and not name.startswith(".") and (folder / rel).is_file():
            yield rel


def _sources(folder: Path) -> dict[str, tuple[str, str]]:
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
    keep = near_duplicates.keepers([r.phash for r in usable], [r.width * r.height for r in usable],
                                   [r.sha256 for r in usable], p.near_duplicate_distance)
    for r, k in zip(usable, keep):
        if usable[k] is not r:
            r.skip, r.kept = "near_duplicate", usable[k]
    for r in results:
        while r.kept is not None and r.kept.skip is not None:
            r.kept = r.kept.kept


def prepare(p: PrepareParams, raw: Path | Mapping[str, Path], out: Path, metrics: Path,
            workers: int | None = None, page: Path | None = None) -> dict[str, Any]:
    """Build the prepared tree `out` from the raw folders `raw` (domain -> folder, or a folder holding
    one folder per domain), write the counts to `metrics` and, with `page`, the dataset page there;
    returns the counts. Raises UserError (one line) for a missing folder or a domain left empty."""
    raws = {d: Path(raw[d]) for d in DOMAINS} if isinstance(raw, Mapping) else {d: Path(raw) / d for d in DOMAINS}
    for d in DOMAINS:
        if not raws[d].is_dir():
            raise UserError(f"{raws[d]}: missing; run the fetch stage first (uv run dvc repro fetch@{d})")
    # test_too_small: domain -> test images, for each domain with fewer than MIN_TEST
    counts: dict[str, Any] = {"kept": {}, "skipped": {}, "cropped_to_face": {}, "sources": {},
                              "test_too_small": {}, "cross_domain_near_duplicates": []}
    rows: list[tuple[Any, ...]] = []      # manifest rows in MANIFEST_COLUMNS order: ~100 bytes + origin
    hashes: dict[str, list[int]] = {d: [] for d in DOMAINS}   # domain -> perceptual hashes, in the order of rows
    sheets = report.DatasetSheets(p.page_thumbnails, p.seed)
    with atomic_dir(out) as tmp, (atomic_dir(page) if page is not None else nullcontext()) as page_tmp:
        for d in DOMAINS:
            for split in ("train", "test"):
                (tmp / f"{split}{d.upper()}").mkdir()
            sources = _sources(raws[d])
            staging = tmp / f".staging{d}"
            staging.mkdir()
            rels = list(_raw_files(raws[d]))
            jobs = ((raws[d] / f, p, d, staging / f"{i}.png", page is not None) for i, f in enumerate(rels))
            results: list[Outcome] = []
            seen: dict[str, Outcome] = {}     # sha256 -> the first usable image with it
            for i, r in enumerate(imap(_process, jobs, workers=workers, desc=f"prepare {d}", total=len(rels))):
                r.index, r.rel = i, rels[i]
                results.append(r)
                if r.skip is None and r.sha256 in seen:
                    r.skip, r.kept = "duplicate", seen[r.sha256]
                elif r.skip is None:
                    seen[r.sha256] = r
            del rels, seen
            if p.near_duplicate_distance:
                _drop_near_duplicates(results, p)
            skipped: Counter[str] = Counter({reason: 0 for reason in REASONS})
            kept: Counter[str] = Counter({"train": 0, "test": 0})
            per_source: dict[str, Counter[str]] = {}
            for r in results:
                source = sources.get(r.rel, ("(not in manifest.csv)", ""))[0]
                per_source.setdefault(source, Counter({"kept": 0, "skipped": 0}))
                if r.skip is not None:
                    skipped[r.skip] += 1
                    per_source[source]["skipped"] += 1
                    if r.skip in ("error", "too_large"):    # rare, and not the file's fault: name it
                        print(f"prepare {d}: skipped {raws[d] / r.rel} ({r.skip}: {r.detail})")
                    continue
                split = "test" if is_test(r.sha256, p.seed, p.test_fraction) else "train"
                r.name = name = f"{split}{d.upper()}/{r.sha256[:16]}.png"
                (staging / f"{r.index}.png").rename(tmp / name)
                kept[split] += 1
                per_source[source]["kept"] += 1
                hashes[d].append(r.phash)
                rows.append((name, d, split, r.sha256, r.width, r.height,
                             sources.get(r.rel, ("", (raws[d] / r.rel).as_posix()))[1]))
            del sources
            if kept["train"] == 0:
                raise UserError(f"{raws[d]}: no usable training images for domain {d} "
                                f"({len(results)} files; skipped: {dict(+skipped) or 'none'}); add images "
                                f"or check domains.{d}, prepare.min_size, prepare.test_fraction and "
                                f"prepare.faces.{d}")
            if page_tmp is not None:
                sheets.add_domain(d, results, page_tmp,
                                  lambda r: staging / f"{r.index}.thumb.png" if r.thumb else None)
            shutil.rmtree(staging)
            counts["kept"][d] = dict(kept)
            counts["skipped"][d] = dict(skipped)
            counts["cropped_to_face"][d] = sum(1 for r in results if r.skip is None and r.cropped)
            counts["sources"][d] = {s: dict(c) for s, c in sorted(per_source.items())}
            shown = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"
            print(f"prepare {d}: {kept['train']} train, {kept['test']} test; skipped: {shown}")
            if kept["test"] < MIN_TEST:
                counts["test_too_small"][d] = kept["test"]
                print(f"warning: prepare {d}: test{d.upper()} has {kept['test']} image(s); evaluate needs at "
                      f"least {MIN_TEST} for FID/KID (skipped otherwise); raise prepare.test_fraction "
                      f"(now {p.test_fraction}) or add images to domain {d}", file=sys.stderr)
        a, b = ([row[0] for row in rows if row[1] == d] for d in DOMAINS)     # their prepared files
        across = near_duplicates.close_pairs(hashes["a"], p.near_duplicate_distance, hashes["b"])
        counts["cross_domain_near_duplicates"] = [[a[i], b[j]] for i, j in across]
        if across:
            shown = ", ".join(f"{a[i]} ~ {b[j]}" for i, j in across[:10])
            print(f"warning: prepare: {len(across)} near-duplicate pair(s) across domains a and b (the same "
                  f"picture in both): {shown}{', ...' if len(across) > 10 else ''}; see "
                  f"{metrics} (cross_domain_near_duplicates)", file=sys.stderr)
        write_manifest(tmp / "manifest.csv", rows, MANIFEST_COLUMNS)
        counts["total_kept"] = sum(sum(k.values()) for k in counts["kept"].values())
        counts["total_skipped"] = sum(sum(s.values()) for s in counts["skipped"].values())
        if page is not None:
            counts["page"] = (page / "index.html").as_posix()
            sheets.write(page_tmp, counts, params.as_dict(p))
    atomic_write_json(metrics, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.prepare", description="Prepare and pack the dataset.")
    parser.add_argument("--raw", type=Path, nargs=len(DOMAINS), required=True, metavar="DIR",
                        help=f"the raw folders of domains {', '.join(DOMAINS)}, in that order")
    parser.add_argument("--out", type=Path, required=True, help="the packed dataset (the DVC output)")
    parser.add_argument("--view", type=Path, required=True, help="its browsable, unpacked view")
    parser.add_argument("--metrics", type=Path, required=True, help="kept and skipped counts (JSON)")
    parser.add_argument("--page", type=Path, help="the dataset page folder (index.html + thumbnails)")
    args = parser.parse_args(argv)
    folders = [args.view.parent, args.out.parent, args.metrics.parent] + ([args.page.parent] if args.page else [])
    remove_stale_temporaries(*folders)   # what a killed run left behind
    p = params.parse(PrepareParams, params.section(params.load(), "prepare"), "prepare")
    prepare(p, dict(zip(DOMAINS, args.raw)), args.view, args.metrics, page=args.page)
    pack_dir(args.view, args.out)
    print(f"prepare: packed {args.view}/ into {args.out} (the DVC output; the folder is a view of it)")


if __name__ == "__main__":
    main_guard(main)
