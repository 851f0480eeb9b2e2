"""End to end: the real `dvc repro` of the whole DAG in a fresh git copy of the project, tiny params."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from ruamel.yaml import YAML

from tests.helpers import TINY, VENV_BIN, clone_project, dvc, env, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = clone_project(tmp_path_factory.mktemp("e2e") / "project", TINY)
    dvc(dest, "repro")
    return dest


def test_repro_runs_every_stage_and_leaves_nothing_to_do(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    expected = {
        f"fetch@{d}" for d in yaml.safe_load((project / "params.yaml").read_text())["domains"]
    }
    expected |= {name for name in stages if name != "fetch"}
    assert set(lock) == expected
    status = dvc(project, "status", "--json")
    assert json.loads(status.stdout or "{}") == {}
    again = dvc(project, "repro")
    assert (
        "didn't change, skipping" in again.stdout
        or "Data and pipelines are up to date" in again.stdout
    )


def test_raw_domains_match_their_manifests(project):
    for domain in ("a", "b"):
        folder = project / "data" / "raw" / domain
        manifest = pd.read_csv(folder / "manifest.csv")
        assert len(manifest) == TINY["domains"][domain]["count"]
        assert sorted(manifest.file) == sorted(p.name for p in folder.glob("*.png"))


def test_prepared_dataset(project):
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    files = sorted(
        p.relative_to(project / "data" / "prepared").as_posix()
        for p in (project / "data" / "prepared").glob("*/*.png")
    )
    assert sorted(manifest.file) == files
    assert {f.split("/")[0] for f in files} == {"trainA", "trainB", "testA", "testB"}
    report = json.loads((project / "metrics" / "prepare.json").read_text())
    assert report["total_kept"] == len(files) == 24 and report["total_skipped"] == 0


def test_param_change_reruns_only_what_depends_on_it(project, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["train"]["epochs"] += 1
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "train.epochs" in dvc(copy, "params", "diff").stdout
    out = dvc(copy, "repro").stdout
    ran = sorted(
        line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")
    )
    assert ran == ["evaluate", "train"], out
    params["domains"]["b"]["seed"] += 1
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(copy, "repro").stdout
    assert "Running stage 'fetch@b'" in out
    assert "Running stage 'fetch@a'" not in out
    assert "Running stage 'prepare'" in out


def test_dvc_plots_render_curves_and_images(project, tmp_path):
    out = tmp_path / "plots"
    dvc(project, "plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    # One image: the best epoch's grid (metrics/eval_plots). The per-epoch grids are in the report;
    # the training samples duplicate them, so neither is declared as a plot (tests/test_dvc_views.py).
    assert page.count("<img") == 1 and "best_epoch.png" in page
    assert "G_A" in page and "cycle_A" in page  # the loss curves


TEXT_SUFFIXES = {".json", ".csv", ".html", ".tsv", ".yaml", ".lock", ".md", ".txt", ".svg"}


def test_tracked_artifacts_hold_no_host_facts(project, tmp_path):
    """A run of prepare, train and evaluate that scores FID/KID offline (evaluate.metrics: required:
    the bundled Inception weights), with HOME in a folder of its own and no TORCH_HOME: no tracked
    artifact (every DVC output in dvc.lock, and dvc.lock) holds that home folder or the user's, the
    clone's or the venv's absolute path, or (in text files) the host name. Those go to the console."""

    def edit(params):  # enough test images for FID/KID (>= 2 per domain): prepare and train run too
        params["evaluate"]["metrics"] = "required"
        params["prepare"]["test_fraction"] = 0.5

    copy = copy_with(project, tmp_path, edit)
    home = tmp_path / "home-of-someone"
    home.mkdir()
    environment = {**env(), "HOME": str(home)}
    environment.pop("TORCH_HOME", None)
    proc = subprocess.run(
        [str(VENV_BIN / "dvc"), "repro"], cwd=copy, env=environment, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "Running stage 'evaluate'" in proc.stdout
        and "FID/KID: the bundled Inception weights" in proc.stdout
    )
    numbers = json.loads((copy / "metrics" / "eval.json").read_text())
    assert (
        numbers["best_is_fallback"] is False and numbers["fid"] > 0 and numbers["kid"] is not None
    )
    assert "skipped" not in (copy / "metrics" / "eval_epochs.csv").read_text()
    lock = yaml.safe_load((copy / "dvc.lock").read_text())["stages"]
    files = [copy / "dvc.lock"]
    for entry in lock.values():
        for out in entry.get("outs", []):
            path = copy / out["path"]
            files += sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    hosts = {str(home), str(Path.home()), str(project), str(copy), str(VENV_BIN.parent)}
    name = re.compile(rf"\b{re.escape(socket.gethostname())}\b")
    leaks = []
    for f in files:
        data = f.read_bytes()
        leaks += [f"{f.relative_to(copy)}: {h}" for h in hosts if h.encode() in data]
        if f.suffix in TEXT_SUFFIXES and name.search(data.decode()):
            leaks.append(f"{f.relative_to(copy)}: host name {socket.gethostname()}")
    assert len(files) > 20 and leaks == []


def test_prepared_folder_is_a_view_of_the_tracked_tar(project, tmp_path):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert [o["path"] for o in lock["prepare"]["outs"]] == [
        "data/prepared.tar",
        "metrics/data",
        "metrics/prepare.json",
    ]
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    shutil.rmtree(copy / "data" / "prepared")
    assert json.loads(dvc(copy, "status", "--json").stdout or "{}") == {}  # the view is not tracked
    dvc(copy, "repro", "-f", "-s", "evaluate")  # a stage that reads it
    assert (
        sorted((copy / "data" / "prepared").rglob("*.png"))
        and (copy / "data" / "prepared" / "manifest.csv").read_bytes()
        == (project / "data" / "prepared" / "manifest.csv").read_bytes()
    )


def copy_with(project, tmp_path, edit):
    """A copy of the run project (outputs, dvc.lock, DVC cache) with params.yaml edited by `edit`."""
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    params = YAML(typ="safe").load((copy / "params.yaml").read_text())
    edit(params)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return copy


def tree_bytes(root, paths):
    """{relative path: bytes} of every file under `paths` (files or folders)."""
    out = {}
    for path in paths:
        p = root / path
        for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
            out[f.relative_to(root).as_posix()] = f.read_bytes()
    return out


def test_changing_an_image_size_really_reruns(project, tmp_path):
    """DVC's run cache leaves keys named `size` out of its key: with `prepare.size` it answered a
    change from the cache ("is cached - skipping run") with the old 32-px images."""

    def smaller(p):
        p["domains"]["a"]["image_size"] = 24
        p["prepare"]["image_size"] = 24

    copy = copy_with(project, tmp_path, smaller)
    out = dvc(copy, "repro", "prepare").stdout
    assert "Running stage 'fetch@a'" in out and "Running stage 'prepare'" in out, out
    assert "cached" not in out, out
    assert {Image.open(f).size for f in (copy / "data" / "raw" / "a").glob("*.png")} == {(24, 24)}
    assert {Image.open(f).size for f in (copy / "data" / "prepared").glob("*/*.png")} == {(24, 24)}


def set_key(dotted, value):
    def edit(params):
        *parents, last = dotted.split(".")
        node = params
        for k in parents:
            node = node[k]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return edit


def deleted_by_dvc(project, stage):
    """The outputs dvc.lock records for `stage` that `dvc repro` deletes before running it: all but
    those dvc.yaml declares `persist: true`."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage.split("@")[0]]
    spec = spec.get("do", spec)
    persist = {
        path
        for section in ("outs", "metrics", "plots")
        for item in spec.get(section) or []
        if isinstance(item, dict)
        for path, opts in item.items()
        if (opts or {}).get("persist")
    }
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]
    return [o["path"] for o in lock["outs"] if o["path"] not in persist]


