"""Train stage faults: divergence, degenerate splits, extending a run, damaged checkpoints, concurrent
runs, threads and progress (issues 11 and 12)."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import unpaired.models.progress
from stages.evaluate import EvaluateParams, evaluate
from stages.train import train
from tests.helpers import TRAIN_ARGS
from tests.test_evaluate import paths_in
from tests.test_train import TINY, make_prepared, same, weights
from unpaired import checkpoint, threads
from unpaired.distributed import output_lock
from unpaired.errors import UserError
from unpaired.models.cyclegan import LOSS_NAMES
from unpaired.models.live import SPEEDS
from unpaired.models.networks import ResnetGenerator
from unpaired.models.progress import Progress
from unpaired.models.training import TrainParams
from unpaired.params import ParamsError, parse
from unpaired.translate import translate_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    return make_prepared(tmp_path / "prepared")


def names(folder: Path) -> list[str]:
    """The files of a run in `folder` (not samples/, not the timing beside them: live.SPEEDS)."""
    return (
        sorted(p.name for p in folder.iterdir() if p.name not in ("samples", SPEEDS))
        if folder.exists()
        else []
    )


def lrs(live: Path) -> list[float]:
    return pd.read_csv(live / "plots" / "metrics" / "lr.tsv", sep="\t")["lr"].tolist()


def zero_block(path: Path, size: int = 5120) -> None:
    """Overwrite `size` bytes in the middle of a file with zeros (a damaged disk block)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + size] = bytes(min(size, len(raw) - mid))
    path.write_bytes(bytes(raw))


# --- non-finite losses (issue 11.1) ----------------------------------------------------------------


def test_diverging_run_stops_at_the_first_non_finite_epoch(tmp_path, data):
    out = tmp_path / "ckpt"
    with pytest.raises(UserError) as err:
        train(replace(TINY, lr=1.0e30), data, out, tmp_path / "live")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("epoch 1/2: the losses are not finite (G_A nan")
    assert "params.yaml: train.lr (now 1e+30)" in line and "prepared data" in line
    assert "no checkpoint was written" in line
    assert not list(out.glob("*.pt"))


def test_divergence_after_a_good_epoch_keeps_the_good_last_pt(tmp_path, data):
    out = tmp_path / "ckpt"
    train(replace(TINY, epochs=3, epochs_decay=0), data, out, tmp_path / "live", stop_after=1)
    state = checkpoint.load(out / "last.pt")
    state["nets"]["D_A"]["model.0.weight"].fill_(1e38)  # a run about to blow up in epoch 2
    checkpoint.save(state, out / "last.pt")
    good = (out / "last.pt").read_bytes()
    with pytest.raises(
        UserError, match=r"^epoch 2/3: the losses are not finite .*keeps the last good epoch"
    ):
        train(replace(TINY, epochs=3, epochs_decay=0), data, out, tmp_path / "live")
    assert names(out) == ["epoch_001.pt", "last.pt"]
    assert (out / "last.pt").read_bytes() == good and checkpoint.load(out / "last.pt")["epoch"] == 1


def _generators(tmp_path: Path, poison: bool) -> Path:
    torch.manual_seed(0)
    g = ResnetGenerator(ngf=4, n_blocks=1)
    payload = checkpoint.generators_payload(
        1, {"ngf": 4, "n_blocks": 1, "in_channels": 3, "out_channels": 3}, g, g
    )
    if poison:
        payload["G_AB"]["model.1.weight"][0] = float("nan")
    path = tmp_path / "ckpts" / "epoch_001.pt"
    checkpoint.save(payload, path)
    return path


