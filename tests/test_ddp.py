"""Data-parallel training with real gloo processes on 127.0.0.1 (torchrun), tiny networks."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from stages.train import main, train
from tests.ddp_worker import TINY, samples
from tests.helpers import ROOT, TINY as TINY_PROJECT, clone_project, dvc
from tests.test_train import make_prepared, same, weights
from unpaired import checkpoint
from unpaired.distributed import cpu_cores
from unpaired.errors import main_guard
from unpaired.training import ImagePool, build_models, optimizers, train_step

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or cpu_cores() < 2,
                                reason="needs torch.distributed and 2 CPU cores")


def torchrun(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


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
    node = torchrun("--standalone", "--nproc-per-node=2", *worker, str(one), "equivalence,straight,resumed")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                      "--rdzv-id=test", *worker, str(two), "straight") for _ in range(2)]
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
        train_step(m, opt_G, opt_D, ImagePool(0, g), ImagePool(0, g), a[2 * k:2 * k + 2], b[2 * k:2 * k + 2],
                   10.0, 0.5, contextlib.nullcontext)
        if k == 0:
            for theirs, p in zip(got["grads"], (p for net in m.nets() for p in net.parameters()), strict=True):
                assert (theirs - p.grad).abs().max() <= 1e-9 * p.grad.abs().max() + 1e-15
    # Conv biases before instance norm have a true gradient of 0: Adam turns their rounding noise
    # (~1e-15 in float64) into steps of ~1e-11, hence the absolute tolerance (lr is 2e-4).
    for name in ("G_A", "G_B", "D_A", "D_B"):
        for key, value in getattr(m, name).state_dict().items():
            theirs = got["nets"][name][key]
            assert torch.allclose(theirs, value, rtol=1e-7, atol=1e-9), (name, key, (theirs - value).abs().max())
    start = build_models(4, 4, 1, 3, torch.device("cpu"), False, dtype=torch.float64)
    assert not torch.equal(start.G_A.model[1].weight, m.G_A.model[1].weight)   # (it did train)


def test_interrupted_two_process_run_resumes_bitwise(runs):
    one = runs["one"]
    assert "resuming from" in runs["logs"][0]
    assert same(weights(one / "straight" / "last.pt"), weights(one / "resumed" / "last.pt"))
    tsv = lambda d: (one / d / "plots" / "metrics" / "G_A.tsv").read_text()  # noqa: E731
    assert tsv("live_straight") == tsv("live_resumed")
    last = checkpoint.load(one / "straight" / "last.pt")
    assert last["world_size"] == 2 and len(last["other_ranks"]) == 1 and last["device"] == "cpu"
    assert sorted(p.name for p in (one / "straight").iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]


def test_two_nodes_rendezvous_and_match_one_node(runs):
    assert same(weights(runs["one"] / "straight" / "last.pt"), weights(runs["two"] / "straight" / "last.pt"))


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
        main_guard(main)
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: params.yaml: train.devices: {n} processes requested but only {n - 1} "
                                 f"CPU core(s) here (each process needs one); use train.devices: {n - 1} or less\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_dvc_repro_with_two_processes_leaves_a_clean_status(tmp_path):
    over = {**TINY_PROJECT, "train": {**TINY_PROJECT["train"], "devices": 2}}
    project = clone_project(tmp_path / "project", over)
    out = dvc(project, "repro", "train").stdout
    assert "2 processes (gloo)" in out
    assert json.loads(dvc(project, "status", "--json", "train").stdout or "{}") == {}
    assert checkpoint.load(project / "models" / "checkpoints" / "last.pt")["world_size"] == 2
