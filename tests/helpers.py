"""Shared test helpers: a throw-away copy of the project to run real `dvc` in, with tiny params."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Params overrides that make the whole DAG run in seconds. Each stage's section belongs here.
TINY: dict[str, Any] = {
    "domains": {"a": {"count": 12, "image_size": 32}, "b": {"count": 12, "image_size": 32}},
    "prepare": {"image_size": 32, "test_fraction": 0.25, "min_size": 8},
    "train": {
        "epochs": 1,
        "epochs_decay": 1,
        "ngf": 4,
        "ndf": 4,
        "n_blocks": 1,
        "load_size": 28,
        "crop_size": 24,
        "samples": 2,
        "pool_size": 4,
    },
    "evaluate": {
        "samples": 2,
        "kid_subsets": 2,
        "metrics": "off",
    },  # Inception: seconds per image on CPU
}


# dvc.yaml's train cmd: its arguments, and for one process after the interpreter (python ...)
TRAIN_ARGS = [
    "--data",
    "data/prepared.tar",
    "--view",
    "data/prepared",
    "--out",
    "models/checkpoints",
    "--live",
    "metrics/train",
]
TRAIN_STAGE = ["-m", "stages.train", *TRAIN_ARGS]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def env() -> dict[str, str]:
    """The environment for commands run in a clone: this venv's python/dvc first on PATH."""
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("PYTHONPATH", None)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def committed_params() -> str:
    """params.yaml as committed (HEAD), never the working copy a user may be trying things in."""
    return subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def clone_project(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A git repository at `dest` holding the project's working tree (tracked and untracked,
    not ignored files; no DVC outputs), with the committed params.yaml (HEAD, not the working copy)
    deep-merged with `overrides`, committed."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    dest.mkdir(parents=True, exist_ok=True)
    for name in filter(None, files):
        src = ROOT / name
        if not src.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(src.read_bytes())
        os.chmod(dest / name, src.stat().st_mode)
    (dest / "params.yaml").write_text(committed_params())
    if overrides:
        params = YAML(typ="safe").load((dest / "params.yaml").read_text())  # YAML 1.2, as DVC
        (dest / "params.yaml").write_text(
            yaml.safe_dump(deep_merge(params, overrides), sort_keys=False)
        )
    (dest / "dvc.lock").unlink(missing_ok=True)
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def dvc(dest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], cwd=dest, check=check)


CHROMIUM = Path(
    "/usr/bin/chromium"
)  # Debian's chromium, driven by playwright (no browser download)


@contextlib.contextmanager
def chromium_page(url: str, width: int) -> Iterator[tuple[Any, list[str]]]:
    """Open `url` in headless Debian chromium at `width` × 900 px, loaded; yield the playwright page
    and the list that collects its console errors and page errors. Offline: no network features."""
    from playwright.sync_api import sync_playwright

    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_load_state("load")
            yield page, errors
        finally:
            browser.close()