def test_evaluate_and_translate_refuse_non_finite_weights(tmp_path, data):
    path = _generators(tmp_path, poison=True)
    with pytest.raises(
        UserError,
        match=r"epoch_001.pt: the G_AB weights are not finite \(NaN or inf in "
        r"model.1.weight\).*train.lr",
    ):
        checkpoint.load_generator(path, "AtoB")
    checkpoint.load_generator(path, "BtoA")  # the other direction is fine
    with pytest.raises(UserError, match="weights are not finite"):
        evaluate(EvaluateParams(samples=1, metrics="off"), paths_in(tmp_path, data, path.parent))
    assert not (tmp_path / "best").exists()
    with pytest.raises(UserError, match="weights are not finite"):
        translate_files(
            str(path), [str(data / "testA")], str(tmp_path / "translated"), device="cpu"
        )
    assert not (tmp_path / "translated").exists()


# --- degenerate splits (issue 11.2, train part) -----------------------------------------------------


def declared_train_outputs() -> list[str]:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


@pytest.mark.parametrize("case", ["samples: 0", "test_fraction: 0"])
def test_every_declared_output_exists(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    data = make_prepared(tmp_path / "data" / "prepared")
    p = TINY
    if case == "samples: 0":
        p = replace(TINY, samples=0)
    else:
        for split in ("testA", "testB"):
            for f in (data / split).iterdir():
                f.unlink()
    train(p, Path("data/prepared"), Path("models/checkpoints"), Path("metrics/train"))
    outputs = declared_train_outputs()
    assert "metrics/train/plots/images" in outputs
    assert [o for o in outputs if not (tmp_path / o).exists()] == []


def test_first_run_keeps_the_tracked_gitignore(tmp_path, data):
    live = tmp_path / "live"
    (live / "plots").mkdir(parents=True)
    (live / "plots" / ".gitignore").write_text("/images\n")  # DVC's, tracked in git
    (live / "plots" / "metrics").mkdir()
    (live / "plots" / "metrics" / "G_A.tsv").write_text("step\tG_A\n1\t9.0\n")  # an older run's log
    train(TINY, data, tmp_path / "ckpt", live)
    assert (live / "plots" / ".gitignore").read_text() == "/images\n"
    assert len(pd.read_csv(live / "plots" / "metrics" / "G_A.tsv", sep="\t")) == 2


# --- extending a finished run, other runs moved aside (issue 11.4) ----------------------------------


def test_extending_a_finished_run_continues_with_the_new_schedule(tmp_path, data, capsys):
    out, live = tmp_path / "ckpt", tmp_path / "live"
    train(replace(TINY, epochs=2, epochs_decay=1), data, out, live)
    before = {n: (out / n).read_bytes() for n in ("epoch_001.pt", "epoch_002.pt", "epoch_003.pt")}
    capsys.readouterr()
    train(replace(TINY, epochs=2, epochs_decay=4), data, out, live)
    said = capsys.readouterr().out
    assert "train: extending the run in" in said and "train.epochs_decay 1 -> 4" in said
    assert (
        "from epoch 4 on the learning rate follows the new schedule: 0.00012 (epoch 3 ran at 0.0001)"
        in said
    )
    assert names(out) == [f"epoch_{e:03d}.pt" for e in range(1, 7)] + ["last.pt"]
    assert all((out / n).read_bytes() == b for n, b in before.items())  # the finished epochs kept
    assert lrs(live) == pytest.approx([2e-4, 2e-4, 1e-4, 1.2e-4, 0.8e-4, 0.4e-4])
    assert not (tmp_path / "ckpt.previous").exists()


def test_extended_run_equals_a_straight_run_when_their_lr_agrees(tmp_path, data, capsys):
    train(replace(TINY, epochs=3, epochs_decay=0), data, tmp_path / "straight", tmp_path / "l1")
    train(replace(TINY, epochs=2, epochs_decay=0), data, tmp_path / "extended", tmp_path / "l2")
    capsys.readouterr()
    train(replace(TINY, epochs=3, epochs_decay=0), data, tmp_path / "extended", tmp_path / "l2")
    assert "train: extending the run in" in capsys.readouterr().out  # continued, not retrained
    assert same(
        weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "extended" / "last.pt")
    )


