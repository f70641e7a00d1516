"""The run page's figures: latency CDFs, KV usage over time, per-request parity, memory terms.

Every figure takes one entry per side present ("sim" and/or "real") and draws only those, so a
sim-only run never gets an empty measured trace. Long runs are thinned (peaks kept) so a page
stays a few hundred kB.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports.formatting import GiB, number
from reports.run_tables import MEMORY_TERMS, SHORT_LABEL, SIDE_LABEL

COLOR = {"sim": "#1f77b4", "real": "#e4572e"}
TERM_COLOR = ("#4c72b0", "#dd8452", "#8172b3", "#937860", "#55a868")
CDF_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))
MAX_POINTS = 2000
FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 13}


def base_layout(fig: go.Figure, height: int, legend_top: bool = True) -> go.Figure:
    """The shared look; the section heading names the figure, so it carries no title.
    The legend sits above the plots, clear of the subplot titles."""
    top, bottom = 70, 55
    fig.update_layout(height=height, template="plotly_white", font=FONT,
                      margin={"l": 65, "r": 30, "t": top, "b": bottom},
                      uniformtext={"minsize": 10, "mode": "hide"})
    if legend_top:
        lift = 34 / max(height - top - bottom, 1)
        fig.update_layout(legend={"orientation": "h", "x": 0, "xanchor": "left",
                                  "y": 1 + lift, "yanchor": "bottom"})
    return fig


def time_unit(values: pd.Series | np.ndarray) -> tuple[float, str]:
    """(scale from seconds, label): milliseconds unless the largest value reaches 10 s."""
    v = pd.to_numeric(pd.Series(np.asarray(values, dtype=float)), errors="coerce").dropna()
    return (1.0, "s") if len(v) and v.max() >= 10 else (1e3, "ms")


def decades(values: pd.Series | np.ndarray) -> float:
    """How many decades the positive finite values span (0 for none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.log10(v.max() / v.min())) if v.size else 0.0


def log_ticks(values: pd.Series | np.ndarray) -> dict[str, Any]:
    """Log-axis ticks without a crowd of 2..9 labels: one per decade over a decade or more,
    1-2-5 values near a decade, plotly's own (linear-looking) ticks over a narrow range."""
    if decades(values) >= 1:
        return {"type": "log", "dtick": 1, "minor": {"ticks": "outside", "showgrid": True}}
    ticks = one_two_five(values)
    if len(ticks) < 3:
        return {"type": "log"}
    return {"type": "log", "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def one_two_five(values: pd.Series | np.ndarray) -> list[float]:
    """The 1, 2, 5 x 10^k values within the positive data's range (20% margin)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return []
    lo, hi = v.min() / 1.2, v.max() * 1.2
    exponents = range(math.floor(np.log10(lo)), math.ceil(np.log10(hi)) + 1)
    return [m * 10.0**e for e in exponents for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]


def cdf_points(values: pd.Series, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite values and their empirical CDF, at most `max_points` of them."""
    v = np.sort(pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float))
    v = v[v > 0]  # drawn on a log axis
    y = np.arange(1, v.size + 1) / max(v.size, 1)
    if v.size > max_points:
        idx = np.unique(np.linspace(0, v.size - 1, max_points).round().astype(int))
        v, y = v[idx], y[idx]
    return v, y


