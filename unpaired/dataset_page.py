"""metrics/data/index.html, the dataset page prepare writes: a contact sheet per domain and split
(every prepared image up to `cap` thumbnails, else a sample seeded by prepare.seed, saying so), the
skipped images grouped by reason (each near-duplicate or duplicate next to the image kept instead),
counts per source and per skip reason, and the prepare settings. Thumbnails are PNG files in the
page's folder (thumbs/<domain>/), the stylesheet is unpaired/templates/dataset.css, inlined. The same
inputs give the same bytes.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unpaired import templates

THUMB = 64  # thumbnail side in pixels (the longer side; kept images are square)
# the page's groups of skipped images: (id, heading, the skip reasons it gathers)
SKIP_GROUPS = (
    ("unreadable", "unreadable", ("empty", "not_image", "truncated", "unreadable", "error")),
    ("too_small", "too small", ("too_small",)),
    ("too_large", "too large", ("too_large",)),
    ("duplicate", "duplicate (same bytes)", ("duplicate",)),
    ("near_duplicate", "near-duplicate (next to the image kept)", ("near_duplicate",)),
    ("no_face", "no face", ("no_face",)),
)


def dataset_thumbnail(img: Any) -> bytes:
    """A Pillow RGB image → PNG bytes of a copy whose longer side is at most THUMB pixels (aspect
    kept; smaller images as they are). Deterministic bytes."""
    from unpaired.images import RESAMPLE, png_bytes

    small = img.copy()
    small.thumbnail((THUMB, THUMB), RESAMPLE)
    return png_bytes(small)


def _sample(items: list[Any], cap: int, seed: int, key: str) -> tuple[list[Any], str]:
    """All of `items` up to `cap`, else a sample of `cap` drawn with the seed (order kept), and the
    note saying which."""
    import random

    if len(items) <= cap:
        return items, f"all {len(items)}"
    chosen = sorted(random.Random(f"{seed}:{key}").sample(range(len(items)), cap))
    return [items[i] for i in chosen], f"a sample of {cap} of {len(items)} (seeded by prepare.seed)"


class DatasetSheets:
    """Collects, domain by domain, what the dataset page shows, copying the chosen thumbnails into
    the page folder as it goes (so no image is held in memory), then writes index.html."""

    def __init__(self, cap: int, seed: int):
        self.cap, self.seed = cap, seed
        self.sheets: list[
            tuple[str, str, str, list[tuple[str, str]]]
        ] = []  # domain, split, note, figures
        self.groups: dict[
            str, list[tuple[str, str, list[str]]]
        ] = {}  # group -> (domain, note, items)

    def _thumb(self, r: Any, d: str, page: Path, thumb: Callable[[Any], Path | None]) -> str | None:
        """Copy r's staged thumbnail into page/thumbs/<d>/ and return its page-relative path."""
        staged = thumb(r)
        if staged is None or not staged.is_file():
            return None
        prefix = "" if r.skip is None else "skipped-"
        rel = f"thumbs/{d}/{prefix}{r.sha256[:16]}.png"
        (page / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staged, page / rel)
        return rel

    def _figure(
        self,
        r: Any,
        d: str,
        page: Path,
        thumb: Callable[[Any], Path | None],
        caption: str,
        title: str = "",
    ) -> str:
        esc = html.escape
        rel = self._thumb(r, d, page, thumb)
        title = title or caption
        img = (
            f'<img src="{esc(rel)}" alt="{esc(caption)}" title="{esc(title)}">'
            if rel
            else f'<div class=noimg title="{esc(title)}">✕</div>'
        )
        return f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>"

    def add_domain(
        self, d: str, results: list[Any], page: Path, thumb: Callable[[Any], Path | None]
    ) -> None:
        """`results`: prepare's per-file outcomes for domain `d` (unpaired/prepare.py Outcome: attributes
        skip, rel, sha256, name, kept, detail); kept ones carry their prepared `name` (trainA/<hash>.png).
        `thumb(r)`: the file of r's staged thumbnail, or None when it has none."""
        esc = html.escape
        for split in ("train", "test"):
            kept = sorted(
                (r for r in results if r.skip is None and r.name.startswith(split)),
                key=lambda r: r.name,
            )
            chosen, note = _sample(kept, self.cap, self.seed, f"{d}:{split}")
            figs = [(self._thumb(r, d, page, thumb) or "", f"{r.name} ← {r.rel}") for r in chosen]
            self.sheets.append((d, split, note, figs))
        for group, _, reasons in SKIP_GROUPS:
            skipped = sorted(
                (r for r in results if r.skip in reasons), key=lambda r: (r.skip, r.rel)
            )
            if not skipped:
                continue
            chosen, note = _sample(skipped, self.cap, self.seed, f"{d}:{group}")
            items = []
            for r in chosen:
                caption = r.rel if r.kept is not None else f"{r.rel} ({r.skip})"
                fig = self._figure(r, d, page, thumb, caption, f"{caption}: {r.detail or ''}")
                if r.kept is not None:
                    keeper = r.kept
                    fig = (
                        f'<div class=pair data-kept="{esc(keeper.name)}">{fig}'
                        f"{self._figure(keeper, d, page, thumb, 'kept: ' + keeper.name)}</div>"
                    )
                items.append(fig)
            self.groups.setdefault(group, []).append((d, note, items))

    def write(self, page: Path, counts: dict[str, Any], settings: dict[str, Any]) -> None:
        """Write page/index.html from what add_domain collected, `counts` (prepare.json's content)
        and `settings` (the prepare params)."""
        esc = html.escape
        style = templates.text("dataset.css")  # unpaired/templates/
        total = ", ".join(
            f"{d.upper()}: {k.get('train', 0)} train + {k.get('test', 0)} test"
            for d, k in counts["kept"].items()
        )
        settings_rows = "".join(
            f"<tr><th class=l>prepare.{esc(k)}</th><td class=l>{esc(json.dumps(v))}</td></tr>"
            for k, v in settings.items()
        )
        source_rows = "".join(
            f"<tr><th class=l>{d.upper()}</th><td class=l>{esc(s)}</td><td>{c.get('kept', 0)}</td>"
            f"<td>{c.get('skipped', 0)}</td></tr>"
            for d, per in counts.get("sources", {}).items()
            for s, c in per.items()
        )
        reasons = sorted({r for per in counts["skipped"].values() for r in per})
        reason_rows = "".join(
            f"<tr><th class=l>{esc(r)}</th>"
            + "".join(f"<td>{counts['skipped'][d].get(r, 0)}</td>" for d in counts["skipped"])
            + "</tr>"
            for r in reasons
        )
        reason_rows += (
            "<tr><th class=l>cropped to a face (kept)</th>"
            + "".join(
                f"<td>{counts.get('cropped_to_face', {}).get(d, 0)}</td>" for d in counts["skipped"]
            )
            + "</tr>"
        )
        cross = counts.get("cross_domain_near_duplicates") or []
        cross_html = (
            (
                f"<p class=warn id=cross-domain>{len(cross)} near-duplicate pair(s) across domains A and B "
                f"(the same picture in both): "
                + esc(", ".join(f"{a} ~ {b}" for a, b in cross[:20]))
                + (", ..." if len(cross) > 20 else "")
                + "</p>"
            )
            if cross
            else ""
        )
        sheets = "".join(
            f'<section class=split data-domain="{d}" data-split="{split}"><h3>{split}{d.upper()} — {esc(note)}</h3>'
            f"<div class=sheet>"
            + "".join(f'<img src="{esc(src)}" alt="{esc(t)}" title="{esc(t)}">' for src, t in figs)
            + "</div></section>"
            for d, split, note, figs in self.sheets
        )
        groups = "".join(
            f'<section class=group data-group="{gid}"><h3>{esc(title)}</h3>'
            + "".join(
                f"<p class=note>domain {d.upper()}: {esc(note)}</p><div class=items>{''.join(items)}</div>"
                for d, note, items in self.groups[gid]
            )
            + "</section>"
            for gid, title, _ in SKIP_GROUPS
            if gid in self.groups
        )
        doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unpaired: dataset</title><style>{
            style
        }</style></head>
<body><h1>unpaired — the prepared dataset</h1>
<p>{esc(total)}; {
            counts.get("total_skipped", 0)
        } raw file(s) skipped. Thumbnails are the prepared images
(hover for the file and where it came from).</p>{cross_html}
<div class=columns><div><h2>Counts per source</h2><table id=sources><tr><th class=l>domain</th><th class=l>source</th>
<th>kept</th><th>skipped</th></tr>{source_rows}</table></div>
<div><h2>Skipped, by reason</h2><table id=reasons><tr><th class=l>reason</th>{
            "".join(f"<th>{d.upper()}</th>" for d in counts["skipped"])
        }</tr>{reason_rows}</table></div>
<div><h2>Settings</h2><table id=settings>{settings_rows}</table></div></div>
<h2>Contact sheets</h2>{sheets}
<h2>Skipped images</h2>{groups or "<p class=note id=none-skipped>No image was skipped.</p>"}
</body></html>
"""
        (page / "index.html").write_bytes(doc.encode())
