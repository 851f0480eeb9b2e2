"""evaluate: score every epoch checkpoint, pick the best, write what shows it.

    python -m stages.evaluate --checkpoints models/checkpoints --data data/prepared.tar
        --view data/prepared --prepare-metrics metrics/prepare.json --train-live metrics/train
        --cache models/eval_cache --best models/best --samples metrics/samples
        --test-set metrics/test_set --report metrics/report.html --info metrics/eval_info.json
        --epochs-csv metrics/eval_epochs.csv --metrics metrics/eval.json --plots metrics/eval_plots

(dvc.yaml's cmd: the one place these paths are written.) Each epoch_NNN.pt gives a sample grid
(--samples/epoch_NNN.png) and FID/KID (--epochs-csv, plotted from --plots), cached in --cache under a
key made of the checkpoint's sha256, the test images and the evaluate params, so a longer training run
only pays for its new epochs. The best epoch's generators go to --best, the whole test set translated
by them to --test-set (index.html, also cached), and then --report (HTML), --metrics (numbers only:
what `dvc metrics show` compares) and --info (why: the best epoch's reason, skipped metrics, which
Inception weights scored the run). No host path or error text goes into an output: the console has them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from unpaired import allocator, params, threads
from unpaired.devices import resolve_device
from unpaired.errors import UserError, end_process, main_guard
from unpaired.evaluation import (
    DIRECTION_COLUMNS,
    KID_STD_COLUMNS,
    METRIC_COLUMNS,
    EvalCache,
    EvalImages,
    EvaluateParams,
    MetricsPlan,
    Scores,
    epoch_checkpoints,
    fid_caution,
    finite,
    plan_metrics,
    protocol,
    run_directions,
    score_epochs,
    scored,
    select_best,
    train_run,
    translated_test_set,
    warn,
)
from unpaired.files import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temporaries,
    unpack_view,
)
from unpaired.report import write_report
from unpaired.weights import weights_facts

__all__ = ["EvaluateParams", "Paths", "evaluate", "main", "parse_args"]


def _path(text: str) -> Any:
    return field(metadata={"help": text})


@dataclass(frozen=True)
class Paths:
    """evaluate's inputs and outputs, as dvc.yaml's cmd passes them (one flag per field)."""

    checkpoints: Path = _path("train's epoch_NNN.pt files (and last.pt: the device it trained on)")
    data: Path = _path("the packed prepared data; unpacked into --view when present")
    view: Path = _path("the prepared data's folder: its testA/ and testB/ are evaluated")
    prepare_metrics: Path = _path("prepare's counts, shown in the report (may be absent)")
    train_live: Path = _path(
        "train's dvclive folder: losses and images/s for the report (may be absent)"
    )
    cache: Path = _path("out (persistent): each epoch's score and the best epoch's test-set pages")
    best: Path = _path("out: the best epoch's generators.pt and best.json")
    samples: Path = _path("out: every epoch's sample grid, epoch_NNN.png")
    test_set: Path = _path("out: every test image translated by the best epoch (index.html)")
    report: Path = _path("out: the HTML report (links samples/ and test_set/ beside it)")
    info: Path = _path("out: JSON prose: why this best epoch, why FID/KID were skipped")
    epochs_csv: Path = _path("out: one CSV row per epoch: FID/KID, or why they were skipped")
    metrics: Path = _path("out: JSON numbers: best epoch, its KID/FID (a DVC metrics file)")
    plots: Path = _path("out: FID/KID per epoch (TSV; none when skipped) and the best epoch's grid")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, as every other bad input
        raise UserError(f"{self.prog}: {message}; pass every path as dvc.yaml's evaluate cmd does")


def parse_args(argv: list[str] | None = None) -> Paths:
    """Paths from the command line (sys.argv[1:] when `argv` is None); raises UserError (one line)
    for a missing or unknown flag."""
    parser = _Parser(
        prog="python -m stages.evaluate", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    for f in dataclasses.fields(Paths):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=Path,
            required=True,
            metavar="PATH",
            help=f.metadata["help"],
        )
    return Paths(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    paths = parse_args(argv)
    outputs = (
        paths.samples,
        paths.test_set,
        paths.report,
        paths.info,
        paths.epochs_csv,
        paths.metrics,
        paths.plots,
        paths.best,
    )  # what a killed run left next to them (the cache: score_epochs)
    remove_stale_temporaries(*sorted({o.parent for o in outputs} | {paths.best, paths.view.parent}))
    all_params = params.load()
    p = params.parse(EvaluateParams, params.section(all_params, "evaluate"), "evaluate")
    allocator.keep_freed_memory()  # freed activations reused, not faulted in again
    threads.apply(p.threads)
    if note := threads.load_note("evaluate.threads", p.threads):
        print(note, flush=True)
    if paths.data.is_file():  # after a `dvc pull` only the tar is there
        unpack_view(paths.data, paths.view)
    evaluate(p, paths, all_params)


def evaluate(
    p: EvaluateParams, paths: Paths, all_params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Score every epoch checkpoint, pick the best and write all of evaluate's outputs (`paths`).
    Every declared output is written even when the test split is empty or FID/KID cannot run; the
    reason is in the report, --info and --epochs-csv. `all_params`: every params.yaml section, shown
    in the report. Returns --info's content with the final and best rows. Raises UserError without
    checkpoints, for a damaged or diverged one, or when evaluate.metrics is required and FID/KID
    cannot run."""
    device = resolve_device(p.device, "evaluate.device")
    ckpts = epoch_checkpoints(paths.checkpoints)
    test = EvalImages.load(paths.view)
    if test.empty_note():
        warn(test.empty_note())
    plan = plan_metrics(p, device, test)
    notes = [n for n in (test.empty_note(), plan.note) if n]  # for the report and --info

    cache = EvalCache(paths.cache)  # new scores stay pending until every output is written
    scores = score_epochs(ckpts, cache, p, device, test, plan)

    best = select_best(scores.rows, p.select, plan.skipped)
    if best["fallback"] and p.metrics == "off":  # the user turned FID/KID off: no alarm, one hint
        print(
            "evaluate: evaluate.metrics is off, so models/best holds the last epoch "
            "(set evaluate.select: last to say so)"
        )
    elif best["fallback"]:
        warn(f"evaluate.select is {p.select}, but models/best holds {best['reason']}")

    write_samples(paths, scores)
    write_best(paths, scores, best)
    write_plots(paths, scores, best, plan)
    test_set = translated_test_set(cache, scores, best["epoch"], p, device, test)
    with atomic_dir(paths.test_set) as tmp:  # built once per best checkpoint, in the cache
        shutil.copytree(test_set, tmp, dirs_exist_ok=True)
    write_epochs_csv(paths, scores, plan)
    write_metrics(paths, scores, best, plan, test)
    info = {
        "best_epoch": best["epoch"],
        "best_reason": best["reason"],
        "select": p.select,
        "selected_by": best["selected_by"],
        "select_fallback": best["fallback"],
        "metrics_available": plan.features is not None,
        "metrics_skipped": plan.why,
        "weights": plan.weights,  # which weights scored the run ({} when FID/KID were skipped)
        "weights_help": weights_facts() if plan.skipped == "no usable Inception weights" else {},
        "test_images": {"A": len(test.A), "B": len(test.B)},
        "protocol": protocol(
            p, plan, test, run_directions(ckpts)
        ),  # one sentence: what was compared with what, how
        "fid_caution": fid_caution(plan, test),  # FID on a small test set: biased; "" when not
        "notes": notes,
        "device": str(device),
        "epochs": [r["epoch"] for r in scores.rows],
        "train_run": train_run(paths.checkpoints),
    }
    atomic_write_json(paths.info, info)
    summary = {**info, "final": scores.rows[-1], "best": scores.row(best["epoch"])}
    write_report(
        paths.report,
        summary=summary,
        table=pd.DataFrame(scores.rows),
        grids=sorted(scores.grids),
        params_all={**(all_params or {}), "evaluate": params.as_dict(p)},
        live_dir=paths.train_live,
        prepare_report=paths.prepare_metrics,
    )
    cache.commit(test_set)  # every output is written: the new scores join the recorded cache
    print(
        f"evaluate: best epoch {best['epoch']} ({best['reason']}) -> {paths.best}/generators.pt; report: "
        f"{paths.report}; test set: {paths.test_set / 'index.html'}"
    )
    return summary


