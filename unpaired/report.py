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
the best epoch's translations of every test image.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from unpaired.files import atomic_write_bytes

LOSSES = ("G_A", "G_B", "D_A", "D_B", "cycle_A", "cycle_B", "idt_A", "idt_B")
LOSS_PANELS = (("generators (LSGAN)", ("G_A", "G_B")), ("discriminators", ("D_A", "D_B")),
               ("cycle consistency", ("cycle_A", "cycle_B")), ("identity", ("idt_A", "idt_B")))
COLOUR_A, COLOUR_B = "#1f77b4", "#d62728"    # everything about direction A (A→B) blue, B red


def colour_of(name: str) -> str:
    """A series' colour: blue for A / A→B series (G_A, cycle_A, fid_AtoB, ...), red for B ones."""
    return COLOUR_A if name.endswith(("_A", "AtoB")) else COLOUR_B


Series = dict[str, list[tuple[float, float]]]


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo, (lo + hi) / 2, hi]


def svg_panel(series: Series, title: str, marker: float | None = None, note: str = "") -> str:
    """One small chart: each series a polyline (and dots) on the panel's own y scale, a marker line
    at x=`marker`, an HTML legend whose entries carry their series' colour. Non-finite points are
    left out. Returns "" when no series has a finite point (no empty chart is drawn)."""
    clean = {k: [(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y)] for k, v in series.items()}
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
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)     # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (h - top - bottom)      # noqa: E731
    out = [f'<svg class=chart viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">']
    for t in _ticks(y0 + pad, y1 - pad):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class=grid />'
                   f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" class=tick>{t:.3g}</text>')
    for t in sorted({x0 if len(set(xs)) > 1 else xs[0], x1 if len(set(xs)) > 1 else xs[0]}):
        out.append(f'<text x="{sx(t):.1f}" y="{h - 8}" text-anchor="middle" class=tick>{t:g}</text>')
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" class=axis />')
    if marker is not None and x0 <= marker <= x1:
        out.append(f'<line x1="{sx(marker):.1f}" y1="{top}" x2="{sx(marker):.1f}" y2="{h - bottom}" class=best />')
    for name, values in clean.items():
        colour = colour_of(name)
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        out.append(f'<polyline data-series="{html.escape(name)}" fill="none" stroke="{colour}" '
                   f'stroke-width="2" points="{pts}"/>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in values)
    out.append("</svg>")
    legend = "".join(f'<span class=key data-series="{html.escape(n)}" style="color:{colour_of(n)}">'
                     f'<i style="background:{colour_of(n)}"></i>{html.escape(n)}</span>' for n in clean)
    caption = f"<b>{html.escape(title)}</b> {legend}" + (f"<br><small>{html.escape(note)}</small>" if note else "")
    return f'<figure class=panel>{"".join(out)}<figcaption class=legend>{caption}</figcaption></figure>'


def _tsv_series(live_dir: Path, name: str) -> list[tuple[float, float]]:
    """(step, value) pairs of dvclive's `live_dir`/plots/metrics/`name`.tsv; [] when the file is
    absent or unreadable (a run that logged nothing yet, or an older run that logged no such series)."""
    tsv = live_dir / "plots" / "metrics" / f"{name}.tsv"
    if not tsv.is_file():
        return []
    try:
        frame = pd.read_csv(tsv, sep="\t")
        return list(zip(frame["step"].astype(float), frame[name].astype(float)))
    except (OSError, ValueError, KeyError):    # empty, truncated or another program's file
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


def _context(params_all: dict[str, Any], prepare: dict[str, Any], live_dir: Path,
             summary: dict[str, Any]) -> tuple[str, str]:
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
        rows.append(f"<tr><th>{d.upper()}</th><td>{esc(str(spec.get('source', '?')))}</td>"
                    f"<td class=detail>{esc(detail)}</td><td>{counts.get('train', '?')}</td>"
                    f"<td>{counts.get('test', '?')}</td><td>{n_skip if kept else '?'}</td></tr>")
    ips = _tsv_series(live_dir, "images_per_s")
    per_epoch = max((kept.get(d) or {}).get("train", 0) for d in ("a", "b")) if kept else 0
    if ips:
        rates = [y for _, y in ips if y > 0]
        mean = sum(rates) / len(rates) if rates else 0.0
        seconds = sum(per_epoch / y for y in rates) if per_epoch else 0.0
        speed = f"{mean:.3g} images/s on average over {len(ips)} epoch(s) (last {ips[-1][1]:.3g})"
        took = (f"≈ {_duration(seconds)} in training steps ({per_epoch} images per epoch ÷ images/s, "
                f"summed over epochs)" if seconds else "not known (no metrics/prepare.json)")
    else:
        speed, took = "not known (no training logs)", "not known (no training logs)"
    train = params_all.get("train") or {}
    evaluate = params_all.get("evaluate") or {}
    table = ("<table class=domains><tr><th>domain</th><th>source</th><th class=detail>settings</th><th>train images</th>"
             "<th>test images</th><th>skipped</th></tr>" + "".join(rows) + "</table>")
    facts = [
        ("preset", esc(str(params_all.get("preset", "(none: params.yaml edited by hand)")))),
        ("training", esc(", ".join(part for part in (
            f"{train['epochs']} + {train['epochs_decay']} epochs (constant lr, then linear decay)"
            if "epochs" in train and "epochs_decay" in train else "",
            f"{train['load_size']}→{train['crop_size']} px crops" if "load_size" in train and "crop_size" in train
            else "",
            f"ngf {train['ngf']}, {train['n_blocks']} residual blocks" if "ngf" in train and "n_blocks" in train
            else "") if part) or "see params below")),
        ("device", f"train: {_train_device(summary.get('train_run') or {}, train)}; evaluate: "
                   f"{esc(str(summary.get('device', '?')))} (evaluate.device = {esc(str(evaluate.get('device', 'auto')))})"),
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
    return "<table class=params>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in _flat(section, values)) + "</table>"


def write_report(path: Path, *, summary: dict[str, Any], table: pd.DataFrame, grids: list[int],
                 params_all: dict[str, Any], live_dir: Path, prepare_report: Path | None = None) -> None:
    """Write the report to `path` atomically. `summary` is evaluate's (best_epoch, best_reason,
    select_fallback, metrics_available, metrics_skipped, weights (those that scored), weights_help,
    notes, device, train_run); `table`
    has a row per evaluated epoch (epoch and, with metrics, fid_AtoB ... kid); `grids` the epochs with
    a sample grid in samples/; `params_all` every params.yaml section as the stages read it; `live_dir`
    train's dvclive folder (losses, images/s: absent series are said to be unknown); `prepare_report`
    prepare's counts (metrics/prepare.json; absent: shown as ?)."""
    best = summary["best_epoch"]
    esc = html.escape
    prepare_counts = _read_json(prepare_report)
    header, _ = _context(params_all, prepare_counts, live_dir, summary)
    if prepare_counts.get("page"):      # the dataset page prepare wrote (metrics/data/index.html)
        link = Path(os.path.relpath(prepare_counts["page"], path.parent)).as_posix()
        header += (f'<p id=dataset-page>The prepared images, what was skipped and why: '
                   f'<a href="{esc(link)}">{esc(link)}</a>.</p>')

    panels = [svg_panel({n: _tsv_series(live_dir, n) for n in names}, title, best) for title, names in LOSS_PANELS]
    panels = [p for p in panels if p]
    loss_html = (f'<div class=panels>{"".join(panels)}</div>' if panels else
                 f"<p class=note>No training logs found in {esc(str(live_dir))}.</p>")

    if summary["metrics_available"]:
        def series(cols: tuple[str, str]) -> Series:
            return {c: list(zip(table.epoch.astype(float), table[c].astype(float))) for c in cols}
        charts = [svg_panel(series(("fid_AtoB", "fid_BtoA")), "FID per epoch (lower is better)", best),
                  svg_panel(series(("kid_AtoB", "kid_BtoA")), "KID per epoch (lower is better)", best)]
        cols = ["epoch", "fid_AtoB", "fid_BtoA", "kid_AtoB", "kid_BtoA", "fid", "kid"]
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join(
            f"<tr{' class=best' if int(r['epoch']) == best else ''}>" + "".join(
                f"<td>{int(r[c]) if c == 'epoch' else (f'{r[c]:.4g}' if math.isfinite(r[c]) else 'not finite')}</td>"
                for c in cols) + "</tr>" for r in table.to_dict("records"))
        metric_html = (f'<div class=panels>{"".join(c for c in charts if c)}</div>'
                       f"<table class=numbers><tr>{head}</tr>{body}</table>")
        used = summary.get("weights") or {}
        if used:
            metric_html += (f"<p id=inception-weights>Inception weights: {esc(used['source'])}, <code>"
                            f"{esc(used['file'])}</code>, sha256 <code>{esc(used['sha256'])}</code>.</p>")
    else:
        weights = summary.get("weights_help") or {}
        metric_html = f"<p class=warn id=metrics-skipped>{esc(summary.get('metrics_skipped') or 'FID/KID not computed')}</p>"
        if weights:
            metric_html += (
                "<p>To compute them without internet, fetch the file elsewhere and copy it in:</p><dl class=facts>"
                f"<dt>URL</dt><dd><a href=\"{esc(weights['url'])}\">{esc(weights['url'])}</a></dd>"
                f"<dt>file name</dt><dd><code>{esc(weights['file'])}</code></dd>"
                f"<dt>folder</dt><dd><code>{esc(weights['folder'])}/</code> (by default ~/.cache/torch/hub/checkpoints)</dd>"
                f"<dt>sha256</dt><dd>starts with <code>{esc(weights['sha256_prefix'] or '?')}</code> (torch-fidelity "
                f"publishes only this prefix, in the file name)</dd>"
                f"<dt>then</dt><dd><code>{esc(weights['check'])}</code>, and run evaluate again</dd></dl>")

    notes = "".join(f"<p class=warn>{esc(n)}</p>" for n in summary.get("notes") or [])
    best_cls = "warn" if summary.get("select_fallback") else "ok"
    best_html = (f"<p class={best_cls} id=best>Best epoch: <b>{best}</b> — {esc(summary['best_reason'])}. Its "
                 f"generators are in <code>models/best/generators.pt</code>. {len(table)} saved epoch(s) evaluated. "
                 f'Every test image translated by them: <a href="test_set/index.html">test_set/index.html</a>.</p>')
    if grids:
        start = grids.index(best) if best in grids else len(grids) - 1
        strip = "".join(
            f'<figure{" class=best" if e == best else ""}><img src="samples/epoch_{e:03d}.png" '
            f'alt="samples at epoch {e}" loading="eager"><figcaption>epoch {e}{" ★ best" if e == best else ""}'
            f"</figcaption></figure>" for e in grids)
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
        for name, values in sections.items() if isinstance(values, dict)]
    params_html = f'<div class=params-grid>{"".join(blocks)}</div>'

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unpaired: evaluation report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }} h3 {{ font-size: 15px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td.detail, table.params td, th.detail {{ text-align: left; font-size: 12px; }} table.params {{ margin-bottom: 8px; }}
.params-grid {{ display: flex; flex-wrap: wrap; gap: 4px 24px; align-items: flex-start; }}
tr.best td {{ background: #e6f7e6; font-weight: bold; }}
dl.facts {{ display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }}
dl.facts dt {{ font-weight: bold; }} dl.facts dd {{ margin: 0; }}
.panels {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.panel {{ margin: 0; border: 1px solid #eee; padding: 4px; }}
.chart {{ width: 340px; height: 190px; display: block; }}
.chart .tick {{ font-size: 10px; fill: #555; }} .chart .grid {{ stroke: #eee; }} .chart .axis {{ stroke: #999; }}
.chart .best {{ stroke: #2a2; stroke-dasharray: 4 3; }}
.legend {{ font-size: 12px; }} .legend .key {{ margin-left: 10px; white-space: nowrap; }}
.legend .key i {{ display: inline-block; width: 14px; height: 3px; margin: 0 4px 3px 0; vertical-align: middle; }}
.warn {{ background: #fff4e5; padding: 8px; border-left: 4px solid #f0a020; }}
.ok {{ background: #eef7ee; padding: 8px; border-left: 4px solid #2a2; }} .note {{ color: #666; }}
#viewer img, .strip img {{ image-rendering: pixelated; }}
#viewer img {{ max-height: 70vh; border: 1px solid #ccc; }}
.strip {{ display: flex; gap: 12px; overflow-x: auto; padding-bottom: 8px; }}
.strip figure {{ margin: 0; text-align: center; }} .strip img {{ height: 260px; border: 2px solid transparent; }}
.strip figure.best img {{ border-color: #2a2; }}
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
const slider = document.getElementById("epoch"), img = document.getElementById("grid"),
      label = document.getElementById("label");
function show() {{
  const e = epochs[Number(slider.value)];
  img.src = "samples/epoch_" + String(e).padStart(3, "0") + ".png";
  label.textContent = "epoch " + e + (e === best ? " ★ best" : "");
}}
if (slider) {{ slider.addEventListener("input", show); show(); }}
</script>
</body></html>
"""
    atomic_write_bytes(path, page.encode())


# --- metrics/test_set: every test image translated by the best epoch ----------------------------
TEST_SET_STYLE = ("body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}"
                  "td,th{border:1px solid #ccc;padding:3px}table{border-collapse:collapse}"
                  "td.name{font:12px monospace}img{width:128px;height:auto;image-rendering:pixelated;display:block}"
                  ".warn{background:#fff4e5;padding:8px;border-left:4px solid #f0a020}")
TEST_SET_KINDS = ("real", "fake", "rec")


def page_name_for_test_set(i: int) -> str:
    """Page `i` (from 0) of the test set: index.html, then page_002.html, page_003.html, ..."""
    return "index.html" if i == 0 else f"page_{i + 1:03d}.html"


def pages_for_test_set(epoch: int, generators: Path, directions: dict[str, list[str]], rows_per_page: int
                   ) -> dict[str, str]:
    """The test-set pages as {file name: HTML}: for each direction ("AtoB", "BtoA" → the test file
    names of its source domain) a table of `rows_per_page` rows per page, each row the real image,
    its translation by G_A or G_B and its reconstruction, linked to the full-size PNGs the caller
    writes at <direction>/{real,fake,rec}/<name>. A direction without images says how to get some.
    `generators` is the checkpoint shown (= models/best/generators.pt); `epoch` its epoch."""
    esc = html.escape
    pages = max(1, math.ceil(max(map(len, directions.values()), default=0) / rows_per_page))
    out = {}
    for i in range(pages):
        nav = " ".join(f"<b>{j + 1}</b>" if j == i else f'<a href="{page_name_for_test_set(j)}">{j + 1}</a>'
                       for j in range(pages)) if pages > 1 else ""
        parts = []
        for label, names in directions.items():
            a, b = label[0], label[-1]
            rows = "".join(
                f"<tr><td class=name>{esc(n)}</td>" + "".join(
                    f'<td><a href="{label}/{kind}/{esc(n)}"><img src="{label}/{kind}/{esc(n)}" '
                    f'alt="{kind} {esc(n)}" loading="lazy"></a></td>' for kind in TEST_SET_KINDS) + "</tr>"
                for n in names[i * rows_per_page:(i + 1) * rows_per_page])
            body = (f"<table><tr><th>file</th><th>real {a}</th><th>fake {b} (G_{a})</th><th>reconstructed {a}</th>"
                    f"</tr>{rows}</table>" if names else
                    f"<p class=warn>No test images in test{a}: raise prepare.test_fraction (or add images) and "
                    f"run prepare again.</p>")
            parts.append(f"<h2>{a} → {b}: {len(names)} test image(s)</h2>{body}")
        out[page_name_for_test_set(i)] = (
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>unpaired: test set, epoch {epoch}"
            f"</title><style>{TEST_SET_STYLE}</style></head><body>"
            f"<h1>Test set translated by the best epoch ({epoch})</h1>"
            f"<p>Generators: <code>{esc(generators.as_posix())}</code> (= models/best/generators.pt). "
            f"Click an image for the full-size file. Page {i + 1} of {pages}. {nav}</p>"
            + "".join(parts) + (f"<p>{nav}</p>" if nav else "") + "</body></html>\n")
    return out


# --- metrics/data: the dataset page prepare writes (contact sheets, skipped images, sources) -----
THUMB = 64          # thumbnail side in pixels (the longer side; kept images are square)
# the page's groups of skipped images: (id, heading, the skip reasons it gathers)
SKIP_GROUPS = (("unreadable", "unreadable", ("empty", "not_image", "truncated", "unreadable", "error")),
               ("too_small", "too small", ("too_small",)), ("too_large", "too large", ("too_large",)),
               ("duplicate", "duplicate (same bytes)", ("duplicate",)),
               ("near_duplicate", "near-duplicate (next to the image kept)", ("near_duplicate",)),
               ("no_face", "no face", ("no_face",)))
DATASET_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}h3{font-size:15px;margin:16px 0 4px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td.l,th.l{text-align:left}.note{color:#666}.warn{background:#fff4e5;padding:8px;border-left:4px solid #f0a020}
.sheet{display:flex;flex-wrap:wrap;gap:3px}.sheet img,figure img{width:64px;height:64px;object-fit:contain;
image-rendering:pixelated;background:#f4f4f4;display:block}
.items{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:11px;max-width:150px;word-break:break-all}
.pair{display:flex;gap:2px;align-items:flex-start}.pair figure:last-child img{outline:2px solid #2a2}
.noimg{width:64px;height:64px;background:#fee;display:flex;align-items:center;justify-content:center;color:#a00}
.columns{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}"""


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
        self.sheets: list[tuple[str, str, str, list[tuple[str, str]]]] = []   # domain, split, note, figures
        self.groups: dict[str, list[tuple[str, str, list[str]]]] = {}        # group -> (domain, note, items)

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

    def _figure(self, r: Any, d: str, page: Path, thumb: Callable[[Any], Path | None], caption: str,
                title: str = "") -> str:
        esc = html.escape
        rel = self._thumb(r, d, page, thumb)
        title = title or caption
        img = (f'<img src="{esc(rel)}" alt="{esc(caption)}" title="{esc(title)}">' if rel else
               f'<div class=noimg title="{esc(title)}">✕</div>')
        return f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>"

    def add_domain(self, d: str, results: list[Any], page: Path, thumb: Callable[[Any], Path | None]) -> None:
        """`results`: prepare's per-file outcomes for domain `d` (stages/prepare.py Outcome: attributes
        skip, rel, sha256, name, kept, detail); kept ones carry their prepared `name` (trainA/<hash>.png).
        `thumb(r)`: the file of r's staged thumbnail, or None when it has none."""
        esc = html.escape
        for split in ("train", "test"):
            kept = sorted((r for r in results if r.skip is None and r.name.startswith(split)), key=lambda r: r.name)
            chosen, note = _sample(kept, self.cap, self.seed, f"{d}:{split}")
            figs = [(self._thumb(r, d, page, thumb) or "", f"{r.name} ← {r.rel}") for r in chosen]
            self.sheets.append((d, split, note, figs))
        for group, _, reasons in SKIP_GROUPS:
            skipped = sorted((r for r in results if r.skip in reasons), key=lambda r: (r.skip, r.rel))
            if not skipped:
                continue
            chosen, note = _sample(skipped, self.cap, self.seed, f"{d}:{group}")
            items = []
            for r in chosen:
                caption = r.rel if r.kept is not None else f"{r.rel} ({r.skip})"
                fig = self._figure(r, d, page, thumb, caption, f"{caption}: {r.detail or ''}")
                if r.kept is not None:
                    keeper = r.kept
                    fig = (f'<div class=pair data-kept="{esc(keeper.name)}">{fig}'
                           f'{self._figure(keeper, d, page, thumb, "kept: " + keeper.name)}</div>')
                items.append(fig)
            self.groups.setdefault(group, []).append((d, note, items))

    def write(self, page: Path, counts: dict[str, Any], settings: dict[str, Any]) -> None:
        """Write page/index.html from what add_domain collected, `counts` (prepare.json's content)
        and `settings` (the prepare params)."""
        esc = html.escape
        total = ", ".join(f"{d.upper()}: {k.get('train', 0)} train + {k.get('test', 0)} test"
                          for d, k in counts["kept"].items())
        settings_rows = "".join(f"<tr><th class=l>prepare.{esc(k)}</th><td class=l>{esc(json.dumps(v))}</td></tr>"
                                for k, v in settings.items())
        source_rows = "".join(
            f"<tr><th class=l>{d.upper()}</th><td class=l>{esc(s)}</td><td>{c.get('kept', 0)}</td>"
            f"<td>{c.get('skipped', 0)}</td></tr>"
            for d, per in counts.get("sources", {}).items() for s, c in per.items())
        reasons = sorted({r for per in counts["skipped"].values() for r in per})
        reason_rows = "".join(f"<tr><th class=l>{esc(r)}</th>" + "".join(
            f"<td>{counts['skipped'][d].get(r, 0)}</td>" for d in counts["skipped"]) + "</tr>" for r in reasons)
        reason_rows += "<tr><th class=l>cropped to a face (kept)</th>" + "".join(
            f"<td>{counts.get('cropped_to_face', {}).get(d, 0)}</td>" for d in counts["skipped"]) + "</tr>"
        cross = counts.get("cross_domain_near_duplicates") or []
        cross_html = (f"<p class=warn id=cross-domain>{len(cross)} near-duplicate pair(s) across domains A and B "
                      f"(the same picture in both): " + esc(", ".join(f"{a} ~ {b}" for a, b in cross[:20]))
                      + (", ..." if len(cross) > 20 else "") + "</p>") if cross else ""
        sheets = "".join(
            f'<section class=split data-domain="{d}" data-split="{split}"><h3>{split}{d.upper()} — {esc(note)}</h3>'
            f'<div class=sheet>' + "".join(f'<img src="{esc(src)}" alt="{esc(t)}" title="{esc(t)}">' for src, t in figs)
            + "</div></section>" for d, split, note, figs in self.sheets)
        groups = "".join(
            f'<section class=group data-group="{gid}"><h3>{esc(title)}</h3>' + "".join(
                f'<p class=note>domain {d.upper()}: {esc(note)}</p><div class=items>{"".join(items)}</div>'
                for d, note, items in self.groups[gid]) + "</section>"
            for gid, title, _ in SKIP_GROUPS if gid in self.groups)
        doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unpaired: dataset</title><style>{DATASET_STYLE}</style></head>
<body><h1>unpaired — the prepared dataset</h1>
<p>{esc(total)}; {counts.get('total_skipped', 0)} raw file(s) skipped. Thumbnails are the prepared images
(hover for the file and where it came from).</p>{cross_html}
<div class=columns><div><h2>Counts per source</h2><table id=sources><tr><th class=l>domain</th><th class=l>source</th>
<th>kept</th><th>skipped</th></tr>{source_rows}</table></div>
<div><h2>Skipped, by reason</h2><table id=reasons><tr><th class=l>reason</th>{"".join(
    f"<th>{d.upper()}</th>" for d in counts["skipped"])}</tr>{reason_rows}</table></div>
<div><h2>Settings</h2><table id=settings>{settings_rows}</table></div></div>
<h2>Contact sheets</h2>{sheets}
<h2>Skipped images</h2>{groups or "<p class=note id=none-skipped>No image was skipped.</p>"}
</body></html>
"""
        (page / "index.html").write_bytes(doc.encode())
