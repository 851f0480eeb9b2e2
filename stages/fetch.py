"""fetch@<domain>: build data/raw/<domain>/ (images + manifest.csv) from the domain's source.

    python -m stages.fetch a        # reads params.yaml domains.a

The source writes into a temporary directory that replaces data/raw/<domain> only when complete.
Downloads go through data/cache/ (shared by the domains, so one archive serves both), which
survives re-runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from unpaired import params, sources
from unpaired.errors import UserError, main_guard
from unpaired.files import atomic_dir, remove_stale_temporaries, write_manifest
from unpaired.parallel import default_workers
from unpaired.sources.base import MANIFEST_COLUMNS, FetchContext

RAW = Path("data/raw")
CACHE = Path("data/cache")


def fetch_domain(domain: str, params_file: Path = params.PARAMS_FILE, raw_root: Path = RAW,
                 cache_root: Path = CACHE, workers: int | None = None) -> Path:
    data = params.load(params_file)
    domains = params.section(data, "domains")
    key = f"domains.{domain}"
    if domain not in domains:
        params.fail(key, f"no such domain; defined domains: {', '.join(domains) or 'none'}")
    spec = params.section(domains, domain)
    if "source" not in spec:
        params.fail(f"{key}.source", f"required; one of: {', '.join(sorted(sources.SOURCES))}")
    fetch = sources.get(spec["source"], f"{key}.source")
    raw = {k: v for k, v in spec.items() if k != "source"}
    target = raw_root / domain
    with atomic_dir(target) as tmp:
        ctx = FetchContext(domain=domain, key=key, out_dir=tmp, cache_dir=cache_root,
                           workers=workers or default_workers())
        rows = fetch(raw, ctx)
        if not rows:
            raise UserError(f"{key}: the {spec['source']} source produced no images; check its keys")
        write_manifest(tmp / "manifest.csv", rows, MANIFEST_COLUMNS)
    print(f"fetch@{domain}: {len(rows)} images from {spec['source']} -> {target}")
    return target


def main() -> None:
    if len(sys.argv) != 2:
        raise UserError("usage: python -m stages.fetch DOMAIN   (a key of `domains` in params.yaml)")
    remove_stale_temporaries(RAW, CACHE, recursive=True)     # what a killed run left behind
    fetch_domain(sys.argv[1])


if __name__ == "__main__":
    from unpaired.restore import keep_outputs   # under dvc repro: a failure keeps the previous outputs
    main_guard(keep_outputs(main))