def test_a_shorter_schedule_than_the_checkpoint_is_refused(tmp_path, data):
    out = tmp_path / "ckpt"
    train(replace(TINY, epochs=2, epochs_decay=1), data, out, tmp_path / "live")
    with pytest.raises(
        UserError,
        match=r"^params.yaml: train.epochs \+ train.epochs_decay = 2 is below the 3 "
        r"epochs already in .*last.pt: raise them",
    ):
        train(replace(TINY, epochs=1, epochs_decay=1), data, out, tmp_path / "live")
    assert names(out) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "last.pt"]


def test_other_params_name_the_keys_and_move_the_checkpoints_aside(tmp_path, data, capsys):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    out = tmp_path / "ckpt"
    train(TINY, data, out, tmp_path / "live")
    before = {n: (out / n).read_bytes() for n in names(out)}
    capsys.readouterr()
    train(replace(TINY, lr=1e-4, ngf=8), data, out, tmp_path / "live")
    said = capsys.readouterr().out
    assert (
        "starting afresh: " in said
        and "was written with train.lr 0.0002 -> 0.0001, train.ngf 4 -> 8;" in said
    )
    assert "moved the earlier checkpoints (epochs 1-2) to " in said
    [aside] = [d for d in (tmp_path / "ckpt.previous").iterdir() if d.is_dir()]
    assert str(aside) in said
    assert {n: (aside / n).read_bytes() for n in names(aside)} == before  # nothing deleted
    assert checkpoint.load(out / "last.pt")["run_params"]["lr"] == 1e-4
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ckpt.previous" not in status and "ckpt/last.pt" in status  # aside: ignored by git
    # Other data, same params: said as such.
    Image.new("RGB", (28, 28), "red").save(data / "trainA" / "extra.png")
    train(replace(TINY, lr=1e-4, ngf=8), data, out, tmp_path / "live")
    assert f"was written with other prepared training images in {data};" in capsys.readouterr().out
    assert len([d for d in (tmp_path / "ckpt.previous").iterdir() if d.is_dir()]) == 2


def test_settings_that_do_not_fit_the_weights_give_one_line(tmp_path, data, capsys):
    path = _generators(tmp_path, poison=False)
    state = checkpoint.load(path)
    state["model"]["ngf"] = 8
    checkpoint.save(state, tmp_path / "wider.pt")
    with pytest.raises(
        UserError,
        match=r"wider.pt: the G_AB weights do not fit the stored model settings "
        r"\(ngf=8, n_blocks=1\): .*size mismatch",
    ) as err:
        checkpoint.load_generator(tmp_path / "wider.pt")
    assert "\n" not in str(err.value)
    del state["model"]["ngf"]
    checkpoint.save(state, tmp_path / "no_ngf.pt")
    with pytest.raises(UserError, match=r"no_ngf.pt: the model settings lack ngf"):
        checkpoint.load_generator(tmp_path / "no_ngf.pt")
    # Resume: last.pt whose weights do not fit its params; last.pt lacking a key.
    out = tmp_path / "ckpt"
    train(replace(TINY, epochs=2, epochs_decay=1), data, out, tmp_path / "live", stop_after=1)
    last = checkpoint.load(out / "last.pt")
    edited = dict(
        last, nets=dict(last["nets"], G_A={k: v[..., :1] for k, v in last["nets"]["G_A"].items()})
    )
    checkpoint.save(edited, out / "last.pt")
    with pytest.raises(
        UserError,
        match=r"last.pt: its stored state does not fit the models its train params "
        r"describe \(RuntimeError: .*size mismatch.*move .* away",
    ) as err:
        train(replace(TINY, epochs=2, epochs_decay=1), data, out, tmp_path / "live")
    assert "\n" not in str(err.value)
    checkpoint.save({k: v for k, v in last.items() if k != "opt_G"}, out / "last.pt")
    capsys.readouterr()
    train(replace(TINY, epochs=2, epochs_decay=1), data, out, tmp_path / "live")
    assert "last.pt lacks opt_G" in capsys.readouterr().out


