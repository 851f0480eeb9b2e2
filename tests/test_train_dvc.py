"""The train stage under real DVC, in a fresh git copy of the project with tiny params (issue 24): a
damaged epoch file comes back from the DVC cache (24.8), a Ctrl-C in a fresh run leaves one run's
logs and checkpoints (24.12a), a run resumed with nothing left to train keeps its timing (24.12b)."""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ruamel.yaml import YAML

from tests.helpers import TINY, TRAIN_STAGE, VENV_BIN, clone_project, dvc, env, run
from unpaired import checkpoint

CKPT = Path("models/checkpoints")
LIVE = Path("metrics/train")
STAGE = TRAIN_STAGE


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project with `dvc repro train` done: epochs 1-2 recorded in dvc.lock and the DVC cache."""
    dest = clone_project(tmp_path_factory.mktemp("train_dvc") / "project", TINY)
    dvc(dest, "repro", "train")
    return dest


def copy_with(project: Path, tmp_path: Path, **train: object) -> Path:
    """A copy of the project (outputs, dvc.lock, DVC cache) with params.yaml's `train` section updated."""
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    params = YAML(typ="safe").load((copy / "params.yaml").read_text())
    params["train"].update(train)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return copy


DAMAGED = (
    f"train: {CKPT / 'epoch_001.pt'}: not a checkpoint, or a truncated one (a PyTorch checkpoint is a "
    f"complete zip archive, this file is not); "
)


def truncate(path: Path) -> bytes:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return raw


def recorded_and_unchanged(copy: Path) -> list[str]:
    """The files of models/checkpoints that dvc.lock records and the workspace holds unchanged
    (`dvc data status`, with dvc.lock committed to git first)."""
    from dvc.repo import Repo

    run(["git", "add", "dvc.lock"], cwd=copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], cwd=copy)
    with Repo(str(copy)) as repo:
        return sorted(repo.data_status(targets=[str(CKPT)], granular=True)["unchanged"])


def epochs_logged(copy: Path) -> list[int]:
    tsv = copy / LIVE / "plots" / "metrics" / "lr.tsv"
    return pd.read_csv(tsv, sep="\t")["step"].tolist() if tsv.is_file() else []


# --- 24.8: a damaged epoch file and the DVC cache -------------------------------------------------


def test_a_damaged_epoch_file_comes_back_from_the_dvc_cache(project, tmp_path):
    """Extending the recorded run (train.epochs_decay 1 -> 2) with epoch_001.pt damaged: it is
    restored from the DVC cache (it was dropped: 'its weights exist nowhere else') and dvc.lock
    records it again."""
    copy = copy_with(project, tmp_path, epochs_decay=2)
    good = truncate(copy / CKPT / "epoch_001.pt")
    out = dvc(copy, "repro", "train").stdout
    assert f"{DAMAGED}restored it from the DVC cache (the version dvc.lock records)\n" in out, out
    assert (copy / CKPT / "epoch_001.pt").read_bytes() == good
    assert sorted(checkpoint.epoch_files(copy / CKPT)) == [1, 2, 3]
    assert [f"{CKPT}/", *(f"{CKPT}/epoch_00{e}.pt" for e in (1, 2, 3)), f"{CKPT}/last.pt"] == [
        f for f in recorded_and_unchanged(copy) if "/samples/" not in f
    ]


