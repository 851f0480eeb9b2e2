"""metrics/report.html: one page a person can open — what was trained (preset, domains and their
sources, images per split, device, training time, throughput), the best epoch and why, the sample
grid of every epoch with a slider, FID/KID per epoch, the training losses, and every params section.

The page is self-contained apart from the sample grids, which it references by relative path inside
metrics/ (samples/epoch_NNN.png), and the test-set page (test_set/index.html). Curves are small
inline SVG panels written here: a plotting library would add a heavy dependency for a few lines, and
the page must render offline. Losses are drawn as small multiples, one panel per kind (G, D, cycle,
identity) with its own y scale, since the D losses sit near 0.25 while cycle losses start near 3.
Legends are HTML, coloured with inline styles, so no stylesheet rule can grey them out.

Training time and throughput come from train's dvclive logs (`<train live>/plots/metrics/
images_per_s.tsv`), never from a checkpoint: timing is kept out of every artifact but this page.

Also here: the test-set pages (metrics/test_set/index.html, page_NNN.html), which evaluate fills with
the best epoch's translations of every test image. The pages' stylesheets and script are package data
in unpaired/templates/; prepare's dataset page is unpaired/dataset_page.py.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from unpaired import templates
from unpaired.files import atomic_write_bytes

LOSSES = ("G_A", "G_B", "D_A", "D_B", "cycle_A", "cycle_B", "idt_A", "idt_B")
LOSS_PANELS = (
    ("generators (LSGAN)", ("G_A", "G_B")),
    ("discriminators", ("D_A", "D_B")),
    ("cycle consistency", ("cycle_A", "cycle_B")),
    ("identity", ("idt_A", "idt_B")),
    # CUT and FastCUT's losses (a run logs one model's: the other's panels are left out)
    ("G (LSGAN)", ("G_GAN", "G")),
    ("D (LSGAN)", ("D_real", "D_fake")),
    ("PatchNCE", ("NCE", "NCE_Y")),
)
FIRST_OF_PAIR = ("G_GAN", "D_real", "NCE")  # CUT's series drawn blue (the others of its pairs red)
COLOUR_A, COLOUR_B = "#1f77b4", "#d62728"  # everything about direction A (A→B) blue, B red


def colour_of(name: str) -> str:
    """A series' colour: blue for A / A→B series (G_A, cycle_A, fid_AtoB, ...), red for B ones;
    CUT's: blue for the first of each panel's pair (FIRST_OF_PAIR), red for the second."""
    return COLOUR_A if name.endswith(("_A", "AtoB")) or name in FIRST_OF_PAIR else COLOUR_B


Series = dict[str, list[tuple[float, float]]]


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo, (lo + hi) / 2, hi]


def svg_panel(series: Series, title: str, marker: float | None = None, note: str = "") -> str:
    """One small chart: each series a polyline (and dots) on the panel's own y scale, a marker line
    at x=`marker`, an HTML legend whose entries carry their series' colour. Non-finite points are
    left out. Returns "" when no series has a finite point (no empty chart is drawn)."""
    clean = {
        k: [(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y)]
        for k, v in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return ""
    w, h, left, right, top, bottom = 340, 190, 52, 10, 10, 26
    xs = [x for v in clean.values() for x, _ in v]
    ys = [y for v in clean.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    out = [f'<svg class=chart viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">']
    for t in _ticks(y0 + pad, y1 - pad):
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class=grid />'
            f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" class=tick>{t:.3g}</text>'
        )
    for t in sorted({x0 if len(set(xs)) > 1 else xs[0], x1 if len(set(xs)) > 1 else xs[0]}):
        out.append(
            f'<text x="{sx(t):.1f}" y="{h - 8}" text-anchor="middle" class=tick>{t:g}</text>'
        )
    out.append(
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" class=axis />'
    )
    if marker is not None and x0 <= marker <= x1:
        out.append(
            f'<line x1="{sx(marker):.1f}" y1="{top}" x2="{sx(marker):.1f}" y2="{h - bottom}" class=best />'
        )
    for name, values in clean.items():
        colour = colour_of(name)
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        out.append(
            f'<polyline data-series="{html.escape(name)}" fill="none" stroke="{colour}" '
            f'stroke-width="2" points="{pts}"/>'
        )
        out.extend(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>'
            for x, y in values
        )
    out.append("</svg>")
    legend = "".join(
        f'<span class=key data-series="{html.escape(n)}" style="color:{colour_of(n)}">'
        f'<i style="background:{colour_of(n)}"></i>{html.escape(n)}</span>'
        for n in clean
    )
    caption = f"<b>{html.escape(title)}</b> {legend}" + (
        f"<br><small>{html.escape(note)}</small>" if note else ""
    )
    return f"<figure class=panel>{''.join(out)}<figcaption class=legend>{caption}</figcaption></figure>"


def _tsv_series(live_dir: Path, name: str) -> list[tuple[float, float]]:
    """(step, value) pairs of dvclive's `live_dir`/plots/metrics/`name`.tsv; [] when the file is
    absent or unreadable (a run that logged nothing yet, or an older run that logged no such series)."""
    tsv = live_dir / "plots" / "metrics" / f"{name}.tsv"
    if not tsv.is_file():
        return []
    try:
        frame = pd.read_csv(tsv, sep="\t")
        return list(zip(frame["step"].astype(float), frame[name].astype(float)))
    except (OSError, ValueError, KeyError):  # empty, truncated or another program's file
        return []


def _read_json(path: Path | None) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _train_device(run: dict[str, Any], train: dict[str, Any]) -> str:
    """`cpu, 2 processes (DDP, effective batch 2) (train.device = auto)`, from what last.pt recorded."""
    setting = f"train.device = {train.get('device', 'auto')}"
    if "device" not in run:
        return html.escape(f"{setting} (this run's last.pt does not record what it resolved to)")
    n, batch = int(run.get("world_size", 1)), int(train.get("batch_size", 1))
    procs = f", {n} processes (DDP, effective batch {n * batch})" if n > 1 else ", 1 process"
    return html.escape(f"{run['device']}{procs} ({setting})")


def _context(
    params_all: dict[str, Any], prepare: dict[str, Any], live_dir: Path, summary: dict[str, Any]
) -> tuple[str, str]:
    """(the header's HTML, the throughput note): what was trained, on what, how fast."""
    esc = html.escape
    domains = params_all.get("domains") or {}
    kept = prepare.get("kept") or {}
    skipped = prepare.get("skipped") or {}
    rows = []
    for d in ("a", "b"):
        spec = domains.get(d) or {}
        detail = ", ".join(f"{k}: {json.dumps(v)}" for k, v in spec.items() if k != "source")
        counts = kept.get(d) or {}
        n_skip = sum(v for v in (skipped.get(d) or {}).values() if isinstance(v, (int, float)))
        rows.append(
            f"<tr><th>{d.upper()}</th><td>{esc(str(spec.get('source', '?')))}</td>"
            f"<td class=detail>{esc(detail)}</td><td>{counts.get('train', '?')}</td>"
            f"<td>{counts.get('test', '?')}</td><td>{n_skip if kept else '?'}</td></tr>"
        )
    ips = _tsv_series(live_dir, "images_per_s")
    per_epoch = max((kept.get(d) or {}).get("train", 0) for d in ("a", "b")) if kept else 0
    if ips:
        rates = [y for _, y in ips if y > 0]
        mean = sum(rates) / len(rates) if rates else 0.0
        seconds = sum(per_epoch / y for y in rates) if per_epoch else 0.0
        speed = f"{mean:.3g} images/s on average over {len(ips)} epoch(s) (last {ips[-1][1]:.3g})"
        took = (
            f"≈ {_duration(seconds)} in training steps ({per_epoch} images per epoch ÷ images/s, "
            f"summed over epochs)"
            if seconds
            else "not known (no metrics/prepare.json)"
        )
    else:
        speed, took = "not known (no training logs)", "not known (no training logs)"
    train = params_all.get("train") or {}
    evaluate = params_all.get("evaluate") or {}
    table = (
        "<table class=domains><tr><th>domain</th><th>source</th><th class=detail>settings</th><th>train images</th>"
        "<th>test images</th><th>skipped</th></tr>" + "".join(rows) + "</table>"
    )
    facts = [
        ("preset", esc(str(params_all.get("preset", "(none: params.yaml edited by hand)")))),
        (
            "training",
            esc(
                ", ".join(
                    part
                    for part in (
                        f"{train['epochs']} + {train['epochs_decay']} epochs (constant lr, then linear decay)"
                        if "epochs" in train and "epochs_decay" in train
                        else "",
                        f"{train['load_size']}→{train['crop_size']} px crops"
                        if "load_size" in train and "crop_size" in train
                        else "",
                        f"ngf {train['ngf']}, {train['n_blocks']} residual blocks"
                        if "ngf" in train and "n_blocks" in train
                        else "",
                    )
                    if part
                )
                or "see params below"
            ),
        ),
        (
            "device",
            f"train: {_train_device(summary.get('train_run') or {}, train)}; evaluate: "
            f"{esc(str(summary.get('device', '?')))} (evaluate.device = {esc(str(evaluate.get('device', 'auto')))})",
        ),
        ("training time", esc(took)),
        ("throughput", esc(speed)),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    return f"<dl class=facts>{dl}</dl>{table}", speed


def _flat(prefix: str, values: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _flat(key, v) if isinstance(v, dict) else [(key, v)]
    return out


def _params_table(section: str, values: dict[str, Any]) -> str:
    return (
        "<table class=params>"
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
            for k, v in _flat(section, values)
        )
        + "</table>"
    )


def write_report(
    path: Path,
    *,
    summary: dict[str, Any],
    table: pd.DataFrame,
    grids: list[int],
    params_all: dict[str, Any],
    live_dir: Path,
    prepare_report: Path | None = None,
) -> None:
    """Write the report to `path` atomically. `summary` is evaluate's (best_epoch, best_reason,
    select_fallback, metrics_available, metrics_skipped, weights (those that scored), weights_help,
    test_images ({"A": n, "B": n}), protocol and fid_caution (sentences; "" for none), notes, device,
    train_run); `table` has a row per evaluated epoch (epoch and, with metrics, fid_AtoB ... kid,
    kid_std_AtoB/BtoA); `grids` the epochs with
    a sample grid in samples/; `params_all` every params.yaml section as the stages read it; `live_dir`
    train's dvclive folder (losses, images/s: absent series are said to be unknown); `prepare_report`
    prepare's counts (metrics/prepare.json; absent: shown as ?)."""
    best = summary["best_epoch"]
    esc = html.escape
    prepare_counts = _read_json(prepare_report)
    header, _ = _context(params_all, prepare_counts, live_dir, summary)
    if prepare_counts.get("page"):  # the dataset page prepare wrote (metrics/data/index.html)
        link = Path(os.path.relpath(prepare_counts["page"], path.parent)).as_posix()
        header += (
            f"<p id=dataset-page>The prepared images, what was skipped and why: "
            f'<a href="{esc(link)}">{esc(link)}</a>.</p>'
        )

    panels = [
        svg_panel({n: _tsv_series(live_dir, n) for n in names}, title, best)
        for title, names in LOSS_PANELS
    ]
    panels = [p for p in panels if p]
    loss_html = (
        f"<div class=panels>{''.join(panels)}</div>"
        if panels
        else f"<p class=note>No training logs found in {esc(str(live_dir))}.</p>"
    )

    if summary["metrics_available"]:
        one_way = "kid_BtoA" not in table  # a one-directional run (CUT): A→B columns alone

        def series(cols: tuple[str, str]) -> Series:
            return {
                c: list(zip(table.epoch.astype(float), table[c].astype(float)))
                for c in cols
                if c in table
            }

        marked = f"dashed line: the best epoch ({best})"
        charts = [
            svg_panel(
                series(("fid_AtoB", "fid_BtoA")), "FID per epoch (lower is better)", best, marked
            ),
            svg_panel(
                series(("kid_AtoB", "kid_BtoA")), "KID per epoch (lower is better)", best, marked
            ),
        ]
        counts = summary.get("test_images") or {}
        n_A, n_B = counts.get("A", "?"), counts.get("B", "?")
        heads = [
            ("epoch", "epoch"),
            ("FID A→B", "fid_AtoB"),
            ("FID B→A", "fid_BtoA"),
            ("KID A→B ± std", "kid_AtoB"),
            ("KID B→A ± std", "kid_BtoA"),
            ("fid (sum)", "fid"),
            ("kid (sum)", "kid"),
        ]
        if one_way:  # no empty B→A columns, and no sums (they are A→B's)
            heads = [h for h in heads if h[1] in ("epoch", "fid_AtoB", "kid_AtoB")]
        stds = {"kid_AtoB": "kid_std_AtoB", "kid_BtoA": "kid_std_BtoA"}

        def cell(r: dict[str, Any], c: str) -> str:
            if c == "epoch":
                return str(int(r[c]))
            if not math.isfinite(r[c]):
                return "not finite"
            std = r.get(stds.get(c, ""), math.nan)
            if c not in stds or not math.isfinite(std):
                return f"{r[c]:.4g}"
            # equal test sets: every subset is the whole set, and the std is rounding noise (~1e-16)
            return f"{r[c]:.4g} ± {std:.2g}" if abs(std) > 1e-12 else f"{r[c]:.4g} ± 0"

        head = "".join(f"<th>{esc(h)}</th>" for h, _ in heads)
        body = "".join(
            f"<tr{' class=best' if int(r['epoch']) == best else ''}>"
            + "".join(f"<td>{cell(r, c)}</td>" for _, c in heads)
            + "</tr>"
            for r in table.to_dict("records")
        )
        metric_html = (
            f"<p id=test-counts>Test images: A→B translates the {n_A} test A images and compares them "
            f"with the {n_B} real test B images; B→A translates the {n_B} test B images and compares "
            f"them with the {n_A} real test A images.</p>"
            if not one_way
            else f"<p id=test-counts>Test images: A→B translates the {n_A} test A images and compares "
            f"them with the {n_B} real test B images. One direction: this run's model (CUT) has one "
            f"generator, A→B, so B→A is neither trained nor scored, and the best epoch is A→B's.</p>"
        )
        if summary.get("fid_caution"):
            metric_html += f"<p class=warn id=fid-caution>{esc(summary['fid_caution'])}</p>"
        metric_html += (
            f"<div class=panels>{''.join(c for c in charts if c)}</div>"
            f"<table class=numbers><tr>{head}</tr>{body}</table>"
        )
        if summary.get("protocol"):
            metric_html += f"<p id=protocol><b>How:</b> {esc(summary['protocol'])}</p>"
        used = summary.get("weights") or {}
        if used:
            metric_html += (
                f"<p id=inception-weights>Inception weights: {esc(used['source'])}, <code>"
                f"{esc(used['file'])}</code>, sha256 <code>{esc(used['sha256'])}</code>.</p>"
            )
    else:
        weights = summary.get("weights_help") or {}
        metric_html = f"<p class=warn id=metrics-skipped>{esc(summary.get('metrics_skipped') or 'FID/KID not computed')}</p>"
        if weights:
            metric_html += (
                "<p>To compute them without internet, fetch the file elsewhere and copy it in:</p><dl class=facts>"
                f'<dt>URL</dt><dd><a href="{esc(weights["url"])}">{esc(weights["url"])}</a></dd>'
                f"<dt>file name</dt><dd><code>{esc(weights['file'])}</code></dd>"
                f"<dt>folder</dt><dd><code>{esc(weights['folder'])}/</code> (by default ~/.cache/torch/hub/checkpoints)</dd>"
                f"<dt>sha256</dt><dd>starts with <code>{esc(weights['sha256_prefix'] or '?')}</code> (torch-fidelity "
                f"publishes only this prefix, in the file name)</dd>"
                f"<dt>then</dt><dd><code>{esc(weights['check'])}</code>, and run evaluate again</dd></dl>"
            )

    notes = "".join(f"<p class=warn>{esc(n)}</p>" for n in summary.get("notes") or [])
    best_cls = "warn" if summary.get("select_fallback") else "ok"
    best_html = (
        f"<p class={best_cls} id=best>Best epoch: <b>{best}</b> — {esc(summary['best_reason'])}. Its "
        f"generators are in <code>models/best/generators.pt</code>. {len(table)} saved epoch(s) evaluated. "
        f'Every test image translated by them: <a href="test_set/index.html">test_set/index.html</a>.</p>'
    )
    if grids:
        start = grids.index(best) if best in grids else len(grids) - 1
        strip = "".join(
            f'<figure{" class=best" if e == best else ""}><img src="samples/epoch_{e:03d}.png" '
            f'alt="samples at epoch {e}" loading="eager"><figcaption>epoch {e}{" ★ best" if e == best else ""}'
            f"</figcaption></figure>"
            for e in grids
        )
        grids_html = f"""<p>Rows: real A | fake B | reconstructed A, then real B | fake A | reconstructed B; the same test
images every epoch.</p>
<div id="viewer"><input id="epoch" type="range" min="0" max="{len(grids) - 1}" value="{start}"
 aria-label="epoch"> <span id="label"></span><br>
<img id="grid" src="samples/epoch_{grids[start]:03d}.png" alt="sample grid"></div>
<h3>All epochs</h3><div class="strip">{strip}</div>"""
    else:
        grids_html = "<p class=warn>No sample grids: there are no test images (see above).</p>"

    sections = params_all
    scalars = {k: v for k, v in sections.items() if not isinstance(v, dict)}
    blocks = ([f"<div><h3>top level</h3>{_params_table('', scalars)}</div>"] if scalars else []) + [
        f"<div><h3>{esc(name)}</h3>{_params_table(name, values)}</div>"
        for name, values in sections.items()
        if isinstance(values, dict)
    ]
    params_html = f"<div class=params-grid>{''.join(blocks)}</div>"

    css, js = templates.text("report.css"), templates.text("report.js")  # unpaired/templates/
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unpaired: evaluation report</title>
<style>
{css}
</style></head><body>
<h1>unpaired — evaluation report</h1>
{header}
{best_html}
{notes}
<h2>Sample grids</h2>
{grids_html}
<h2>FID / KID</h2>{metric_html}
<h2>Training losses</h2>
<p>Per-epoch means, each panel on its own scale; the dashed line marks the best epoch.</p>
{loss_html}
<h2>Params</h2>{params_html}
<script>
const epochs = {json.dumps(grids)}, best = {best};
{js}
</script>
</body></html>
"""
    atomic_write_bytes(path, page.encode())


# --- metrics/test_set: every test image translated by the best epoch ----------------------------
TEST_SET_KINDS = ("real", "fake", "rec")


def page_name_for_test_set(i: int) -> str:
    """Page `i` (from 0) of the test set: index.html, then page_002.html, page_003.html, ..."""
    return "index.html" if i == 0 else f"page_{i + 1:03d}.html"


def pages_for_test_set(
    epoch: int,
    generators: Path,
    directions: dict[str, list[str]],
    rows_per_page: int,
    kinds: tuple[str, ...] = TEST_SET_KINDS,
) -> dict[str, str]:
    """The test-set pages as {file name: HTML}: for each direction ("AtoB", "BtoA" → the test file
    names of its source domain) a table of `rows_per_page` rows per page, each row the real image,
    its translation by G_A or G_B and its reconstruction, linked to the full-size PNGs the caller
    writes at <direction>/{real,fake,rec}/<name> (`kinds`: real and fake alone for a one-directional
    run, whose page says so). A direction without images says how to get some.
    `generators` is the checkpoint shown (= models/best/generators.pt); `epoch` its epoch."""
    esc = html.escape
    style = templates.text("test_set.css")  # unpaired/templates/
    pages = max(1, math.ceil(max(map(len, directions.values()), default=0) / rows_per_page))
    out = {}
    for i in range(pages):
        nav = (
            " ".join(
                f"<b>{j + 1}</b>"
                if j == i
                else f'<a href="{page_name_for_test_set(j)}">{j + 1}</a>'
                for j in range(pages)
            )
            if pages > 1
            else ""
        )
        parts = []
        for label, names in directions.items():
            a, b = label[0], label[-1]
            rows = "".join(
                f"<tr><td class=name>{esc(n)}</td>"
                + "".join(
                    f'<td><a href="{label}/{kind}/{esc(n)}"><img src="{label}/{kind}/{esc(n)}" '
                    f'alt="{kind} {esc(n)}" loading="lazy"></a></td>'
                    for kind in kinds
                )
                + "</tr>"
                for n in names[i * rows_per_page : (i + 1) * rows_per_page]
            )
            body = (
                f"<table><tr><th>file</th><th>real {a}</th><th>fake {b} (G_{a})</th>"
                + (f"<th>reconstructed {a}</th>" if "rec" in kinds else "")
                + f"</tr>{rows}</table>"
                if names
                else f"<p class=warn>No test images in test{a}: raise prepare.test_fraction (or add images) and "
                f"run prepare again.</p>"
            )
            parts.append(f"<h2>{a} → {b}: {len(names)} test image(s)</h2>{body}")
        if "BtoA" not in directions:
            parts.append(
                "<p class=note>One direction: this run's model (CUT) has one generator, A → B.</p>"
            )
        out[page_name_for_test_set(i)] = (
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>unpaired: test set, epoch {epoch}"
            f"</title><style>{style}</style></head><body>"
            f"<h1>Test set translated by the best epoch ({epoch})</h1>"
            f"<p>Generators: <code>{esc(generators.as_posix())}</code> (= models/best/generators.pt). "
            f"Click an image for the full-size file. Page {i + 1} of {pages}. {nav}</p>"
            + "".join(parts)
            + (f"<p>{nav}</p>" if nav else "")
            + "</body></html>\n"
        )
    return out