def latency_cdfs(latencies: dict[str, pd.DataFrame],
                 bands: dict[str, dict[str, list[float]]] | None = None) -> go.Figure:
    """TTFT, TPOT and E2E CDFs, one line per side, on log time axes; `bands` (per column,
    the predicted quantiles' 5-95 % range) shade the predicted CDF."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=[name for _, name in CDF_METRICS],
                        horizontal_spacing=0.07)
    for col, (column, name) in enumerate(CDF_METRICS, start=1):
        scale, unit = time_unit(pd.concat([lat[column] for lat in latencies.values()]))
        shown = []
        band = (bands or {}).get(column) if "sim" in latencies else None
        if band:
            fig.add_trace(cdf_band(band, scale, unit, name, legend=col == 1), row=1, col=col)
            shown.append(np.asarray(band["lo"] + band["hi"]) * scale)
        for side, lat in latencies.items():
            x, y = cdf_points(lat[column])
            shown.append(x * scale)
            fig.add_trace(go.Scatter(
                x=x * scale, y=y, name=SIDE_LABEL[side], legendgroup=side,
                showlegend=col == 1, line={"color": COLOR[side], "shape": "hv", "width": 2},
                hovertemplate=f"{name} %{{x:.3g}} {unit}<br>%{{y:.1%}} of requests"
                              "<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text=f"{name} ({unit}, log)", row=1, col=col,
                         **log_ticks(np.concatenate(shown)))
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    fig.update_yaxes(title_text="requests at or below", row=1, col=1)
    return base_layout(fig, 420)


def cdf_band(band: dict[str, list[float]], scale: float, unit: str, name: str,
             legend: bool) -> go.Scatter:
    """The predicted CDF's 5-95 % band: a filled area between the quantiles' bounds."""
    x = np.concatenate([band["lo"], band["hi"][::-1]]) * scale
    y = np.concatenate([band["q"], band["q"][::-1]])
    return go.Scatter(x=x, y=y, fill="toself", mode="lines", line={"width": 0},
                      fillcolor="rgba(31, 119, 180, 0.18)", name="predicted 5-95 % band",
                      legendgroup="band", showlegend=legend, hoverinfo="skip")


def thin_timeline(timeline: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most `max_points` rows: time bins keep their first time and their peak values."""
    if len(timeline) <= max_points:
        return timeline
    bins = pd.cut(timeline["time_s"], max_points, labels=False)
    agg = {"time_s": "first", "blocks_used": "max", "running": "max", "waiting": "max"}
    return timeline.groupby(bins, sort=True).agg(agg).reset_index(drop=True)


def kv_timeline(timelines: dict[str, pd.DataFrame], num_blocks: dict[str, Any]) -> go.Figure:
    """KV blocks used, and running / waiting requests, over (simulated or wall) time."""
    capacity = ", ".join(f"{SHORT_LABEL[s]} {_int(num_blocks.get(s))}" for s in timelines)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=(f"KV blocks used (num_blocks: {capacity})",
                                        "requests running (solid) and waiting (dotted)"))
    for side, tl in timelines.items():
        tl = thin_timeline(tl)
        for row, column, dash in ((1, "blocks_used", "solid"), (2, "running", "solid"),
                                  (2, "waiting", "dot")):
            fig.add_trace(_step_line(tl, column, side, dash, legend=column == "blocks_used"),
                          row=row, col=1)
    fig.update_xaxes(title_text="time since the first arrival (s)", row=2, col=1)
    fig.update_yaxes(title_text="blocks", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="requests", rangemode="tozero", row=2, col=1)
    return base_layout(fig, 560)


def _step_line(tl: pd.DataFrame, column: str, side: str, dash: str,
               legend: bool) -> go.Scatter:
    label = column.replace("_", " ")
    return go.Scatter(x=tl["time_s"].to_numpy(), y=tl[column].to_numpy(),
                      name=SIDE_LABEL[side], legendgroup=side, showlegend=legend, mode="lines",
                      line={"color": COLOR[side], "shape": "hv", "dash": dash, "width": 1.5},
                      hovertemplate=f"{label} %{{y:,}} at %{{x:.3g}} s<extra>"
                                    f"{SHORT_LABEL[side]}</extra>")


def _int(value: Any) -> str:
    v = number(value)
    return "–" if v is None else f"{v:,.0f}"


