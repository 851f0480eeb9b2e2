"""Sweeps with DVC's own experiment commands keep params.yaml the user's file: a queued sweep over one
param (train.model: cyclegan, cut, fastcut on the same data, docs/training.md's walk-through) runs
the committed params.yaml plus exactly that override, in parallel workers; each run is scored
(FID/KID with the bundled Inception weights) and `dvc exp show --sort-by metrics/eval.json:kid_AtoB`
ranks the runs by KID; `dvc exp apply` brings the winner back; one experiment's checkpoints never
leak into another's run. And the model registry: a colleague gets
the best generators by name (`dvc artifacts get`) from a git repository and its DVC remote."""

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

from tests.helpers import ROOT, TINY, VENV_BIN, clone_project, deep_merge, dvc, env, run

# A sweep's own edits of the committed params, so a test can tell them from conf/'s defaults: with
# DVC's Hydra composition on, every experiment silently ran conf/'s values instead.
# Valid for every model: CycleGAN-only keys at their defaults (pool_size), a G deep enough for CUT's
# NCE layers (layer 16 needs 5 residual blocks).
EDITS = {
    "train": {"lr": 0.0003, "seed": 3, "n_blocks": 5, "pool_size": 50},
    "domains": {"a": {"count": 16}},
    "prepare": {
        "test_fraction": 0.5
    },  # 5 + 7 test images: every run scored (FID/KID need >= 2) ...
    "evaluate": {"metrics": "required"},
}  # ... or the run fails; kid_subsets 2 (TINY)
SWEEP = ("cyclegan", "cut", "fastcut")
ARTIFACT, VERSION = "cyclegan-generators", "v0.1.0"  # dvc.yaml's `artifacts:`; a GTO version tag


def _params(repo):
    return YAML(typ="safe").load((repo / "params.yaml").read_text())


