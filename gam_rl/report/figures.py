"""Figures of `gam-rl-report` (matplotlib's Agg canvas, no pyplot global state).

Each figure function draws from one profile's runs and returns None, or the reason it was not
drawn (the sweep has no runs for it); every point is a mean over the ok runs of that |D| with
a standard-deviation bar.

- figure2: the paper's Figure 2. Top: CE(T, pi) of dpg_off and of distill, CE(T, r) and
  H(p_true) against |D|; bottom: the motif frequency of pi (both methods) and of r.
- dpg_vs_distill: CE(T, pi) of dpg_off against distill, one point per cell where both ran.
- figure3: Training-1 by SNIS (snis_r) against rejection sampling (rs), and distillation on
  each: CE(T, p_lambda) and CE(T, pi) of distill for both estimators (sweep preset figure3).
- figure4: DPG on P_lambda against DPG on the true process: CE(T, pi) of dpg_off and of
  dpg_true, CE(T, p_lambda) and H (sweep preset true_target).
- figure5: DPG against distillation with the length features M, v off (1001111) and on
  (Mv1001111): CE(T, pi) and the motif frequency of pi (the Table 1 grid).

The helpers new_figure, save_figure and MARKERS also draw methods.py's figure; cli.py lists
these figures and that one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gam_rl.report.model import ProfileData, Stat

COLOURS = {"dpg_off": "tab:blue", "distill": "tab:orange", "r": "tab:gray", "p_lambda": "tab:green",
           "dpg_true": "tab:red", "distill@estimator=rs": "tab:purple"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def new_figure(width: float, height: float, rows: int = 1) -> tuple[Figure, list]:
    """A figure drawn by the Agg canvas, without touching pyplot's global backend."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, k + 1) for k in range(rows)]
    return fig, axes


def _stat(data: ProfileData, size: int, method: str, key: str, features: str | None = None) -> Stat:
    """key over the ok runs of `method` at |D| = size (of one feature set, if given)."""
    stat = Stat()
    for cell in data.cells_of_size(size):
        run = data.cells[cell].get(method)
        if run is not None and run.ok and _finite(run.values.get(key)) and features in (None, cell[1]):
            stat.values.append(run.values[key])
    return stat


def _runs_stat(data: ProfileData, size: int, methods: tuple[str, ...], key: str) -> Stat:
    """key per cell (mean over the cell's ok runs of the methods: a value they share, like CE(T, r)),
    then over cells."""
    stat = Stat()
    for cell in data.cells_of_size(size):
        values = [run.values[key] for m, run in data.cells[cell].items()
                  if m in methods and run.ok and _finite(run.values.get(key))]
        if values:
            stat.values.append(sum(values) / len(values))
    return stat


def _series(ax, sizes: list[int], stats: list[Stat], label: str, colour: str, marker: str,
            dashed: bool = False) -> bool:
    points = [(s, st.mean, st.std or 0.0) for s, st in zip(sizes, stats, strict=True) if st.n]
    if not points:
        return False
    xs, ys, errs = zip(*points, strict=True)
    ax.errorbar(xs, ys, yerr=errs, label=label, color=colour, marker=marker, capsize=3, markersize=6,
                linestyle="--" if dashed else "-", markerfacecolor="white" if dashed else colour)
    return True


def _entropy_line(ax, data: ProfileData) -> None:
    entropies = [run.values["entropy_true"] for runs in data.cells.values() for run in runs.values()
                 if run.ok and _finite(run.values.get("entropy_true"))]
    if entropies:
        h = sum(entropies) / len(entropies)
        ax.axhline(h, color="black", linestyle=":", label=f"H(p_true) = {h:.4f}")


def _size_axis(ax, sizes: list[int], label: bool = True) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    if len(sizes) == 1:  # one |D|: a narrow window around it, not a decade of empty axis
        ax.set_xlim(sizes[0] / 1.5, sizes[0] * 1.5)
    if label:
        ax.set_xlabel("|D| (log scale)")