# --- damaged checkpoints (issue 11.20) ----------------------------------------------------------------


def test_load_refuses_damaged_files(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"epoch": 1, "w": torch.arange(100_000, dtype=torch.float32)}, path)
    assert checkpoint.load(path)["epoch"] == 1
    zeroed = tmp_path / "zeroed.pt"
    zeroed.write_bytes(path.read_bytes())
    zero_block(zeroed)
    with pytest.raises(UserError, match=r"zeroed.pt: damaged checkpoint \(CRC mismatch"):
        checkpoint.load(zeroed)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match=r"truncated.pt: not a checkpoint, or a truncated one"):
        checkpoint.load(truncated)
    # Consistent zip, content altered after the digest was taken: the stored sha256 catches it.
    raw = torch.load(path, weights_only=True)
    raw["w"][5] = -1.0
    torch.save(raw, tmp_path / "altered.pt")
    with zipfile.ZipFile(tmp_path / "altered.pt") as z:
        assert z.testzip() is None
    with pytest.raises(
        UserError, match=r"altered.pt: damaged checkpoint \(its content does not match the sha256"
    ):
        checkpoint.load(tmp_path / "altered.pt")


def test_damaged_last_pt_starts_afresh_and_is_moved_aside(tmp_path, data, capsys):
    p = replace(TINY, epochs=2, epochs_decay=1)
    train(p, data, tmp_path / "straight", tmp_path / "l1")
    out = tmp_path / "ckpt"
    train(p, data, out, tmp_path / "live", stop_after=2)
    zero_block(out / "last.pt")
    damaged = (out / "last.pt").read_bytes()
    capsys.readouterr()
    train(p, data, out, tmp_path / "live")
    said = capsys.readouterr().out
    assert "damaged checkpoint" in said and "starting afresh" in said and "resuming" not in said
    [aside] = [d for d in (tmp_path / "ckpt.previous").iterdir() if d.is_dir()]
    assert (aside / "last.pt").read_bytes() == damaged
    assert same(weights(tmp_path / "straight" / "last.pt"), weights(out / "last.pt"))