def repro(project, *args, check=False):
    """`make repro`'s command (python -m unpaired.repro: params check, dvc repro, dvc checkout after a
    failure) in `project`, with this venv."""
    return run([str(VENV_BIN / "python"), "-m", "unpaired.repro", *args], cwd=project, check=check)


@pytest.mark.parametrize(
    "stage, key, value",
    [
        ("fetch@a", "domains.a.count", -3),
        ("prepare", "prepare.test_fraction", 1.5),
        ("train", "train.lr", -1.0),
        ("evaluate", "evaluate.kid_subsets", -1),
    ],
)
def test_a_failed_stage_keeps_its_previous_outputs(project, tmp_path, stage, key, value):
    """Under `dvc repro`, DVC deletes a stage's outputs before running it: a failed run used to
    leave none. Through `make repro` they are back, byte for byte (dvc checkout, and the `cache:
    false` metrics from the copy kept aside), and `dvc status` names only the changed param."""
    outputs = deleted_by_dvc(project, stage)
    assert outputs
    before = tree_bytes(project, outputs)
    copy = copy_with(project, tmp_path, set_key(key, value))
    proc = repro(copy, stage)
    assert proc.returncode != 0
    assert f"params.yaml: {key}: " in proc.stderr and "kept the previous" in proc.stderr, (
        proc.stderr
    )
    assert (proc.stdout + proc.stderr).count(f"params.yaml: {key}: ") == 1, (
        proc.stderr
    )  # issue 24.12
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: params.yaml: {key}: ") and "kept the previous" in last, (
        proc.stderr
    )
    assert tree_bytes(copy, outputs) == before
    status = json.loads(dvc(copy, "status", "--json", stage).stdout or "{}")
    assert status == {
        stage: [{"changed deps": {"params.yaml": {key.rsplit(".", 1)[0]: "modified"}}}]
    }
    assert not (copy / ".dvc" / "tmp" / "repro-kept").exists()


