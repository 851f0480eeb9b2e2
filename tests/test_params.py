from dataclasses import dataclass
from typing import Literal

import pytest

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


@pytest.mark.parametrize("raw, key, words", [
    ({"sise": 3}, "demo.sise", "unknown key"),
    ({"size": "big"}, "demo.size", "expected an integer"),
    ({"size": True}, "demo.size", "expected an integer"),
    ({"size": 0}, "demo.size", "must be > 0"),
    ({"mode": "zoom"}, "demo.mode", "must be one of 'crop', 'pad'"),
    ({"pair": [1]}, "demo.pair", "list of 2"),
    ({"pair": [1, "x"]}, "demo.pair[1]", "expected an integer"),
    ({"flag": "yes"}, "demo.flag", "true or false"),
    ({"name": 3}, "demo.name", "expected str"),
])
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