def _wait_for_queue(repo, count, limit_s=600):
    """Until `count` experiments have finished (success or failure), bounded in time."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        status = dvc(repo, "queue", "status", check=False).stdout
        done = status.count("Success") + status.count("Failed")
        if done >= count:
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {limit_s} s:\n{status}")


def _stop_workers(repo, starter):
    """No process of the sweep outlives the test: the starter's session, then any queue worker of
    this repository (dvc names its workers after the repository's queue), bounded in time."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(starter.pid, signal.SIGKILL)
    starter.wait(timeout=10)
    for _ in range(50):
        pids = [
            int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_worker(p, repo)
        ]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _is_worker(proc_dir, repo):
    try:
        cmd = (proc_dir / "cmdline").read_bytes()
        cwd = os.readlink(proc_dir / "cwd")
    except OSError:
        return False
    return b"queue-worker" in cmd and cwd.startswith(str(repo))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    repo = clone_project(tmp_path_factory.mktemp("sweep") / "project", deep_merge(TINY, EDITS))
    committed = _params(repo)
    dvc(repo, "repro")  # the baseline, committed with its dvc.lock ...
    dvc(
        repo, "remote", "add", "-f", "-d", "shared", str(repo.parent / "storage")
    )  # ... and a local remote
    for cmd in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"],
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "tag",
            "-a",
            f"{ARTIFACT}@{VERSION}",
            "-m",
            "the baseline's generators",
        ],
    ):  # a registered version: GTO's annotated tag NAME@vX.Y.Z
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    dvc(repo, "push", "models/best")  # what a colleague fetches below
    dvc(repo, "exp", "run", "--queue", "-S", f"train.model={','.join(SWEEP)}")
    # `dvc queue start` daemonizes its workers, which may keep inherited pipes open: never wait on
    # its output (subprocess.run(capture_output=True) waited for EOF for ever on a fresh clone).
    log = (repo.parent / "queue-start.log").open("wb")
    starter = subprocess.Popen(
        [str(VENV_BIN / "dvc"), "queue", "start", "-j", "2"],
        cwd=repo,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        status = _wait_for_queue(repo, len(SWEEP))
    finally:
        dvc(repo, "queue", "stop", "--kill", check=False)
        _stop_workers(repo, starter)
        log.close()
    assert status.count("Success") == len(SWEEP), status
    return repo, committed


def _experiments(repo):
    """{name: {"params": params.yaml's values, "metrics": {file: values}}} from `dvc exp show --json`."""
    out = {}
    for commit in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                name = rev.get("name") or data.get("name")
                if not name:
                    continue
                params = data["params"]["params.yaml"]["data"]
                metrics = {f: m["data"] for f, m in (data.get("metrics") or {}).items()}
                out[name] = {"params": params, "metrics": metrics}
    return out


def test_each_queued_run_is_the_committed_params_plus_its_override(swept):
    repo, committed = swept
    exps = _experiments(repo)
    assert len(exps) == len(SWEEP), exps.keys()
    seen = set()
    for name, exp in exps.items():
        value = exp["params"]["train"]["model"]
        seen.add(value)
        expected = deep_merge(committed, {"train": {"model": value}})
        assert exp["params"] == expected, name  # nothing else changed: no reset to conf/
    assert seen == set(SWEEP)


def test_exp_show_compares_the_runs_best_metrics(swept):
    """Each run logs its own model's losses (CycleGAN's G_A, CUT's NCE) beside its best epoch."""
    repo, _ = swept
    for name, exp in _experiments(repo).items():
        assert exp["metrics"]["metrics/eval.json"]["best_epoch"] >= 1, name
        loss = "G_A" if exp["params"]["train"]["model"] == "cyclegan" else "NCE"
        assert loss in exp["metrics"]["metrics/train/metrics.json"], name
    table = dvc(repo, "exp", "show", "--only-changed", "--csv").stdout.splitlines()[
        0
    ]  # the header row
    assert "train.model" in table.split(",")  # the swept param, beside what changed with it
    assert "train.ngf" not in table.split(",")  # (--only-changed: not the rest)
    full = dvc(repo, "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    assert {"best_epoch", "G_A", "NCE", "train.model", "train.ngf"} <= set(full)


@pytest.mark.parametrize("key", ["kid", "kid_AtoB"])
def test_exp_show_ranks_the_sweep_by_kid(swept, key):
    """The walk-throughs of docs/operations.md (`kid`) and docs/training.md (`kid_AtoB`, the one
    direction all three models train): every queued run has a KID, `dvc exp show --sort-by
    metrics/eval.json:KEY --sort-order asc` lists them lowest first (the first is the one to `dvc exp
    apply`), and KID and FID are its first metric columns; each run's best epoch was chosen by KID,
    not by falling back to the last."""
    repo, _ = swept
    out = dvc(
        repo, "exp", "show", "--csv", "--sort-by", f"metrics/eval.json:{key}", "--sort-order", "asc"
    ).stdout
    header = out.splitlines()[0].split(",")
    columns = [
        c
        for c in header
        if c not in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
    ]
    assert columns[:2] == ["kid", "fid"], header  # the metrics first, eval.json's first
    ranked = [
        (float(r[key]), r["train.model"])
        for r in csv.DictReader(io.StringIO(out))
        if r["Experiment"]
    ]
    assert sorted(model for _, model in ranked) == sorted(SWEEP) and all(
        math.isfinite(k) for k, _ in ranked
    )
    assert [k for k, _ in ranked] == sorted(k for k, _ in ranked), ranked
    by_model = {
        e["params"]["train"]["model"]: e["metrics"]["metrics/eval.json"]
        for e in _experiments(repo).values()
    }
    assert [kid for kid, model in ranked] == pytest.approx(
        [by_model[model][key] for _, model in ranked], rel=1e-3
    )
    assert all(m["best_is_fallback"] is False for m in by_model.values())
    assert "kid_BtoA" in by_model["cyclegan"] and "kid_BtoA" not in by_model["cut"]
    assert by_model["cut"]["kid"] == by_model["cut"]["kid_AtoB"]  # one direction: its KID


def test_dvc_plots_mark_the_best_epoch(swept):
    """`dvc plots show` draws FID/KID per direction and epoch with .dvc/plots/best_epoch.json: the
    curve, and a dashed vertical line at the epoch whose `best` is 1, the best epoch of eval.json."""
    repo, _ = swept
    shown = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert not shown.get("errors")
    best = json.loads((repo / "metrics" / "eval.json").read_text())["best_epoch"]
    for column in ("fid_AtoB", "fid_BtoA", "kid_AtoB", "kid_BtoA"):
        content = shown["data"][f"metrics/eval_plots/{column}.tsv"][0]["content"]
        line, rule = content["layer"]
        assert line["encoding"]["y"]["field"] == column and rule["mark"]["type"] == "rule"
        assert rule["transform"] == [{"filter": "datum.best == 1"}]
        values = content["data"]["values"]
        assert [int(v["epoch"]) for v in values if int(v["best"]) == 1] == [best] and len(
            values
        ) >= 2


def test_the_best_generators_are_a_registry_model():
    """dvc.yaml declares models/best, evaluate's output, as a model in DVC's registry shape."""
    spec = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())
    entry = spec["artifacts"][ARTIFACT]
    assert entry["path"] == "models/best" and entry["type"] == "model"
    assert entry["desc"] and "cyclegan" in entry["labels"]
    assert "models/best" in spec["stages"]["evaluate"]["outs"]


def test_a_colleague_gets_the_best_generators_by_name(swept, tmp_path):
    """`dvc artifacts get <git url> cyclegan-generators` (and `dvc get <git url> models/best`), in a
    folder outside any repository, against a bare git repository whose DVC remote is a local folder:
    the registered version's generators.pt and best.json, byte for byte; no DVC Studio."""
    import dvc.api as dvc_api  # (not `dvc`: the helper that runs the CLI)

    repo, _ = swept
    server = tmp_path / "server.git"  # what a colleague can reach: git + the DVC remote
    run(["git", "clone", "-q", "--bare", str(repo), str(server)], cwd=tmp_path)
    rev = f"{ARTIFACT}@{VERSION}"
    want = {
        name: dvc_api.read(f"models/best/{name}", repo=str(repo), rev=rev, mode="rb")
        for name in ("generators.pt", "best.json")
    }
    assert json.loads(want["best.json"])["selected_by"] == "kid"
    colleague = tmp_path / "colleague"
    colleague.mkdir()
    dvc(colleague, "artifacts", "get", str(server), ARTIFACT, "-o", "by-name")
    dvc(colleague, "artifacts", "get", str(server), ARTIFACT, "--rev", VERSION, "-o", "by-version")
    dvc(colleague, "get", str(server), "models/best", "-o", "by-path")
    for folder in ("by-name", "by-version", "by-path"):
        assert {f.name: f.read_bytes() for f in (colleague / folder).iterdir()} == want, folder
    assert dvc_api.artifacts_show(ARTIFACT, repo=str(server))["path"] == "models/best"


def test_exp_apply_brings_the_chosen_run_and_its_own_checkpoints(swept, tmp_path):
    repo, committed = swept
    name = next(
        n for n, e in _experiments(repo).items() if e["params"]["train"]["model"] == SWEEP[1]
    )
    dvc(repo, "exp", "apply", name)
    assert _params(repo) == deep_merge(committed, {"train": {"model": SWEEP[1]}})
    last = torch.load(
        repo / "models" / "checkpoints" / "last.pt", weights_only=True, map_location="cpu"
    )
    run = last["run_params"]
    assert run["model"] == SWEEP[1] and run["lr"] == EDITS["train"]["lr"]
    assert set(last["nets"]) == {"G", "D", "F"}  # CUT's own nets, no CycleGAN leftovers
    epochs = committed["train"]["epochs"] + committed["train"]["epochs_decay"]
    assert (
        last["epoch"] == epochs and len(last["history"]) == epochs
    )  # trained afresh, no leftover epochs
    best = torch.load(
        repo / "models" / "best" / "generators.pt", weights_only=True, map_location="cpu"
    )
    assert best["model"]["kind"] == SWEEP[1] and "G_BA" not in best