def request_parity(sim: pd.DataFrame, real: pd.DataFrame) -> go.Figure:
    """Per request_id, predicted against measured E2E and TTFT, with the y = x line."""
    merged = sim.assign(key=sim["request_id"].astype(str)).merge(
        real.assign(key=real["request_id"].astype(str)), on="key", suffixes=("_sim", "_real"))
    if len(merged) > MAX_POINTS:
        merged = merged.sample(MAX_POINTS, random_state=0)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        f"E2E, {len(merged):,} requests", f"TTFT, {len(merged):,} requests"))
    for col, (column, name) in enumerate((("e2e_s", "E2E"), ("ttft_s", "TTFT")), start=1):
        both = pd.concat([merged[f"{column}_sim"], merged[f"{column}_real"]])
        scale, unit = time_unit(both)
        x, y = merged[f"{column}_sim"] * scale, merged[f"{column}_real"] * scale
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=name, text=merged["key"], showlegend=False,
            marker={"color": COLOR["real"], "size": 6, "opacity": 0.7},
            hovertemplate=f"request %{{text}}<br>predicted %{{x:.3g}} {unit}<br>measured "
                          f"%{{y:.3g}} {unit}<extra></extra>"), row=1, col=col)
        fig.add_trace(identity_line(both * scale), row=1, col=col)
        ticks = log_ticks(both * scale)
        fig.update_xaxes(title_text=f"predicted {name} ({unit}, log)", row=1, col=col, **ticks)
        fig.update_yaxes(title_text=f"measured {name} ({unit}, log)", row=1, col=col, **ticks)
    return base_layout(fig, 460, legend_top=False)


def identity_line(values: pd.Series, name: str = "y = x") -> go.Scatter:
    v = pd.to_numeric(values, errors="coerce").dropna()
    v = v[v > 0]
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (1.0, 1.0)
    return go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name=name, showlegend=False,
                      line={"color": "#6e7781", "dash": "dash", "width": 1}, hoverinfo="skip")


def memory_bars(memories: dict[str, dict[str, Any]]) -> go.Figure:
    """Stacked start-up memory terms per side (GiB) against the budget line. A KV cache that
    does not fit (negative) is drawn as zero and its shortfall written above the bar."""
    x = [SIDE_LABEL[s] for s in memories]
    fig = go.Figure()
    for (label, key), color in zip(MEMORY_TERMS, TERM_COLOR, strict=True):
        y = [(number(m.get(key)) or 0.0) / GiB for m in memories.values()]
        fig.add_trace(go.Bar(x=x, y=[max(v, 0.0) for v in y], name=label, marker_color=color,
                             text=[f"{v:.2f}" for v in y], textposition="inside",
                             customdata=y, hovertemplate=f"{label}: %{{customdata:.3f}} GiB"
                                                         "<extra>%{x}</extra>"))
    budget = [(number(m.get("budget_bytes")) or np.nan) / GiB for m in memories.values()]
    fig.add_trace(go.Scatter(x=x, y=budget, mode="markers", name="budget",
                             marker={"symbol": "line-ew", "size": 90, "line": {
                                 "width": 3, "color": "#cf222e"}},
                             hovertemplate="budget: %{y:.3f} GiB<extra>%{x}</extra>"))
    for label, m in zip(x, memories.values(), strict=True):
        kv = number(m.get("kv_cache_bytes"))
        if kv is not None and kv < 0:
            fig.add_annotation(x=label, y=(_stacked(m) / GiB), yshift=14, showarrow=False,
                               text=f"<b>no room for the KV cache: {-kv / GiB:.2f} GiB over "
                                    "budget</b>", font={"color": "#cf222e"})
    fig.update_layout(barmode="stack", yaxis_title="GiB", bargap=0.5)
    return base_layout(fig, 440, legend_top=False).update_layout(
        legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top"})


def _stacked(memory: dict[str, Any]) -> float:
    return sum(max(number(memory.get(key)) or 0.0, 0.0) for _, key in MEMORY_TERMS)
