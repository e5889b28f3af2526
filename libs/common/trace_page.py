"""A trace as a self-contained HTML waterfall: `flywheel trace TRACE_ID --html journey.html`, and
the dashboard's link to a trace when no tracing UI is configured (GET /traces/TRACE_ID).

For local runs without a collector: one bar per span, indented by parent, coloured by
service, with its attributes on hover. Any browser opens it; nothing is fetched.
"""

from __future__ import annotations

import html
import json

from libs.common.tracing import span_rows

_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


def render_trace_page(trace_id: str, spans: list[dict]) -> str:
    if not spans:
        return f"<!doctype html><title>trace {html.escape(trace_id)}</title><p>No spans recorded for {html.escape(trace_id)}.</p>"
    origin = min(s["start_ns"] for s in spans)
    end = max((s["end_ns"] or s["start_ns"]) for s in spans)
    total = max(end - origin, 1)
    services = sorted({s["service"] for s in spans})
    colour = {svc: _PALETTE[i % len(_PALETTE)] for i, svc in enumerate(services)}
    rows = []
    for depth, span, repeats in span_rows(spans):
        start = span["start_ns"] - origin
        took = (span["end_ns"] or span["start_ns"]) - span["start_ns"]
        left, width = 100 * start / total, max(100 * took / total, 0.15)
        tip = html.escape(json.dumps(span["attributes"], indent=1, default=str))
        error = " error" if span["status"] == "ERROR" else ""
        name = span["name"] + (f" ×{repeats}" if repeats > 1 else "")
        rows.append(
            f'<tr class="{error.strip()}"><td class="name" style="padding-left:{depth * 14 + 4}px">{html.escape(name)}</td>'
            f'<td class="svc">{html.escape(span["service"])}</td>'
            f'<td class="bar"><div title="{tip}" style="left:{left:.3f}%;width:{width:.3f}%;background:{colour[span["service"]]}"></div></td>'
            f'<td class="num">+{start / 1e9:.2f}s</td><td class="num">{took / 1e9:.3f}s</td></tr>'
        )
    legend = " ".join(f'<span><i style="background:{colour[s]}"></i>{html.escape(s)}</span>' for s in services)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Flywheel trace {html.escape(trace_id)}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 18px; }} .legend span {{ margin-right: 14px; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }}
table {{ border-collapse: collapse; width: 100%; }} td {{ padding: 2px 6px; border-bottom: 1px solid #eee; white-space: nowrap; }}
td.bar {{ position: relative; width: 55%; }} td.bar div {{ position: absolute; top: 4px; height: 12px; border-radius: 2px; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; color: #555; }} td.svc {{ color: #555; }}
tr.error td.name {{ color: #c00; font-weight: 600; }}
</style></head><body>
<h1>Trace {html.escape(trace_id)}</h1>
<p>{len(spans)} spans across {len(services)} services, {total / 1e9:.2f}s from submission to the last span.</p>
<p class="legend">{legend}</p>
<table><tr><th>span</th><th>service</th><th>timeline</th><th>start</th><th>took</th></tr>
{''.join(rows)}
</table></body></html>
"""
