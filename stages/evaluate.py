"""evaluate: every models/checkpoints/epoch_NNN.pt → metrics/samples/epoch_NNN.png, FID/KID per epoch
(metrics/eval_epochs.csv, metrics/eval.json), the best epoch's generators in models/best/, and
metrics/report.html.

    python -m stages.evaluate

Results per checkpoint are cached in models/eval_cache/ under a key made of the checkpoint's hash,
the test data and the evaluate params, so a longer training run only pays for its new epochs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from unpaired.devices import resolve_device
from unpaired import checkpoint, params
from unpaired.errors import UserError, main_guard
from unpaired.evaluation import fid_kid, inception_features, labelled_grid, load_images, translate
from unpaired.files import (atomic_dir, atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_of,
                            unpack_view)
from unpaired.report import write_report

DATA = Path("data/prepared")
PACKED = Path("data/prepared.tar")
CHECKPOINTS = Path("models/checkpoints")
CACHE = Path("models/eval_cache")
BEST = Path("models/best")
METRICS = Path("metrics")
LIVE = Path("metrics/train")
CACHE_VERSION = 1


@dataclass(frozen=True)
class EvaluateParams(params.Params):
    samples: int = 4                 # test images per direction in each epoch's grid (same every epoch)
    select: str = "kid"              # best epoch by: kid or fid (summed over both directions), or last
    metrics: str = "auto"            # auto: FID/KID when the Inception weights can be had; required; off
    kid_subsets: int = 100
    batch_size: int = 16
    device: str = "auto"

    def validate(self, prefix: str) -> None:
        params.check(self.samples >= 1, f"{prefix}.samples", f"must be >= 1, got {self.samples}")
        params.check(self.select in ("kid", "fid", "last"), f"{prefix}.select",
                     f"unknown {self.select!r}; use kid, fid or last")
        params.check(self.metrics in ("auto", "required", "off"), f"{prefix}.metrics",
                     f"unknown {self.metrics!r}; use auto, required or off")
        params.check(self.kid_subsets >= 1, f"{prefix}.kid_subsets", f"must be >= 1, got {self.kid_subsets}")
        params.check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")


def evaluate(p: EvaluateParams, data: Path = DATA, checkpoints: Path = CHECKPOINTS, cache: Path = CACHE,
             best_dir: Path = BEST, metrics_dir: Path = METRICS, live_dir: Path = LIVE,
             train_params: dict[str, Any] | None = None) -> dict[str, Any]:
    device = resolve_device(p.device, "evaluate.device")
    ckpts = checkpoint.epoch_files(checkpoints)
    if not ckpts:
        raise UserError(f"{checkpoints}: no epoch_NNN.pt checkpoints; run the train stage first")
    names_A, test_A = load_images(data / "testA")
    names_B, test_B = load_images(data / "testB")
    if not len(test_A) or not len(test_B):
        raise UserError(f"{data}: testA and testB must both hold images; raise prepare.test_fraction")

    features, why = (None, "evaluate.metrics is off") if p.metrics == "off" else inception_features(device)
    if features is None and p.metrics == "required":
        raise UserError(f"evaluate.metrics is required but {why}")
    if features is None and p.metrics == "auto":
        print(f"warning: {why}", file=sys.stderr)
    real_A = features(test_A) if features else None
    real_B = features(test_B) if features else None

    settings = json.dumps({"v": CACHE_VERSION, "samples": p.samples, "kid_subsets": p.kid_subsets,
                           "metrics": features is not None, "A": names_A, "B": names_B}, sort_keys=True)
    cache.mkdir(parents=True, exist_ok=True)
    rows, grids = [], {}
    for epoch, path in ckpts.items():
        key = hashlib.sha256((sha256_of(path) + settings).encode()).hexdigest()[:32]
        entry, grid_file = cache / f"{key}.json", cache / f"{key}.png"
        if entry.is_file() and grid_file.is_file():
            row = json.loads(entry.read_text())
            print(f"epoch {epoch:03d}: cached")
        else:
            G_A, _ = checkpoint.load_generator(path, "AtoB", device)
            G_B, _ = checkpoint.load_generator(path, "BtoA", device)
            fake_B = translate(G_A, test_A, p.batch_size, device)
            fake_A = translate(G_B, test_B, p.batch_size, device)
            k = p.samples
            rec_A = translate(G_B, fake_B[:k], p.batch_size, device)
            rec_B = translate(G_A, fake_A[:k], p.batch_size, device)
            grid = labelled_grid([list(t) for t in zip(test_A[:k], fake_B[:k], rec_A)],
                                 [list(t) for t in zip(test_B[:k], fake_A[:k], rec_B)])
            grid.save(cache / f".{key}.png.tmp", format="PNG")
            row = {"epoch": epoch}
            if features is not None:
                ab = fid_kid(real_B, features(fake_B), p.kid_subsets)
                ba = fid_kid(real_A, features(fake_A), p.kid_subsets)
                row.update({"fid_AtoB": ab["fid"], "fid_BtoA": ba["fid"], "kid_AtoB": ab["kid"],
                            "kid_BtoA": ba["kid"], "fid": ab["fid"] + ba["fid"], "kid": ab["kid"] + ba["kid"]})
            (cache / f".{key}.png.tmp").replace(grid_file)
            atomic_write_json(entry, row)
            print(f"epoch {epoch:03d}: " + (", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
                                           or "grid only"))
        row["epoch"] = epoch
        rows.append(row)
        grids[epoch] = grid_file

    table = pd.DataFrame(rows)
    has_metrics = features is not None
    if has_metrics and p.select in ("kid", "fid"):
        best = int(table.loc[table[p.select].idxmin(), "epoch"])
        reason = f"lowest {p.select.upper()} summed over both directions"
    else:
        best = int(table.epoch.max())
        reason = "the last epoch (evaluate.select is last)" if p.select == "last" else \
            f"the last epoch, because FID/KID were not computed: {why}"
    summary = {"epochs": len(table), "metrics_available": has_metrics, "best_epoch": best,
               "best_reason": reason, "final": rows[-1], "best": rows[list(table.epoch).index(best)]}

    samples_dir = metrics_dir / "samples"
    with atomic_dir(samples_dir) as tmp:
        for epoch, grid_file in grids.items():
            shutil.copyfile(grid_file, tmp / f"epoch_{epoch:03d}.png")
    with atomic_dir(best_dir) as tmp:
        shutil.copyfile(ckpts[best], tmp / "generators.pt")
        atomic_write_json(tmp / "best.json", {"epoch": best, "reason": reason, "source": ckpts[best].as_posix()})
    columns = ["epoch"] + ([c for c in ("fid_AtoB", "fid_BtoA", "kid_AtoB", "kid_BtoA", "fid", "kid")]
                           if has_metrics else [])
    atomic_write_bytes(metrics_dir / "eval_epochs.csv", table[columns].to_csv(index=False).encode())
    atomic_write_json(metrics_dir / "eval.json", summary)
    write_report(metrics_dir / "report.html", summary=summary, table=table, grids=sorted(grids),
                 live_dir=live_dir, train_params=train_params or {}, eval_params=params.as_dict(p),
                 metrics_note="" if has_metrics else why)
    print(f"evaluate: best epoch {best} ({reason}) -> {best_dir}/generators.pt; report: "
          f"{metrics_dir / 'report.html'}")
    return summary


def main() -> None:
    remove_stale_temporaries(METRICS, BEST.parent, BEST, CACHE, DATA.parent)   # what a killed run left
    data = params.load()
    p = params.parse(EvaluateParams, params.section(data, "evaluate"), "evaluate")
    if PACKED.is_file():       # after a `dvc pull` only the tar is there
        unpack_view(PACKED, DATA)
    evaluate(p, train_params=params.section(data, "train"))


if __name__ == "__main__":
    main_guard(main)
