"""The train stage under real DVC, in a fresh git copy of the project with tiny params (issue 24): a
Ctrl-C in a fresh run leaves one run's logs and checkpoints (24.12a), a run resumed with nothing left
to train keeps its timing (24.12b)."""

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

from tests.helpers import TINY, VENV_BIN, clone_project, dvc, env
from unpaired import checkpoint

CKPT = Path("models/checkpoints")
LIVE = Path("metrics/train")


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


def epochs_logged(copy: Path) -> list[int]:
    tsv = copy / LIVE / "plots" / "metrics" / "lr.tsv"
    return pd.read_csv(tsv, sep="\t")["step"].tolist() if tsv.is_file() else []


# --- 24.12: the logs and the checkpoints tell one run, at every exit --------------------------------


def test_ctrl_c_in_a_fresh_run_leaves_one_runs_logs_and_checkpoints(project, tmp_path):
    """`make repro` with a changed train param (a fresh run: the recorded checkpoints are moved
    aside), Ctrl-C before its first epoch is saved: the logs, metrics.json and the checkpoints tell
    the same epochs (metrics.json was `{}` beside the earlier run's loss curves, which `make repro`
    had put back, and no checkpoint)."""
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
    saved = sorted(checkpoint.epoch_files(copy / CKPT))
    assert epochs_logged(copy) == saved, said
    summary = json.loads((copy / LIVE / "metrics.json").read_text())
    assert summary.get("step") == (saved[-1] if saved else None), summary


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
