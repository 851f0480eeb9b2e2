"""evaluate: every models/checkpoints/epoch_NNN.pt → metrics/samples/epoch_NNN.png, FID/KID per epoch
(metrics/eval_epochs.csv, plotted from metrics/eval_plots/), the best epoch's generators in models/best/,
the whole test set translated by them (metrics/test_set/index.html), metrics/report.html, and
metrics/eval.json (numbers only: what `dvc metrics show` compares) with metrics/eval_info.json (why).

    python -m stages.evaluate

Results per checkpoint are cached in models/eval_cache/ under a key made of the checkpoint's hash,
the test data and the evaluate params, so a longer training run only pays for its new epochs.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unpaired import threads
threads.passive_wait()   # before torch loads OpenMP, which reads its wait policy only then

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from unpaired.devices import check_device, resolve_device
from unpaired import checkpoint, params
from unpaired.errors import UserError, main_guard
from unpaired.evaluation import (MIN_METRIC_IMAGES, fid_kid, inception_features, labelled_grid, load_images,
                                 translate, weights_facts)
from unpaired.files import (atomic_dir, atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_of,
                            unpack_view)
from unpaired.report import write_report
from unpaired.images import png_bytes

DATA = Path("data/prepared")
PACKED = Path("data/prepared.tar")
CHECKPOINTS = Path("models/checkpoints")
CACHE = Path("models/eval_cache")
BEST = Path("models/best")
METRICS = Path("metrics")
LIVE = Path("metrics/train")
PREPARE_REPORT = Path("metrics/prepare.json")
CACHE_VERSION = 2
TEST_PAGE_ROWS = 50        # images per direction on one page of metrics/test_set/
METRIC_COLUMNS = ("fid_AtoB", "fid_BtoA", "kid_AtoB", "kid_BtoA", "fid", "kid")


@dataclass(frozen=True)
class EvaluateParams(params.Params):
    samples: int = 4                 # test images per direction in each epoch's grid (same every epoch)
    select: str = "kid"              # best epoch by: kid or fid (summed over both directions), or last
    metrics: str = "auto"            # auto: FID/KID when the Inception weights can be had; required; off
    kid_subsets: int = 100
    batch_size: int = 16
    device: str = "auto"
    threads: int | str = "auto"      # CPU threads: auto (CPUs - 1, at least 1) or N; passive OpenMP wait

    def validate(self, prefix: str) -> None:
        params.check(self.samples >= 1, f"{prefix}.samples", f"must be >= 1, got {self.samples}")
        params.check(self.select in ("kid", "fid", "last"), f"{prefix}.select",
                     f"unknown {self.select!r}; use kid, fid or last")
        params.check(self.metrics in ("auto", "required", "off"), f"{prefix}.metrics",
                     f"unknown {self.metrics!r}; use auto, required or off")
        params.check(self.kid_subsets >= 1, f"{prefix}.kid_subsets", f"must be >= 1, got {self.kid_subsets}")
        params.check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        threads.check(self.threads, f"{prefix}.threads")
        check_device(self.device, f"{prefix}.device")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _metrics_plan(p: EvaluateParams, device: Any, data: Path, n_A: int, n_B: int
                  ) -> tuple[Any, str, str, str]:
    """(features or None, a short reason FID/KID are skipped or "", the full reason, a note to show
    when they run)."""
    if p.metrics == "off":
        return None, "evaluate.metrics is off", "FID/KID skipped: evaluate.metrics is off", ""
    if min(n_A, n_B) < MIN_METRIC_IMAGES:
        short = f"fewer than {MIN_METRIC_IMAGES} test images in a domain"
        why = (f"FID/KID skipped: they need at least {MIN_METRIC_IMAGES} test images per domain, and "
               f"{data}/testA has {n_A}, {data}/testB has {n_B}; raise prepare.test_fraction or add images")
    else:
        short = "no usable Inception weights"
        features, why = inception_features(device)
        if features is not None:
            if why:
                _warn(why)
            return features, "", "", why
    if p.metrics == "required":
        raise UserError(f"evaluate.metrics is required but {why.removeprefix('FID/KID skipped: ')}")
    _warn(why)
    return None, short, why, ""


def _evaluate_checkpoint(path: Path, p: EvaluateParams, device: Any, test_A: Any, test_B: Any,
                         features: Any, real_A: Any, real_B: Any) -> tuple[dict[str, Any], bytes | None]:
    """One checkpoint: its sample grid as PNG bytes (None without test images) and its row."""
    G_A, G_B, _ = checkpoint.load_generators(path, device)
    fake_B = translate(G_A, test_A, p.batch_size, device)
    fake_A = translate(G_B, test_B, p.batch_size, device)
    k = p.samples
    rec_A = translate(G_B, fake_B[:k], p.batch_size, device)
    rec_B = translate(G_A, fake_A[:k], p.batch_size, device)
    rows_a = [list(t) for t in zip(test_A[:k], fake_B[:k], rec_A)]
    rows_b = [list(t) for t in zip(test_B[:k], fake_A[:k], rec_B)]
    png = png_bytes(labelled_grid(rows_a, rows_b)) if rows_a or rows_b else None
    row: dict[str, Any] = {}
    if features is not None:
        ab = fid_kid(real_B, features(fake_B), p.kid_subsets)
        ba = fid_kid(real_A, features(fake_A), p.kid_subsets)
        row = {"fid_AtoB": ab["fid"], "fid_BtoA": ba["fid"], "kid_AtoB": ab["kid"], "kid_BtoA": ba["kid"],
               "fid": ab["fid"] + ba["fid"], "kid": ab["kid"] + ba["kid"]}
    return row, png


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def select_best(rows: list[dict[str, Any]], select: str, skipped: str) -> dict[str, Any]:
    """The best epoch: the lowest finite `select` (kid or fid) value, else the last epoch; never one
    whose metric is NaN or infinite. Returns epoch, selected_by (kid, fid or last), fallback (True
    when `select` asked for a metric and the last epoch was taken instead) and reason (one line).
    `skipped`: why FID/KID were not computed ("" when they were)."""
    last = rows[-1]["epoch"]
    if select == "last":
        return {"epoch": last, "selected_by": "last", "fallback": False,
                "reason": "the last epoch (evaluate.select is last)"}
    name = select.upper()
    if skipped:
        return {"epoch": last, "selected_by": "last", "fallback": True,
                "reason": f"the LAST epoch, not the lowest {name} that evaluate.select asks for: FID/KID were "
                          f"skipped ({skipped})"}
    finite = [r for r in rows if _finite(r.get(select))]
    bad = [r["epoch"] for r in rows if not _finite(r.get(select))]
    if not finite:
        return {"epoch": last, "selected_by": "last", "fallback": True,
                "reason": f"the LAST epoch, not the lowest {name} that evaluate.select asks for: every epoch's "
                          f"{name} is NaN or infinite"}
    best = min(finite, key=lambda r: (r[select], r["epoch"]))["epoch"]
    reason = f"lowest {name} summed over both directions"
    if bad:
        reason += f" (epochs {', '.join(map(str, bad))} left out: {name} is NaN or infinite)"
    return {"epoch": best, "selected_by": select, "fallback": False, "reason": reason}


def _train_run(checkpoints: Path) -> dict[str, Any]:
    """{"device": "cpu"|"cuda"|"mps", "world_size": N} as models/checkpoints/last.pt records them (what
    train.device auto resolved to, and train.devices), for the report; {} when last.pt is absent,
    unreadable or older than that record."""
    try:
        last = checkpoint.load(checkpoints / "last.pt")
    except UserError:
        return {}
    return {k: last[k] for k in ("device", "world_size") if isinstance(last, dict) and k in last}


def evaluate(p: EvaluateParams, data: Path = DATA, checkpoints: Path = CHECKPOINTS, cache: Path = CACHE,
             best_dir: Path = BEST, metrics_dir: Path = METRICS, live_dir: Path = LIVE,
             train_params: dict[str, Any] | None = None, all_params: dict[str, Any] | None = None,
             prepare_report: Path | None = None) -> dict[str, Any]:
    """Evaluate every epoch checkpoint and write all of evaluate's outputs (see the module's
    docstring). Every declared output is written even when the test split is empty or FID/KID
    cannot run; the reason is in the report, eval_info.json and eval_epochs.csv. Raises UserError
    without checkpoints, or when evaluate.metrics is required and FID/KID cannot run."""
    device = resolve_device(p.device, "evaluate.device")
    ckpts = checkpoint.epoch_files(checkpoints)
    if not ckpts:
        raise UserError(f"{checkpoints}: no epoch_NNN.pt checkpoints; run the train stage first")
    names_A, test_A = load_images(data / "testA")
    names_B, test_B = load_images(data / "testB")
    notes = []
    if not len(test_A) or not len(test_B):
        empty = " and ".join(f"{data}/test{d}" for d, t in (("A", test_A), ("B", test_B)) if not len(t))
        notes.append(f"no test images in {empty}: nothing to translate there; raise prepare.test_fraction "
                     f"(or add images) and run prepare again")
        _warn(notes[-1])

    features, skipped_short, skipped_why, metrics_note = _metrics_plan(p, device, data, len(test_A), len(test_B))
    if metrics_note:
        notes.append(metrics_note)
    real_A = features(test_A) if features else None
    real_B = features(test_B) if features else None

    settings = json.dumps({"v": CACHE_VERSION, "samples": p.samples, "kid_subsets": p.kid_subsets,
                           "metrics": features is not None, "A": names_A, "B": names_B}, sort_keys=True)
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache)          # what a killed run left (main() cleans the stage's other folders)
    rows, grids, digests = [], {}, {}
    for epoch, path in ckpts.items():
        digests[epoch] = sha256_of(path)
        key = hashlib.sha256((digests[epoch] + settings).encode()).hexdigest()[:32]
        entry, grid_file = cache / f"{key}.json", cache / f"{key}.png"
        cached = json.loads(entry.read_text()) if entry.is_file() else None
        if cached is not None and (not cached["grid"] or grid_file.is_file()):
            row, has_grid = cached["row"], cached["grid"]
            print(f"epoch {epoch:03d}: cached")
        else:
            row, png = _evaluate_checkpoint(path, p, device, test_A, test_B, features, real_A, real_B)
            has_grid = png is not None
            if has_grid:    # the grid first, then the entry that says the grid is there
                atomic_write_bytes(grid_file, png)
            atomic_write_json(entry, {"row": row, "grid": has_grid})
            print(f"epoch {epoch:03d}: " + (", ".join(f"{k} {v:.4g}" for k, v in row.items()) or "grid only"))
        rows.append({"epoch": epoch, **row})
        if has_grid:
            grids[epoch] = grid_file

    has_metrics = features is not None
    best = select_best(rows, p.select, skipped_short)
    if best["fallback"] and p.metrics == "off":   # the user turned FID/KID off: no alarm, one hint
        print(f"evaluate: evaluate.metrics is off, so models/best holds the last epoch "
              f"(set evaluate.select: last to say so)")
    elif best["fallback"]:
        _warn(f"evaluate.select is {p.select}, but models/best holds {best['reason']}")
    best_row = next(r for r in rows if r["epoch"] == best["epoch"])

    with atomic_dir(metrics_dir / "samples") as tmp:
        for epoch, grid_file in grids.items():
            shutil.copyfile(grid_file, tmp / f"epoch_{epoch:03d}.png")
    with atomic_dir(best_dir) as tmp:
        shutil.copyfile(ckpts[best["epoch"]], tmp / "generators.pt")
        atomic_write_json(tmp / "best.json", {"epoch": best["epoch"], "reason": best["reason"],
                                              "selected_by": best["selected_by"],
                                              "source": ckpts[best["epoch"]].as_posix()})
    with atomic_dir(metrics_dir / "eval_plots") as tmp:
        if has_metrics:       # no metrics, no plot files: `dvc plots show` then draws none
            for column in METRIC_COLUMNS[:4]:
                frame = pd.DataFrame({"epoch": [r["epoch"] for r in rows],
                                      column: [r[column] if _finite(r[column]) else None for r in rows]})
                (tmp / f"{column}.tsv").write_bytes(frame.to_csv(sep="\t", index=False).encode())
        if best["epoch"] in grids:
            shutil.copyfile(grids[best["epoch"]], tmp / "samples_best_epoch.png")
    # the test-set page: built once per (best checkpoint, test images, params) in the cache
    page_key = hashlib.sha256((digests[best["epoch"]] + settings + f"pages{TEST_PAGE_ROWS}")
                              .encode()).hexdigest()[:32]
    built = cache / f"test_set-{page_key}"
    if not built.is_dir():
        write_test_set(built, ckpts[best["epoch"]], best["epoch"], p, device, (names_A, test_A), (names_B, test_B))
    for old in cache.glob("test_set-*"):       # only the current best's page is kept
        if old != built:
            shutil.rmtree(old, ignore_errors=True)
    with atomic_dir(metrics_dir / "test_set") as tmp:
        shutil.copytree(built, tmp, dirs_exist_ok=True)
    table = pd.DataFrame(rows)
    if has_metrics:
        table = table[["epoch", *METRIC_COLUMNS]]
    else:     # the reason in every row, rather than a table of epoch numbers alone
        table = pd.DataFrame({"epoch": table.epoch, "fid_kid": f"skipped: {skipped_short}"})
    atomic_write_bytes(metrics_dir / "eval_epochs.csv", table.to_csv(index=False).encode())

    # metrics/eval.json: numbers only, the comparison first (dvc metrics show / dvc exp show);
    # metrics/eval_info.json: the prose that explains them.
    numbers: dict[str, Any] = {"best_epoch": best["epoch"]}
    numbers.update({k: (best_row[k] if _finite(best_row[k]) else None) for k in ("kid", "fid", *METRIC_COLUMNS[:4])
                    if has_metrics})
    numbers.update({"best_is_fallback": best["fallback"], "epochs": len(rows),
                    "test_images_A": len(test_A), "test_images_B": len(test_B)})
    atomic_write_bytes(metrics_dir / "eval.json", (json.dumps(numbers, indent=2, allow_nan=False) + "\n").encode())
    info = {"best_epoch": best["epoch"], "best_reason": best["reason"], "select": p.select,
            "selected_by": best["selected_by"], "select_fallback": best["fallback"],
            "metrics_available": has_metrics, "metrics_skipped": skipped_why,
            "weights": weights_facts() if skipped_why and "Inception" in skipped_why else {},
            "notes": notes, "device": str(device), "epochs": [r["epoch"] for r in rows],
            "train_run": _train_run(checkpoints)}
    atomic_write_json(metrics_dir / "eval_info.json", info)
    summary = {**info, "final": rows[-1], "best": best_row}
    write_report(metrics_dir / "report.html", summary=summary, table=pd.DataFrame(rows), grids=sorted(grids),
                 live_dir=live_dir, params_all=all_params or {"train": train_params or {}},
                 eval_params=params.as_dict(p), prepare_report=prepare_report)
    print(f"evaluate: best epoch {best['epoch']} ({best['reason']}) -> {best_dir}/generators.pt; report: "
          f"{metrics_dir / 'report.html'}; test set: {metrics_dir / 'test_set' / 'index.html'}")
    return summary


def write_test_set(folder: Path, ckpt: Path, epoch: int, p: EvaluateParams, device: Any,
                   side_A: tuple[list[str], Any], side_B: tuple[list[str], Any]) -> None:
    """`folder`/index.html (+ page_NNN.html): every test image with its translation and
    reconstruction by the best epoch's generators, both directions, TEST_PAGE_ROWS rows per direction
    per page, each image a link to its full-size PNG under `folder`/{AtoB,BtoA}/{real,fake,rec}/."""
    (names_A, test_A), (names_B, test_B) = side_A, side_B
    G_A, G_B, _ = checkpoint.load_generators(ckpt, device)
    directions = []
    for label, names, real, fwd, back in (("AtoB", names_A, test_A, G_A, G_B), ("BtoA", names_B, test_B, G_B, G_A)):
        fake = translate(fwd, real, p.batch_size, device)
        directions.append((label, names, {"real": real, "fake": fake, "rec": translate(back, fake, p.batch_size, device)}))
    pages = max(1, math.ceil(max(len(names_A), len(names_B)) / TEST_PAGE_ROWS))
    page_name = lambda i: "index.html" if i == 0 else f"page_{i + 1:03d}.html"   # noqa: E731
    esc = html.escape
    with atomic_dir(folder) as tmp:
        for label, names, images in directions:
            for kind, batch in images.items():
                (tmp / label / kind).mkdir(parents=True)
                for name, img in zip(names, batch):
                    (tmp / label / kind / name).write_bytes(png_bytes(Image.fromarray(img.permute(1, 2, 0).numpy())))
        for i in range(pages):
            nav = " ".join(f"<b>{j + 1}</b>" if j == i else f'<a href="{page_name(j)}">{j + 1}</a>'
                           for j in range(pages)) if pages > 1 else ""
            parts = []
            for label, names, _ in directions:
                a, b = label[0], label[-1]
                chunk = names[i * TEST_PAGE_ROWS:(i + 1) * TEST_PAGE_ROWS]
                rows = "".join(
                    f"<tr><td class=name>{esc(n)}</td>" + "".join(
                        f'<td><a href="{label}/{kind}/{esc(n)}"><img src="{label}/{kind}/{esc(n)}" '
                        f'alt="{kind} {esc(n)}" loading="lazy"></a></td>' for kind in ("real", "fake", "rec"))
                    + "</tr>" for n in chunk)
                body = (f"<table><tr><th>file</th><th>real {a}</th><th>fake {b} (G_{a})</th><th>reconstructed {a}</th>"
                        f"</tr>{rows}</table>" if names else
                        f"<p class=warn>No test images in test{a}: raise prepare.test_fraction (or add images) and "
                        f"run prepare again.</p>")
                parts.append(f"<h2>{a} → {b}: {len(names)} test image(s)</h2>{body}")
            page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>unpaired: test set, epoch {epoch}"
                    f"</title><style>body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}}"
                    f"td,th{{border:1px solid #ccc;padding:3px}}table{{border-collapse:collapse}}"
                    f"td.name{{font:12px monospace}}img{{width:128px;height:auto;image-rendering:pixelated;display:block}}"
                    f".warn{{background:#fff4e5;padding:8px;border-left:4px solid #f0a020}}</style></head><body>"
                    f"<h1>Test set translated by the best epoch ({epoch})</h1>"
                    f"<p>Generators: <code>{esc(ckpt.as_posix())}</code> (= models/best/generators.pt). "
                    f"Click an image for the full-size file. Page {i + 1} of {pages}. {nav}</p>"
                    + "".join(parts) + (f"<p>{nav}</p>" if nav else "") + "</body></html>\n")
            (tmp / page_name(i)).write_text(page)


def main() -> None:
    remove_stale_temporaries(METRICS, BEST.parent, BEST, DATA.parent)   # what a killed run left (the cache: evaluate())
    data = params.load()
    p = params.parse(EvaluateParams, params.section(data, "evaluate"), "evaluate")
    threads.apply(p.threads)
    if PACKED.is_file():       # after a `dvc pull` only the tar is there
        unpack_view(PACKED, DATA)
    evaluate(p, train_params=params.section(data, "train"), all_params=data, prepare_report=PREPARE_REPORT)


if __name__ == "__main__":
    main_guard(main)
