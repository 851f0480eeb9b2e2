"""prepare: data/raw/{a,b} → data/prepared/{trainA,trainB,testA,testB}/*.png + manifest.csv,
packed into data/prepared.tar (the DVC output: one remote object instead of thousands; the folder
is its browsable view, see unpaired/files.py), and metrics/prepare.json (kept and skipped counts).

    python -m stages.prepare --raw data/raw/a data/raw/b --out data/prepared.tar \
        --view data/prepared --metrics metrics/prepare.json        # dvc.yaml's cmd

Every raw file is decoded to 8-bit RGB (see unpaired/images.py), checked against `min_size`, resized to
an `image_size`×`image_size` square and written as PNG named by the first 16 hex digits of the SHA-256 of the raw
file's bytes. Exact duplicates (same hash) are kept once. The split is a pure function of (seed,
content hash), so adding images never moves existing ones between train and test, and a duplicate can
never land in both. Decoding runs on all cores; the tree is built in a temporary directory and renamed.
"""
from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import ImageColor

from unpaired import params
from unpaired.errors import ArgumentParser, UserError, main_guard
from unpaired.files import (NO_SPACE, atomic_dir, atomic_write_json, pack_dir, remove_stale_temporaries,
                            write_manifest)
from unpaired.images import SKIP_REASONS, Skip, decode_scaled, png_bytes, square
from unpaired.parallel import pmap

DOMAINS = ("a", "b")
MANIFEST_COLUMNS = ["file", "domain", "split", "sha256", "width", "height", "origin"]
MIN_TEST = 2           # evaluate's FID/KID need at least two test images per domain


@dataclass(frozen=True)
class PrepareParams(params.Params):
    image_size: int = 64                  # output width = height in pixels
    resize: str = "crop"                  # crop: shorter side to image_size, centre crop; pad: letterbox
    pad_color: str = "white"              # letterbox colour for resize: pad
    test_fraction: float = 0.1            # share of images in testA/testB, in [0, 1)
    min_size: int = 16                    # images whose shorter side is smaller are skipped
    seed: int = 0                         # split seed

    BOUNDS = {
        "image_size": params.IMAGE_SIZE,
        "test_fraction": params.Bound(1, "a share of the images", 0, below=True),
        "min_size": params.Bound(65_535, "pixels; no format this reads stores a longer side (JPEG's limit)"),
        "seed": params.SEED,
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


def is_test(sha256: str, seed: int, test_fraction: float) -> bool:
    """Stable split: a uniform number drawn from (seed, content hash) alone."""
    u = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:16], 16) / 2 ** 64
    return u < test_fraction


def _process(job: tuple[Path, PrepareParams, Path]) -> dict[str, Any]:
    """Decode, check and resize one raw file, writing the PNG to `staged` (the worker writes it, so
    the parent process only renames: that keeps the parent from becoming the bottleneck). Never
    raises for one file: an unexpected failure (a decoder bug on a strange file) is the skip `error`
    naming the file. Only a full disk stops the stage (atomic_dir makes it one line)."""
    path, p, staged = job
    try:
        return _process_one(path, p, staged)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise      # the parent's atomic_dir names the output and the free space
        return {"path": path, "skip": "error", "detail": f"{type(err).__name__}: {err}"}
    except Exception as err:  # noqa: BLE001 - one file never stops the stage; it is counted and named
        return {"path": path, "skip": "error", "detail": f"{type(err).__name__}: {err}"}


def _process_one(path: Path, p: PrepareParams, staged: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as err:
        return {"path": path, "skip": "unreadable", "detail": str(err)}
    digest = hashlib.sha256(data).hexdigest()
    try:
        img, (width, height) = decode_scaled(data, str(path), min_side=p.image_size)
    except Skip as skip:
        return {"path": path, "skip": skip.reason, "detail": str(skip)}
    if min(width, height) < p.min_size:
        return {"path": path, "skip": "too_small", "detail": f"{width}x{height}"}
    staged.write_bytes(png_bytes(square(img, p.image_size, p.resize, p.pad_color)))
    return {"path": path, "skip": None, "sha256": digest, "width": width, "height": height,
            "staged": staged}


def _raw_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and f.name != "manifest.csv" and not f.name.startswith("."))


def _origins(folder: Path) -> dict[str, str]:
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return {}
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if not {"file", "origin"} <= set(frame.columns):
        return {}
    return dict(zip(frame.file, frame.origin))