def test_damaged_epoch_files_are_rewritten_or_removed_at_resume(tmp_path, data, capsys):
    p = replace(TINY, epochs=2, epochs_decay=1)
    train(p, data, tmp_path / "straight", tmp_path / "l1")
    out = tmp_path / "ckpt"
    train(p, data, out, tmp_path / "live", stop_after=2)
    good_002 = checkpoint.load(out / "epoch_002.pt")
    raw = (out / "epoch_001.pt").read_bytes()
    (out / "epoch_001.pt").write_bytes(raw[: len(raw) // 2])  # truncated
    zero_block(out / "epoch_002.pt", 2048)  # zeroed inside
    capsys.readouterr()
    train(p, data, out, tmp_path / "live")
    said = capsys.readouterr().out
    assert "epoch_001.pt: not a checkpoint, or a truncated one" in said and "removed it" in said
    assert "epoch_002.pt: damaged checkpoint" in said and "rewrote it from" in said
    assert names(out) == ["epoch_002.pt", "epoch_003.pt", "last.pt"]
    rewritten = checkpoint.load(out / "epoch_002.pt")
    assert all(torch.equal(rewritten["G_AB"][k], v) for k, v in good_002["G_AB"].items())
    assert same(weights(tmp_path / "straight" / "last.pt"), weights(out / "last.pt"))
    # An epoch file missing after an interruption between the two writes is written from last.pt.
    (out / "epoch_003.pt").unlink()
    train(p, data, out, tmp_path / "live")
    assert checkpoint.load(out / "epoch_003.pt")["epoch"] == 3


def test_an_image_as_checkpoint_never_suggests_weights_only_false(tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(UserError) as err:
        checkpoint.load_generator(image)
    assert str(err.value).startswith(f"{image}: not a checkpoint") and "weights_only" not in str(
        err.value
    )
    foreign = tmp_path / "foreign.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, foreign)  # a pickled module: code
    with pytest.raises(UserError) as err:
        checkpoint.load(foreign)
    assert "refused because loading them could run code" in str(err.value)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


# --- one train run at a time (issue 11.21) -----------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from unpaired.distributed import output_lock
with output_lock(Path("models/checkpoints")):
    print("locked", flush=True)
    time.sleep(60)
"""


STAGE_ARGS = TRAIN_ARGS


def test_a_second_train_process_stops_naming_the_first(tmp_path):
    make_prepared(tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "train": {
                    "epochs": 1,
                    "epochs_decay": 1,
                    "ngf": 4,
                    "ndf": 4,
                    "n_blocks": 1,
                    "load_size": 28,
                    "crop_size": 24,
                }
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], cwd=tmp_path, env=env, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        second = subprocess.run(
            [sys.executable, "-m", "stages.train", *STAGE_ARGS],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    assert second.stderr == (
        f"error: models/checkpoints: another train run (PID {holder.pid}) is writing "
        f"it; wait for it to end, or stop it (kill {holder.pid}) and run again\n"
    )
    assert (
        not (tmp_path / "models" / "checkpoints").exists() and not (tmp_path / "metrics").exists()
    )
    with output_lock(tmp_path / "models" / "checkpoints"):  # the holder is gone: free again
        pass


# --- threads (issue 12.1) ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, prefix", [(TrainParams, "train"), (EvaluateParams, "evaluate")])
def test_threads_setting(cls, prefix):
    assert parse(cls, {}, prefix).threads == "auto"
    assert parse(cls, {"threads": 2}, prefix).threads == 2
    for bad in (0, "two", -1):
        with pytest.raises(
            ParamsError, match=f"^params.yaml: {prefix}.threads: use auto or a number of threads"
        ):
            parse(cls, {"threads": bad}, prefix)


def test_threads_apply(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply(2) == 2 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.apply("auto") == threads.cpu_count()  # the machine alone, never its load
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert threads.apply("auto") == 1  # the user's OMP_NUM_THREADS wins
    finally:
        torch.set_num_threads(before)


WATCH = """
import builtins, os, sys
seen = {}
real_import = builtins.__import__
def watch(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules and "policy" not in seen:
        seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
    return real_import(name, *args, **kwargs)
builtins.__import__ = watch
import importlib
importlib.import_module(sys.argv[1])
from unpaired import threads
print(seen.get("policy"), threads.START.chosen_by, threads.START.busy)
"""


@pytest.mark.parametrize("stage", ["stages.train", "stages.evaluate"])
def test_stages_set_the_wait_policy_for_the_load_before_torch_loads(stage):
    """Importing a stage chooses OpenMP's wait policy before torch loads: PASSIVE while another
    process burns a core (other work holds the CPUs), and what it found is what torch read; a
    user's OMP_WAIT_POLICY is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        policy, chosen_by, busy = subprocess.run(
            [sys.executable, "-c", WATCH, stage],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    finally:
        burner.kill()
        burner.wait()
    assert (policy, chosen_by) == ("PASSIVE", "load") and float(busy) >= threads.BUSY_CPUS
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's choice is kept
    got = subprocess.run(
        [sys.executable, "-c", WATCH, stage],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert got[:2] == ["ACTIVE", "user"]


# --- Ctrl-C: one line, whenever it comes (issue 24.10); the logs match the checkpoints (24.12) -----


def _loading(pid: int, library: str) -> bool:
    """Whether process `pid` has mapped a file of `library` (it is importing it, or has)."""
    try:
        return f"/{library}/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="watches /proc/PID/maps (Linux)")
@pytest.mark.parametrize(
    "stage, library, presses", [("train", "torch", 1), ("evaluate", "pandas", 2)]
)
def test_ctrl_c_while_a_stage_starts_is_one_line(stage, library, presses):
    """A real SIGINT to the stage's process group while it still imports (its first large library is
    being mapped), once or twice: one line and status 130, no KeyboardInterrupt traceback (20 lines
    from pandas or torch, and more with a second Ctrl-C)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}", "--help"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not _loading(proc.pid, library) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    for _ in range(presses):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (130, "", f"interrupted while starting {stage}\n")


def test_two_ctrl_c_while_training_are_one_line_and_the_logs_match_the_checkpoints(tmp_path):
    """Two real SIGINTs to a training, close together as a user presses them: `interrupted` and
    status 130, nothing from the exit handlers (weakref's and tqdm's got the second one: `Exception
    ignored in atexit callback`, and status -2), and the logs, metrics.json and the checkpoints tell
    the same epochs."""
    make_prepared(tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "train": {
                    "epochs": 400,
                    "epochs_decay": 0,
                    "ngf": 4,
                    "ndf": 4,
                    "n_blocks": 1,
                    "load_size": 28,
                    "crop_size": 24,
                    "samples": 2,
                }
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *STAGE_ARGS],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if line.startswith("epoch 2/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (130, "interrupted\n"), out
    live, out_dir = tmp_path / "metrics" / "train", tmp_path / "models" / "checkpoints"
    saved = sorted(checkpoint.epoch_files(out_dir))
    assert saved and lrs_steps(live) == saved
    assert json.loads((live / "metrics.json").read_text())["step"] == saved[-1]
    assert checkpoint.load(out_dir / "last.pt")["epoch"] == saved[-1]


def test_a_run_that_ends_early_logs_the_saved_epochs_only(tmp_path, data):
    """Issue 24.12: with train.save_every 2, a run that ends after epoch 3 (an interruption) has
    epoch 2 saved: its logs and metrics.json end at epoch 2 too, as a resumed run will rewrite them
    (they showed epoch 3, which no checkpoint holds)."""
    out, live = tmp_path / "ckpt", tmp_path / "live"
    train(replace(TINY, epochs=4, epochs_decay=0, save_every=2), data, out, live, stop_after=3)
    assert sorted(checkpoint.epoch_files(out)) == [2] and lrs_steps(live) == [1, 2]
    assert json.loads((live / "metrics.json").read_text())["step"] == 2


def lrs_steps(live: Path) -> list[int]:
    return pd.read_csv(live / "plots" / "metrics" / "lr.tsv", sep="\t")["step"].tolist()


# --- progress without a terminal, slowdown warning (issues 12.1, 12.2) ------------------------------


class Clock:
    """Seconds that tests advance by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_epoch(
    progress: Progress, clock: Clock, epoch: int, seconds_per_step: float, plain: bool = True
):
    progress.start_epoch(epoch, plain=plain)
    sums = torch.zeros(8)
    for step in range(1, progress.steps + 1):
        clock.now += seconds_per_step
        sums += torch.arange(8, dtype=torch.float32)
        progress.step(step, sums)
    progress.end_epoch(
        progress.steps * progress.images_per_step / (progress.steps * seconds_per_step)
    )


def test_progress_lines_without_a_terminal_at_a_bounded_rate(capsys):
    clock = Clock()
    progress = Progress(
        steps=200,
        images_per_step=2,
        total=3,
        hint="HINT",
        names=LOSS_NAMES,
        every_s=60,
        min_gap_s=10,
        clock=clock,
    )
    run_epoch(progress, clock, 1, 0.5)  # 100 s epoch: a line at each 10 % (10 s apart)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9
    assert lines[0] == (
        "epoch 1/3  step 20/200 (10%)  4.0 img/s  ETA 1:30 (run 4:50)  G_A 0.000  G_B 1.000  "
        "cycle_A 2.000  cycle_B 3.000  idt_A 4.000  idt_B 5.000  D_A 6.000  D_B 7.000"
    )
    run_epoch(progress, clock, 2, 0.02)  # 4 s epoch: the 10 s gap bounds it to no line
    assert capsys.readouterr().out == ""
    progress = Progress(
        steps=10,
        images_per_step=1,
        total=1,
        hint="HINT",
        names=LOSS_NAMES,
        every_s=60,
        min_gap_s=10,
        clock=clock,
    )
    run_epoch(progress, clock, 1, 100.0)  # 100 s steps: a line per step... at most one per 60 s
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and lines[0].startswith(
        "epoch 1/1  step 1/10 (10%)  0.0 img/s  ETA 15:00"
    )
    run_epoch(progress, clock, 1, 100.0, plain=False)  # on a terminal: tqdm's bar, no lines
    assert capsys.readouterr().out == ""


def test_slowdown_is_said_once_with_the_setting_to_try(capsys):
    clock = Clock()
    progress = Progress(
        steps=50,
        images_per_step=1,
        total=4,
        hint="try params.yaml: train.threads: 1",
        names=LOSS_NAMES,
        every_s=1e9,
        min_gap_s=1e9,
        clock=clock,
    )
    run_epoch(progress, clock, 1, 0.1)
    run_epoch(progress, clock, 2, 0.2)  # 2x slower: within reason
    assert capsys.readouterr().out == ""
    run_epoch(progress, clock, 3, 1.0)  # 10x slower than the first steps
    run_epoch(progress, clock, 4, 1.0)
    assert capsys.readouterr().out.splitlines() == [
        "train: warning: epoch 3 runs at 1.00 img/s, 10x slower than its first steps (10.00 img/s): other "
        "work is probably sharing the machine; try params.yaml: train.threads: 1"
    ]


def test_training_prints_progress_lines_in_a_log(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setattr(
        unpaired.models.progress, "PROGRESS_MIN_GAP_S", 0.0
    )  # tiny epochs: lift the rate bound
    train(TINY, data, tmp_path / "ckpt", tmp_path / "live")
    out = capsys.readouterr().out
    assert (
        "epoch 1/2  step 1/5 (20%)" in out
        and "epoch 2/2  step 4/5 (80%)" in out
        and " img/s  ETA " in out
    )


# --- last.pt keeps its size; the logs are whole whatever happened to them (issue 17 cases 8 and 4) --


def test_last_pt_does_not_grow_with_the_sample_grids(tmp_path, data):
    out, live = tmp_path / "ckpt", tmp_path / "live"
    p = replace(TINY, epochs=6, epochs_decay=0, samples=2)
    train(p, data, out, live, stop_after=2)
    at_2 = (out / "last.pt").stat().st_size
    train(p, data, out, live)
    at_6 = (out / "last.pt").stat().st_size
    assert abs(at_6 - at_2) < 3000, (at_2, at_6)  # the history's numbers only
    assert "sample" not in str(checkpoint.load(out / "last.pt")["history"])
    assert names(out / "samples") == [f"epoch_{e:03d}.png" for e in range(1, 7)]  # each grid once


def test_logs_deleted_during_a_run_are_whole_at_its_end(tmp_path, data, monkeypatch):
    import shutil

    publishing = sys.modules[
        "unpaired.models.live"
    ]  # where rank 0 writes each epoch's grid and logs
    out, live = tmp_path / "ckpt", tmp_path / "live"
    real, deleted = publishing.write_sample, []

    def deleted_meanwhile(folder, epoch, grid):  # what a refused `dvc repro train` does to the logs
        if epoch in (2, 3):
            shutil.rmtree(live)
            deleted.append(epoch)
        real(folder, epoch, grid)

    monkeypatch.setattr(publishing, "write_sample", deleted_meanwhile)
    train(replace(TINY, epochs=4, epochs_decay=0), data, out, live)
    assert deleted == [2, 3]
    for name in ("G_A", "D_B", "lr", "images_per_s"):
        assert pd.read_csv(live / "plots" / "metrics" / f"{name}.tsv", sep="\t").step.tolist() == [
            1,
            2,
            3,
            4,
        ]
    assert names(live / "plots" / "images" / "samples") == [
        f"epoch_{e:03d}.png" for e in range(1, 5)
    ]
