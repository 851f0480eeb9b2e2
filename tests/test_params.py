from dataclasses import dataclass
from typing import Literal

import pytest

from tests.helpers import TRAIN_ARGS
from unpaired import params
from unpaired.params import Params, ParamsError, check, parse


@dataclass(frozen=True)
class Demo(Params):
    size: int = 64
    ratio: float = 0.5
    mode: Literal["crop", "pad"] = "crop"
    pair: tuple[int, int] = (1, 2)
    name: str | None = None
    flag: bool = False

    def validate(self, prefix: str) -> None:
        check(self.size > 0, f"{prefix}.size", f"must be > 0, got {self.size}")


def test_defaults_and_values():
    d = parse(Demo, {"size": 32, "ratio": 1, "pair": [3, 4], "mode": "pad"}, "demo")
    assert d == Demo(size=32, ratio=1.0, mode="pad", pair=(3, 4))
    assert isinstance(d.ratio, float)
    assert parse(Demo, None, "demo") == Demo()


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"sise": 3}, "demo.sise", "unknown key"),
        ({"size": "big"}, "demo.size", "expected an integer"),
        ({"size": True}, "demo.size", "expected an integer"),
        ({"size": 0}, "demo.size", "must be > 0"),
        ({"mode": "zoom"}, "demo.mode", "must be one of 'crop', 'pad'"),
        ({"pair": [1]}, "demo.pair", "list of 2"),
        ({"pair": [1, "x"]}, "demo.pair[1]", "expected an integer"),
        ({"flag": "yes"}, "demo.flag", "true or false"),
        ({"name": 3}, "demo.name", "expected str"),
    ],
)
def test_errors_name_the_key(raw, key, words):
    with pytest.raises(ParamsError) as err:
        parse(Demo, raw, "demo")
    message = str(err.value)
    assert message.startswith(f"params.yaml: {key}: ") and words in message
    assert "\n" not in message


def test_load_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        params.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        params.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        params.load(bad)


def test_params_are_read_as_yaml_1_2_like_dvc(tmp_path):
    """DVC reads params.yaml as YAML 1.2 (ruamel.yaml): `off`, `yes`, `on` are strings there, and so
    they must be for the stages, or the two disagree on what a value is."""
    from dvc.utils.serialize import load_yaml

    from stages.evaluate import EvaluateParams
    from unpaired.sources.stylegan import StyleGANParams, parse_seeds

    path = tmp_path / "params.yaml"
    path.write_text(
        "evaluate:\n  metrics: off\n  select: fid\n"
        "domains:\n  b:\n    source: stylegan\n    network: net.pkl\n    seeds: 7\n"
        "train:\n  lr: 2.0e-4\n  device: cpu\n"
    )
    data = params.load(path)
    assert data == load_yaml(str(path))  # exactly what DVC records in dvc.lock
    assert params.parse(EvaluateParams, data["evaluate"], "evaluate").metrics == "off"
    b = dict(data["domains"]["b"])
    b.pop("source")
    p = params.parse(StyleGANParams, b, "domains.b")  # `-S domains.b.seeds=7` writes an int
    assert parse_seeds(p.seeds, "domains.b.seeds") == [7]
    assert data["train"]["lr"] == 2.0e-4


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "trian:\n  lr: 0.1\n",
            "params.yaml: trian: unknown section; did you mean train? "
            "known: domains, prepare, train, evaluate, preset",
        ),
        (
            "evalute: {}\n",
            "params.yaml: evalute: unknown section; did you mean evaluate? "
            "known: domains, prepare, train, evaluate, preset",
        ),
        (
            "zzz: 1\n",
            "params.yaml: zzz: unknown section; known: domains, prepare, train, evaluate, preset",
        ),
    ],
)
def test_unknown_section_suggests_the_nearest(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n" + text)
    with pytest.raises(ParamsError) as err:
        params.load()
    assert str(err.value) == message


@pytest.mark.parametrize(
    "stage",
    [  # each with dvc.yaml's arguments (the paths)
        ["fetch", "a", "--out", "data/raw/a"],
        [
            "prepare",
            "--raw",
            "data/raw/a",
            "data/raw/b",
            "--out",
            "data/prepared.tar",
            "--view",
            "data/prepared",
            "--metrics",
            "metrics/prepare.json",
        ],
        ["train", *TRAIN_ARGS],
        [
            "evaluate",
            "--checkpoints",
            "models/checkpoints",
            "--data",
            "data/prepared.tar",
            "--view",
            "data/prepared",
            "--prepare-metrics",
            "metrics/prepare.json",
            "--train-live",
            "metrics/train",
            "--cache",
            "models/eval_cache",
            "--best",
            "models/best",
            "--samples",
            "metrics/samples",
            "--test-set",
            "metrics/test_set",
            "--report",
            "metrics/report.html",
            "--info",
            "metrics/eval_info.json",
            "--epochs-csv",
            "metrics/eval_epochs.csv",
            "--metrics",
            "metrics/eval.json",
            "--plots",
            "metrics/eval_plots",
        ],
    ],
)
def test_every_stage_refuses_an_unknown_section(tmp_path, stage):
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    (tmp_path / "params.yaml").write_text(
        "domains:\n  a:\n    source: doodles\ntrian:\n  epochs: 1\n"
    )
    if stage[0] != "fetch":  # the paths as dvc.yaml's cmd passes them
        cmd = shlex.split(
            yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"][
                stage[0]
            ]["cmd"]
        )
        stage = [stage[0], *cmd[cmd.index(f"stages.{stage[0]}") + 1 :]]
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: params.yaml: trian: unknown section; did you mean train? "
        "known: domains, prepare, train, evaluate, preset"
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    "text, line",
    [
        ("trian:\n  epochs: 1\n", "params.yaml: trian: unknown section; did you mean train?"),
        ("domains: {}\nprepare: {}\nevaluate: {}\n", "params.yaml: train: missing section"),
    ],
)
def test_make_repro_checks_the_sections_before_dvc(tmp_path, text, line):
    """DVC refuses a stage whose params section is missing only after removing the stage's outputs,
    and before the stage's own check runs; so `make repro` (python -m unpaired.repro) checks params.yaml
    first, as `python -m unpaired.params` does."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    (tmp_path / "params.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "unpaired.params"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith(f"error: {line}")
    assert len(proc.stderr.splitlines()) == 1
    # make repro's command (python -m unpaired.repro) checks the same way before it runs dvc repro:
    # the same one line, and no DVC run (there is no DVC repository here: it would fail otherwise)
    recipe = subprocess.run(
        ["make", "-n", "repro"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "-m unpaired.repro" in recipe and "dvc repro" not in recipe
    proc = subprocess.run(
        [sys.executable, "-m", "unpaired.repro"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith(f"error: {line}")
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / ".dvc").exists()
