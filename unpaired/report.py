"""metrics/report.html: one page a person can open — params, loss curves, FID/KID per epoch, and
the sample grid of every epoch with a slider, best epoch marked.

The page is self-contained apart from the sample grids, which it references by relative path inside
metrics/ (samples/epoch_NNN.png). Curves are small inline SVG polylines written here: a plotting
library would add a heavy dependency for a few lines, and the page must render offline.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from unpaired.files import atomic_write_bytes

LOSSES = ("G_A", "G_B", "D_A", "D_B", "cycle_A", "cycle_B", "idt_A", "idt_B")
COLOURS = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _svg_chart(series: dict[str, list[tuple[float, float]]], title: str, marker: float | None = None) -> str:
    w, h, m = 520, 220, 36
    points = [pt for values in series.values() for pt in values]
    if not points:
        return f"<p class=note>{html.escape(title)}: no data.</p>"
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0
    sx = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m)        # noqa: E731
    sy = lambda y: h - m - (y - y0) / (y1 - y0) * (h - 2 * m)    # noqa: E731
    out = [f'<svg class=chart viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{m}" y="16" class=title>{html.escape(title)}</text>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#999"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#999"/>',
           f'<text x="{m}" y="{h - m + 16}">{x0:g}</text><text x="{w - m}" y="{h - m + 16}" '
           f'text-anchor="end">{x1:g}</text><text x="4" y="{m + 4}">{y1:.3g}</text>'
           f'<text x="4" y="{h - m}">{y0:.3g}</text>']
    if marker is not None:
        out.append(f'<line x1="{sx(marker):.1f}" y1="{m}" x2="{sx(marker):.1f}" y2="{h - m}" '
                   f'stroke="#2a2" stroke-dasharray="4 3"/>')
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        out.append(f'<text x="{w - m + 2}" y="{m + 12 * i}" fill="{colour}" font-size="10">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _losses(live_dir: Path) -> dict[str, list[tuple[float, float]]]:
    series = {}
    for name in LOSSES:
        tsv = live_dir / "plots" / "metrics" / f"{name}.tsv"
        if tsv.is_file():
            frame = pd.read_csv(tsv, sep="\t")
            series[name] = list(zip(frame["step"].astype(float), frame[name].astype(float)))
    return series


def write_report(path: Path, *, summary: dict[str, Any], table: pd.DataFrame, grids: list[int],
                 live_dir: Path, train_params: dict[str, Any], eval_params: dict[str, Any],
                 metrics_note: str) -> None:
    best = summary["best_epoch"]
    esc = html.escape
    losses = _losses(live_dir)
    loss_html = (_svg_chart(losses, "training losses (per-epoch means)", best) if losses else
                 f"<p class=note>No training logs found in {esc(str(live_dir))}.</p>")
    if summary["metrics_available"]:
        fid = {c: list(zip(table.epoch.astype(float), table[c])) for c in ("fid_AtoB", "fid_BtoA")}
        kid = {c: list(zip(table.epoch.astype(float), table[c])) for c in ("kid_AtoB", "kid_BtoA")}
        metric_html = _svg_chart(fid, "FID per epoch", best) + _svg_chart(kid, "KID per epoch", best)
    else:
        metric_html = f"<p class=warn>FID/KID not computed: {esc(metrics_note)}.</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    body = "".join(
        f"<tr{' class=best' if int(r['epoch']) == best else ''}>"
        + "".join(f"<td>{int(v) if k == 'epoch' else f'{v:.4g}'}</td>" for k, v in r.items()) + "</tr>"
        for r in table.to_dict("records"))
    params_html = "".join(f"<tr><td>{esc(section)}.{esc(k)}</td><td>{esc(json.dumps(v))}</td></tr>"
                          for section, values in (("train", train_params), ("evaluate", eval_params))
                          for k, v in values.items())
    strip = "".join(
        f'<figure{" class=best" if e == best else ""}><img src="samples/epoch_{e:03d}.png" '
        f'alt="samples at epoch {e}" loading="eager"><figcaption>epoch {e}{" ★ best" if e == best else ""}'
        f"</figcaption></figure>" for e in grids)
    epochs_js = json.dumps(grids)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unpaired: evaluation report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
tr.best td {{ background: #e6f7e6; font-weight: bold; }}
.chart {{ width: 520px; height: 220px; margin: 4px 12px 4px 0; border: 1px solid #eee; }}
.chart text {{ font-size: 11px; fill: #444; }} .chart .title {{ font-weight: bold; }}
.warn {{ background: #fff4e5; padding: 8px; border-left: 4px solid #f0a020; }} .note {{ color: #666; }}
#viewer img, .strip img {{ image-rendering: pixelated; }}
#viewer img {{ max-height: 70vh; border: 1px solid #ccc; }}
.strip {{ display: flex; gap: 12px; overflow-x: auto; padding-bottom: 8px; }}
.strip figure {{ margin: 0; text-align: center; }} .strip img {{ height: 260px; border: 2px solid transparent; }}
.strip figure.best img {{ border-color: #2a2; }}
</style></head><body>
<h1>unpaired — evaluation report</h1>
<p>Best epoch: <b>{best}</b> — {esc(summary['best_reason'])}. Its generators are in
<code>models/best/generators.pt</code>. {len(grids)} saved epoch(s) evaluated.</p>
<h2>Sample grids</h2>
<p>Rows: real A | fake B | reconstructed A, then real B | fake A | reconstructed B; the same test images every epoch.</p>
<div id="viewer"><input id="epoch" type="range" min="0" max="{len(grids) - 1}" value="{grids.index(best)}"
 aria-label="epoch"> <span id="label"></span><br>
<img id="grid" src="samples/epoch_{best:03d}.png" alt="sample grid"></div>
<h3>All epochs</h3><div class="strip">{strip}</div>
<h2>FID / KID</h2>{metric_html}
<table><tr>{head}</tr>{body}</table>
<h2>Training losses</h2>{loss_html}
<h2>Params</h2><table>{params_html}</table>
<script>
const epochs = {epochs_js}, best = {best};
const slider = document.getElementById("epoch"), img = document.getElementById("grid"),
      label = document.getElementById("label");
function show() {{
  const e = epochs[Number(slider.value)];
  img.src = "samples/epoch_" + String(e).padStart(3, "0") + ".png";
  label.textContent = "epoch " + e + (e === best ? " ★ best" : "");
}}
slider.addEventListener("input", show);
show();
</script>
</body></html>
"""
    atomic_write_bytes(path, page.encode())
