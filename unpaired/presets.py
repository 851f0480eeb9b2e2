"""Presets: switching params.yaml to another pair of domains in one explicit command.

params.yaml is the one file the pipeline reads and the user edits: `dvc repro`, `dvc exp run -S
key=value`, `--queue` and `dvc queue start` run it as it is, plus exactly the named overrides (DVC
rewrites only those keys and keeps every comment). Presets never rewrite it behind the user's back:

    uv run unpaired preset horse2zebra               # switch; say what changed, key by key
    uv run unpaired preset horse2zebra --keep-edits  # ... keeping your own edits the preset does not set

A preset is `conf/preset/<name>.yaml`: a `preset:` name, the two `domains`, and the prepare/train/
evaluate keys that suit them. `compose(conf, name)` lays it over `conf/config.yaml` (the shared
settings, with a comment explaining each key) and gives the text of params.yaml, comments kept. So
the committed params.yaml is exactly `compose(conf, "doodles2flares")` (a test checks it).

Every file is read as DVC reads params.yaml: YAML 1.2 through ruamel.yaml (`off` is a string, `1_000`
a string, `017` the integer 17), so a value means the same in conf/ as in params.yaml.

"Your edits" are the leaves where params.yaml differs from the composition it was written from (the
one its first line records: conf/ as it is, or as git holds it when conf/ changed since); with
--keep-edits they survive the switch unless the switch changes that key itself (the new preset, or
conf/ edited since, gives it another value: that value wins, and the line says so) or the edit
belongs to a domain whose source changes. So `unpaired preset NAME --keep-edits` with NAME in force
keeps every edit and applies what conf/ changed: what the stale-composition warning recommends.

params.yaml's first line records the digest of the two conf/ files it was composed from, so a run
can say in one line when conf/ changed since (`stale_composition`): an edit there is otherwise
ignored without a word, since runs read params.yaml alone.
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from unpaired.errors import UserError

CONF = Path("conf")
HEADER = (
    "# params.yaml: the one file the pipeline reads. Edit it, then `make repro`; `uv run dvc exp run -S "
    "key=value` changes only that key."
)
SWITCH = "# Switch presets with `uv run unpaired preset NAME [--keep-edits]` (conf/preset/NAME.yaml); each key is explained below and in docs/params.md."
DIGEST = re.compile(
    r"^# composed by `unpaired preset (?P<name>[\w.-]+)` from conf/ \(sha256 (?P<digest>[0-9a-f]{16})\)$"
)
_ABSENT = object()


def _yaml() -> YAML:
    y = YAML()  # round trip: comments and key order kept; YAML 1.2 like DVC
    y.width = 4096  # never fold a long line (a URL, a palette)
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _read(path: Path, text: str | None = None) -> CommentedMap:
    """One YAML 1.2 mapping with its comments (from `path`, or `text` when given: an older version
    of that file); UserError (one line) naming the file otherwise."""
    try:
        data = _yaml().load(path.read_text() if text is None else text)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(
            f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}"
        ) from None
    if not isinstance(data, CommentedMap):
        raise UserError(f"{path}: must be a mapping of sections")
    return data


def names(conf: Path = CONF) -> list[str]:
    """The preset names: conf/preset/*.yaml without the suffix, sorted."""
    return sorted(p.stem for p in (conf / "preset").glob("*.yaml"))


def preset_file(conf: Path, name: str) -> Path:
    """conf/preset/<name>.yaml; UserError naming the known presets when there is none."""
    path = conf / "preset" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown preset {name!r}; known presets: {', '.join(names(conf))} (conf/preset/)"
        )
    return path


def digest(conf: Path, name: str) -> str:
    """16 hex digits of sha256 over conf/config.yaml and conf/preset/<name>.yaml (their bytes)."""
    return _digest_of((conf / "config.yaml").read_bytes(), preset_file(conf, name).read_bytes())


def _digest_of(config: bytes, preset: bytes) -> str:
    h = hashlib.sha256()
    for data in (config, preset):
        h.update(data)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _merge(base: CommentedMap, over: CommentedMap) -> None:
    """Lay `over` onto `base` in place: mappings merge key by key, anything else is replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _composed(conf: Path, name: str, texts: tuple[str, str] | None = None) -> CommentedMap:
    """conf/config.yaml with conf/preset/<name>.yaml laid over it; with `texts`, those two files'
    texts (an older version of them) instead of what conf/ holds now."""
    config, preset = texts if texts is not None else (None, None)
    base = _read(conf / "config.yaml", config)
    base.ca.comment = None  # its own header explains conf/, not params.yaml
    _merge(
        base,
        _read(
            preset_file(conf, name) if texts is None else conf / "preset" / f"{name}.yaml", preset
        ),
    )
    _annotate(base)
    return base


COMMENT_COLUMN = 26  # where params.yaml's end-of-line comments start
COMMENT_WIDTH = 100  # ... and where they wrap onto comment lines of their own


def _comment(doc: str) -> str:
    """A field's doc as an end-of-line comment, wrapped at COMMENT_WIDTH under its first line."""
    import textwrap

    lines = textwrap.wrap(doc, COMMENT_WIDTH - COMMENT_COLUMN - 2) or [""]
    return ("\n" + " " * COMMENT_COLUMN).join(f"# {line}" for line in lines)


def _document(section: CommentedMap, docs: dict[str, str]) -> None:
    """Give each key of `section` its field's doc as its comment (replacing any written in conf/:
    the params dataclasses are the one place a param is documented)."""
    for key in section:
        section.ca.items.pop(key, None)
        if isinstance(section[key], CommentedMap):
            for inner in section[key]:
                section[key].ca.items.pop(inner, None)
        if key in docs:
            section.yaml_add_eol_comment(_comment(docs[key]), key, column=COMMENT_COLUMN)


def _annotate(data: CommentedMap) -> None:
    """The comments of a composed params.yaml, from the params classes' field docs (unpaired.params_doc):
    each key of prepare, train and evaluate, and each key of a domain by its source's class."""
    from unpaired import params_doc  # the params classes live beside their (heavy) code

    by_section, by_source = params_doc.classes()
    for name, cls in by_section.items():
        if isinstance(data.get(name), CommentedMap):
            _document(data[name], params_doc.comments(cls))
    for domain in (data.get("domains") or {}).values():
        if isinstance(domain, CommentedMap) and domain.get("source") in by_source:
            docs = {
                "source": "where the images come from (docs/data.md); the keys below are its own",
                **params_doc.comments(by_source[domain["source"]]),
            }
            _document(domain, docs)


def _git(cwd: Path, *args: str) -> bytes | None:
    """`git ARGS` run in `cwd`: its stdout, or None when git is missing or fails."""
    import subprocess

    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _recorded_texts(conf: Path, name: str, recorded: str) -> tuple[str, str] | None:
    """The texts of conf/config.yaml and conf/preset/<name>.yaml whose digest is `recorded` (the
    composition params.yaml's first line records): conf/ as it is, else the two files as git holds
    them at HEAD or at one of the last 200 commits that changed them. None when none matches (conf/
    is not in git, or was composed from a version never committed)."""
    config, preset = conf / "config.yaml", conf / "preset" / f"{name}.yaml"
    if preset.is_file() and _digest_of(config.read_bytes(), preset.read_bytes()) == recorded:
        return config.read_text(), preset.read_text()
    top = _git(conf if conf.is_dir() else Path("."), "rev-parse", "--show-toplevel")
    if top is None:
        return None
    root = Path(top.decode().strip())
    try:
        paths = [p.resolve().relative_to(root).as_posix() for p in (config, preset)]
    except ValueError:
        return None
    commits = _git(root, "log", "--format=%H", "-n", "200", "--", *paths) or b""
    for commit in ["HEAD", *commits.decode().split()]:
        texts = [_git(root, "show", f"{commit}:{path}") for path in paths]
        if None not in texts and _digest_of(*texts) == recorded:
            return texts[0].decode(), texts[1].decode()
    return None


def _dump(data: CommentedMap, conf_digest: str, name: str) -> str:
    out = io.StringIO()
    _yaml().dump(data, out)
    lines = [
        f"# composed by `unpaired preset {name}` from conf/ (sha256 {conf_digest})",
        HEADER,
        SWITCH,
    ]
    return "\n".join(lines) + "\n" + out.getvalue()


def compose(conf: Path, name: str) -> str:
    """The text of params.yaml for preset `name`: conf/config.yaml with conf/preset/<name>.yaml laid
    over it, comments kept, under a three-line header (the first records `digest`). Raises UserError
    for an unknown preset or a file that is not a YAML mapping."""
    return _dump(_composed(conf, name), digest(conf, name), name)


def leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of nested mappings; a list is one leaf."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    else:
        yield prefix.rstrip("."), tree


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _set(tree: CommentedMap, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = CommentedMap()
        tree = tree[part]
    tree[last] = value


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return repr(list(value) if isinstance(value, list) else value)


def _plain(tree: Any) -> Any:
    return YAML(typ="safe").load(_yaml_text(tree))


def _yaml_text(tree: Any) -> str:
    out = io.StringIO()
    _yaml().dump(tree, out)
    return out.getvalue()


class Switch(NamedTuple):
    """What `switch` gives: the new text of params.yaml, one line per key whose value changes, and
    one line per edit of yours kept or dropped (a dropped edit's key is among the changes too)."""

    text: str
    changes: list[str]
    notes: list[str]


def _baseline(
    params_path: Path, conf: Path, current: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The composition params.yaml was written from, which "your edits" are measured against, and
    a note when it could not be found: the one its first line records (conf/ as it is, or as git
    holds it when conf/ changed since: see `_recorded_texts`), else conf/'s composition of the preset
    params.yaml names, else nothing (every key is an edit)."""
    old_name = current.get("preset")
    try:
        match = DIGEST.match(params_path.read_text().split("\n", 1)[0])
    except OSError:
        match = None
    if match and match["name"] == old_name and old_name in names(conf):
        texts = _recorded_texts(conf, old_name, match["digest"])
        if texts is not None:
            return _plain(_composed(conf, old_name, texts)), None
        return _plain(_composed(conf, old_name)), (
            f"conf/ changed since {params_path} was composed, and git holds no version of it with the "
            f"recorded digest: where conf/ changed, the value {params_path} holds counts as your edit; "
            f"`git diff conf/` shows what changed"
        )
    return (_plain(_composed(conf, old_name)) if old_name in names(conf) else {}), None


def switch(params_path: Path, conf: Path, name: str, keep_edits: bool = False) -> Switch:
    """The new text of params.yaml for preset `name`, the lines that say what changes (one per key
    whose value changes, `train.ngf: 16 -> 64`) and the notes (one per edit of yours kept or
    dropped). Without `keep_edits` every key takes the composition's value; with it, your edits (see
    the module docstring) survive unless the switch itself changes that key (another preset's value,
    or conf/ edited since params.yaml was composed: the new value wins, and the note says so) or the
    edit belongs to a domain whose source changes. So `unpaired preset NAME --keep-edits` with the
    preset in force keeps every edit and applies only what conf/ changed. The current params.yaml
    may be missing or unreadable (then there are no edits to keep). Raises UserError for an unknown
    preset or a conf/ file that is not a YAML mapping."""
    new = _composed(conf, name)
    current = None
    if params_path.is_file():
        try:
            current = _plain(_read(params_path))
        except UserError:
            current = None
    edits: dict[str, Any] = {}
    notes = []
    baseline: dict[str, Any] = {}
    if current is not None:
        baseline, note = _baseline(params_path, conf, current)
        notes += [note] if note else []
        edits = {k: v for k, v in leaves(current) if k != "preset" and _get(baseline, k) != v}
    composed = _plain(new)
    old_domains = (current or {}).get("domains") or {}
    for key, value in edits.items():
        parts = key.split(".")
        if parts[0] == "domains" and len(parts) > 2:
            same_source = _get(old_domains, f"{parts[1]}.source") == _get(
                new, f"domains.{parts[1]}.source"
            )
        else:
            same_source = True
        if not keep_edits:
            notes.append(f"dropped your edit {key}: {_show(value)} (pass --keep-edits to keep it)")
        elif _get(composed, key) != _get(baseline, key):  # the switch itself changes this key
            notes.append(
                f"dropped your edit {key}: {_show(value)}: preset {name} sets it to {_show(_get(new, key))}"
            )
        elif not same_source:
            notes.append(
                f"dropped your edit {key}: {_show(value)}: domain {parts[1]}'s source changes"
            )
        else:
            _set(new, key, copy.deepcopy(value))
            notes.append(f"kept your edit {key}: {_show(value)}")
    text = _dump(new, digest(conf, name), name)
    after = _plain(new)
    before = current or {}
    changes = []
    for key in sorted({k for k, _ in leaves(before)} | {k for k, _ in leaves(after)}):
        old, now = _get(before, key), _get(after, key)
        if old != now:
            changes.append(f"{key}: {_show(old)} -> {_show(now)}")
    return Switch(text, changes, notes)


def stale_composition(params_path: Path, conf: Path = CONF) -> str | None:
    """One line when params.yaml records (first line) that it was composed from conf/ files that
    have changed since — runs read params.yaml alone, so that change would be ignored without a
    word — else None (also for a params.yaml written by hand, without that line)."""
    try:
        first = params_path.read_text().split("\n", 1)[0]
    except OSError:
        return None
    match = DIGEST.match(first)
    if not match or not (conf / "preset" / f"{match['name']}.yaml").is_file():
        return None
    name = match["name"]
    if digest(conf, name) == match["digest"]:
        return None
    return (
        f"{params_path} was composed from conf/config.yaml and conf/preset/{name}.yaml, which changed "
        f"since; runs read {params_path} alone, so that change is not used: apply it with `uv run "
        f"unpaired preset {name} --keep-edits`, or undo it (`git checkout conf/`)"
    )