def prepare(p: PrepareParams, raw: Path | Mapping[str, Path], out: Path, metrics: Path,
            workers: int | None = None) -> dict[str, Any]:
    """Build the prepared tree `out` from the raw folders `raw` (domain -> folder, or a folder holding
    one folder per domain) and write the counts to `metrics`; returns those counts."""
    raws = {d: Path(raw[d]) for d in DOMAINS} if isinstance(raw, Mapping) else {d: Path(raw) / d for d in DOMAINS}
    files: dict[str, list[Path]] = {}
    for d in DOMAINS:
        folder = raws[d]
        if not folder.is_dir():
            raise UserError(f"{folder}: missing; run the fetch stage first (uv run dvc repro fetch@{d})")
        files[d] = _raw_files(folder)
    # test_too_small: domain -> test images, for each domain with fewer than MIN_TEST
    report: dict[str, Any] = {"kept": {}, "skipped": {}, "test_too_small": {}}
    rows: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        for d in DOMAINS:
            for split in ("train", "test"):
                (tmp / f"{split}{d.upper()}").mkdir()
            origins = _origins(raws[d])
            staging = tmp / f".staging{d}"
            staging.mkdir()
            jobs = [(f, p, staging / f"{i}.png") for i, f in enumerate(files[d])]
            results = pmap(_process, jobs, workers=workers, desc=f"prepare {d}")
            skipped: Counter[str] = Counter({reason: 0 for reason in SKIP_REASONS})
            kept: Counter[str] = Counter({"train": 0, "test": 0})
            seen: set[str] = set()
            for r in results:
                if r["skip"] is None and r["sha256"] in seen:
                    r["staged"].unlink()
                    r = {**r, "skip": "duplicate"}
                if r["skip"] is not None:
                    skipped[r["skip"]] += 1
                    if r["skip"] in ("error", "too_large"):    # rare, and not the file's fault: name it
                        print(f"prepare {d}: skipped {r['path']} ({r['skip']}: {r['detail']})")
                    continue
                seen.add(r["sha256"])
                split = "test" if is_test(r["sha256"], p.seed, p.test_fraction) else "train"
                name = f"{split}{d.upper()}/{r['sha256'][:16]}.png"
                r["staged"].rename(tmp / name)
                kept[split] += 1
                rel = r["path"].relative_to(raws[d]).as_posix()
                rows.append({"file": name, "domain": d, "split": split, "sha256": r["sha256"],
                             "width": r["width"], "height": r["height"],
                             "origin": origins.get(rel, (raws[d] / rel).as_posix())})
            if kept["train"] == 0:
                raise UserError(f"{raws[d]}: no usable training images for domain {d} "
                                f"({len(files[d])} files; skipped: {dict(+skipped) or 'none'}); add images "
                                f"or check domains.{d}, prepare.min_size and prepare.test_fraction")
            staging.rmdir()
            report["kept"][d] = dict(kept)
            report["skipped"][d] = dict(skipped)
            shown = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "none"
            print(f"prepare {d}: {kept['train']} train, {kept['test']} test; skipped: {shown}")
            if kept["test"] < MIN_TEST:
                report["test_too_small"][d] = kept["test"]
                print(f"warning: prepare {d}: test{d.upper()} has {kept['test']} image(s); evaluate needs at "
                      f"least {MIN_TEST} for FID/KID (skipped otherwise); raise prepare.test_fraction "
                      f"(now {p.test_fraction}) or add images to domain {d}", file=sys.stderr)
        write_manifest(tmp / "manifest.csv", rows, MANIFEST_COLUMNS)
    report["total_kept"] = sum(sum(k.values()) for k in report["kept"].values())
    report["total_skipped"] = sum(sum(s.values()) for s in report["skipped"].values())
    atomic_write_json(metrics, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.prepare", description="Prepare and pack the dataset.")
    parser.add_argument("--raw", type=Path, nargs=len(DOMAINS), required=True, metavar="DIR",
                        help=f"the raw folders of domains {', '.join(DOMAINS)}, in that order")
    parser.add_argument("--out", type=Path, required=True, help="the packed dataset (the DVC output)")
    parser.add_argument("--view", type=Path, required=True, help="its browsable, unpacked view")
    parser.add_argument("--metrics", type=Path, required=True, help="kept and skipped counts (JSON)")
    parser.add_argument("--page", type=Path, help="the dataset page folder")
    args = parser.parse_args(argv)
    remove_stale_temporaries(args.view.parent, args.out.parent, args.metrics.parent)   # a killed run's
    p = params.parse(PrepareParams, params.section(params.load(), "prepare"), "prepare")
    prepare(p, dict(zip(DOMAINS, args.raw)), args.view, args.metrics)
    pack_dir(args.view, args.out)
    print(f"prepare: packed {args.view}/ into {args.out} (the DVC output; the folder is a view of it)")


if __name__ == "__main__":
    main_guard(main)
