"""CycleGAN model and train stage: architecture, pool, schedule, losses, learning, resume, safety."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages.train import train
from unpaired import checkpoint
from unpaired.errors import UserError
from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.live import SPEEDS
from unpaired.models.networks import PatchDiscriminator, ResnetGenerator, count_parameters
from unpaired.models.pool import ImagePool
from unpaired.models.schedule import lr_factor
from unpaired.models.training import TrainParams
from unpaired.params import ParamsError, parse

TINY = TrainParams(
    epochs=1,
    epochs_decay=1,
    ngf=4,
    ndf=4,
    n_blocks=1,
    load_size=28,
    crop_size=24,
    samples=2,
    pool_size=3,
)


def test_parameter_counts():
    assert count_parameters(ResnetGenerator(ngf=64, n_blocks=9)) == 11_378_179
    assert count_parameters(ResnetGenerator(ngf=64, n_blocks=6)) == 7_837_699
    assert count_parameters(PatchDiscriminator(ndf=64, n_layers=3)) == 2_764_737


def test_output_shapes():
    g = ResnetGenerator(ngf=8, n_blocks=2)
    for h, w in ((64, 64), (36, 52)):
        y = g(torch.randn(2, 3, h, w))
        assert y.shape == (2, 3, h, w) and y.abs().max() <= 1
    d = PatchDiscriminator(ndf=8)
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # 70×70 receptive field
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_architecture_details():
    g = ResnetGenerator(ngf=8, n_blocks=2)
    kinds = [type(m).__name__ for m in g.modules()]
    assert (
        "Dropout" not in kinds
        and kinds.count("ConvTranspose2d") == 2
        and "ReflectionPad2d" in kinds
    )
    assert all(not m.affine for m in g.modules() if isinstance(m, torch.nn.InstanceNorm2d))
    d_layers = list(PatchDiscriminator(ndf=8).model)
    assert isinstance(d_layers[1], torch.nn.LeakyReLU) and d_layers[1].negative_slope == 0.2
    net = build_models(8, 8, 1, 3, torch.device("cpu"), False).G_A
    weights = torch.cat(
        [m.weight.flatten() for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    )
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002


def test_pool_semantics():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ImagePool(0, g).query(x := torch.randn(3, 3, 4, 4)), x)
    pool = ImagePool(4, g)
    first = [torch.full((1, 3, 2, 2), float(i)) for i in range(4)]
    for im in first:  # filling up: returns its input, stores it
        assert torch.equal(pool.query(im), im)
    assert len(pool.images) == 4
    swapped = 0
    for i in range(4, 404):
        im = torch.full((1, 3, 2, 2), float(i))
        out = pool.query(im)
        if torch.equal(out, im):
            continue
        swapped += 1
        assert out[0, 0, 0, 0].item() < i  # an older image ...
        assert any(torch.equal(s, im) for s in pool.images)  # ... replaced by the new one
    assert len(pool.images) == 4 and 160 < swapped < 240  # about half of the queries swap


def test_pool_grows_as_images_arrive():
    """A huge pool_size allocates only what is stored (issue 17.6), with the same draws and results
    as a pool that is never full."""
    huge, small = (
        ImagePool(10**9, torch.Generator().manual_seed(0)),
        ImagePool(50, torch.Generator().manual_seed(0)),
    )
    for _ in range(5):
        x = torch.randn(2, 3, 4, 4)
        assert torch.equal(huge.query(x), x) and torch.equal(small.query(x), x)
    assert huge.buffer is not None and len(huge.buffer) <= 16 and len(huge.images) == 10
    assert torch.equal(huge.state()["images"], small.state()["images"])


def test_learning_rate_schedule():
    assert [lr_factor(e, 100, 100) for e in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(100, 100, 100) == pytest.approx(1 - 1 / 101)
    assert lr_factor(199, 100, 100) == pytest.approx(1 / 101)
    m = build_models(4, 4, 1, 3, torch.device("cpu"), False)
    opt, _ = optimizers(m, 2e-4, 0.5, False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, 2, 3))
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4])


def test_foreach_adam_trains_the_same_bytes_as_torchs_per_tensor_loop():
    """The CPU optimizers are foreach Adam (training.adam_options), chosen for speed on the claim
    that they give the per-tensor loop's numbers bit for bit: three steps of both, all eight
    optimizer/network states equal."""
    runs = []
    for foreach in (True, False):
        torch.manual_seed(0)
        m = build_models(4, 8, 1, 3, torch.device("cpu"), False)
        opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
        assert opt_G.param_groups[0]["foreach"] is True
        if not foreach:
            for opt in (opt_G, opt_D):
                opt.param_groups[0]["foreach"] = False
        g = torch.Generator().manual_seed(1)
        pools = ImagePool(2, g), ImagePool(2, g)
        for p in pools:
            p.prepare(3, torch.device("cpu"))
        data = torch.Generator().manual_seed(2)
        for _ in range(3):
            a, b = (torch.rand(1, 3, 24, 24, generator=data) * 2 - 1 for _ in range(2))
            train_step(
                m, opt_G, opt_D, *pools, a, b, 10.0, 0.5, __import__("contextlib").nullcontext
            )
        runs.append(
            [net.state_dict() for net in m.nets()]
            + [opt.state_dict()["state"] for opt in (opt_G, opt_D)]
        )
    for ours, loop in zip(*runs):
        torch.testing.assert_close(ours, loop, rtol=0, atol=0)


def test_one_step_losses_match_an_independent_computation():
    torch.manual_seed(0)
    m = build_models(4, 4, 1, 3, torch.device("cpu"), False)
    before = copy.deepcopy(m)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 24, 24) * 2 - 1, torch.rand(1, 3, 24, 24) * 2 - 1
    got = train_step(
        m,
        opt_G,
        opt_D,
        ImagePool(0, g),
        ImagePool(0, g),
        a,
        b,
        10.0,
        0.5,
        __import__("contextlib").nullcontext,
    )
    G_A, G_B, D_A, D_B = before.G_A, before.G_B, before.D_A, before.D_B
    with torch.no_grad():
        fake_B, fake_A = G_A(a), G_B(b)
        expected = [
            ((D_A(fake_B) - 1) ** 2).mean(),
            ((D_B(fake_A) - 1) ** 2).mean(),
            (G_B(fake_B) - a).abs().mean() * 10,
            (G_A(fake_A) - b).abs().mean() * 10,
            (G_A(b) - b).abs().mean() * 5,
            (G_B(a) - a).abs().mean() * 5,
            0.5 * (((D_A(b) - 1) ** 2).mean() + (D_A(fake_B) ** 2).mean()),
            0.5 * (((D_B(a) - 1) ** 2).mean() + (D_B(fake_A) ** 2).mean()),
        ]
    assert torch.allclose(got, torch.stack(expected), atol=1e-6)
    # Both steps happened: generators and discriminators moved.
    assert not torch.equal(m.G_A.model[1].weight, G_A.model[1].weight)
    assert not torch.equal(m.D_A.model[0].weight, D_A.model[0].weight)


def test_overfits_a_fixed_pair():
    torch.manual_seed(0)
    m = build_models(8, 8, 1, 3, torch.device("cpu"), False)
    opt_G, opt_D = optimizers(m, 1e-3, 0.5, False)
    g = torch.Generator().manual_seed(0)
    pool_A, pool_B = ImagePool(0, g), ImagePool(0, g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    a = torch.stack([xx, yy, -xx])[None]
    b = torch.stack([yy.sign(), xx * yy, yy])[None]
    losses = torch.stack(
        [
            train_step(
                m,
                opt_G,
                opt_D,
                pool_A,
                pool_B,
                a,
                b,
                10.0,
                0.5,
                __import__("contextlib").nullcontext,
            )
            for _ in range(300)
        ]
    )
    first, last = losses[:20].mean(0), losses[-20:].mean(0)
    cycle = slice(2, 4)
    assert (last[cycle] < 0.3 * first[cycle]).all(), (first, last)


# --- the stage -----------------------------------------------------------------------------------


def make_prepared(root: Path, n=(5, 4), size=28, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, counts in (("train", n), ("test", (2, 2))):
        for d, count in zip("AB", counts):
            folder = root / f"{split}{d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    folder / f"{i:03d}.png"
                )
    return root


def weights(path: Path) -> dict:
    return checkpoint.load(path)["nets"]


def same(x: dict, y: dict) -> bool:
    return all(torch.equal(x[n][k], y[n][k]) for n in x for k in x[n])


@pytest.fixture
def data(tmp_path):
    return make_prepared(tmp_path / "prepared")


def run_files(out: Path) -> list[str]:
    """The checkpoint files in `out` (not the timing beside them: live.SPEEDS)."""
    return sorted(p.name for p in out.iterdir() if p.is_file() and p.name != SPEEDS)


def test_stage_writes_checkpoints_and_logs(tmp_path, data):
    out, live = tmp_path / "ckpt", tmp_path / "live"
    train(replace(TINY, epochs=2, epochs_decay=1, save_every=2), data, out, live)
    assert run_files(out) == ["epoch_002.pt", "epoch_003.pt", "last.pt"]
    assert json.loads((out / SPEEDS).read_text()).keys() == {
        "1",
        "2",
        "3",
    }  # the timing, beside them
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "epoch_001.png",
        "epoch_002.png",
        "epoch_003.png",
    ]
    g, ckpt = checkpoint.load_generator(out / "epoch_003.pt", "BtoA")
    assert ckpt["epoch"] == 3 and g(torch.zeros(1, 3, 24, 24)).shape == (1, 3, 24, 24)
    last = checkpoint.load(out / "last.pt")
    assert set(last) >= {
        "G_AB",
        "G_BA",
        "nets",
        "opt_G",
        "opt_D",
        "sched_G",
        "sched_D",
        "pool_A",
        "pool_B",
        "rng",
        "epoch",
        "run_hash",
        "history",
    }
    for name in (
        "G_A",
        "G_B",
        "D_A",
        "D_B",
        "cycle_A",
        "cycle_B",
        "idt_A",
        "idt_B",
        "lr",
        "images_per_s",
    ):
        tsv = pd.read_csv(live / "plots" / "metrics" / f"{name}.tsv", sep="\t")
        assert list(tsv.step) == [1, 2, 3] and tsv[name].notna().all()
    lr = pd.read_csv(live / "plots" / "metrics" / "lr.tsv", sep="\t")["lr"].tolist()
    assert lr == pytest.approx([2e-4, 2e-4, 1e-4])
    images = sorted((live / "plots" / "images" / "samples").iterdir())
    assert [p.name for p in images] == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    assert Image.open(images[0]).size == (3 * 24 + 4 * 2, 4 * 24 + 5 * 2)  # 3 columns, 2+2 rows


def test_cpu_training_is_deterministic(tmp_path, data):
    train(TINY, data, tmp_path / "one", tmp_path / "l1")
    train(TINY, data, tmp_path / "two", tmp_path / "l2")
    assert same(weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt"))


def test_resume_equals_uninterrupted(tmp_path, data, capsys):
    p = replace(TINY, epochs=2, epochs_decay=1)
    train(p, data, tmp_path / "straight", tmp_path / "l1")
    train(p, data, tmp_path / "resumed", tmp_path / "l2", stop_after=1)
    assert run_files(tmp_path / "resumed") == ["epoch_001.pt", "last.pt"]
    train(p, data, tmp_path / "resumed", tmp_path / "l2")
    assert "resuming from" in capsys.readouterr().out
    assert same(
        weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "resumed" / "last.pt")
    )
    tsv = lambda d: (tmp_path / d / "plots" / "metrics" / "G_A.tsv").read_text()  # noqa: E731
    assert tsv("l1") == tsv("l2")
    speed = pd.read_csv(tmp_path / "l2" / "plots" / "metrics" / "images_per_s.tsv", sep="\t")
    assert list(speed.step) == [1, 2, 3]  # the resumed run's log keeps epoch 1's images/s


def test_a_resumed_run_takes_back_its_own_timing_only(tmp_path, data):
    """Issue 24.12b: the logs are gone (DVC deletes them before train runs) and the run resumes with
    nothing left to train: its images/s come back from the timing file beside the checkpoints, but
    never another run's (DVC ignores that file: `dvc exp apply` or `dvc checkout` bringing other
    checkpoints leaves it as it was)."""
    p = replace(TINY, epochs=2, epochs_decay=0)
    train(p, data, tmp_path / "a", tmp_path / "la")
    train(replace(p, lr=1e-4), data, tmp_path / "b", tmp_path / "lb")
    speed = lambda live: pd.read_csv(live / "plots" / "metrics" / "images_per_s.tsv", sep="\t")  # noqa: E731
    before = speed(tmp_path / "lb")
    shutil.rmtree(tmp_path / "lb")
    assert (
        "images_per_s"
        in train(replace(p, lr=1e-4), data, tmp_path / "b", tmp_path / "lb")["metrics"]
    )
    assert speed(tmp_path / "lb").equals(before)
    shutil.copy(tmp_path / "a" / SPEEDS, tmp_path / "b" / SPEEDS)  # run a's timing beside run b
    shutil.rmtree(tmp_path / "lb")
    assert (
        "images_per_s"
        not in train(replace(p, lr=1e-4), data, tmp_path / "b", tmp_path / "lb")["metrics"]
    )
    assert not (tmp_path / "lb" / "plots" / "metrics" / "images_per_s.tsv").exists()


def test_changed_params_start_afresh(tmp_path, data, capsys):
    out = tmp_path / "ckpt"
    train(replace(TINY, epochs=2, epochs_decay=1), data, out, tmp_path / "live")
    train(replace(TINY, lr=1e-4), data, out, tmp_path / "live")
    assert "starting afresh" in capsys.readouterr().out
    assert run_files(out) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    assert checkpoint.load(out / "last.pt")["epoch"] == 2


WRITER = """
import sys, torch
from unpaired import checkpoint
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    checkpoint.save({"epoch": i, "w": torch.full((1_000_000,), float(i))}, path)
"""


def test_killed_checkpoint_write_leaves_previous_loadable(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 0, "w": torch.zeros(1_000_000)}, path)
    root = Path(__file__).resolve().parents[1]
    epochs = set()
    for delay in (0.0, 0.013, 0.05, 0.11, 0.23, 0.4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            cwd=root,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.stdout.readline() == b"ready\n"  # torch imported: writes start now
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)  # kill -9 at some point of a write
        proc.wait()
        state = checkpoint.load(path)  # never a torn file
        assert torch.equal(state["w"], torch.full((1_000_000,), float(state["epoch"])))
        epochs.add(state["epoch"])
    assert len(epochs) > 1  # the kills did land among writes
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.tmp-") for name in leftovers)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"crop_size": 80, "load_size": 72}, "train.crop_size"),
        ({"crop_size": 62, "load_size": 72}, "train.crop_size"),
        ({"load_size": 60}, "train.crop_size"),
        ({"crop_size": 16, "load_size": 20}, "train.crop_size"),
        ({"device": "gpu"}, "train.device"),
        ({"precision": "fp8"}, "train.precision"),
        ({"epochs": 0}, "train.epochs"),
        ({"lr": -1.0}, "train.lr"),
    ],
)
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ParamsError, match=f"^params.yaml: {key}: "):
        parse(TrainParams, raw, "train")


def test_the_papers_sizes_are_accepted():
    p = parse(
        TrainParams,
        {"load_size": 286, "crop_size": 256, "n_blocks": 9, "ngf": 64, "ndf": 64},
        "train",
    )
    assert (p.load_size, p.crop_size) == (286, 256)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda(tmp_path, data):
    with pytest.raises(
        ParamsError, match="train.device: 'cuda' requested but CUDA is not available"
    ):
        train(replace(TINY, device="cuda"), data, tmp_path / "ckpt", tmp_path / "live")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "live").exists()


def test_empty_train_folder(tmp_path):
    data = make_prepared(tmp_path / "prepared", n=(3, 0))
    with pytest.raises(UserError, match=r"trainB: no training images; run the prepare stage"):
        train(TINY, data, tmp_path / "ckpt", tmp_path / "live")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "live").exists()
