"""Evaluate stage and report (translate and export: tests/test_cli.py)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from PIL import Image

import stages.evaluate as ev
from stages.evaluate import EvaluateParams, evaluate
from unpaired import checkpoint
from unpaired.cyclegan import ResnetGenerator, init_weights
from unpaired.errors import UserError
from unpaired.evaluation import fid_kid, labelled_grid

CHROMIUM = Path("/usr/bin/chromium")


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
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fid_kid_match_numpy_scipy():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 40, 3, 24, 24), dtype=np.uint8))
    extract = LocalFeatures()
    real, fake = extract(images[0]), extract(images[1] // 2 + 60)
    got = fid_kid(real, fake, kid_subsets=5)
    want_fid = numpy_fid(real.double().numpy(), fake.double().numpy())
    want_kid = numpy_kid(real.double().numpy(), fake.double().numpy())   # subset = whole set
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
    y0 = 4 + 16                                   # first image row, below the A header
    for c, v in enumerate((10, 120, 250)):
        x0 = 4 + c * 20
        assert (arr[y0:y0 + 16, x0:x0 + 16] == v).all()
    header = arr[4:4 + 16, 4:4 + 60]
    assert (header < 128).any()                   # the labels are drawn


def make_test_data(root: Path, n=6, size=24) -> Path:
    rng = np.random.default_rng(1)
    for d in "AB":
        (root / f"test{d}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"test{d}" / f"{i}.png")
    return root


def save_epoch(folder: Path, epoch: int, seed: int) -> Path:
    torch.manual_seed(seed)
    nets = [init_weights(ResnetGenerator(ngf=4, n_blocks=1)) for _ in range(2)]
    path = folder / f"epoch_{epoch:03d}.pt"
    checkpoint.save(checkpoint.generators_payload(epoch, {"ngf": 4, "n_blocks": 1}, *nets), path)
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))   # no cached Inception weights ...
    # ... and a download address that refuses at once (a closed loopback port): never the internet.
    monkeypatch.setattr("unpaired.evaluation.INCEPTION_URL", "http://127.0.0.1:9/pt_inception-2015-12-05.pth")
    data = make_test_data(tmp_path / "prepared")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for e in (1, 2):
        save_epoch(ckpts, e, seed=e)
    dirs = dict(data=data, checkpoints=ckpts, cache=tmp_path / "cache", best_dir=tmp_path / "best",
                metrics_dir=tmp_path / "metrics", live_dir=tmp_path / "live")
    return tmp_path, dirs


def test_offline_skips_metrics_with_a_warning(setup, capsys):
    tmp_path, dirs = setup
    summary = evaluate(EvaluateParams(samples=2), **dirs)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "FID/KID skipped" in err
    assert summary["metrics_available"] is False and summary["best_epoch"] == 2
    assert "last epoch, because FID/KID were not computed" in summary["best_reason"]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["epoch"] == 2
    assert (tmp_path / "best" / "generators.pt").read_bytes() == (dirs["checkpoints"] / "epoch_002.pt").read_bytes()
    grids = sorted((tmp_path / "metrics" / "samples").iterdir())
    assert [g.name for g in grids] == ["epoch_001.png", "epoch_002.png"]
    assert Image.open(grids[0]).size == labelled_grid([[torch.zeros(3, 24, 24, dtype=torch.uint8)] * 3] * 2,
                                                      [[torch.zeros(3, 24, 24, dtype=torch.uint8)] * 3] * 2).size
    assert "FID/KID not computed" in (tmp_path / "metrics" / "report.html").read_text()
    with pytest.raises(UserError, match="evaluate.metrics is required but"):
        evaluate(EvaluateParams(metrics="required"), **dirs)


def test_metrics_best_epoch_and_cache(setup, capsys, monkeypatch):
    tmp_path, dirs = setup
    extract = LocalFeatures()
    monkeypatch.setattr(ev, "inception_features", lambda device: (extract, ""))
    summary = evaluate(EvaluateParams(samples=2, kid_subsets=3), **dirs)
    table = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")
    assert list(table.columns) == ["epoch", "fid_AtoB", "fid_BtoA", "kid_AtoB", "kid_BtoA", "fid", "kid"]
    best = int(table.loc[table.kid.idxmin(), "epoch"])
    assert summary["best_epoch"] == best and summary["metrics_available"]
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text())["best_epoch"] == best
    capsys.readouterr()
    save_epoch(dirs["checkpoints"], 3, seed=3)
    evaluate(EvaluateParams(samples=2, kid_subsets=3), **dirs)
    out = capsys.readouterr().out
    assert "epoch 001: cached" in out and "epoch 002: cached" in out and "epoch 003: cached" not in out
    assert len(pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv")) == 3
    again = pd.read_csv(tmp_path / "metrics" / "eval_epochs.csv").iloc[:2]
    pd.testing.assert_frame_equal(again, table)


def test_no_checkpoints_is_one_line(setup):
    tmp_path, dirs = setup
    with pytest.raises(UserError, match="no epoch_NNN.pt checkpoints; run the train stage first"):
        evaluate(EvaluateParams(), **{**dirs, "checkpoints": tmp_path / "none"})


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(setup, monkeypatch):
    from playwright.sync_api import sync_playwright
    tmp_path, dirs = setup
    monkeypatch.setattr(ev, "inception_features", lambda device: (LocalFeatures(), ""))
    live = dirs["live_dir"] / "plots" / "metrics"
    live.mkdir(parents=True)
    for name in ("G_A", "D_A", "cycle_A"):
        pd.DataFrame({"step": [1, 2], name: [1.0, 0.5]}).to_csv(live / f"{name}.tsv", sep="\t", index=False)
    evaluate(EvaluateParams(samples=2, kid_subsets=2), **dirs)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "metrics" / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == 3 and all(ok and w > 0 for ok, w in images)
        assert page.locator("svg polyline").count() >= 5          # 3 losses + 2 FID + 2 KID lines
        page.fill("#epoch", "0")
        page.dispatch_event("#epoch", "input")
        assert page.inner_text("#label").startswith("epoch 1")
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10                                      # not a blank page
