"""Keep a stage's previous outputs through a failed run under `dvc repro` / `dvc exp run`.

Before DVC runs a stage's command it deletes the stage's outputs (all but `persist: true` ones), so a
stage that then fails (a params error, a 404, Ctrl-C) would leave nothing where its last good outputs
were, although every stage writes atomically. `keep_outputs(main)` wraps a stage's entry point: when
`main` fails while DVC runs the stage (DVC sets `DVC_STAGE`, e.g. `fetch@a`), every non-persist
output that dvc.lock records for the stage is put back from the DVC cache, byte for byte, so the
workspace again matches dvc.lock and `dvc status` reports only what was changed (the params, a dep).
The run cache keeps working: no output has to become `persist: true` for this.

Every output DVC caches is in the cache after a run; a `cache: false` one (metrics) is there when the
stage is run-cached (DVC commits those too). What cannot be restored (no dvc.lock entry: the first
run; objects missing from the cache: `dvc gc`, a fresh clone) is named in the error, with
`uv run dvc checkout <stage>` / `uv run dvc pull <stage>` to get it back. Outside DVC
(`python -m stages.x`) nothing was deleted, and nothing is done.

The copying is written here rather than calling `dvc checkout`: the running `dvc repro` holds the
repository's locks, so a nested checkout would be refused. The cache layout (`<cache>/ab/cdef...`,
directories as `.dir` listings) is read through dvc / dvc-data's own objects.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from unpaired.errors import UserError

LOCK_FILE = Path("dvc.lock")
STAGES_FILE = Path("dvc.yaml")


def keep_outputs(main: Callable[[], None]) -> Callable[[], None]:
    """`main` wrapped so that, under DVC, a failure restores the stage's previous outputs (the
    UserError's one line then says what was kept, or what to run to get it back), and a success
    stores the stage's `cache: false` outputs in the DVC cache so that a later failure can restore
    them too (DVC itself does that only for run-cached stages)."""
    def run() -> None:
        stage = os.environ.get("DVC_STAGE")
        try:
            main()
        except SystemExit as done:                 # sys.exit(0) is a success, any other code not
            if done.code not in (0, None):
                _print(after_failure(stage))
            elif stage:
                stash_uncached(stage)
            raise
        except BaseException as err:  # noqa: BLE001 - Ctrl-C and bugs lose outputs too; re-raised
            notes = after_failure(stage)
            if isinstance(err, UserError) and notes:
                raise UserError(f"{err}; {'; '.join(notes)}") from None
            _print(notes)
            raise
        if stage:
            stash_uncached(stage)
    return run


def _print(notes: list[str]) -> None:
    for note in notes:
        print(note, file=sys.stderr)


def after_failure(stage: str | None) -> list[str]:
    """Restore `stage`'s outputs (DVC addressing, e.g. `fetch@a`) as dvc.lock records them. Returns
    what to tell the user (empty outside DVC or when nothing was deleted). Never raises: a failure
    to restore becomes a note, the stage's own error stays the one reported."""
    hints = []
    if os.environ.get("DVC_EXP_BASELINE_REV"):     # `dvc exp run` may have rewritten params.yaml
        hints.append("`dvc exp run` rewrote params.yaml: "
                     "`git checkout params.yaml` restores the committed one")
    if not stage:
        return hints
    stage = _name(stage)
    try:
        outs = _locked_outs(stage)
    except Exception as err:  # noqa: BLE001 - an unreadable dvc.lock must not hide the stage's error
        return [f"could not read {LOCK_FILE} to restore the previous outputs ({err}); "
                f"run `uv run dvc checkout {stage}`", *hints]
    restored, lost = [], []
    caches = None
    if outs:
        try:
            caches = _caches()
        except Exception:  # noqa: BLE001 - no cache: everything is reported as lost below
            pass
    for out in outs:
        path = Path(out["path"])
        try:
            if caches is None:
                raise FileNotFoundError("no DVC cache")
            _restore(path, out, caches)
            restored.append(str(path))
        except Exception:  # noqa: BLE001 - e.g. the object is not in the cache
            lost.append(str(path))
    notes = []
    if restored:
        notes.append(f"kept the previous {', '.join(restored)} "
                     f"(restored from the DVC cache, as in {LOCK_FILE})")
    if lost:
        notes.append(f"the previous {', '.join(lost)} could not be restored (not in the DVC cache): "
                     f"run `uv run dvc checkout {stage}` (or `uv run dvc pull {stage}`)")
    return notes + hints