def _motif_axis(ax) -> None:
    ax.set_ylim(-0.05, 1.05)  # a motif frequency of 0 stays visible above the axis line
    ax.set_ylabel("motif frequency")
    ax.grid(alpha=0.3)


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)


def _ce_panel(ax, data: ProfileData, sizes: list[int], title: str, ylabel: str = "CE(T, .) (nats per symbol)",
              xlabel: bool = True, legend: int = 8) -> None:
    """The cross-entropy panel's furniture: H(p_true), labels, title, legend, grid, the |D| axis."""
    _entropy_line(ax, data)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend)
    ax.grid(alpha=0.3)
    _size_axis(ax, sizes, label=xlabel)


def figure2(data: ProfileData, path: Path) -> str | None:
    sizes = data.sizes
    if not any(_stat(data, s, m, "ce_test_pi").n for s in sizes for m in ("dpg_off", "distill")):
        return "figure 2 needs ok dpg_off or distill runs"
    fig, (ax, ax2) = new_figure(7.5, 7.5, rows=2)
    for k, method in enumerate(("dpg_off", "distill")):
        _series(ax, sizes, [_stat(data, s, method, "ce_test_pi") for s in sizes], f"pi ({method})",
                COLOURS[method], MARKERS[k])
        _series(ax2, sizes, [_stat(data, s, method, "motif_freq_pi") for s in sizes], f"pi ({method})",
                COLOURS[method], MARKERS[k])
    _series(ax, sizes, [_runs_stat(data, s, ("dpg_off", "distill"), "ce_test_r") for s in sizes], "r",
            COLOURS["r"], MARKERS[2])
    _series(ax2, sizes, [_runs_stat(data, s, ("dpg_off", "distill"), "motif_freq_r") for s in sizes], "r",
            COLOURS["r"], MARKERS[2])
    _ce_panel(ax, data, sizes, f"Figure 2: cross-entropy on the test set against |D| (profile {data.profile})",
              xlabel=False)
    _motif_axis(ax2)
    ax2.set_title("motif frequency of the models' samples")
    ax2.legend(fontsize=8)
    _size_axis(ax2, sizes)
    save_figure(fig, path)
    return None


def dpg_vs_distill_figure(data: ProfileData, path: Path) -> str | None:
    by_size = {}
    for size in data.sizes:
        points = []
        for cell in data.cells_of_size(size):
            runs = data.cells[cell]
            if all(m in runs and runs[m].ok for m in ("dpg_off", "distill")):
                x, y = runs["distill"].values.get("ce_test_pi"), runs["dpg_off"].values.get("ce_test_pi")
                if _finite(x) and _finite(y):
                    points.append((x, y))
        if points:
            by_size[size] = points
    if not by_size:
        return "the dpg_off vs distill scatter needs a cell where both ran ok"
    fig, (ax,) = new_figure(5.5, 5.5)
    for k, (size, points) in enumerate(by_size.items()):
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, label=f"|D| = {size}", s=30, marker=MARKERS[k % len(MARKERS)])
    values = [v for points in by_size.values() for p in points for v in p]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 0.01)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=0.8, label="y = x")
    ax.set_xlabel("CE(T, pi) of distillation (nats per symbol)")
    ax.set_ylabel("CE(T, pi) of DPG_off (nats per symbol)")
    # how to read it goes in the title, outside the axes: points may lie anywhere inside them
    ax.set_title(f"DPG_off against distillation, one point per cell (profile {data.profile})\n"
                 "below the line y = x: DPG_off better (lower CE than distillation)", fontsize=9)
    ax.legend(fontsize=8, loc="best")  # the corner with the fewest points
    save_figure(fig, path)
    return None