def test_a_failed_stage_without_cache_says_how_to_get_the_outputs_back(project, tmp_path):
    copy = copy_with(project, tmp_path, set_key("domains.a.count", -3))
    shutil.rmtree(copy / ".dvc" / "cache")
    proc = repro(copy, "fetch@a")
    assert proc.returncode != 0
    assert (
        "params.yaml: domains.a.count: must be > 0, got -3; the previous data/raw/a could not be "
        "restored (not in the DVC cache): run `uv run dvc checkout data/raw/a`"
    ) in proc.stderr


def test_evaluates_outputs_come_back_though_its_persist_cache_grew(project, tmp_path):
    """Issue 24.1: models/eval_cache (persist) holds a file DVC has not recorded (an interrupted
    evaluate's new entry), then evaluate fails: `dvc checkout evaluate` refused for that file, and
    models/best, metrics/samples, metrics/test_set, metrics/report.html, metrics/eval_plots stayed
    missing. Put back by output path they are back, and the cache's new file is where it was."""
    outputs = deleted_by_dvc(project, "evaluate")
    before = tree_bytes(project, outputs)
    copy = copy_with(project, tmp_path, set_key("evaluate.kid_subsets", -1))
    (copy / "models" / "eval_cache" / "unrecorded.json").write_text("{}")
    proc = repro(copy, "evaluate")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: params.yaml: evaluate.kid_subsets: ")
        and "kept the previous" in last
    ), proc.stderr
    for path in (
        "models/best",
        "metrics/samples",
        "metrics/test_set",
        "metrics/report.html",
        "metrics/eval_plots",
    ):
        assert path in last
    assert tree_bytes(copy, outputs) == before
    assert (copy / "models" / "eval_cache" / "unrecorded.json").read_text() == "{}"