def stash_uncached(stage: str) -> None:
    """Store the `cache: false`, non-persist outputs of `stage` in the DVC cache, exactly as DVC's
    run cache stores them for the stages it can run-cache (same objects, same hashes as dvc.lock's),
    so `after_failure` can restore them. Best effort: a failure here never fails the stage."""
    try:
        paths = [p for p, opts in _declared(_name(stage)).items()
                 if opts.get("cache") is False and not opts.get("persist") and os.path.exists(p)]
        if not paths:
            return
        from dvc.fs import LocalFileSystem
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.transfer import transfer
        odb = _caches()["md5"]
        fs = LocalFileSystem()
        for path in paths:
            staging, _meta, obj = build(odb, os.path.abspath(path), fs, "md5")
            transfer(staging, odb, {obj.hash_info}, shallow=False, hardlink=False)
    except Exception as err:  # noqa: BLE001
        print(f"note: could not keep a copy of the metrics in the DVC cache ({err})", file=sys.stderr)


def _name(stage: str) -> str:
    return stage.rsplit(":", 1)[-1]               # `dvc.yaml:prepare` -> `prepare`


def _locked_outs(stage: str) -> list[dict[str, Any]]:
    """The outputs dvc.lock records for `stage` that DVC deletes before running it (not persist)."""
    if not LOCK_FILE.is_file():
        return []
    entry = (YAML(typ="safe").load(LOCK_FILE.read_text()) or {}).get("stages", {}).get(stage)
    if not entry:
        return []
    persist = _persistent_outs(stage)
    return [o for o in entry.get("outs", []) if o.get("md5") and o["path"] not in persist]


def _persistent_outs(stage: str) -> set[str]:
    """Paths declared `persist: true` for `stage` (DVC leaves those alone; the stage manages them
    itself, e.g. resumable checkpoints)."""
    return {path for path, opts in _declared(stage).items() if opts.get("persist")}


def _declared(stage: str) -> dict[str, dict[str, Any]]:
    """The outputs dvc.yaml declares for `stage` (outs, metrics, plots) with their options; a
    foreach stage's `${key}` is filled in from `name@key`."""
    name, _, key = stage.partition("@")
    spec = (YAML(typ="safe").load(STAGES_FILE.read_text()) or {}).get("stages", {}).get(name) or {}
    spec = spec.get("do", spec)
    declared = {}
    for section in ("outs", "metrics", "plots"):
        for item in spec.get(section) or []:
            for path, opts in (item.items() if isinstance(item, dict) else [(item, {})]):
                declared[str(path).replace("${key}", key)] = opts if isinstance(opts, dict) else {}
    return declared


def _caches() -> dict[str, Any]:
    """The repository's object databases: `md5` (DVC 3, `.dvc/cache/files/md5`) and the legacy one
    (`.dvc/cache`, outputs locked without `hash: md5`), as DVC's config places them."""
    from dvc.repo import Repo
    repo = Repo(os.getcwd())
    try:
        return {"md5": repo.cache.local, "legacy": repo.cache.legacy}
    finally:
        repo.close()


def _restore(path: Path, out: dict[str, Any], caches: dict[str, Any]) -> None:
    """Replace `path` with the cached object `out["md5"]` (a file, or a `.dir` listing), atomically:
    built next to it and renamed, so an interrupted restore leaves no half-restored output."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    odb = caches["md5" if out.get("hash") == "md5" else "legacy"]
    oid = out["md5"]
    if oid.endswith(".dir"):
        tree = Tree.load(odb, HashInfo("md5", oid))
        files = [(Path(*key), odb.oid_to_path(hi.value)) for key, _meta, hi in tree]
        missing = [src for _, src in files if not os.path.isfile(src)]
        if missing:
            raise FileNotFoundError(missing[0])
    else:
        src = odb.oid_to_path(oid)
        if not os.path.isfile(src):
            raise FileNotFoundError(src)
        files = None
    staged = path.parent / f".{path.name}.restoring-{os.getpid()}"
    _remove(staged)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if files is None:
            shutil.copyfile(src, staged)                 # a plain file's mode (umask), not the cache's 0444
        else:
            staged.mkdir()
            for rel, obj in files:
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(obj, staged / rel)
        _remove(path)
        os.replace(staged, path)
    finally:
        _remove(staged)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