# --- the outputs --------------------------------------------------------------------------------


def write_samples(paths: Paths, scores: Scores) -> None:
    """--samples/epoch_NNN.png for every epoch with a grid (none without test images)."""
    with atomic_dir(paths.samples) as tmp:
        for epoch, grid_file in scores.grids.items():
            shutil.copyfile(grid_file, tmp / f"epoch_{epoch:03d}.png")


def write_plots(paths: Paths, scores: Scores, best: dict[str, Any], plan: MetricsPlan) -> None:
    """--plots: FID/KID per direction and epoch as TSV, columns epoch, best (1 on the best epoch,
    else 0: .dvc/plots/best_epoch.json draws it as a vertical line) and the value, last (the column
    `dvc plots show` plots); no files without metrics (`dvc plots show` then draws none); a
    non-finite value is left empty. And the best epoch's grid."""
    with atomic_dir(paths.plots) as tmp:
        if plan.features is not None:
            for column in scored(DIRECTION_COLUMNS, scores.rows):
                frame = pd.DataFrame(
                    {
                        "epoch": [r["epoch"] for r in scores.rows],
                        "best": [int(r["epoch"] == best["epoch"]) for r in scores.rows],
                        column: [r[column] if finite(r[column]) else None for r in scores.rows],
                    }
                )
                (tmp / f"{column}.tsv").write_bytes(frame.to_csv(sep="\t", index=False).encode())
        if best["epoch"] in scores.grids:
            shutil.copyfile(scores.grids[best["epoch"]], tmp / "samples_best_epoch.png")