def test_more_train_devices_than_cores_after_an_interrupted_run_keeps_trains_outputs(
    project, tmp_path
):
    """Issue 24.1/24.5: models/checkpoints (persist) holds a file DVC has not recorded (an earlier
    interrupted training), and train.devices asks for more processes than there are cores: one line
    naming train.devices, before any worker starts, and train's outputs are back (by stage, `dvc
    checkout train` refused for the checkpoint)."""
    from unpaired.threads import cpu_count

    outputs = deleted_by_dvc(project, "train")
    before = tree_bytes(project, outputs)
    copy = copy_with(project, tmp_path, set_key("train.devices", cpu_count() + 1))
    (copy / "models" / "checkpoints" / "epoch_099.pt").write_bytes(b"an interrupted run's")
    proc = repro(copy, "train")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(
            f"error: params.yaml: train.devices: {cpu_count() + 1} processes requested but only "
            f"{cpu_count()} CPU core(s) here"
        )
        and "kept the previous" in last
    ), proc.stderr
    assert "rank" not in proc.stderr
    assert tree_bytes(copy, outputs) == before
    assert (copy / "models" / "checkpoints" / "epoch_099.pt").exists()


def test_plain_dvc_repro_leaves_the_restore_to_dvc_checkout(project, tmp_path):
    """Plain `dvc repro` no longer restores anything (DVC's own behaviour, README: run `uv run dvc
    checkout` after a failure), and that command does bring the outputs back."""
    before = tree_bytes(project, ["data/raw/a"])
    copy = copy_with(project, tmp_path, set_key("domains.a.count", -3))
    assert dvc(copy, "repro", "fetch@a", check=False).returncode != 0
    assert not (copy / "data" / "raw" / "a").exists()
    dvc(copy, "checkout", "fetch@a")
    assert tree_bytes(copy, ["data/raw/a"]) == before


KNOWN = "archive, doodles, flares, folder, kaggle, quickdraw, stylegan, web"


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "flickr",
            f"error: params.yaml: domains.a.source: unknown source 'flickr'; known sources: {KNOWN}",
        ),
        (None, f"error: params.yaml: domains.a.source: required; one of: {KNOWN}"),
    ],
)
def test_unknown_or_missing_source_is_the_products_line(project, tmp_path, value, message):
    """dvc.yaml depended on unpaired/sources/${item.source}.py: DVC failed first, with a path error
    or "Could not find 'item.source'"."""
    before = tree_bytes(project, ["data/raw/a"])
    copy = copy_with(project, tmp_path, set_key("domains.a.source", value))
    proc = repro(copy, "fetch@a")  # make repro: the previous data/raw/a is put back
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stdout + proc.stderr
    assert "No such file" not in proc.stderr and "item.source" not in proc.stderr
    assert tree_bytes(copy, ["data/raw/a"]) == before


def test_a_failed_exp_run_changed_only_its_override_and_says_how_to_get_params_yaml_back(
    project, tmp_path
):
    """`dvc exp run -S key=value` writes exactly that key into params.yaml (DVC's Hydra composition
    is off: it rewrote every key from conf/); when a stage then fails, the error says how to get the
    committed file back."""
    copy = copy_with(project, tmp_path, lambda p: None)
    for cmd in (["add", "-A"], ["commit", "-qm", "the run"]):  # a user's committed baseline
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=copy, check=True
        )
    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=copy, capture_output=True, text=True, check=True
    ).stdout
    proc = dvc(copy, "exp", "run", "-S", "domains.a.count=-3", check=False)
    assert proc.returncode != 0
    assert "params.yaml: domains.a.count" in proc.stderr
    assert (
        "`dvc exp run -S` wrote its overrides into params.yaml and removed the failed stage's "
        "outputs: `git checkout params.yaml` restores the committed params, then `git checkout "
        "metrics && uv run dvc checkout` the outputs" in " ".join(proc.stderr.split())
    )
    expected = YAML(typ="safe").load(committed)
    expected["domains"]["a"]["count"] = -3
    assert YAML(typ="safe").load((copy / "params.yaml").read_text()) == expected
    subprocess.run(["git", "checkout", "params.yaml"], cwd=copy, check=True)
    assert (copy / "params.yaml").read_text() == committed
    subprocess.run(["git", "checkout", "metrics"], cwd=copy, check=True)
    dvc(copy, "checkout")
    assert json.loads(dvc(copy, "status", "--json").stdout or "{}") == {}  # as committed again


