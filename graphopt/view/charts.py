"""Charts drawn straight into the HTML report as inline SVG (no plotting library, no script):
the per-layer int8 sensitivity that ``quantize{per_layer_report=true}`` records.

Each layer gets three bars, the model's output SQNR with only that layer's weights in int8,
only its input activations, and both; layers are ranked worst first, so the layers worth keeping
float (``quantize{min_sqnr=...}``) or fixing (``mobile-int8-accurate``) are at the top. A bar's
length is its SQNR in dB, capped where it stops mattering; a layer exact in int8 shows as "inf".
"""
from __future__ import annotations

import html
import math
from typing import Any, Sequence

#: the three measurements, in the order drawn: (key in a per-layer row, label, colour)
SERIES = (("weight_sqnr_db", "weights only", "#1565c0"),
          ("activation_sqnr_db", "input only", "#ef6c00"),
          ("sensitivity_sqnr_db", "both", "#37474f"))
#: SQNR beyond this (dB) is drawn full length: a layer that good is not where accuracy goes
CAP_DB = 80.0
#: layers shown, worst first; the rest are counted below the chart
MAX_LAYERS = 40

_BAR, _GAP, _LABEL_W, _PLOT_W, _VALUE_W = 7, 6, 220, 360, 60


def has_sensitivity(rows: Any) -> bool:
    """Whether ``rows`` (a record's ``per_layer`` figure) holds the sensitivity columns."""
    return isinstance(rows, list) and any(isinstance(r, dict) and r.get("sensitivity_sqnr_db") is not None for r in rows)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def sensitivity_svg(rows: Sequence[dict[str, Any]], title: str) -> str:
    """An SVG bar chart of ``rows`` (per-layer report rows), worst layer first."""
    layers = [r for r in rows if _number(r.get("sensitivity_sqnr_db")) is not None]
    layers.sort(key=lambda r: _number(r["sensitivity_sqnr_db"]))
    shown, hidden = layers[:MAX_LAYERS], len(layers) - MAX_LAYERS
    row_h = len(SERIES) * _BAR + _GAP
    top = 34
    height = top + len(shown) * row_h + 38
    width = _LABEL_W + _PLOT_W + _VALUE_W
    scale = _PLOT_W / CAP_DB
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="0" y="12" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    for k, (_, label, colour) in enumerate(SERIES):  # legend
        x = _LABEL_W + k * 110
        out.append(f'<rect x="{x}" y="18" width="10" height="8" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="26" font-size="10">{html.escape(label)}</text>')
    for i, row in enumerate(shown):
        y = top + i * row_h
        name = str(row.get("provenance") or row.get("layer") or "?")
        out.append(f'<g class="layer" data-layer="{html.escape(str(row.get("layer", "")))}">'
                   f'<title>{html.escape(name)} ({html.escape(str(row.get("op", "")))}): '
                   + ", ".join(f"{label} {_text(_number(row.get(key)))} dB" for key, label, _ in SERIES)
                   + "</title>"
                   f'<text x="{_LABEL_W - 6}" y="{y + row_h / 2 + 1}" font-size="10" text-anchor="end">'
                   f'{html.escape(name[-40:])}</text>')
        for k, (key, _, colour) in enumerate(SERIES):
            value = _number(row.get(key))
            length = 0.0 if value is None else min(max(value, 0.0), CAP_DB) * scale
            if value is not None and math.isinf(value):
                length = _PLOT_W
            out.append(f'<rect class="{key}" x="{_LABEL_W}" y="{y + k * _BAR}" width="{length:.1f}" '
                       f'height="{_BAR - 1}" fill="{colour}"/>')
        out.append(f'<text x="{_LABEL_W + _PLOT_W + 4}" y="{y + row_h / 2 + 1}" font-size="10">'
                   f'{_text(_number(row.get("sensitivity_sqnr_db")))} dB</text></g>')
    axis_y = top + len(shown) * row_h + 12
    for db in range(0, int(CAP_DB) + 1, 20):
        x = _LABEL_W + db * scale
        out.append(f'<text x="{x:.0f}" y="{axis_y}" font-size="9" text-anchor="middle">{db}</text>')
    out.append(f'<text x="{_LABEL_W + _PLOT_W / 2:.0f}" y="{axis_y + 13}" font-size="9" text-anchor="middle">'
               f'output SQNR (dB; {CAP_DB:g} and above drawn full length)</text>')
    out.append("</svg>")
    if hidden > 0:
        out.append(f'<p class="caption">{hidden} more layer(s), all at least '
                   f'{_text(_number(layers[MAX_LAYERS]["sensitivity_sqnr_db"]))} dB, are in the JSON report.</p>')
    return "".join(out)


def sensitivity_sections(records: Sequence[Any]) -> str:
    """One chart per pass record that measured per-layer sensitivity (HTML, may be empty)."""
    parts = []
    for i, record in enumerate(records):
        rows = getattr(record, "figures", {}).get("per_layer")
        if has_sensitivity(rows):
            parts.append(f'<div class="sensitivity" data-record="{i}">'
                         + sensitivity_svg(rows, f"#{i + 1} {record.name}: output SQNR with one layer in int8")
                         + "</div>")
    if not parts:
        return ""
    return ("<h2>Int8 sensitivity per layer</h2><p class=\"caption\">Output SQNR against float with only the "
            "layer's weights, only its input, or both in int8; worst layer first. Keep the worst float with "
            "quantize{min_sqnr=DB}.</p>" + "".join(parts))
