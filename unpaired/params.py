"""Loading params.yaml into typed, validated objects.

Every section of params.yaml is described by a frozen dataclass that lives next to the code that uses
it. `parse(Cls, raw, "train")` checks that `raw` is a mapping, that it has no unknown keys, that every
value has the annotated type, and then runs the dataclass's own `__post_init__` checks. Every failure
is a `ParamsError` whose message starts with the full dotted key, e.g.
`params.yaml: train.crop_size: must be <= train.load_size (286), got 300`.

Numbers have bounds. `_coerce` refuses a non-finite float (`.inf`, `.nan`) for every float field,
and each dataclass lists in `BOUNDS` (a ClassVar mapping field name -> `Bound`) the largest value
(and, where 0 is not the floor its own checks give, the smallest) each numeric field may take, with
the reason: a value past it would ask for memory, disk or time no run needs (`prepare.image_size:
100000` would make every prepare worker ask for 30 GB). `parse` checks them before the class's own
`validate`; tests/test_params.py checks that every int and float field of every params class has one.

This is written by hand because the few lines here are all we need: a schema library (pydantic,
attrs+cattrs) would add a dependency and its own error format for what is a dozen checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from unpaired.errors import UserError

PARAMS_FILE = Path("params.yaml")
# The top-level sections of params.yaml; any other name is a typo (`trian:`) that would otherwise
# leave its section at the defaults without a word.
SECTIONS = ("domains", "prepare", "train", "evaluate", "preset")


class ParamsError(UserError, ValueError):
    """A bad value in params.yaml. str(err) is one line naming the key and what to do."""


def fail(key: str, message: str) -> typing.NoReturn:
    raise ParamsError(f"{PARAMS_FILE}: {key}: {message}")


def check(condition: bool, key: str, message: str) -> None:
    if not condition:
        fail(key, message)


def load(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a dict, read as DVC reads it: YAML 1.2 through ruamel.yaml's safe loader, so
    the stages and DVC (dvc.lock, `dvc params diff`, the run cache) agree on every value (`off`,
    `yes`, `on` are strings, `0o17` is an octal int). Raises ParamsError (one line) when the file is
    missing, not YAML, not a mapping, or has a top-level section other than SECTIONS."""
    path = Path(path)
    try:
        data = YAML(typ="safe").load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: not found; run from the project root (where params.yaml is)"
        ) from None
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of sections (domains, prepare, train, ...)")
    for name in data:
        if name not in SECTIONS:
            near = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ParamsError(
                f"{path}: {name}: unknown section; {hint}known: {', '.join(SECTIONS)}"
            )
    return data


def section(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The mapping under `name`; a missing section is an empty one (all defaults)."""
    value = data.get(name, {})
    if value is None:
        return {}
    check(isinstance(value, dict), name, f"must be a mapping, got {type(value).__name__}")
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if tp is bool:
        return "true or false"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, list[X], tuple[X, ...],
    X | None, Literal[...]); ints are accepted where a float is expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ParamsError:
                pass
        fail(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        check(value in args, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            check(
                len(value) == len(args),
                key,
                f"expected a list of {len(args)} values, got {value!r}",
            )
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            key,
            f"expected a number, got {value!r}",
        )
        check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"params.parse: unsupported annotation {tp!r} for {key}")


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range a numeric field may take: `high` (inclusive unless `below`, in the field's unit),
    `why` (a short reason, printed with a refusal), and `low` (inclusive) where 0 or 1 is not the
    floor the class's own checks give. For a list or tuple of numbers, each item is checked."""

    high: int | float
    why: str
    low: int | float | None = None
    below: bool = False  # `high` itself is out (a share < 1)

    def describe(self) -> str:
        if self.low is None:
            return f"{'<' if self.below else '<='} {_number(self.high)}"
        return f"in [{_number(self.low)}, {_number(self.high)}{')' if self.below else ']'}"

    def holds(self, value: int | float) -> bool:
        return (value < self.high if self.below else value <= self.high) and (
            self.low is None or value >= self.low
        )


# Bounds several classes share.
SEED = Bound(2**32 - 1, "the range every random generator here accepts (numpy's needs >= 0)", 0)
COUNT = Bound(
    1_000_000,
    "a million images is past any dataset this pipeline trains on; each one is "
    "a file on disk and a row in the manifest",
)
IMAGE_SIZE = Bound(
    4096,
    "each image is held as 3 × side² bytes while it is made and resized "
    "(48 MiB at 4096, 30 GB at 100000), and training crops at most 1024",
)
THREADS = Bound(
    1024, "CPU threads; past the largest machines' core counts more only wait on each other"
)
SAMPLES = Bound(
    64,
    "images per direction in each epoch's sample grid, 3 rows of them; a bigger grid "
    "is a picture too large to look at",
)
TIMEOUT = Bound(3600, "seconds per request; no server keeps a silent connection open for an hour")


class Params:
    """Base of every params dataclass: override `validate` for checks across fields, and list each
    int or float field's `Bound` in `BOUNDS` (checked by `parse` before `validate`)."""

    BOUNDS: ClassVar[dict[str, Bound]] = {}

    def validate(self, prefix: str) -> None:
        pass


def _number(value: int | float) -> str:
    return f"{value:,}" if abs(value) < 1e15 else f"{value:.3g}"


def check_bounds(obj: Params, prefix: str) -> None:
    """Raise ParamsError (one line naming the key, the bound and why) for the first field of `obj`
    outside its `BOUNDS` entry. Non-numbers (None, "auto", strings) are not checked here."""
    for name, bound in type(obj).BOUNDS.items():
        value = getattr(obj, name)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                continue
            if not bound.holds(item):
                key = f"{prefix}.{name}" + ("" if i is None else f"[{i}]")
                fail(key, f"must be {bound.describe()}, got {_number(item)}: {bound.why}")


P = TypeVar("P", bound=Params)


def parse(cls: type[P], raw: dict[str, Any] | None, prefix: str) -> P:
    """Build dataclass `cls` from the mapping `raw` found at dotted key `prefix`."""
    raw = {} if raw is None else raw
    check(isinstance(raw, dict), prefix, f"must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        fail(f"{prefix}.{unknown[0]}", f"unknown key; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}"
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            fail(key, "required key is missing")
    obj = cls(**values)
    check_bounds(obj, prefix)
    obj.validate(prefix)
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# The sections dvc.yaml's stages declare as params: DVC itself refuses to run when one is missing
# (`Parameters 'train' are missing from 'params.yaml'`), after removing that stage's outputs, so
# `make repro` checks them first (python -m unpaired.params).
STAGE_SECTIONS = ("domains", "prepare", "train", "evaluate")


def check_file(path: str | Path = PARAMS_FILE) -> None:
    """Raise ParamsError (one line) if `path` is not valid YAML, has an unknown top-level section
    (with the nearest known name) or lacks a section that dvc.yaml's stages depend on."""
    data = load(path)
    for name in STAGE_SECTIONS:
        if name not in data:
            raise ParamsError(
                f"{path}: {name}: missing section (dvc.yaml's stages depend on "
                f"{', '.join(STAGE_SECTIONS)}); restore it, e.g. `git checkout {path}`"
            )


if __name__ == "__main__":
    from unpaired.errors import main_guard

    main_guard(check_file)