def test_a_damaged_epoch_file_the_cache_lacks_is_removed_and_the_rest_kept(project, tmp_path):
    """Its object gone from the DVC cache (the cache's documented layout: files/md5/<2>/<30>), or the
    whole cache (a clone never pulled): the file is removed, with the command that brings it back
    from a remote. DVC's checkout of one file whose folder listing the cache lacks removes the whole
    folder: it is never asked to."""
    import hashlib

    copy = copy_with(project, tmp_path, epochs_decay=2)
    md5 = hashlib.md5(truncate(copy / CKPT / "epoch_001.pt")).hexdigest()
    (copy / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    out = dvc(copy, "repro", "train").stdout
    assert (
        f"{DAMAGED}not restored from the DVC cache (dvc.lock records it, but the cache lacks it: `uv run "
        f"dvc pull {CKPT}/epoch_001.pt` brings it back from a DVC remote that holds it): removed it (retrain "
        f"from scratch to have that epoch again)\n"
    ) in out, out
    assert sorted(checkpoint.epoch_files(copy / CKPT)) == [2, 3]
    assert checkpoint.load(copy / CKPT / "last.pt")["epoch"] == 3
    # the whole cache gone: DVC runs every stage again (their outputs are not in the cache)
    shutil.rmtree(copy / ".dvc" / "cache")
    truncate(copy / CKPT / "epoch_002.pt")
    params = YAML(typ="safe").load((copy / "params.yaml").read_text())
    params["train"]["epochs_decay"] = 3
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(copy, "repro", "train").stdout
    assert (
        f"train: {CKPT / 'epoch_002.pt'}: not a checkpoint, or a truncated one (a PyTorch checkpoint is a "
        f"complete zip archive, this file is not); not restored from the DVC cache ("
    ) in out, out
    assert sorted(checkpoint.epoch_files(copy / CKPT)) == [3, 4]
    assert checkpoint.load(copy / CKPT / "last.pt")["epoch"] == 4


def test_epoch_files_of_another_run_are_never_restored(project, tmp_path):
    """dvc.lock records the run of train.seed 0; the checkpoints folder holds a run of seed 1 that
    was never recorded (trained outside `dvc repro`): its damaged epoch_001.pt must not come back as
    seed 0's, which would load fine."""
    copy = copy_with(project, tmp_path, seed=1)
    run([str(VENV_BIN / "python"), *STAGE], cwd=copy)
    params = YAML(typ="safe").load((copy / "params.yaml").read_text())
    params["train"]["epochs_decay"] = 2
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    truncate(copy / CKPT / "epoch_001.pt")
    out = run([str(VENV_BIN / "python"), *STAGE], cwd=copy).stdout
    assert (
        f"{DAMAGED}not restored from the DVC cache (dvc.lock records the checkpoints of another run): "
        f"removed it (retrain from scratch to have that epoch again)\n"
    ) in out, out
    assert sorted(checkpoint.epoch_files(copy / CKPT)) == [2, 3]


# --- 24.12: the logs and the checkpoints tell one run, at every exit --------------------------------


def test_ctrl_c_in_a_fresh_run_leaves_one_runs_logs_and_checkpoints(project, tmp_path):
    """`make repro` with a changed train param (a fresh run: the recorded checkpoints are moved
    aside), Ctrl-C before its first epoch is saved: the earlier checkpoints come back (they were
    left moved aside, no checkpoint in their place), the logs, metrics.json and the checkpoints tell
    the same epochs (metrics.json was `{}` beside the earlier run's loss curves), and `dvc status`
    shows only the changed param."""
    copy = copy_with(project, tmp_path, ngf=64, n_blocks=9, epochs=50)  # seconds per epoch
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "unpaired.repro", "train"],
        cwd=copy,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if "decoded images" in line:  # RunLog's opening line: the new run's logs are written
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "".join(seen)
    deadline = (
        time.monotonic() + 60
    )  # and the new run's logs are written (before the line or after it)
    while (
        not (
            (copy / LIVE / "plots" / "images").is_dir() and (copy / LIVE / "metrics.json").is_file()
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # epoch 1 takes seconds with these params
    assert proc.wait(120) == 130
    reader.join(10)
    said = "".join(seen)
    assert "moved the earlier checkpoints (epochs 1-2)" in said, said
    assert "this run saved no epoch; moved the earlier checkpoints back" in said, said
    saved = sorted(checkpoint.epoch_files(copy / CKPT))
    assert saved == [1, 2] and epochs_logged(copy) == saved, said
    summary = json.loads((copy / LIVE / "metrics.json").read_text())
    assert summary.get("step") == saved[-1], summary
    for f in (project / CKPT).iterdir():
        if f.is_file():
            assert (copy / CKPT / f.name).read_bytes() == f.read_bytes(), f.name
    status = json.loads(dvc(copy, "status", "--json", "train").stdout)  # (evaluate never ran)
    assert status == {"train": [{"changed deps": {"params.yaml": {"train": "modified"}}}]}, status


def test_a_rerun_with_nothing_left_to_train_keeps_the_timing(project, tmp_path):
    """`dvc repro -f train` on a finished run (DVC deletes the logs, the run resumes with nothing
    left): images/s of every epoch in the logs and metrics.json, so the report keeps its
    throughput and training time; the timing file is no part of the checkpoints' hash."""
    copy = copy_with(project, tmp_path)
    before = (copy / LIVE / "plots" / "metrics" / "images_per_s.tsv").read_text()
    out = dvc(copy, "repro", "-f", "train").stdout
    assert "nothing left to train" in out, out
    assert (copy / LIVE / "plots" / "metrics" / "images_per_s.tsv").read_text() == before
    assert "images_per_s" in json.loads((copy / LIVE / "metrics.json").read_text())
    lock = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]["train"]["outs"]
    before_lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["outs"]
    assert [o for o in lock if o["path"] == str(CKPT)] == [
        o for o in before_lock if o["path"] == str(CKPT)
    ]
