"""The report's plots as PNGs (matplotlib's Agg canvas: no display, no global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kmim.files import atomic_write

HEATMAP_ROWS = 64  # codes in the token-by-class heat map: the most used ones
TICK_LIMIT = 40  # more classes or codes than this get no tick labels (they would overlap)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def usage_plot(hist: np.ndarray, path: Path) -> None:
    """Patches per code ``hist`` int [K]: by code id, and sorted by usage on a log scale (dead codes left out)."""
    k = len(hist)
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    by_id, by_rank = fig.subplots(1, 2)
    by_id.fill_between(np.arange(k), hist, step="mid", color="#4c72b0")
    by_id.set(title="patches per code", xlabel="code id", ylabel="patches", xlim=(-0.5, k - 0.5))
    used = np.sort(hist[hist > 0])[::-1]
    if len(used):
        by_rank.plot(np.arange(1, len(used) + 1), used, color="#4c72b0", marker="o" if len(used) < 40 else None)
        by_rank.set_yscale("log")
    by_rank.set(title=f"sorted by usage ({k - len(used)} dead of {k})", xlabel="rank", ylabel="patches")
    for ax in (by_id, by_rank):
        ax.grid(alpha=0.3)
    _save(fig, path)


def _tick_text(name: str) -> str:
    """A class name as a tick label: short, and with ``$`` escaped (matplotlib would parse it as math)."""
    name = name if len(name) <= 24 else name[:23] + "…"
    return name.replace("$", r"\$")


def class_heatmap(counts: np.ndarray, names: list[str], path: Path, rows: int = HEATMAP_ROWS) -> None:
    """P(class | code) of the ``rows`` most used codes (rows, by usage) over the classes ``names`` (columns), from
    token-by-class patch counts ``counts`` int [K, C]."""
    usage = counts.sum(1)
    codes = [c for c in np.argsort(-usage, kind="stable")[:rows] if usage[c] > 0]
    share = counts[codes] / usage[codes, None]
    fig = Figure(figsize=(min(12.0, 6 + 0.3 * len(names)), min(12.0, 3 + 0.16 * len(codes))), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="P(class | code)")
    if len(names) <= TICK_LIMIT:
        ax.set_xticks(range(len(names)), [_tick_text(n) for n in names], rotation=60, ha="right", fontsize="small")
    if len(codes) <= TICK_LIMIT * 2:
        ax.set_yticks(range(len(codes)), [str(c) for c in codes], fontsize="x-small")
    ax.set(xlabel="class", ylabel="code (most used first)",
           title=f"class distribution of the {len(codes)} most used codes")
    _save(fig, path)


def inertia_plot(history: list[dict], path: Path) -> None:
    """The k-means fit's ``inertia`` (mean squared distance to the nearest centroid) per ``epoch``, and the share of
    codes in use when recorded."""
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["inertia"] for h in history], marker="o", color="#c44e52", label="inertia")
    ax.set(title="k-means fit", xlabel="epoch", ylabel="inertia per point")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    util = [(h["epoch"], h["utilization"]) for h in history if isinstance(h.get("utilization"), int | float)]
    if util:
        twin = ax.twinx()
        twin.plot(*zip(*util, strict=True), marker=".", color="#4c72b0", label="utilization")
        twin.set(ylabel="utilization", ylim=(0, 1.05))
        fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    _save(fig, path)
