"""unpaired.torchrun, the launcher dvc.yaml's train cmd runs: a bad process count is one line naming
train.devices before any process starts, and among failed ranks a recorded error is the one shown
(issue 24.5). Real launcher processes; the workers are tests/torchrun_worker.py."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import ROOT
from unpaired.threads import cpu_count

LAUNCH = [sys.executable, "-m", "unpaired.torchrun", "--standalone"]
WORKER = ["-m", "tests.torchrun_worker"]


def launch(folder, nproc: str, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*LAUNCH, "--nproc-per-node", nproc, *WORKER],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


CORES = cpu_count()
BAD = {  # train.devices as params.yaml holds it -> the one line
    "zero": (0, "error: params.yaml: train.devices: must be >= 1, got 0"),
    "word": (
        "two",
        "error: params.yaml: train.devices: expected an integer (processes on this node), got 'two'",
    ),
    "float": (
        1.5,
        "error: params.yaml: train.devices: expected an integer (processes on this node), got 1.5",
    ),
    "past the bound": (
        65,
        "error: params.yaml: train.devices: must be <= 64, got 65: processes on one node, "
        "each with its own copy of the models",
    ),
    "more than the cores": (
        CORES + 1,
        f"error: params.yaml: train.devices: {CORES + 1} processes requested "
        f"but only {CORES} CPU core(s) here (each process needs one); use "
        f"train.devices: {CORES} or less",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_train_devices_is_one_line_before_any_process_starts(tmp_path, case):
    """`devices: 0` printed a 15-line ZeroDivisionError traceback; `two` and `1.5` torchrun's message
    without the key; `65` started 65 processes on 2 CPUs; one more than the cores hid rank 0's
    error behind "rank 1 ... was killed by SIGTERM". The value comes into the command as DVC writes
    `${train.devices}`."""
    value, line = BAD[case]
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"train": {"devices": value, "device": "cpu"}})
    )
    written = str(value).lower() if isinstance(value, bool) else str(value)
    t0 = time.monotonic()
    proc = launch(tmp_path, written)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no worker started
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize(
    "nproc, line",
    [
        ("0", "error: unpaired.torchrun: --nproc-per-node: must be >= 1, got 0"),
        (
            "two",
            "error: unpaired.torchrun: --nproc-per-node: expected a number of processes (or cpu, gpu, "
            "auto, xpu), got 'two'",
        ),
    ],
)
def test_a_bad_count_by_hand_names_the_option(tmp_path, nproc, line):
    proc = launch(tmp_path, nproc)  # no params.yaml: not train.devices
    assert (proc.returncode, proc.stderr) == (2, line + "\n")
    assert list(tmp_path.iterdir()) == []


def test_a_rank_killed_from_outside_wins_over_one_the_agent_stopped(tmp_path, monkeypatch):
    """Rank 1 killed from outside (SIGTERM) records `interrupted`; rank 0, stopped by the agent while
    it could not record (starting up), ends with status 130 and no record: rank 1 is the cause
    (the line was `error: rank 0 (PID ...) exited with status 130`, seen on a loaded machine)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from unpaired import torchrun

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "1" / "error.json"))
    assert torchrun.record_failure("interrupted", 130)
    rank0 = ProcessFailure(0, 100, 130, str(tmp_path / "0" / "error.json"))  # no file: no record
    rank1 = ProcessFailure(1, 101, 130, str(tmp_path / "1" / "error.json"))
    text, status = torchrun.failure_report({0: rank0, 1: rank1})
    assert (text, status) == (
        "rank 1 (PID 101) failed first; the other processes of the run were stopped\ninterrupted",
        130,
    )
    killed = ProcessFailure(1, 101, -9, str(tmp_path / "none.json"))  # kill -9: no record either
    assert torchrun.failure_report({0: rank0, 1: killed})[0].startswith(
        "error: rank 1 (PID 101) was killed by SIGKILL"
    )


@pytest.mark.skipif(CORES < 2, reason="needs 2 CPU cores for 2 worker processes")
def test_a_recorded_error_wins_over_a_rank_the_agent_stopped(tmp_path):
    """Rank 0 records its error and exits; torchrun's agent then stops rank 1 (SIGTERM) before it
    could record anything. The line was `error: rank 1 (PID ...) was killed by SIGTERM; ...`, the
    real error hidden; it is rank 0's own line now."""
    proc = launch(tmp_path, "2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started-0", "started-1"]
    assert (proc.returncode, proc.stderr) == (
        2,
        "error: params.yaml: train.lr: rank 0's own error\n",
    )
