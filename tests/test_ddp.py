"""Data-parallel training with real gloo processes on 127.0.0.1 (unpaired.torchrun), tiny networks;
real signals on real processes for the no-orphans rule and the one-line failures."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from stages.train import main, train
from tests.ddp_worker import TINY, samples
from tests.helpers import ROOT, TRAIN_ARGS, TRAIN_STAGE, clone_project, dvc
from tests.helpers import TINY as TINY_PROJECT
from tests.test_train import make_prepared, same, weights
from unpaired import checkpoint
from unpaired.distributed import cpu_cores
from unpaired.errors import main_guard
from unpaired.models.cyclegan import build_models, optimizers, train_step
from unpaired.models.live import SPEEDS
from unpaired.models.pool import ImagePool

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or cpu_cores() < 2,
    reason="needs torch.distributed and 2 CPU cores",
)


def torchrun(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "unpaired.torchrun", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of 2 processes on one node (equivalence steps, a straight and an interrupted +
    resumed stage run), and 2 single-process "nodes" meeting at a c10d rendezvous on 127.0.0.1
    (the straight run). Both launches run at the same time."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_prepared(root / "prepared", n=(6, 5))
    one, two = root / "one_node", root / "two_nodes"
    one.mkdir(), two.mkdir()
    worker = ["-m", "tests.ddp_worker", str(data)]
    node = torchrun(
        "--standalone",
        "--nproc-per-node=2",
        *worker,
        str(one),
        "gather,equivalence,straight,resumed,cut",
    )
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        torchrun(
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=test",
            *worker,
            str(two),
            "straight",
        )
        for _ in range(2)
    ]
    logs = [finish(p) for p in [node, *nodes]]
    return {"data": data, "one": one, "two": two, "logs": logs}


def test_two_processes_at_batch_1_equal_one_at_batch_2(runs):
    """Gradients averaged over ranks == the gradient of the batch-2 mean loss: after 5 Adam steps
    the weights agree in float64, and the ranks held identical weights after every step."""
    got = torch.load(runs["one"] / "equivalence.pt", weights_only=True)
    assert got["identical"] == [True] * 5
    torch.manual_seed(0)
    m = build_models(4, 4, 1, 3, torch.device("cpu"), False, dtype=torch.float64)
    opt_G, opt_D = optimizers(m, 2e-4, 0.5, False)
    g = torch.Generator().manual_seed(0)
    a, b = samples()
    for k in range(5):
        train_step(
            m,
            opt_G,
            opt_D,
            ImagePool(0, g),
            ImagePool(0, g),
            a[2 * k : 2 * k + 2],
            b[2 * k : 2 * k + 2],
            10.0,
            0.5,
            contextlib.nullcontext,
        )
        if k == 0:
            for theirs, p in zip(
                got["grads"], (p for net in m.nets() for p in net.parameters()), strict=True
            ):
                assert (theirs - p.grad).abs().max() <= 1e-9 * p.grad.abs().max() + 1e-15
    # Conv biases before instance norm have a true gradient of 0: Adam turns their rounding noise
    # (~1e-15 in float64) into steps of ~1e-11, hence the absolute tolerance (lr is 2e-4).
    for name in ("G_A", "G_B", "D_A", "D_B"):
        for key, value in getattr(m, name).state_dict().items():
            theirs = got["nets"][name][key]
            assert torch.allclose(theirs, value, rtol=1e-7, atol=1e-9), (
                name,
                key,
                (theirs - value).abs().max(),
            )
    start = build_models(4, 4, 1, 3, torch.device("cpu"), False, dtype=torch.float64)
    assert not torch.equal(start.G_A.model[1].weight, m.G_A.model[1].weight)  # (it did train)


def test_object_collectives_carry_compact_cpu_copies(runs):
    """What Rank.gather delivers (the ranks' own state at each checkpoint: pools, random streams)
    holds CPU tensors that own only their elements: a sender's CUDA tensor would be unpickled onto
    the sender's GPU by every receiver, and a view would carry its whole storage. (On this CPU-only
    machine the device part cannot fail; the storage part does on a plain all_gather_object.)"""
    got = json.loads((runs["one"] / "gathered.json").read_text())
    assert len(got) == 2 and all(
        {x["key"] for x in rank} == {"pool_A.images", "pool_A.u", "pool_A.index", "pool"}
        for rank in got
    )
    for leaf in (x for rank in got for x in rank):
        assert leaf["device"] == "cpu" and leaf["storage"] == leaf["own"], leaf


def test_interrupted_two_process_run_resumes_bitwise(runs):
    one = runs["one"]
    assert "resuming from" in runs["logs"][0]
    assert same(weights(one / "straight" / "last.pt"), weights(one / "resumed" / "last.pt"))
    tsv = lambda d: (one / d / "plots" / "metrics" / "G_A.tsv").read_text()  # noqa: E731
    assert tsv("live_straight") == tsv("live_resumed")
    last = checkpoint.load(one / "straight" / "last.pt")
    assert last["world_size"] == 2 and len(last["other_ranks"]) == 1 and last["device"] == "cpu"
    assert sorted(
        p.name for p in (one / "straight").iterdir() if p.name not in ("samples", SPEEDS)
    ) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]


def test_cut_trains_on_two_processes_and_resumes_bitwise(runs):
    """train.model cut under DDP (G and F wrapped together, F made before the wrap): an interrupted
    two-process run resumed equals the straight one, and each rank kept its own random stream."""
    one = runs["one"]
    assert same(weights(one / "cut_straight" / "last.pt"), weights(one / "cut_resumed" / "last.pt"))
    last = checkpoint.load(one / "cut_straight" / "last.pt")
    assert last["world_size"] == 2 and set(last["nets"]) == {"G", "D", "F"}
    assert last["run_params"]["model"] == "cut" and last["epoch"] == 2
    nce = lambda d: (one / d / "plots" / "metrics" / "NCE.tsv").read_text()  # noqa: E731
    assert nce("live_cut_straight") == nce("live_cut_resumed")


def test_two_nodes_rendezvous_and_match_one_node(runs):
    assert same(
        weights(runs["one"] / "straight" / "last.pt"), weights(runs["two"] / "straight" / "last.pt")
    )


def test_other_world_size_starts_afresh(runs, tmp_path, capsys):
    out = tmp_path / "ckpt"
    shutil.copytree(runs["one"] / "straight", out)
    train(replace(TINY, devices=1), runs["data"], out, tmp_path / "live")
    assert "was written by 2 process(es), this run has 1 (train.devices)" in capsys.readouterr().out
    assert checkpoint.load(out / "last.pt")["world_size"] == 1


def test_more_devices_than_cores_is_one_line(tmp_path, monkeypatch, capsys):
    n = cpu_cores() + 1
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"devices": n, "device": "cpu"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main_guard(lambda: main(TRAIN_ARGS))
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"error: params.yaml: train.devices: {n} processes requested but only {n - 1} "
        f"CPU core(s) here (each process needs one); use train.devices: {n - 1} or less\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_dvc_repro_with_two_processes_leaves_a_clean_status(tmp_path):
    over = {**TINY_PROJECT, "train": {**TINY_PROJECT["train"], "devices": 2}}
    project = clone_project(tmp_path / "project", over)
    out = dvc(project, "repro", "train").stdout
    assert "2 processes (gloo)" in out
    assert json.loads(dvc(project, "status", "--json", "train").stdout or "{}") == {}
    assert checkpoint.load(project / "models" / "checkpoints" / "last.pt")["world_size"] == 2


# --- one entry (unpaired.torchrun): no orphans, one line per failure (issue 17.1, 17.5) -----------

LAUNCH = [sys.executable, "-m", "unpaired.torchrun", "--standalone"]
STAGE = TRAIN_STAGE
LOCK = Path("models") / ".checkpoints.lock"


def project(root: Path, **train) -> Path:
    """A folder the stage runs in: tiny prepared data and params.yaml's train section."""
    make_prepared(root / "data" / "prepared", n=(6, 5))
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY_PROJECT["train"], **train}}))
    return root


