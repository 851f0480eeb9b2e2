"""benchmarks/gpu_check.sh on this machine, at tiny size (--tiny): without CUDA it says so in one
line, runs the parts that need no GPU (versions, the embedded data, the stage twice with its loss
lines diffed), skips the others, writes one JSON file and a table, and exits 0; a part that runs out
of time or fails is reported and the others still run."""

import json
import subprocess

import pytest
import torch

from tests.helpers import ROOT

GPU_PARTS = ["grads", "bf16", "memory_format", "reference", "data_device", "compile"]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="this machine has CUDA: there "
    "`bash benchmarks/gpu_check.sh` runs the GPU parts, not the no-CUDA path",
)


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_without_cuda_it_says_so_runs_the_cpu_parts_and_exits_0(tmp_path):
    proc = gpu_check("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    said = [line for line in lines if "CUDA" in line and line.startswith("gpu_check:")]
    assert said == [
        f"gpu_check: no CUDA here (torch {torch.__version__}): running only the parts that need no "
        f"GPU (versions, data, stage); skipping {', '.join(GPU_PARTS)}"
    ]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["cuda"] is False and list(parts) == [
        "versions",
        *GPU_PARTS[:4],
        "data",
        "stage",
        *GPU_PARTS[4:],
    ]
    assert (
        sum(report["limits_s"].values()) <= report["total_limit_s"] == 8 * 60
    )  # one run within 8 minutes
    assert parts["stage"]["limit_s"] == sum(
        report["limits_s"][n] for n in ["stage", *GPU_PARTS]
    )  # theirs, unused
    assert {n: parts[n]["status"] for n in GPU_PARTS} == {n: "skipped" for n in GPU_PARTS}
    assert all(parts[n]["skipped"] == "no CUDA" for n in GPU_PARTS)
    assert [parts[n]["status"] for n in ("versions", "data", "stage")] == ["ok"] * 3
    versions = parts["versions"]["result"]
    assert versions["torch"] == torch.__version__ and versions["cuda_available"] is False
    assert versions["precision_auto"].startswith("precision: fp32: train.precision auto on CPU")
    stage = parts["stage"]["result"]
    assert (
        stage["lines"] == 2 and stage["identical_lines"] == 2 and stage["diff"] == []
    )  # CPU: bit for bit
    assert stage["run_1"]["loss_lines"][0].startswith("epoch 1/2  G_A ")
    assert stage["run_1"]["peak_rss_mib"] > 100 and stage["run_1"]["img_per_s"][0] > 0
    assert any(
        line.startswith("train: ") and "(train.data_device: auto)" in line
        for line in stage["run_1"]["train_lines"]
    )
    table = lines[lines.index(next(line for line in lines if line.startswith("part "))) :]
    assert [row.split()[:2] for row in table[1:10]] == [[n, parts[n]["status"]] for n in parts]
    assert lines[-1] == f"JSON: {tmp_path / 'gpu_check.json'}"


def test_a_part_out_of_time_and_a_failed_part_are_reported_and_the_rest_go_on(tmp_path):
    """data given 2 s is stopped (its process group killed); the stage then finds no data and fails;
    both are in the JSON and the table, and the exit status says so."""
    proc = gpu_check("--out", str(tmp_path), "--parts", "data,stage", "--limit-of", "data=2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["data", "stage"]
    assert parts["data"]["status"] == "timed out" and parts["data"]["seconds"] < 10
    assert parts["stage"]["status"] == "failed" and parts["stage"]["error"].startswith("exit 1: ")
    assert "data          timed out" in proc.stdout and "stage         failed" in proc.stdout