# --- issue 17.2: interrupted runs, with real signals on real processes -----------------------------


class Live:
    """`python -m unpaired.repro ARGS` in a session of its own (its process group is what a terminal's
    Ctrl-C reaches), its output (stdout and stderr together) read as it comes."""

    def __init__(self, project, *args):
        import subprocess
        import threading

        self.project = project
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", "unpaired.repro", *args],
            cwd=project,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            with self.changed:
                self.lines.append(raw.decode(errors="replace"))
                self.changed.notify_all()

    def wait_for(self, text, timeout=120):
        with self.changed:
            assert self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                timeout,
            ), "".join(self.lines)
        assert any(text in line for line in self.lines), "".join(self.lines)

    def signal(self, sig):
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout=120):
        self.proc.wait(timeout)
        self.reader.join(timeout)
        return self.proc.returncode, "".join(self.lines)


def processes_in(project):
    """PIDs of the processes whose working directory is inside `project` (dvc, a stage, a watchdog)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if cwd == project or project in cwd.parents:
                found.append(int(entry.name))
    return found


def no_process_left(project, timeout=20.0):
    deadline = time.monotonic() + timeout
    while processes_in(project) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes_in(project) == []


def evaluate_outputs(project):
    return deleted_by_dvc(project, "evaluate")


def leftovers(project):
    """The wrapper's folder and any temporary (files.TEMPORARY) next to or inside an output."""
    from unpaired.files import TEMPORARY

    found = [p for p in [project / ".dvc" / "tmp" / "repro-kept"] if p.exists()]
    for folder in ("data", "models", "metrics"):
        found += [p for p in (project / folder).rglob("*") if TEMPORARY.fullmatch(p.name)]
    return found


def ctrl_c_while_evaluate_imports(project, tmp_path):
    """A copy of the run project, `repro -f -s evaluate` started there and one Ctrl-C (SIGINT to its
    process group) while evaluate still imports torch: (copy, evaluate's outputs, their bytes before,
    the Live run)."""
    copy = copy_with(project, tmp_path, lambda p: None)
    outputs = evaluate_outputs(copy)
    before = tree_bytes(copy, outputs)
    live = Live(copy, "-f", "-s", "evaluate")
    live.wait_for("> python -m stages.evaluate")
    time.sleep(0.5)  # torch is still loading
    live.signal(signal.SIGINT)
    return copy, outputs, before, live


def test_ctrl_c_during_the_stages_imports_keeps_the_previous_outputs(project, tmp_path):
    """Ctrl-C (SIGINT to the process group) while evaluate is still importing: DVC has already deleted
    its outputs; they are back, and the last line says so."""
    copy, outputs, before, live = ctrl_c_while_evaluate_imports(project, tmp_path)
    code, out = live.finish()
    assert code == 130, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; kept the previous ") and "models/best" in last, out
    assert tree_bytes(copy, outputs) == before
    assert json.loads(dvc(copy, "status", "--json").stdout or "{}") == {}
    assert no_process_left(copy) and leftovers(copy) == []


def test_a_second_ctrl_c_during_the_checkout_names_the_command(project, tmp_path):
    """Two Ctrl-C, the second while `dvc checkout` puts the outputs back: either they are back, or the
    last line names the command that brings them back, and that command does."""
    copy, outputs, before, live = ctrl_c_while_evaluate_imports(project, tmp_path)
    live.wait_for("repro: putting back the previous")
    live.signal(signal.SIGINT)
    code, out = live.finish()
    assert code == 130, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: interrupted"), out
    command = re.search(r"run `uv run (dvc checkout [^`]+)`", last)
    if command:
        assert "interrupted while `dvc checkout` put back the previous outputs" in last
        dvc(copy, *command[1].split()[1:])
    assert tree_bytes(copy, outputs) == before
    assert no_process_left(copy) and leftovers(copy) == []


