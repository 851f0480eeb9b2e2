"""`make repro`'s wrapper (unpaired/repro.py) after a failed or interrupted `dvc repro` (issue 24):
real DVC in a small git project whose one stage's outputs have every kind DVC has (a cached folder,
a `persist: true` folder, `cache: false` files and folders), real signals, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, VENV_BIN, dvc, env, run

# The stage: `python make.py`, whose behaviour `mode.txt` (a dep) chooses; every run writes each
# output atomically (as the project's stages do), then `finished` next to them (not an output).
MAKE = """
import os, sys, time
from pathlib import Path
mode = Path("mode.txt").read_text().split()
version = mode[1] if len(mode) > 1 else "1"

def folder(path, files):
    tmp = Path(f".{path}.tmp")
    tmp.mkdir()
    for name, text in files.items():
        (tmp / name).write_text(text)
    os.replace(tmp, path) if not Path(path).exists() else (os.rename(path, f".{path}.old"), os.replace(tmp, path))

Path("started").write_text(str(os.getpid()))
if mode[0] == "slow":
    time.sleep(120)
if mode[0] == "fail":
    print("error: params.yaml: x.y: must be > 0, got -1", file=sys.stderr)
    sys.exit(2)
if mode[0] == "grow_then_fail":                  # a resumable run's new checkpoint, then an error
    Path("keep/new.pt").write_text("unrecorded")
    print("error: params.yaml: x.y: must be > 0, got -1", file=sys.stderr)
    sys.exit(2)
if mode[0] == "partial_then_fail":               # a `cache: false` folder left with 3 of its 10 files
    Path("plots").mkdir()
    for i in range(3):
        Path(f"plots/{i}.tsv").write_text(f"step\\tloss\\n0\\t{i}\\n")
    sys.exit(1)
Path("keep").mkdir(exist_ok=True)
Path(f"keep/{version}.pt").write_text(version)
folder("out", {f"{i}.txt": f"out {i} v{version}\\n" for i in range(3)})
folder("big", {f"{i:05d}.txt": f"{i} v{version}\\n" for i in range(int(os.environ.get("BIG", "20")))})
folder("plots", {f"{i}.tsv": f"step\\tloss\\n0\\t{i} v{version}\\n" for i in range(10)})
Path("m.json").write_text(f'{{"v": "{version}"}}\\n')
Path("finished").write_text("")
"""

DVC_YAML = """stages:
  s:
    cmd: python make.py
    deps: [make.py, mode.txt]
    outs:
      - out
      - big
      - keep:
          persist: true
      - plots:
          cache: false
      - m.json:
          cache: false
"""

OUTPUTS = ["out", "big", "plots", "m.json"]  # all but the persist one


def mini(root: Path) -> Path:
    """The small project at `root`, run once (dvc.lock and the DVC cache hold version 1)."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text("domains: {}\nprepare: {}\ntrain: {}\nevaluate: {}\n")
    (root / "make.py").write_text(MAKE)
    (root / "mode.txt").write_text("ok 1\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / ".gitignore").write_text("started\nfinished\n")
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        [str(VENV_BIN / "dvc"), "init", "-q"],
        [str(VENV_BIN / "dvc"), "config", "core.autostage", "false"],
    ):
        run(cmd, cwd=root)
    dvc(root, "repro")
    for cmd in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1"],
    ):
        run(cmd, cwd=root)
    return root


def tree_bytes(root: Path, paths) -> dict[str, bytes]:
    out = {}
    for path in paths:
        p = root / path
        for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
            out[f.relative_to(root).as_posix()] = f.read_bytes()
    return out


def repro(root: Path, *args) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "python"), "-m", "unpaired.repro", *args], cwd=root, check=False)


def status(root: Path) -> dict:
    return json.loads(dvc(root, "status", "--json").stdout or "{}")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return mini(tmp_path_factory.mktemp("mini") / "project")


