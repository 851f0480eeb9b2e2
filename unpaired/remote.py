"""Which pipeline outputs a DVC remote lacks, by name.

`dvc pull` from a remote that lost objects names missing hashes ("md5: 4fd0...") and "N files failed
to download"; `unpaired remote-status` names the outputs and files instead, e.g.

    missing from remote 'local':
      metrics/samples  (the whole output: its directory listing is missing)
      data/prepared/trainA/03b1c0ffee5a1b2c.png

It asks DVC for the outputs of the current dvc.lock that go through the cache, and checks the
remote's object store for each of their objects (dvc's own object-database API, so it works for
every remote type DVC supports).
"""

from __future__ import annotations

import json

from unpaired.errors import UserError


def missing_outputs(
    root: str = ".", remote: str | None = None, repair: bool = False
) -> tuple[str, dict[str, list[str]]]:
    """(remote name, {output path: [missing file paths]}); an empty list means the whole output.

    With `repair`, the directory listings of incomplete outputs are removed from the remote and the
    outputs are pushed again. (`dvc push` trusts a listing that is present and skips that directory's
    files, so a remote that lost a file inside a directory is never mended by a plain push.)"""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        repo = Repo(root)
        odb = repo.cloud.get_remote_odb(remote, "status")
        name = remote or repo.config["core"].get("remote", "")
        missing: dict[str, list[str]] = {}
        for out in repo.index.outs:
            oid = out.hash_info.value if out.hash_info else None
            if not out.use_cache or not oid:
                continue
            if not odb.exists(oid):
                missing[out.def_path] = []
                continue
            if oid.endswith(".dir"):
                with odb.fs.open(odb.oid_to_path(oid), "r") as f:
                    listing = json.load(f)
                present = set(odb.oids_exist([entry["md5"] for entry in listing]))
                lost = [
                    f"{out.def_path}/{entry['relpath']}"
                    for entry in listing
                    if entry["md5"] not in present
                ]
                if lost:
                    missing[out.def_path] = lost
                    if repair:
                        odb.fs.remove(odb.oid_to_path(oid))
        if repair and missing:
            repo.push(targets=sorted(missing), remote=remote)
            return name, missing_outputs(root, remote)[1]
        return name, missing
    except DvcException as err:
        raise UserError(f"dvc remote: {str(err).splitlines()[0]}") from None


def report(root: str = ".", remote: str | None = None, repair: bool = False) -> int:
    name, missing = missing_outputs(root, remote, repair)
    if not missing:
        print(f"remote '{name}' holds every cached output of dvc.lock")
        return 0
    print(f"missing from remote '{name}':")
    for path, files in sorted(missing.items()):
        if not files:
            print(f"  {path}  (the whole output)")
        for f in files:
            print(f"  {f}")
    print(
        "from a clone that has these outputs, run `uv run unpaired remote-status --repair` "
        "(re-uploads them), or `uv run dvc repro` to rebuild them"
    )
    return 1
