"""docs/params.md, generated from the one place each param is documented: its dataclass field.

A params dataclass (a subclass of `params.Params`) documents each field in Sphinx's attribute-comment
form: the comment on the field's line, or, for a longer doc, `#:` comment lines right above it:

    min_size: int = 16   # skip images whose shorter side is smaller (pixels)
    #: perceptual-hash bits (of 256) within which two images are one picture (re-encoded, resized,
    #: cropped ~5 %); the largest is kept; 0: off
    near_duplicate_distance: int = 72

From the classes this module builds the reference page (key, type, default, allowed values, bound and
its reason, the doc), and `comments(cls)` gives the same docs to `presets.compose`, which writes them
as params.yaml's end-of-line comments. So adding a param means its dataclass field (with its doc)
and its value in conf/config.yaml; `uv run python -m unpaired.params_doc` then rewrites
docs/params.md, and tests/test_params_doc.py fails while the committed page differs from what the
classes give.

The comments are read from the source with `tokenize` (comments are not in the AST): no library
reads Sphinx's attribute comments without importing Sphinx's whole autodoc machinery.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from functools import cache
from pathlib import Path
from typing import Any

from unpaired import params

PAGE = Path("docs/params.md")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its doc (the `#:` lines right above the field, then the comment on the field's
    own line(s), joined by spaces; "" where there is none), for every annotated field in `cls`'s own
    class body."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    comments: dict[int, str] = {}  # line -> text of every comment, '#' kept
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
        elif tok.type not in (
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.ENDMARKER,
        ):
            code_lines.add(tok.start[0])
    docs = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and line not in code_lines and comments[line].startswith("#:"):
            above.insert(0, comments[line][2:].strip())
            line -= 1
        own = [
            comments[n].lstrip("#").strip()
            for n in range(node.lineno, node.end_lineno + 1)
            if n in comments
        ]
        docs[node.target.id] = " ".join(p for p in above + own if p)
    return docs


def comments(cls: type) -> dict[str, str]:
    """Field name -> its doc, for params.yaml's end-of-line comments (no leading '#')."""
    return {name: doc for name, doc in field_docs(cls).items() if doc}


def classes() -> tuple[dict[str, type[params.Params]], dict[str, type[params.Params]]]:
    """({section: class} for prepare, train and evaluate, {source name: class} for the sources)."""
    found = sections()
    by_section = {key: cls for _, key, cls in found if not key.startswith("domains")}
    by_source = {
        heading.split("`")[1]: cls for heading, key, cls in found if key.startswith("domains")
    }
    return by_section, by_source


def _type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        return " or ".join(_type(a) for a in args)
    if origin in (list, tuple):
        inner = _type(args[0]) if args else "any"
        return (
            f"list of {inner}"
            if origin is list or (len(args) == 2 and args[1] is Ellipsis)
            else (f"[{', '.join(_type(a) for a in args)}]")
        )
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return f"`[{', '.join(map(str, value))}]`"
    if isinstance(value, dict):
        return ", ".join(f"`{k}: {v}`" for k, v in value.items()) or "`{}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(cls: type[params.Params]) -> list[str]:
    """The markdown table of `cls`'s fields: key, type, default, doc, bound."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = ["| key | type | default | meaning | bound |", "| --- | --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        bound = cls.BOUNDS.get(field.name)
        limit = f"{bound.describe()}: {bound.why}" if bound else ""
        rows.append(
            f"| `{field.name}` | {_type(hints[field.name])} | {_cell(_default(field))} | "
            f"{_cell(docs.get(field.name, ''))} | {_cell(limit)} |"
        )
    return rows


def sections() -> list[tuple[str, str, type[params.Params]]]:
    """(heading, the params key it documents, class) for every params section, in page order."""
    # Imported here: the library's params classes live beside their code (heavy modules), and only
    # this generator and its test need them all at once.
    from unpaired import evaluation, prepare, sources
    from unpaired.models import training

    found = [
        ("prepare", "prepare", prepare.PrepareParams),
        ("train", "train", training.TrainParams),
        ("evaluate", "evaluate", evaluation.EvaluateParams),
    ]
    for name, fetch in sources.SOURCES.items():
        module = inspect.getmodule(fetch)
        classes = [
            c
            for c in vars(module).values()
            if isinstance(c, type)
            and issubclass(c, params.Params)
            and c is not params.Params
            and c.__module__ == module.__name__
        ]
        for cls in classes:
            found.append((f"domains: source `{name}`", f"domains.<a|b> (source: {name})", cls))
    return found


def render() -> str:
    """The text of docs/params.md."""
    lines = [
        "# Params reference",
        "",
        "<!-- Generated by `uv run python -m unpaired.params_doc` from the params dataclasses' field comments;",
        "     edit those, not this file (tests/test_params_doc.py checks it is current). -->",
        "",
        "Every key of params.yaml, by section. Values are read as DVC reads them (YAML 1.2). A value",
        "outside its bound stops the stage with one line naming the key, the bound and why; so does an",
        "unknown key or a value of the wrong type.",
    ]
    for heading, key, cls in sections():
        lines += [
            "",
            f"## {heading}",
            "",
            f"Key prefix: `{key}`. Class: `{cls.__module__}.{cls.__qualname__}`.",
            "",
        ]
        lines += table(cls)
    return "\n".join(lines) + "\n"


def write(path: Path = PAGE) -> bool:
    """Write docs/params.md if it differs; True when it changed."""
    text = render()
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def main(argv: list[str] | None = None) -> None:
    """`python -m unpaired.params_doc`: rewrite docs/params.md; with --check, only say (exit 1)
    whether it differs from what the classes give."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m unpaired.params_doc", description=main.__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/params.md is out of date")
    args = ap.parse_args(argv)
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != render():
            sys.exit(
                f"error: {PAGE} differs from the params classes' field comments; "
                f"run `uv run python -m unpaired.params_doc` and commit it"
            )
        print(f"{PAGE}: up to date")
        return
    print(f"{PAGE}: {'written' if write() else 'already up to date'}")


if __name__ == "__main__":
    main()
