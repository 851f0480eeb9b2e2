"""fetch@<domain>: build the domain's raw folder (images + manifest.csv) from its source.

    python -m stages.fetch a --out data/raw/a       # reads params.yaml domains.a (dvc.yaml's cmd)

The source writes into a temporary directory that replaces the --out folder only when complete.
Downloads go through --cache (data/cache by default, shared by the domains, so one archive serves
both), which survives re-runs and is not a DVC output.
"""

from __future__ import annotations

from pathlib import Path

from unpaired import params, sources
from unpaired.errors import ArgumentParser, UserError, main_guard
from unpaired.files import atomic_dir, remove_stale_temporaries, write_manifest
from unpaired.parallel import default_workers
from unpaired.sources.base import MANIFEST_COLUMNS, FetchContext


def fetch_domain(
    domain: str,
    out: Path,
    cache: Path,
    params_file: Path = params.PARAMS_FILE,
    workers: int | None = None,
) -> Path:
    """Fetch `domain` (a key of params.yaml's `domains`) into `out`, atomically; returns `out`."""
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
    target = Path(out)
    with atomic_dir(target) as tmp:
        ctx = FetchContext(
            domain=domain,
            key=key,
            out_dir=tmp,
            cache_dir=Path(cache),
            workers=workers or default_workers(),
        )
        rows = fetch(raw, ctx)
        if not rows:
            raise UserError(
                f"{key}: the {spec['source']} source produced no images; check its keys"
            )
        write_manifest(tmp / "manifest.csv", rows, MANIFEST_COLUMNS)
    print(f"fetch@{domain}: {len(rows)} images from {spec['source']} -> {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m stages.fetch", description="Fetch one domain's raw images."
    )
    parser.add_argument("domain", help="a key of `domains` in params.yaml")
    parser.add_argument(
        "--out", type=Path, required=True, help="the raw folder to build (data/raw/<domain>)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("data/cache"),
        help="download cache shared by the domains (default: data/cache)",
    )
    args = parser.parse_args(argv)
    remove_stale_temporaries(
        args.out.parent, args.cache, recursive=True
    )  # what a killed run left behind
    fetch_domain(args.domain, args.out, args.cache)


if __name__ == "__main__":
    main_guard(main)
