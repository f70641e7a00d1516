"""The sweep page's figures: heatmaps over block_size x gpu_memory_utilization, one panel per
max_model_len (and per value of any other field that varies), the feasibility map, and the
predicted-vs-measured parity of all points."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports.aggregate import FACET, METRICS_BY_NAME, X_AXIS, Y_AXIS, config_columns, varies
from reports.formatting import fmt
from reports.plots import COLOR, base_layout, decades, identity_line, log_ticks, time_unit

STATUS_TEXT = {"ok": "starts", "cannot_start": "cannot start", "failed": "failed",
               "interrupted": "interrupted", "unreadable": "unreadable"}
STATUS_CODE = {"ok": 0.0, "cannot_start": 0.5}  # anything else: 1.0
FEASIBILITY_SCALE = [[0, "#2da44e"], [0.25, "#2da44e"], [0.25, "#fb8f44"], [0.75, "#fb8f44"],
                     [0.75, "#cf222e"], [1, "#cf222e"]]
MAX_FACET_COLS = 3
CELL_FONT = {"size": 12}


@dataclass
class Facets:
    """The panels of a heatmap figure and the shared categorical axes."""

    groups: list[tuple[str, pd.DataFrame]]
    xs: list[str]
    ys: list[str]

    @classmethod
    def of(cls, points: pd.DataFrame) -> Facets:
        placed = points.dropna(subset=[X_AXIS, Y_AXIS])
        keys = [c for c in config_columns(placed) if c not in (X_AXIS, Y_AXIS)
                and varies(placed, c)]
        keys.sort(key=lambda c: c != FACET)
        groups = ([(_label(keys, k), g) for k, g in placed.groupby(keys, sort=True,
                                                                      dropna=False)]
                  if keys else [("", placed)])
        return cls(groups, _categories(placed[X_AXIS]), _categories(placed[Y_AXIS]))

    @property
    def empty(self) -> bool:
        return all(group.empty for _, group in self.groups)

    @property
    def shape(self) -> tuple[int, int]:
        cols = min(MAX_FACET_COLS, max(len(self.groups), 1))
        return math.ceil(len(self.groups) / cols), cols

    def figure(self) -> go.Figure:
        rows, cols = self.shape
        titles = [label for label, _ in self.groups]
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles or None,
                            horizontal_spacing=0.08, vertical_spacing=0.16 if rows > 1 else 0.1)
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=self.xs,
                         title_text=X_AXIS)
        fig.update_yaxes(type="category", categoryorder="array", categoryarray=self.ys)
        fig.update_yaxes(title_text=Y_AXIS, col=1)
        return fig

    def cell(self, index: int) -> dict[str, int]:
        cols = self.shape[1]
        return {"row": index // cols + 1, "col": index % cols + 1}

    def grid(self, group: pd.DataFrame, cell: Callable[[pd.Series], tuple[float, str, str]]
             ) -> tuple[np.ndarray, list[list[str]], list[list[str]]]:
        """z, text and hover matrices (rows = ys, columns = xs) from `cell(point row)`."""
        z = np.full((len(self.ys), len(self.xs)), np.nan)
        text = [["" for _ in self.xs] for _ in self.ys]
        hover = [["no point" for _ in self.xs] for _ in self.ys]
        for _, point in group.iterrows():
            i, j = self.ys.index(_cat(point[Y_AXIS])), self.xs.index(_cat(point[X_AXIS]))
            z[i, j], text[i][j], hover[i][j] = cell(point)
        return z, text, hover


def _cat(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _categories(values: pd.Series) -> list[str]:
    return [_cat(v) for v in sorted(values.dropna().unique())]


def _label(keys: list[str], values: object) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{k}={_cat(v)}" for k, v in zip(keys, values, strict=True))


def _hover(point: pd.Series, line: str) -> str:
    return f"point {point['point']} ({STATUS_TEXT.get(point['status'], point['status'])})<br>{line}"


def wrap(message: object, width: int = 70) -> str:
    return "<br>".join(textwrap.wrap(str(message), width)[:6]) if message else ""


def metric_heatmap(points: pd.DataFrame, column: str, unit: str,
                   diverging: bool = False) -> go.Figure:
    """One value per point; points without one are labelled with their status."""
    facets = Facets.of(points)
    fig = facets.figure()
    scale, suffix = _color_units(points[column], "pct" if diverging else unit)

    def cell(point: pd.Series) -> tuple[float, str, str]:
        value = pd.to_numeric(point.get(column), errors="coerce")
        if pd.isna(value):
            status = STATUS_TEXT.get(point["status"], "–").replace(" ", "<br>")
            return np.nan, status, _hover(point, "no value")
        shown = f"{value:+.1f}%" if diverging else fmt(value, unit)
        return float(value) * scale, shown, _hover(point, shown)

    for index, (_, group) in enumerate(facets.groups):
        z, text, hover = facets.grid(group, cell)
        fig.add_trace(go.Heatmap(x=facets.xs, y=facets.ys, z=z, text=text, customdata=hover,
                                 texttemplate="%{text}", textfont=CELL_FONT,
                                 coloraxis="coloraxis", xgap=2, ygap=2,
                                 hovertemplate="%{customdata}<extra></extra>"),
                      **facets.cell(index))
    values = pd.to_numeric(points[column], errors="coerce") * scale
    fig.update_layout(coloraxis=_color_axis(values, diverging, suffix))
    return base_layout(fig, 150 + 300 * facets.shape[0], legend_top=False)


def _color_units(values: pd.Series, unit: str) -> tuple[float, str]:
    """(scale of the colour values, colour-bar tick suffix): times in ms or s as they fit."""
    if unit == "time":
        scale, label = time_unit(pd.to_numeric(values, errors="coerce"))
        return scale, f" {label}"
    return 1.0, {"pct": "%", "x": "x"}.get(unit, "")


def _color_axis(values: pd.Series, diverging: bool, suffix: str) -> dict[str, object]:
    """Viridis; signed errors on a red-blue scale centred on zero (the section names it)."""
    colorbar = {"thickness": 14, "ticksuffix": suffix}
    if not diverging:
        return {"colorscale": "Viridis", "colorbar": colorbar}
    v = values.abs().max()
    bound = float(v) if pd.notna(v) and v > 0 else 1.0
    return {"colorscale": "RdBu_r", "cmin": -bound, "cmax": bound, "colorbar": colorbar}


def feasibility_map(points: pd.DataFrame) -> go.Figure:
    """Green: starts; orange: cannot start (the predicted or engine start-up error); red:
    failed. Hover shows the message."""
    facets = Facets.of(points)
    fig = facets.figure()

    def cell(point: pd.Series) -> tuple[float, str, str]:
        status = point["status"]
        label = STATUS_TEXT.get(status, str(status))
        blocks = point.get("sim_num_blocks", point.get("real_num_blocks"))
        shown = f"{label}<br>{fmt(blocks, 'int')} blocks" if status == "ok" else label
        warning = point.get("warning")
        if isinstance(warning, str) and warning:  # it starts, but not every request ran
            shown += "<br>⚠ " + warning.split(" (")[0]
            return STATUS_CODE.get(status, 1.0), shown, _hover(point, wrap(warning))
        return STATUS_CODE.get(status, 1.0), shown, _hover(point, wrap(point.get("error")))

    for index, (_, group) in enumerate(facets.groups):
        z, text, hover = facets.grid(group, cell)
        fig.add_trace(go.Heatmap(x=facets.xs, y=facets.ys, z=z, text=text, customdata=hover,
                                 texttemplate="%{text}", textfont=CELL_FONT, zmin=0, zmax=1,
                                 showscale=False,
                                 colorscale=FEASIBILITY_SCALE, xgap=2, ygap=2,
                                 hovertemplate="%{customdata}<extra></extra>"),
                      **facets.cell(index))
    return base_layout(fig, 150 + 300 * facets.shape[0], legend_top=False)


def parity_metrics(points: pd.DataFrame) -> list[str]:
    """The error metrics with at least one point measured and predicted."""
    return [m.name for m in METRICS_BY_NAME.values() if m.error
            and {f"sim_{m.name}", f"real_{m.name}"} <= set(points.columns)
            and (points[f"sim_{m.name}"].notna() & points[f"real_{m.name}"].notna()).any()]


def points_parity(points: pd.DataFrame) -> go.Figure:
    """Predicted against measured, one marker per point, one panel per metric, y = x."""
    names = parity_metrics(points)
    cols = min(MAX_FACET_COLS, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.08, vertical_spacing=0.2,
                        subplot_titles=[METRICS_BY_NAME[n].label for n in names])
    for index, name in enumerate(names):
        row, col = index // cols + 1, index % cols + 1
        pair = points.dropna(subset=[f"sim_{name}", f"real_{name}"])
        x, y = pair[f"sim_{name}"].astype(float), pair[f"real_{name}"].astype(float)
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", text=pair["point"], showlegend=False,
            marker={"color": COLOR["real"], "size": 9, "opacity": 0.8},
            error_x=band_errors(pair, name),
            hovertemplate="point %{text}<br>predicted %{x:.4g}<br>measured %{y:.4g}"
                          "<extra></extra>"), row=row, col=col)
        both = pd.concat([x, y, *band_columns(pair, name)])
        fig.add_trace(identity_line(both), row=row, col=col)
        axis = log_ticks(both) if (both > 0).all() and decades(both) >= 1 else {}
        unit = " (s)" if METRICS_BY_NAME[name].unit == "time" else ""
        fig.update_xaxes(title_text=f"predicted{unit}", row=row, col=col, **axis)
        fig.update_yaxes(title_text=f"measured{unit}", row=row, col=col, **axis)
    return base_layout(fig, 100 + 340 * rows, legend_top=False)


def band_columns(points: pd.DataFrame, name: str) -> list[pd.Series]:
    """The points' predicted 5 / 95 % values of metric `name`, where the sweep has bands."""
    cols = [f"sim_{name}_p5", f"sim_{name}_p95"]
    if not set(cols) <= set(points.columns):
        return []
    return [points[c].astype(float).dropna() for c in cols]


def band_errors(points: pd.DataFrame, name: str) -> dict[str, object] | None:
    """Horizontal error bars from each prediction to its band's ends (none where a point
    has no band)."""
    bands = band_columns(points, name)
    if not bands:
        return None
    x = points[f"sim_{name}"].astype(float)
    lo, hi = (points[f"sim_{name}_{q}"].astype(float) for q in ("p5", "p95"))
    return {"type": "data", "symmetric": False, "array": (hi - x).clip(lower=0).fillna(0),
            "arrayminus": (x - lo).clip(lower=0).fillna(0), "color": COLOR["sim"],
            "thickness": 1.2, "width": 3}
