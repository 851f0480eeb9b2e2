"""What `dvc metrics show`, `dvc exp show` and `dvc plots show` give after a real pipeline run in a
throw-away clone (tests/helpers.py): the comparison a user wants first, no prose as metrics, one set
of sample grids, and DVC's rendered plots kept out of git."""

import json

import pytest
import yaml

from tests.helpers import TINY, clone_project, deep_merge, dvc, run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = clone_project(
        tmp_path_factory.mktemp("views") / "p", deep_merge(TINY, {"evaluate": {"metrics": "off"}})
    )
    dvc(dest, "repro")
    return dest


def test_declared_outputs_exist_and_status_is_clean(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "metrics/test_set" in stages["evaluate"]["outs"]  # the whole test set's page
    assert (project / "metrics" / "test_set" / "index.html").is_file()
    for name in ("prepare", "train", "evaluate"):
        for kind in ("outs", "metrics", "plots"):
            for entry in stages[name].get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                assert (project / path).exists(), f"{name}: {path}"
    assert "up to date" in dvc(project, "status").stdout


def test_metrics_are_numbers_with_evaluation_first(project):
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]  # keyed by "" (the workspace)
    assert list(files) == ["metrics/eval.json", "metrics/train/metrics.json"]  # no prepare counters
    for name, entry in files.items():
        for key, value in entry["data"].items():
            assert isinstance(value, (int, float)), f"{name}: {key} = {value!r} is not a number"
    assert files["metrics/eval.json"]["data"]["best_epoch"] == 2
    header = dvc(project, "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    first = header[header.index("Created") + 2 :][:3]  # after Experiment, rev, typ, Created, parent
    assert first == ["best_epoch", "best_is_fallback", "epochs"], header
    assert header.index("G_A") < header.index("preset")  # final losses before the params
    assert not any(c.startswith(("kept.", "skipped.", "total_")) for c in header)
    info = json.loads((project / "metrics" / "eval_info.json").read_text())
    assert "evaluate.metrics is off" in info["best_reason"]


def test_plots_show_one_set_of_grids_and_no_empty_plot(project):
    shown = json.loads(dvc(project, "plots", "show", "--json").stdout)
    assert not shown.get("errors")
    names = list(shown["data"])
    images = [n for n in names if n.endswith(".png")]
    assert images == ["metrics/eval_plots/samples_best_epoch.png"], names
    assert all(shown["data"][n] for n in names)  # every declared plot has data
    assert not any("eval_epochs" in n for n in names)  # FID/KID skipped: no FID/KID plot
    dvc(project, "plots", "show")  # writes dvc_plots/index.html
    assert (project / "dvc_plots" / "index.html").is_file()
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project).stdout
    assert "dvc_plots" not in status
