"""Issue 17.6 and 17.9: every numeric param has a bound (refused in one line naming the key, the
bound and why), and no float param accepts .inf or .nan."""

import dataclasses
import importlib
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from unpaired import params
from unpaired.params import Params, ParamsError

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "unpaired.prepare",
    "stages.train",
    "unpaired.evaluation",
    "unpaired.sources.archive",
    "unpaired.sources.doodles",
    "unpaired.sources.flares",
    "unpaired.sources.folder",
    "unpaired.sources.kaggle",
    "unpaired.sources.quickdraw",
    "unpaired.sources.stylegan",
    "unpaired.sources.web",
]


def all_params_classes() -> list[type[Params]]:
    for name in MODULES:
        importlib.import_module(name)
    seen, todo = [], list(Params.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".")[0] in ("stages", "unpaired") and cls not in seen:
            seen.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: c.__name__)


def is_numeric(tp) -> bool:
    if tp in (int, float):
        return True
    return any(is_numeric(a) for a in typing.get_args(tp) if a is not Ellipsis)


def test_every_numeric_field_of_every_params_class_has_a_bound():
    classes = all_params_classes()
    assert len(classes) >= 11, [c.__name__ for c in classes]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        numeric = {name for name in fields if is_numeric(hints[name])}
        assert numeric <= set(cls.BOUNDS), (
            f"{cls.__name__}: no bound for {sorted(numeric - set(cls.BOUNDS))}"
        )
        assert set(cls.BOUNDS) <= numeric, f"{cls.__name__}: bound for a non-numeric field"
        for name, bound in cls.BOUNDS.items():
            assert bound.why, f"{cls.__name__}.{name}: a bound says why"
            default = fields[name].default
            for v in default if isinstance(default, (list, tuple)) else [default]:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert v <= bound.high and (bound.low is None or v >= bound.low), (cls, name)


def test_the_params_reference_documents_every_bound():
    """docs/params.md (generated from the classes) gives each bound and its reason."""
    page = (ROOT / "docs" / "params.md").read_text()
    for cls in all_params_classes():
        for name, bound in cls.BOUNDS.items():
            assert f"| `{name}` |" in page and f"{bound.describe()}: {bound.why}" in page, (
                f"{cls.__name__}.{name}"
            )


@pytest.mark.parametrize(
    "stage, section, raw, line",
    [
        (
            "prepare",
            "prepare",
            {"image_size": 100000},
            "error: params.yaml: prepare.image_size: must be <= 4,096, got 100,000: each image is held as "
            "3 × side² bytes while it is made and resized (48 MiB at 4096, 30 GB at 100000), and training "
            "crops at most 1024",
        ),
        (
            "train",
            "train",
            {"pool_size": 1000000000},
            "error: params.yaml: train.pool_size: must be <= 10,000, got 1,000,000,000: fake images kept per "
            "direction on the training device; the paper keeps 50",
        ),
        (
            "train",
            "train",
            {"lr": ".inf"},
            "error: params.yaml: train.lr: must be a finite number, got inf",
        ),
    ],
)
def test_the_stage_refuses_an_unbounded_value_in_one_line(tmp_path, stage, section, raw, line):
    text = f"domains:\n  a:\n    source: doodles\n{section}:\n" + "".join(
        f"  {k}: {v}\n" for k, v in raw.items()
    )
    (tmp_path / "params.yaml").write_text(text)
    cmd = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    args = cmd[cmd.index(f"stages.{stage}") + 1 :]
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == line
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".NaN", "-.Inf"])
def test_non_finite_floats_are_refused_for_every_float_field(tmp_path, text):
    (tmp_path / "params.yaml").write_text(f"train:\n  lr: {text}\n")
    raw = params.section(params.load(tmp_path / "params.yaml"), "train")
    from unpaired.models.training import TrainParams

    with pytest.raises(
        ParamsError, match=r"^params.yaml: train.lr: must be a finite number, got -?(inf|nan)$"
    ):
        params.parse(TrainParams, raw, "train")
    for cls in all_params_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is float:
                with pytest.raises(ParamsError, match=f"x.{f.name}: must be a finite number"):
                    params.parse(cls, {f.name: float("nan")}, "x")


@pytest.mark.parametrize(
    "cls_path, raw, key, words",
    [
        (
            "unpaired.models.training.TrainParams",
            {"seed": -1},
            "train.seed",
            "must be in [0, 4,294,967,295], got -1",
        ),
        (
            "unpaired.models.training.TrainParams",
            {"threads": 100000},
            "train.threads",
            "must be <= 1,024",
        ),
        (
            "unpaired.models.training.TrainParams",
            {"pool_size": 5000, "load_size": 286, "crop_size": 256},
            "train.pool_size",
            "5,000 images per direction at crop_size 256 need 7.3 GiB",
        ),
        (
            "unpaired.sources.doodles.DoodleParams",
            {"strokes": [2, 10**20]},
            "d.strokes[1]",
            "must be <= 1,000, got 1e+20",
        ),
        (
            "unpaired.sources.stylegan.StyleGANParams",
            {"network": "x.pkl", "seeds": "0-99999999999"},
            "d.seeds",
            "seeds must be in [0, 2**32)",
        ),
        (
            "unpaired.sources.stylegan.StyleGANParams",
            {"network": "x.pkl", "seeds": "0-9999999"},
            "d.seeds",
            "at most 1,000,000 seeds",
        ),
    ],
)
def test_bounds_name_the_key_the_bound_and_why(cls_path, raw, key, words):
    module, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    prefix = key.split(".")[0]
    with pytest.raises(ParamsError) as err:
        params.parse(cls, raw, prefix)
    message = str(err.value)
    assert message.startswith(f"params.yaml: {key}: ") and words in message and "\n" not in message