def figure3(data: ProfileData, path: Path) -> str | None:
    methods = ("distill", "distill@estimator=rs")
    sizes = [s for s in data.sizes if all(_stat(data, s, m, "ce_test_p_lambda").n for m in methods)]
    if not sizes:
        return ("figure 3 needs distill runs with Training-1 by snis_r and by rs at the same |D| "
                "(multirun_scripts/figure3.sh)")
    fig, (ax, zoom) = new_figure(7.5, 8, rows=2)
    for k, method in enumerate(methods):
        name = "rs" if "rs" in method else "snis_r"
        for panel in (ax, zoom):  # the bottom panel without r: the two estimators are close
            _series(panel, sizes, [_stat(data, s, method, "ce_test_p_lambda") for s in sizes],
                    f"p_lambda, Training-1 {name}", COLOURS[method], MARKERS[k], dashed=True)
            _series(panel, sizes, [_stat(data, s, method, "ce_test_pi") for s in sizes],
                    f"pi distilled, Training-1 {name}", COLOURS[method], MARKERS[k])
    _series(ax, sizes, [_runs_stat(data, s, methods, "ce_test_r") for s in sizes], "r", COLOURS["r"], MARKERS[2])
    _ce_panel(ax, data, sizes, f"Figure 3: Training-1 by SNIS or by rejection sampling (profile {data.profile})",
              xlabel=False)
    _ce_panel(zoom, data, sizes, "the same without r")
    save_figure(fig, path)
    return None


def figure4(data: ProfileData, path: Path) -> str | None:
    sizes = [s for s in data.sizes if all(_stat(data, s, m, "ce_test_pi").n for m in ("dpg_off", "dpg_true"))]
    if not sizes:
        return "figure 4 needs dpg_off and dpg_true runs at the same |D| (multirun_scripts/true_target.sh)"
    fig, (ax,) = new_figure(7.5, 5)
    _series(ax, sizes, [_stat(data, s, "dpg_off", "ce_test_pi") for s in sizes], "pi: DPG on P_lambda",
            COLOURS["dpg_off"], MARKERS[0])
    _series(ax, sizes, [_stat(data, s, "dpg_off", "ce_test_p_lambda") for s in sizes], "p_lambda",
            COLOURS["p_lambda"], MARKERS[1], dashed=True)
    _series(ax, sizes, [_stat(data, s, "dpg_true", "ce_test_pi") for s in sizes], "pi: DPG on the true process",
            COLOURS["dpg_true"], MARKERS[3])
    _ce_panel(ax, data, sizes, f"Figure 4: DPG on P_lambda and on the true process (profile {data.profile})")
    save_figure(fig, path)
    return None


def figure5(data: ProfileData, path: Path) -> str | None:
    features = ("1001111", "Mv1001111")
    sizes = [s for s in data.sizes if all(_stat(data, s, m, "ce_test_pi", f).n for m in ("dpg_off", "distill")
                                          for f in features)]
    if not sizes:
        return "figure 5 needs dpg_off and distill runs with features 1001111 and Mv1001111 at the same |D|"
    fig, (ax, ax2) = new_figure(7.5, 7.5, rows=2)
    k = 0
    for method in ("dpg_off", "distill"):
        for f in features:
            dashed = f.startswith("Mv")
            label = f"{method}, {'with' if dashed else 'without'} M, v ({f})"
            _series(ax, sizes, [_stat(data, s, method, "ce_test_pi", f) for s in sizes], label, COLOURS[method],
                    MARKERS[k], dashed=dashed)
            _series(ax2, sizes, [_stat(data, s, method, "motif_freq_pi", f) for s in sizes], label,
                    COLOURS[method], MARKERS[k], dashed=dashed)
            k += 1
    _ce_panel(ax, data, sizes, f"Figure 5: the length features off and on (profile {data.profile})",
              ylabel="CE(T, pi) (nats per symbol)", xlabel=False, legend=7)
    _motif_axis(ax2)
    ax2.set_title("motif frequency of pi")
    _size_axis(ax2, sizes)
    save_figure(fig, path)
    return None


FIGURES: dict[str, Callable[[ProfileData, Path], str | None]] = {
    "figure2": figure2, "dpg_vs_distill": dpg_vs_distill_figure, "figure3": figure3, "figure4": figure4,
    "figure5": figure5}
