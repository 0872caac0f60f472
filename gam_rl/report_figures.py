"""Figures of `gam-rl-report` (matplotlib's Agg canvas, no pyplot global state).

- figure2: like the paper's Figure 2. x = |D| (log scale); left axis: CE(T, pi) of dpg_off and
  of distill and CE(T, r) (means over the ok runs with std error bars), H(p_true) as a
  horizontal line (mean of the runs' own H); right axis: motif frequency of pi (both methods)
  and of r.
- dpg_vs_distill: CE(T, pi) of dpg_off against distill, one point per cell where both runs are
  ok, with the diagonal (points below it: DPG_off better).
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gam_rl.report import PAPER_METHODS, ProfileData, Stat

# (colour, marker, x offset factor: the series are spread slightly so their error bars do not overlap)
STYLE = {"dpg_off": ("tab:blue", "o", 0.97), "distill": ("tab:orange", "s", 1.03), "r": ("tab:gray", "^", 1.0)}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas, without touching pyplot's global backend."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _method_stat(data: ProfileData, size: int, method: str, key: str) -> Stat:
    stat = Stat()
    for cell in data.cells_of_size(size):
        run = data.cells[cell].get(method)
        if run is not None and run.ok and _finite(run.values.get(key)):
            stat.values.append(run.values[key])
    return stat


def _r_stat(data: ProfileData, size: int, key: str) -> Stat:
    """r's metric per cell (mean over the cell's ok dpg_off/distill runs), then over cells."""
    stat = Stat()
    for cell in data.cells_of_size(size):
        values = [run.values[key] for m, run in data.cells[cell].items()
                  if m in PAPER_METHODS and run.ok and _finite(run.values.get(key))]
        if values:
            stat.values.append(sum(values) / len(values))
    return stat


def _plot_series(ax, sizes: list[int], stats: list[Stat], label: str, style: str, dashed: bool = False) -> list:
    points = [(s, st.mean, st.std or 0.0) for s, st in zip(sizes, stats, strict=True) if st.n]
    if not points:
        return []
    color, marker, shift = STYLE[style]
    xs, ys, errs = zip(*((x * shift, y, e) for x, y, e in points), strict=True)
    container = ax.errorbar(xs, ys, yerr=errs, label=label, color=color, marker=marker, capsize=3,
                            linestyle="--" if dashed else "-", markerfacecolor="none" if dashed else color)
    return [container]


def figure2(data: ProfileData, path: Path) -> None:
    sizes = data.sizes
    fig = _figure(8, 5.8)
    ax = fig.add_subplot()
    handles = []
    for method in PAPER_METHODS:
        stats = [_method_stat(data, s, method, "ce_test_pi") for s in sizes]
        handles += _plot_series(ax, sizes, stats, f"CE(T, pi) {method}", method)
    handles += _plot_series(ax, sizes, [_r_stat(data, s, "ce_test_r") for s in sizes], "CE(T, r)", "r")
    entropies = [run.values["entropy_true"] for runs in data.cells.values() for run in runs.values()
                 if run.ok and _finite(run.values.get("entropy_true"))]
    if entropies:
        h = sum(entropies) / len(entropies)
        handles.append(ax.axhline(h, color="black", linestyle=":", label=f"H(p_true) = {h:.4f} (mean)"))
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("|D| (log scale)")
    ax.set_ylabel("cross-entropy (nats/symbol)")
    ax2 = ax.twinx()
    for method in PAPER_METHODS:
        stats = [_method_stat(data, s, method, "motif_freq_pi") for s in sizes]
        handles += _plot_series(ax2, sizes, stats, f"motif freq pi {method}", method, dashed=True)
    handles += _plot_series(ax2, sizes, [_r_stat(data, s, "motif_freq_r") for s in sizes], "motif freq r", "r",
                            dashed=True)
    ax2.set_ylim(-0.02, 1.05)
    ax2.set_ylabel("motif frequency (dashed)")
    if handles:
        fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=3, frameon=False)
    else:
        ax.text(0.5, 0.5, "no ok dpg_off/distill runs", transform=ax.transAxes, ha="center")
    ax.set_title(f"profile {data.profile}: CE(T, .) and motif frequency vs |D| (mean ± std over cells)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)


def dpg_vs_distill_figure(data: ProfileData, path: Path) -> None:
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    lows, highs = [], []
    for size in data.sizes:
        points = []
        for cell in data.cells_of_size(size):
            runs = data.cells[cell]
            if all(m in runs and runs[m].ok for m in PAPER_METHODS):
                x, y = runs["distill"].values.get("ce_test_pi"), runs["dpg_off"].values.get("ce_test_pi")
                if _finite(x) and _finite(y):
                    points.append((x, y))
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, label=f"|D| = {size}", s=25)
            lows.append(min(*xs, *ys))
            highs.append(max(*xs, *ys))
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.02 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=0.8, label="y = x")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no cell with both dpg_off and distill ok", transform=ax.transAxes, ha="center")
    ax.set_xlabel("CE(T, pi) distill (nats/symbol)")
    ax.set_ylabel("CE(T, pi) dpg_off (nats/symbol)")
    ax.set_title(f"profile {data.profile}: one point per cell")
    fig.tight_layout()
    fig.savefig(path)