def write_best(paths: Paths, scores: Scores, best: dict[str, Any]) -> None:
    """--best/generators.pt (the best epoch's checkpoint, byte for byte) and --best/best.json."""
    source = scores.checkpoints[best["epoch"]]
    with atomic_dir(paths.best) as tmp:
        shutil.copyfile(source, tmp / "generators.pt")
        atomic_write_json(
            tmp / "best.json",
            {
                "epoch": best["epoch"],
                "reason": best["reason"],
                "selected_by": best["selected_by"],
                "source": source.as_posix(),
            },
        )


def write_epochs_csv(paths: Paths, scores: Scores, plan: MetricsPlan) -> None:
    """--epochs-csv: epoch and METRIC_COLUMNS, or, without metrics, the reason in every row (rather
    than a table of epoch numbers alone)."""
    table = pd.DataFrame(scores.rows)
    if plan.features is not None:
        table = table[["epoch", *scored(METRIC_COLUMNS, scores.rows)]]
    else:
        table = pd.DataFrame({"epoch": table.epoch, "fid_kid": f"skipped: {plan.skipped}"})
    atomic_write_bytes(paths.epochs_csv, table.to_csv(index=False).encode())


def write_metrics(
    paths: Paths, scores: Scores, best: dict[str, Any], plan: MetricsPlan, test: EvalImages
) -> None:
    """--metrics: numbers only, the comparison first: `dvc exp show` gives the columns in this order,
    so it leads with the best epoch's KID and FID (sums over both directions), then per direction,
    KID's std, the best epoch; strict JSON (a non-finite metric is null)."""
    row = scores.row(best["epoch"])
    numbers: dict[str, Any] = {}
    if plan.features is not None:
        numbers.update(
            {
                k: (row[k] if finite(row[k]) else None)
                for k in scored(("kid", "fid", *DIRECTION_COLUMNS, *KID_STD_COLUMNS), scores.rows)
            }
        )
    numbers.update(
        {
            "best_epoch": best["epoch"],
            "best_is_fallback": best["fallback"],
            "epochs": len(scores.rows),
            "test_images_A": len(test.A),
            "test_images_B": len(test.B),
        }
    )
    atomic_write_bytes(
        paths.metrics, (json.dumps(numbers, indent=2, allow_nan=False) + "\n").encode()
    )


if __name__ == "__main__":
    main_guard(main)
    end_process()  # done: skip torch's teardown (errors.end_process)