@pytest.mark.parametrize("gap", [0.3, 1.5])
def test_a_double_ctrl_c_while_the_stage_imports_prints_no_traceback(project, tmp_path, gap):
    """Two Ctrl-C a moment apart while evaluate imports (the commonest double Ctrl-C): each process
    says one line at most, no traceback (the stage's, tqdm's atexit or DVC's), and the previous
    outputs are back."""
    copy, outputs, before, live = ctrl_c_while_evaluate_imports(project, tmp_path)
    time.sleep(gap)
    live.signal(signal.SIGINT)
    code, out = live.finish()
    assert code == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    after = out[out.index("> python -m stages.evaluate") :].strip().splitlines()[1:]
    said = [line for line in after if not re.match(r"[AMD] {7}", line)]  # dvc checkout's list
    assert len(said) <= 4, out  # the stage's line, DVC's, the put-back's and the wrapper's
    assert out.strip().splitlines()[-1].startswith("error: interrupted; kept the previous "), out
    assert tree_bytes(copy, outputs) == before
    assert no_process_left(copy) and leftovers(copy) == []


@pytest.mark.parametrize("moment", ["start", "imports", "checkout"])
def test_kill_9_at_any_moment_then_the_next_run_puts_everything_back(project, tmp_path, moment):
    """kill -9 of the wrapper's process group: at its start, while the stage imports, while `dvc
    checkout` runs. No process of the run survives it (dvc runs in a group of its own, whose watchdog
    sees the wrapper die), and the next run puts back what the killed one removed and leaves no
    temporary folder."""
    copy = copy_with(project, tmp_path, lambda p: None)
    outputs = evaluate_outputs(copy)
    before = tree_bytes(copy, outputs)
    live = Live(copy, "-f", "-s", "evaluate")
    if moment == "start":
        time.sleep(1.0)
    else:
        live.wait_for("> python -m stages.evaluate")
        time.sleep(0.5)
        if moment == "checkout":
            live.signal(signal.SIGINT)
            live.wait_for("repro: putting back the previous")
    live.signal(signal.SIGKILL)
    live.finish()
    assert no_process_left(copy)
    proc = repro(copy, "evaluate")  # evaluate's deps are unchanged: nothing to run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree_bytes(copy, outputs) == before
    assert json.loads(dvc(copy, "status", "--json").stdout or "{}") == {}
    assert leftovers(copy) == []


# --- issue 16: two runs on one machine give the same artifacts --------------------------------------

# Outputs that legitimately hold timing (images/s), which DESIGN.md puts in the dvclive metrics and
# the report only: the dvclive summary and curves (images_per_s) and the report's speed line.
TIMING = {"metrics/train/metrics.json", "metrics/train/plots/metrics", "metrics/report.html"}


def locked_outs(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {
        f"{stage}: {o['path']}": o["md5"]
        for stage, entry in lock.items()
        for o in entry.get("outs", [])
    }


def test_repro_f_gives_every_artifact_the_same_hash(project, tmp_path):
    """`dvc repro -f` after `dvc repro`: every output in dvc.lock has the same hash. The persistent
    outputs (checkpoints, the evaluation cache) are removed first, or train would resume with
    nothing left to train and evaluate would answer from its cache: this retrains from scratch."""
    copy = copy_with(project, tmp_path, lambda p: None)
    before = locked_outs(copy)
    shutil.rmtree(copy / "models" / "checkpoints")
    shutil.rmtree(copy / "models" / "eval_cache")
    dvc(copy, "repro", "-f")
    after = locked_outs(copy)
    assert set(after) == set(before)
    differ = sorted(key for key in before if before[key] != after[key])
    path = lambda key: key.split(": ", 1)[1]  # noqa: E731
    assert [k for k in differ if path(k) not in TIMING] == []
