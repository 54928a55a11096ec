"""Charts as embeddable ``<img>`` tags (base64 PNG), drawn with matplotlib.

matplotlib is imported by the first chart drawn, not when this module is imported: most of the library (the
parameter surface, the command line, storage) imports the report helpers without ever drawing, and should not
pay for a plotting library.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Iterable, Mapping
from typing import Any


@functools.cache
def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (pods have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<div class='chart'><img alt='chart' src='data:image/png;base64,{data}'/></div>"


def line_chart(
    series: Mapping[str, Iterable[tuple[float, float]]],
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
) -> str:
    """A line chart of named (x, y) series, as an embeddable <img> tag."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.4))
    drawn = False
    for name, points in series.items():
        pts = list(points)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=name)
        drawn = True
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return _png(fig)


def scatter_path(
    series: Mapping[str, Iterable[tuple[float, float]]],
    labels: Iterable[tuple[float, float, str]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> str:
    """Named (x, y) paths drawn as joined points, plus labelled points (a frontier chart), as an <img> tag."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        pts = list(points)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, label=name)
    for x, y, text in labels:
        ax.scatter([x], [y], s=18, color="#333333", zorder=3)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(list(p) for p in series.values()):
        ax.legend(fontsize=8)
    return _png(fig)


def bar_chart(values: Mapping[str, float], title: str, ylabel: str = "") -> str:
    """A bar chart of named values, as an embeddable <img> tag."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.4))
    names = list(values.keys())
    ax.bar(names, [values[n] for n in names], color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