@pytest.fixture
def project(built, tmp_path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def set_mode(root: Path, mode: str) -> None:
    (root / "mode.txt").write_text(mode + "\n")
    for name in ("started", "finished"):
        (root / name).unlink(missing_ok=True)


def only_the_users_change(root: Path) -> bool:
    """`dvc status` names mode.txt (the dep the test changed, as a user changes a param) and, at
    most, the persist output a run may have grown: no output of the put-back kinds."""
    got = status(root).get("s", [])
    outs = [entry["changed outs"] for entry in got if "changed outs" in entry]
    return {"changed deps": {"mode.txt": "modified"}} in got and all(
        set(o) <= {"keep"} for o in outs
    )


# --- 24.1: put back by output path; a persist output is never touched ---------------------------------


def test_a_persist_output_dvc_has_not_recorded_never_stops_the_put_back(project):
    """The stage adds a checkpoint to its persist folder, then fails. `dvc checkout <stage>` refused
    ("Can't remove the following unsaved files", the persist folder's new file): out/ and big/ stayed
    missing, and the command the last line named failed the same way. By path, they are back, and
    the new checkpoint is where the run left it."""
    before = tree_bytes(project, OUTPUTS)
    set_mode(project, "grow_then_fail 2")
    proc = repro(project)
    assert proc.returncode != 0
    assert last_line(proc) == (
        "error: params.yaml: x.y: must be > 0, got -1; kept the previous plots, "
        "m.json, out, big (put back as dvc.lock records them)"
    ), proc.stderr
    assert tree_bytes(project, OUTPUTS) == before
    assert (project / "keep" / "new.pt").read_text() == "unrecorded"
    assert only_the_users_change(project)
    assert not (project / ".dvc" / "tmp" / "repro-kept").exists()


def test_the_command_named_for_outputs_not_in_the_cache_works(project, tmp_path):
    """Without the DVC cache the outputs cannot be put back: the last line names a command by
    output path, and once the cache is back (a `dvc pull`) that command restores them even though
    the persist folder holds a file DVC has not recorded (by stage it refused)."""
    before = tree_bytes(project, OUTPUTS)
    shutil.move(project / ".dvc" / "cache", tmp_path / "cache")
    set_mode(project, "grow_then_fail 2")
    proc = repro(project)
    assert last_line(proc).endswith(
        "the previous out, big could not be restored (not in the DVC cache): "
        "run `uv run dvc checkout out big` (or `uv run dvc pull out big`)"
    ), proc.stderr
    assert not (project / "out").exists() and (project / "keep" / "new.pt").exists()
    shutil.move(tmp_path / "cache", project / ".dvc" / "cache")
    dvc(project, "checkout", "out", "big")
    assert tree_bytes(project, OUTPUTS) == before


# --- 24.2: every kept copy that differs from what is on disk is put back ------------------------------


def test_a_half_removed_cache_false_folder_is_put_back(project):
    """plots/ (`cache: false`) left with 3 of its 10 files (DVC interrupted while it deleted them,
    or a stage that stopped half-way): it existed, so it was not restored."""
    before = tree_bytes(project, OUTPUTS)
    set_mode(project, "partial_then_fail 2")
    proc = repro(project)
    assert proc.returncode != 0 and "kept the previous plots" in last_line(proc), proc.stderr
    assert tree_bytes(project, OUTPUTS) == before
    assert only_the_users_change(project)


# --- 24.12: the stage's error line once ---------------------------------------------------------------


def test_the_stages_error_line_is_printed_once(project):
    """The stage's `error: ` line came through dvc's stderr, and the wrapper's last line repeated it."""
    set_mode(project, "fail 2")
    proc = repro(project)
    both = proc.stdout + proc.stderr
    assert both.count("x.y: must be > 0, got -1") == 1, both
    assert last_line(proc).startswith(
        "error: params.yaml: x.y: must be > 0, got -1; kept the previous "
    )


# --- 24.3: Ctrl-C while DVC records a finished stage ---------------------------------------------------


def pid_of(root: Path, *words: str) -> int | None:
    """PID of a process working in `root` whose command line holds `words` in order, or None."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == root:
                    argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                    if any(argv[i : i + len(words)] == list(words) for i in range(len(argv))):
                        return int(entry.name)
            except OSError:
                continue
    return None


def children(pid: int) -> list[int]:
    """Every process whose parent is `pid`, zombies (not yet reaped by it) included."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return kids


def test_ctrl_c_while_dvc_records_a_finished_stage_puts_the_previous_outputs_back(project):
    """The stage finished (its new outputs are written), then Ctrl-C while DVC hashes and records
    them (big/ has 3,000 files: about 2 s here). The new outputs stayed, unrecorded, without a word
    (`dvc status`: modified outs). Now the previous ones are back, the last line says so, and
    `dvc status` names only the changed dep."""
    from tests.test_pipeline import Live, no_process_left

    before = tree_bytes(project, OUTPUTS)
    set_mode(project, "ok 2")
    os.environ["BIG"] = "3000"  # read by the stage, through dvc
    try:
        live = Live(project)
    finally:
        del os.environ["BIG"]
    deadline = time.monotonic() + 120
    dvc_pid = None
    while dvc_pid is None and live.proc.poll() is None and time.monotonic() < deadline:
        dvc_pid = pid_of(project, "-m", "dvc", "repro")
    while (
        not (project / "finished").exists()
        and live.proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    # DVC ignores SIGINT until it has reaped the stage's command (dvc/stage/run.py); then it records
    while children(dvc_pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert "nfiles: 3000" not in (project / "dvc.lock").read_text(), "DVC recorded it already"
    live.signal(signal.SIGINT)  # the stage is done: DVC is recording it
    code, out = live.finish()
    assert code == 130, out
    assert out.strip().splitlines()[-1] == (
        "error: interrupted; kept the previous plots, m.json, out, big "
        "(put back as dvc.lock records them)"
    ), out
    assert tree_bytes(project, OUTPUTS) == before
    assert only_the_users_change(project)
    assert no_process_left(project)


def test_dvcs_rwlock_left_half_written_is_repaired(project):
    """DVC rewrites .dvc/tmp/rwlock in place: Ctrl-C (or a kill) between its truncation and its
    write leaves it empty, and every dvc command after refuses ("Unable to read RWLock-file"), the
    wrapper's put-back included. The next run (and the run whose dvc it was) removes it."""
    (project / ".dvc" / "tmp" / "rwlock").write_text("")
    set_mode(project, "ok 1")  # nothing to run: the outputs are version 1
    proc = repro(project)
    assert proc.returncode == 0, proc.stderr
    assert "repro: removed .dvc/tmp/rwlock, left half-written by the interrupted dvc" in proc.stderr
    assert status(project) == {}


# --- 24.6: a kill -9 of make or of `uv run` reaches every process of the run ---------------------------


def makefile_command(project: Path) -> list[str]:
    """`make repro` with the project's Makefile: its setup step (uv sync) skipped (-o), and the
    interpreter it would find through uv given (this environment's)."""
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    return ["make", "-s", "-o", "setup", "repro", f"VENV_PYTHON={VENV_BIN / 'python'}"]


@pytest.mark.parametrize("outer", ["make", "uv run"])
def test_kill_9_of_the_command_the_user_started_stops_the_whole_run(project, outer):
    """`make repro` (make -> the wrapper -> dvc -> the stage) and `uv run python -m unpaired.repro`
    (uv -> the wrapper -> ...): a kill -9 of make or of uv left the wrapper, dvc and the stage running
    on. Now the wrapper gets SIGTERM when its parent dies, stops dvc and the stage, puts the outputs
    back and says so. PATH here lacks the environment (no `uv run` sets it): the wrapper does."""
    uv = shutil.which("uv")
    if outer == "uv run" and uv is None:
        pytest.skip("uv is not on PATH")
    before = tree_bytes(project, OUTPUTS)
    set_mode(project, "slow 2")
    command = (
        makefile_command(project)
        if outer == "make"
        else [
            uv,
            "run",
            "--no-project",
            "--python",
            str(VENV_BIN / "python"),
            "python",
            "-m",
            "unpaired.repro",
        ]
    )
    clean = {
        **env(),
        "PATH": os.pathsep.join(
            p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN
        ),
    }
    clean.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen(
        command,
        cwd=project,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while (
        not (project / "started").exists() and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # the outermost process, alone
    proc.wait(10)
    out = proc.stdout.read().decode()  # until the last writer (the wrapper) is gone
    from tests.test_pipeline import no_process_left

    assert no_process_left(project, timeout=30), out
    assert out.strip().splitlines()[-1] == (
        "error: interrupted; kept the previous plots, m.json, out, big "
        "(put back as dvc.lock records them)"
    ), out
    assert tree_bytes(project, OUTPUTS) == before
    assert only_the_users_change(project)
    assert not (project / ".dvc" / "tmp" / "repro-kept").exists()


def test_kill_9_of_dvc_stops_its_stage(project):
    """A kill -9 of `dvc repro` itself (between the wrapper and the stage) left the stage running on,
    and the wrapper waiting for it (the stage held dvc's stderr pipe) until it ended and wrote its
    new outputs. Now the wrapper stops what is left of dvc's process group and puts the outputs back."""
    from tests.test_pipeline import Live, no_process_left

    before = tree_bytes(project, OUTPUTS)
    set_mode(project, "slow 2")
    live = Live(project)
    deadline = time.monotonic() + 120
    while (
        not (project / "started").exists()
        and live.proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    os.kill(pid_of(project, "-m", "dvc", "repro"), signal.SIGKILL)
    code, out = live.finish(timeout=60)
    assert code == 1, out
    assert out.strip().splitlines()[-1] == (
        "error: `dvc repro` was killed by SIGKILL; kept the previous plots, "
        "m.json, out, big (put back as dvc.lock records them)"
    ), out
    assert no_process_left(project)
    assert tree_bytes(project, OUTPUTS) == before
    assert only_the_users_change(project)
