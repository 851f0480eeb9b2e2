"""The code's shape, read from the source (AST, imports inside functions included): stage modules stay
short, `unpaired/` and `stages/` have no import cycle, the library never imports a stage, DVC is used
through its public interfaces only, and each stage's dvc.yaml `deps` lists exactly the project
modules it imports and the package data they read (so DVC re-runs a stage when, and only when, code
it runs or a file it embeds changed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PACKAGES = ("unpaired", "stages")
MAX_STAGE_LINES = 350
# DVC's public interfaces (issue 16): its CLI, dvc.api, dvc.repo.Repo and dvc.exceptions; dvclive.
DVC_ALLOWED = ("dvc.api", "dvc.repo", "dvc.exceptions")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(path: Path) -> list[str]:
    """Every module name `path` imports, anywhere in the file (top level, functions, conditionals):
    `import a.b` gives a.b; `from a import b` gives a.b and a (which is which is resolved later)."""
    names = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def graph(with_packages: bool = False) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from unpaired import params` is an edge to
    unpaired.params (a module), `from unpaired.x import name` to unpaired.x. With `with_packages`,
    also to every package __init__ that Python runs on the way (importing unpaired.sources.base runs
    unpaired/sources/__init__.py): what a stage really executes, for dvc.yaml's deps."""
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in imported_names(path):
            if imported in mods:
                targets.add(imported)
                if with_packages:
                    parts = imported.split(".")
                    targets |= {
                        ".".join(parts[:i])
                        for i in range(1, len(parts))
                        if ".".join(parts[:i]) in mods
                    }
        targets.discard(name)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_every_stage_module_is_at_most_350_lines():
    long = {
        p.name: n
        for p in sorted((ROOT / "stages").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES
    }
    assert not long, f"stage modules over {MAX_STAGE_LINES} lines: {long}"


def test_no_import_cycle_among_the_projects_modules():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    """The check above can fail: a cycle hidden inside a function is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "unpaired.safe_archive" in imported_names(
        ROOT / "unpaired" / "files.py"
    )  # inside a function


def test_errors_imports_nothing_from_the_project():
    assert graph()["unpaired.errors"] == set()


def test_the_library_never_imports_a_stage():
    bad = {
        name: sorted(t for t in targets if t.split(".")[0] == "stages")
        for name, targets in graph().items()
        if name.split(".")[0] == "unpaired"
    }
    assert {k: v for k, v in bad.items() if v} == {}
    bad_names = {
        name: [i for i in imported_names(path) if i.split(".")[0] == "stages"]
        for name, path in modules().items()
        if name.split(".")[0] == "unpaired"
    }
    assert {k: v for k, v in bad_names.items() if v} == {}


def test_dvc_only_through_its_public_interfaces():
    """No dvc_data / dvc_objects, and of dvc only dvc.api, dvc.repo and dvc.exceptions (dvclive is
    its own public package). The tests may look inside DVC to check its behaviour (the run cache's
    blind keys, Hydra's composition): they are not the product."""
    bad = {}
    for path in sorted(modules().values()):
        for name in imported_names(path):
            top = name.split(".")[0]
            public = any(name == ok or name.startswith(f"{ok}.") for ok in DVC_ALLOWED)
            if top in ("dvc_data", "dvc_objects") or (top == "dvc" and not public):
                bad.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert bad == {}


def stage_deps() -> dict[str, list[str]]:
    """dvc.yaml stage -> its deps that are project code (under unpaired/ or stages/)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        deps = [str(d).split("#")[0].strip() for d in stage.get("deps", [])]
        found[name] = [d for d in deps if d.split("/")[0] in PACKAGES]
    return found


def stage_module(stage: str) -> str:
    return f"stages.{stage}"


def package_data(init: Path) -> set[str]:
    """The data files (relative paths) of the package whose __init__.py is `init`: every file under its
    folder that is not Python, hidden or in __pycache__, and not inside a subpackage (a folder with
    its own __init__.py). A package reads them with importlib.resources (unpaired/templates/)."""
    folder = init.parent
    found = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if (
            not path.is_file()
            or path.suffix in (".py", ".pyc")
            or "__pycache__" in rel.parts
            or any(part.startswith(".") for part in rel.parts)
        ):
            continue
        if next(p for p in path.parents if (p / "__init__.py").is_file()) == folder:
            found.add(str(path.relative_to(ROOT)))
    return found


def needed_files(stage: str) -> set[str]:
    """The files (relative paths) a stage's module runs or reads: itself and every project module it
    imports, transitively, package __init__s included (empty files, the bare package markers, left
    out), and the data files of every package among them (a stylesheet the page embeds changes the
    stage's output as much as code does)."""
    mods = modules()
    edges = graph(with_packages=True)  # `python -m stages.x` runs stages/__init__.py first
    imported = closure(stage_module(stage), edges) | closure("stages", edges)
    files = {str(mods[m].relative_to(ROOT)) for m in imported if mods[m].read_text().strip()}
    for m in imported:
        if mods[m].name == "__init__.py":
            files |= package_data(mods[m])
    return files


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", list(stage_deps()))
def test_each_stage_lists_exactly_the_project_modules_it_imports(stage):
    deps = stage_deps()[stage]
    needed = needed_files(stage)
    missing = sorted(f for f in needed if not covered(f, deps))
    assert not missing, f"dvc.yaml: {stage}: deps lack {missing}"
    stale = sorted(d for d in deps if not any(covered(f, [d]) for f in needed))
    assert not stale, f"dvc.yaml: {stage}: deps list {stale}, which the stage does not import"


def test_the_deps_check_can_fail():
    """A module every stage imports (errors.py), dropped from a deps list, is found missing; so is a
    data file a stage's page embeds (unpaired/templates/), with the templates folder dropped."""
    needed = needed_files("prepare")
    assert "unpaired/errors.py" in needed and "stages/prepare.py" in needed
    assert not covered(
        "unpaired/errors.py", [d for d in stage_deps()["prepare"] if d != "unpaired/errors.py"]
    )
    for stage, data in (
        ("prepare", "unpaired/templates/dataset.css"),
        ("evaluate", "unpaired/templates/report.js"),
    ):
        assert data in needed_files(stage)
        assert not covered(data, [d for d in stage_deps()[stage] if d != "unpaired/templates"])
    assert not any(f.startswith("unpaired/templates/") for f in needed_files("train"))


# The package boundaries: a layer imports only what sits below it. The models package (training) and
# the sources (fetching) are two independent columns over the shared modules; the pages, scoring and
# the user-facing commands sit on top of them and are never imported by them.
TOP = {
    "unpaired.cli",
    "unpaired.translate",
    "unpaired.export",
    "unpaired.weights",
    "unpaired.evaluation",
    "unpaired.report",
    "unpaired.dataset_page",
    "unpaired.prepare",
    "unpaired.repro",
    "unpaired.params_doc",
    "unpaired.presets",
    "unpaired.remote",
}
BOUNDARIES = {
    "unpaired.models": TOP | {"unpaired.sources"},
    "unpaired.sources": TOP | {"unpaired.models"},
}


def boundary_breaks(edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """module -> the modules it imports across BOUNDARIES."""
    bad = {}
    for name, targets in edges.items():
        for package, banned in BOUNDARIES.items():
            if name == package or name.startswith(package + "."):
                crossing = sorted(
                    t for t in targets if any(t == b or t.startswith(b + ".") for b in banned)
                )
                if crossing:
                    bad[name] = crossing
    return bad


def test_the_models_and_sources_packages_import_nothing_above_them():
    assert boundary_breaks(graph()) == {}


def test_the_boundary_check_can_fail():
    assert boundary_breaks({"unpaired.models.state": {"unpaired.evaluation"}}) == {
        "unpaired.models.state": ["unpaired.evaluation"]
    }


def test_no_import_needs_a_noqa_for_its_order():
    """stages/__init__.py sets OpenMP's wait policy before any stage imports torch, so no module
    imports out of order (ruff's E402)."""
    offenders = [
        str(p.relative_to(ROOT)) for p in modules().values() if "noqa: E402" in p.read_text()
    ]
    assert offenders == []
