"""benchmarks/train_throughput.py at tiny size on the CPU: its --ddp path trains real DDP replicas
(2 gloo processes) whose gradients are all-reduced, so both ranks end with the same weights; a
variant whose process crashes is reported and the benchmark goes on (and ends)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from unpaired.distributed import cpu_cores


@pytest.mark.skipif(
    not torch.distributed.is_available() or cpu_cores() < 2,
    reason="needs torch.distributed and 2 CPU cores",
)
def test_ddp_ranks_end_with_the_same_weights_and_a_crashed_variant_is_reported(tmp_path):
    """Each rank trains on its own share of the images: without the gradients' all-reduce their
    weights differ after the first step (measured: `identical: False` with distribute() left out).
    `--reference` names an empty folder: that variant's process fails on its import, and says why;
    before, the benchmark waited on its queue forever."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/train_throughput.py",
            "--device",
            "cpu",
            "--ddp",
            "2",
            "--variants",
            "",
            "--reference",
            str(tmp_path),
            "--steps",
            "3",
            "--warmup",
            "1",
            "--size",
            "24",
            "--ngf",
            "4",
            "--ndf",
            "4",
            "--blocks",
            "1",
            "--images",
            "4",
            "--workers",
            "0",
            "--timeout",
            "300",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert got["ddp"]["ranks_identical"] is True, got
    assert got["ddp"]["processes"] == 2 and got["ddp"]["all_img_per_s"] > 0
    assert got["variants"] == {}
    assert list(got["failed"]) == ["reference"]
    assert got["failed"]["reference"].startswith(
        "failed in process 0: ModuleNotFoundError: No module named 'models"
    )
    assert "reference          failed: failed in process 0: ModuleNotFoundError" in proc.stdout
    assert "every rank ended with the same weights: True" in proc.stdout


def test_a_variant_past_its_time_limit_is_killed_and_reported(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/train_throughput.py",
            "--device",
            "cpu",
            "--variants",
            "batched",
            "--steps",
            "3",
            "--size",
            "24",
            "--ngf",
            "4",
            "--ndf",
            "4",
            "--blocks",
            "1",
            "--images",
            "4",
            "--timeout",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(out.read_text())
    assert got["variants"] == {} and got["failed"] == {"batched": "timed out after 1 s"}
    assert [line.split() for line in proc.stdout.splitlines() if line.startswith("batched")] == [
        ["batched", "*", "failed:", "timed", "out", "after", "1", "s"]
    ]  # (* : the stage's default variant)
