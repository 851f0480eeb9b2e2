"""End to end: the real `dvc repro` of the whole DAG in a fresh git copy of the project, tiny params."""
import json
import shutil

import pandas as pd
import pytest
import yaml

from tests.helpers import TINY, clone_project, dvc


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = clone_project(tmp_path_factory.mktemp("e2e") / "project", TINY)
    dvc(dest, "repro")
    return dest


def test_repro_runs_every_stage_and_leaves_nothing_to_do(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    expected = {f"fetch@{d}" for d in yaml.safe_load((project / "params.yaml").read_text())["domains"]}
    expected |= {name for name in stages if name != "fetch"}
    assert set(lock) == expected
    status = dvc(project, "status", "--json")
    assert json.loads(status.stdout or "{}") == {}
    again = dvc(project, "repro")
    assert "didn't change, skipping" in again.stdout or "Data and pipelines are up to date" in again.stdout


def test_raw_domains_match_their_manifests(project):
    for domain in ("a", "b"):
        folder = project / "data" / "raw" / domain
        manifest = pd.read_csv(folder / "manifest.csv")
        assert len(manifest) == TINY["domains"][domain]["count"]
        assert sorted(manifest.file) == sorted(p.name for p in folder.glob("*.png"))


def test_prepared_dataset(project):
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    files = sorted(p.relative_to(project / "data" / "prepared").as_posix()
                   for p in (project / "data" / "prepared").glob("*/*.png"))
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
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
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
    epochs = TINY["train"]["epochs"] + TINY["train"]["epochs_decay"]
    assert page.count("<img") == 2 * epochs           # a training sample and an evaluate grid per epoch
    assert "G_A" in page and "cycle_A" in page          # the loss curves


def test_prepared_folder_is_a_view_of_the_tracked_tar(project, tmp_path):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert [o["path"] for o in lock["prepare"]["outs"]] == ["data/prepared.tar", "metrics/prepare.json"]
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    shutil.rmtree(copy / "data" / "prepared")
    assert json.loads(dvc(copy, "status", "--json").stdout or "{}") == {}   # the view is not tracked
    dvc(copy, "repro", "-f", "-s", "evaluate")                              # a stage that reads it
    assert sorted((copy / "data" / "prepared").rglob("*.png")) and \
        (copy / "data" / "prepared" / "manifest.csv").read_bytes() == \
        (project / "data" / "prepared" / "manifest.csv").read_bytes()
