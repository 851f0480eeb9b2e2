"""prepare: data/raw/{a,b} → data/prepared/{trainA,trainB,testA,testB}/*.png + manifest.csv,
packed into data/prepared.tar (the DVC output: one remote object instead of thousands; the folder
is its browsable view, see unpaired/files.py), metrics/prepare.json (kept and skipped counts) and
the dataset page metrics/data/index.html (contact sheets, skipped images by reason, counts per source).

    python -m stages.prepare --raw data/raw/a data/raw/b --out data/prepared.tar \
        --view data/prepared --metrics metrics/prepare.json --page metrics/data     # dvc.yaml's cmd

What becomes of each raw file (decoded, checked, cropped to a face, resized, deduplicated, split) is
unpaired/prepare.py's; the dataset page is unpaired/dataset_page.py's. Decoding runs on all cores;
the tree is built in a temporary directory and renamed.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from unpaired import params
from unpaired.dataset_page import DatasetSheets
from unpaired.errors import ArgumentParser, UserError, main_guard
from unpaired.files import (
    SOURCE_SKIP_REASONS,
    atomic_dir,
    atomic_write_json,
    pack_dir,
    read_source_skipped,
    remove_stale_temporaries,
    write_manifest,
)
from unpaired.prepare import (
    DOMAINS,
    MANIFEST_COLUMNS,
    MIN_TEST,
    DomainTally,
    PrepareParams,
    cross_domain_near_duplicates,
    no_training_images,
    place_kept,
    process_domain,
    read_sources,
)


def prepare(
    p: PrepareParams,
    raw: Path | Mapping[str, Path],
    out: Path,
    metrics: Path,
    workers: int | None = None,
    page: Path | None = None,
) -> dict[str, Any]:
    """Build the prepared tree `out` from the raw folders `raw` (domain -> folder, or a folder holding
    one folder per domain), write the counts to `metrics` and, with `page`, the dataset page there;
    returns the counts. Raises UserError (one line) for a missing folder or a domain left empty."""
    raws = raw_folders(raw)
    sheets = DatasetSheets(p.page_thumbnails, p.seed)
    with (
        atomic_dir(out) as tmp,
        atomic_dir(page) if page is not None else nullcontext() as page_tmp,
    ):
        tallies = {
            d: prepare_domain(p, d, raws[d], tmp, workers, sheets, page_tmp) for d in DOMAINS
        }
        across = cross_domain_near_duplicates(tallies, p.near_duplicate_distance)
        warn_cross_domain(across, metrics)
        write_manifest(
            tmp / "manifest.csv",
            [row for t in tallies.values() for row in t.rows],
            MANIFEST_COLUMNS,
        )
        counts = count(tallies, across)
        if page is not None:
            counts["page"] = (page / "index.html").as_posix()
            sheets.write(page_tmp, counts, params.as_dict(p))
    atomic_write_json(metrics, counts)
    return counts


def raw_folders(raw: Path | Mapping[str, Path]) -> dict[str, Path]:
    """domain -> its raw folder; raises UserError (one line) for a missing one."""
    raws = (
        {d: Path(raw[d]) for d in DOMAINS}
        if isinstance(raw, Mapping)
        else {d: Path(raw) / d for d in DOMAINS}
    )
    for d in DOMAINS:
        if not raws[d].is_dir():
            raise UserError(
                f"{raws[d]}: missing; run the fetch stage first (uv run dvc repro fetch@{d})"
            )
    return raws


def prepare_domain(
    p: PrepareParams,
    d: str,
    raw: Path,
    tmp: Path,
    workers: int | None,
    sheets: DatasetSheets,
    page_tmp: Path | None,
) -> DomainTally:
    """Domain `d`: its raw files processed, split and placed under `tmp` (train<D>/, test<D>/), its
    part of the dataset page collected into `sheets` (with `page_tmp`), its counts printed. Raises
    UserError when no training image is left."""
    for split in ("train", "test"):
        (tmp / f"{split}{d.upper()}").mkdir()
    sources = read_sources(raw)
    staging = tmp / f".staging{d}"
    staging.mkdir()
    results = process_domain(p, d, raw, staging, page_tmp is not None, workers)
    tally = place_kept(p, d, raw, results, staging, tmp, sources)
    del sources
    if tally.kept["train"] == 0:
        raise no_training_images(p, d, raw, len(results), tally)
    left_out = read_source_skipped(raw)  # what the source did not copy (hidden, not image names)
    for reason in SOURCE_SKIP_REASONS:
        tally.skipped[reason] += left_out.get(reason, 0)
    if page_tmp is not None:
        sheets.add_domain(
            d, results, page_tmp, lambda r: staging / f"{r.index}.thumb.png" if r.thumb else None
        )
    shutil.rmtree(staging)
    shown = ", ".join(f"{k} {v}" for k, v in tally.skipped.items() if v) or "none"
    print(f"prepare {d}: {tally.kept['train']} train, {tally.kept['test']} test; skipped: {shown}")
    if tally.kept["test"] < MIN_TEST:
        print(
            f"warning: prepare {d}: test{d.upper()} has {tally.kept['test']} image(s); evaluate needs at "
            f"least {MIN_TEST} for FID/KID (skipped otherwise); raise prepare.test_fraction "
            f"(now {p.test_fraction}) or add images to domain {d}",
            file=sys.stderr,
        )
    return tally


def warn_cross_domain(across: list[list[str]], metrics: Path) -> None:
    """A warning on stderr naming the first pairs of near-duplicates across the domains, if any."""
    if across:
        shown = ", ".join(f"{a} ~ {b}" for a, b in across[:10])
        print(
            f"warning: prepare: {len(across)} near-duplicate pair(s) across domains a and b (the same "
            f"picture in both): {shown}{', ...' if len(across) > 10 else ''}; see "
            f"{metrics} (cross_domain_near_duplicates)",
            file=sys.stderr,
        )


def count(tallies: Mapping[str, DomainTally], across: list[list[str]]) -> dict[str, Any]:
    """metrics/prepare.json's content (without `page`): kept and skipped per domain, split, reason
    and source, faces cropped, too-small test splits, cross-domain near-duplicates, totals."""
    counts: dict[str, Any] = {
        "kept": {d: dict(t.kept) for d, t in tallies.items()},
        "skipped": {d: dict(t.skipped) for d, t in tallies.items()},
        "cropped_to_face": {d: t.cropped for d, t in tallies.items()},
        "sources": {
            d: {s: dict(c) for s, c in sorted(t.per_source.items())} for d, t in tallies.items()
        },
        # domain -> test images, for each domain with fewer than MIN_TEST
        "test_too_small": {
            d: t.kept["test"] for d, t in tallies.items() if t.kept["test"] < MIN_TEST
        },
        "cross_domain_near_duplicates": across,
    }
    counts["total_kept"] = sum(sum(k.values()) for k in counts["kept"].values())
    counts["total_skipped"] = sum(sum(s.values()) for s in counts["skipped"].values())
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m stages.prepare", description="Prepare and pack the dataset."
    )
    parser.add_argument(
        "--raw",
        type=Path,
        nargs=len(DOMAINS),
        required=True,
        metavar="DIR",
        help=f"the raw folders of domains {', '.join(DOMAINS)}, in that order",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the packed dataset (the DVC output)"
    )
    parser.add_argument("--view", type=Path, required=True, help="its browsable, unpacked view")
    parser.add_argument(
        "--metrics", type=Path, required=True, help="kept and skipped counts (JSON)"
    )
    parser.add_argument(
        "--page", type=Path, help="the dataset page folder (index.html + thumbnails)"
    )
    args = parser.parse_args(argv)
    folders = [args.view.parent, args.out.parent, args.metrics.parent] + (
        [args.page.parent] if args.page else []
    )
    remove_stale_temporaries(*folders)  # what a killed run left behind
    p = params.parse(PrepareParams, params.section(params.load(), "prepare"), "prepare")
    prepare(p, dict(zip(DOMAINS, args.raw)), args.view, args.metrics, page=args.page)
    pack_dir(args.view, args.out)
    print(
        f"prepare: packed {args.view}/ into {args.out} (the DVC output; the folder is a view of it)"
    )


if __name__ == "__main__":
    main_guard(main)