def start(root: Path, devices: int) -> subprocess.Popen:
    """The stage through the entry, in a session of its own (its process group gets Ctrl-C);
    stdout and stderr go to files in root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(root / "out.txt", "w") as out, open(root / "err.txt", "w") as err:
        return subprocess.Popen(
            [*LAUNCH, f"--nproc-per-node={devices}", *STAGE],
            cwd=root,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def wait_for(what, seconds: float, why: str):
    deadline = time.monotonic() + seconds
    while not (got := what()):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)
    return got


def alive(pid: int) -> bool:
    """Some thread of the process still runs: the process is not gone, nor a zombie whose threads
    all ended (a killed leader turns zombie before its other threads end and its files close)."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            if stat.read_text().rpartition(")")[2].split()[0] not in ("Z", "X"):
                return True
    return False


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def ranks(launcher: int) -> dict[int, int]:
    """rank -> PID of the training processes the launcher started (from their environment)."""
    out = {}
    for pid in children(launcher):
        with contextlib.suppress(OSError):
            env = dict(
                v.split("=", 1)
                for v in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in v
            )
            if "RANK" in env:
                out[int(env["RANK"])] = pid
    return out


def lock_free(root: Path) -> bool:
    fd = os.open(root / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def running(root: Path, devices: int) -> tuple[subprocess.Popen, dict[int, int]]:
    """A run of `devices` processes that has finished epoch 1 and keeps training; rank -> PID."""
    proc = start(root, devices)
    # last.pt appears (atomically renamed) when epoch 1 is saved; the progress line "epoch 1/..." can
    # come earlier, mid-epoch, on a loaded machine
    last = root / "models" / "checkpoints" / "last.pt"
    wait_for(lambda: last.is_file() or proc.poll() is not None, 90, "no epoch finished within 90 s")
    assert proc.poll() is None, (root / "err.txt").read_text()
    return proc, (ranks(proc.pid) if devices > 1 else {0: proc.pid})


KILLS = {  # case -> (whom, signal, the lines on stderr; PID: the killed rank's, LAUNCHER: the launcher's)
    "kill -9 launcher": ("launcher", signal.SIGKILL, []),
    "kill -9 rank 0": (
        0,
        signal.SIGKILL,
        [
            "error: rank 0 (PID {pid}) was killed by SIGKILL; the other "
            "processes of the run were stopped"
        ],
    ),
    "kill -9 rank 1": (
        1,
        signal.SIGKILL,
        [
            "error: rank 1 (PID {pid}) was killed by SIGKILL; the other "
            "processes of the run were stopped"
        ],
    ),
    "kill launcher (the lock's PID)": ("launcher", signal.SIGTERM, ["interrupted"]),
    "SIGHUP launcher": ("launcher", signal.SIGHUP, ["interrupted"]),
    "Ctrl-C": ("group", signal.SIGINT, ["interrupted"]),
    "kill rank 1": (
        1,
        signal.SIGTERM,
        [
            "rank 1 (PID {pid}) failed first; the other processes of the run were stopped",
            "interrupted",
        ],
    ),
}


@pytest.mark.parametrize("case", KILLS)
def test_no_process_of_a_killed_run_remains_and_its_failure_is_one_line(tmp_path, case):
    """Issue 17.1 / 17.5: whichever process of a 2-process run is killed, however, every process of
    the run is gone within seconds, the lock is free, and stderr holds the one line a one-process
    run gives (`interrupted`), or one line naming the rank that was killed, or both."""
    whom, sig, lines = KILLS[case]
    root = project(tmp_path, epochs=300, epochs_decay=0, devices=2)
    proc, pids = running(root, 2)
    assert sorted(pids) == [0, 1]
    assert (root / LOCK).read_text() == f"{proc.pid}\n"  # the PID whose kill stops the run
    assert not lock_free(root)
    if whom == "group":
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal's process group
    else:
        os.kill(proc.pid if whom == "launcher" else pids[whom], sig)
    t0 = time.monotonic()
    wait_for(
        lambda: not any(map(alive, [proc.pid, *pids.values()])),
        10,
        f"still running 10 s after {case}: {[p for p in [proc.pid, *pids.values()] if alive(p)]}",
    )
    assert lock_free(root)
    proc.wait(timeout=5)
    seconds = time.monotonic() - t0
    pid = pids.get(whom)
    # It ends in the one line a one-process run gives, plus at most one line before it (issue 17.5).
    # Measured on the loaded 2-core machine: a worker stopped mid-collective may print its C++
    # runtime's "terminate called ..." or "interrupted" first; that is the one extra line allowed.
    got = (root / "err.txt").read_text().splitlines()
    want = [line.format(pid=pid) for line in lines]
    assert got[-len(want) :] == want if want else got == [], (case, got)
    assert len(got) <= len(want) + (1 if want else 0), (case, got)
    assert seconds < 10
    if sig != signal.SIGKILL or whom != "launcher":
        assert proc.returncode == (130 if lines[-1] == "interrupted" else 1)


def test_after_a_killed_run_a_second_run_works(tmp_path):
    """The issue's case (kill -9 of the PID the lock names, then a run with devices: 1): the second
    run takes the lock at once, moves the killed run's checkpoints aside and trains; as one process
    it is the plain case (the launcher became the stage: same PID, no torchrun children)."""
    root = project(tmp_path, epochs=300, epochs_decay=0, devices=2)
    proc, pids = running(root, 2)
    os.kill(int((root / LOCK).read_text()), signal.SIGKILL)
    proc.wait(timeout=5)
    wait_for(lambda: not any(map(alive, pids.values())), 5, "ranks outlived their launcher")
    (root / "params.yaml").write_text(
        yaml.safe_dump({"train": {**TINY_PROJECT["train"], "devices": 1}})
    )
    second = start(root, 1)
    wait_for(
        lambda: (root / LOCK).read_text() == f"{second.pid}\n" or second.poll() is not None,
        30,
        "the second run did not take the lock",
    )
    assert children(second.pid) == []
    assert second.wait(timeout=120) == 0, (root / "err.txt").read_text()
    out = (root / "out.txt").read_text()
    assert "was written by 2 process(es), this run has 1 (train.devices)" in out
    assert (root / "err.txt").read_text() == ""
    assert sorted(
        p.name
        for p in (root / "models" / "checkpoints").iterdir()
        if p.name not in ("samples", SPEEDS)
    ) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    assert checkpoint.load(root / "models" / "checkpoints" / "last.pt")["world_size"] == 1
    aside = [p for p in (root / "models" / "checkpoints.previous").iterdir() if p.is_dir()]
    assert len(aside) == 1 and (aside[0] / "last.pt").is_file()


def test_an_error_found_by_rank_0_is_its_one_line(tmp_path):
    """Issue 17.5: last.pt at 2 epochs, params now `epochs: 1, epochs_decay: 0`: rank 0's line and
    nothing else (rank 1, waiting for rank 0 in a collective, prints no gloo traceback)."""
    root = project(tmp_path, devices=2)
    assert start(root, 2).wait(timeout=120) == 0, (root / "err.txt").read_text()
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {"train": {**TINY_PROJECT["train"], "epochs": 1, "epochs_decay": 0, "devices": 2}}
        )
    )
    proc = start(root, 2)
    assert proc.wait(timeout=120) == 2
    assert (root / "err.txt").read_text() == (
        "error: params.yaml: train.epochs + train.epochs_decay = 1 is below the 2 epochs already in "
        "models/checkpoints/last.pt: raise them to extend that run, or move models/checkpoints away to "
        "start afresh\n"
    )
    assert lock_free(root)


def test_several_devices_without_a_launcher_is_one_line(tmp_path):
    """`python -m stages.train` by hand is one process: train.devices: 2 there says what starts two."""
    root = project(tmp_path, devices=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *STAGE], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(
        "error: params.yaml: train.devices: 2 processes are started by torchrun, "
        "not by the stage: run `uv run dvc repro train`"
    )
    assert proc.stderr.count("\n") == 1
    assert not (root / "models" / "checkpoints").exists()
