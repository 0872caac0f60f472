"""The methods table and figure of `gam-rl-report`: every Training-2 method of a profile side by
side, judged by what it spent to reach the target and where it ended.

Per profile, |D| and method, over the ok runs (mean; draws and seconds over the runs that
reached the target, with k/n saying how many did):

- target: CE(V, pi) <= (1 + margin) CE(V, p_lambda) (margin 0.01 by default), recorded by every
  method the same way (`t2_reached_target`, `t2_target_ce_valid`): a method with checks records its
  first check under the line; distillation checks its final pi on V (draws = every proposal of its
  sampler). Runs of older versions: `dpg_reached_target` / `distill_reached_target`. `reached` is
  k/n over the runs with a target line ("without a line": dpg_true, whose target is not p_lambda,
  and distillation runs older than this table).
- `on the line, mtf >= 0.9`: k/n of the runs that reached the line and whose pi writes the motif in at
  least 0.9 of its samples (Table 1's bar, the tuning objective's too): the CE(V) line alone is loose at
  small |D| (a distillation can cross it with a motif frequency of 0.86).
- draws to target and `x dpg_off`: mean draws to target over dpg_off's at the same |D|, and `x dpg_off s`
  the same for seconds to target. The reference is `dpg_off_tuned` where the |D| has runs of it (the
  tuned dpg_off: a comparison of tuned methods is with its best), else `dpg_off`; the table says which.
  Seconds to target; Training-2 draws and seconds in all; CE(T, pi); motif frequency of pi.
- with `eval.exact` (profile toy): exact KL(p_lambda || pi), KL(pi || p_lambda), TV.

methods.png: one panel per |D|, one curve per run: CE(V, pi) against draws at every check
(with the target line), or the exact KL(p_lambda || pi) when every run has it; distillation is
one point at its proposals; a dotted line marks r (where the methods start).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from importlib import resources
from pathlib import Path

from matplotlib.ticker import NullFormatter
from omegaconf import OmegaConf

from gam_rl.report.figures import MARKERS, new_figure, save_figure
from gam_rl.report.model import ProfileData, RunRecord, as_float, fmt, md_table

# Table 1's bar, as the tuning objective counts it: pi writes the motif in at least this share of its samples.
# Read from the studies' shared file, so that the report and the studies cannot disagree on it.
STUDY_FILE = resources.files("gam_rl.conf") / "hparams_search/common/study.yaml"
MOTIF_BAR = float(OmegaConf.create(STUDY_FILE.read_text()).tune.min_motif_freq)
REFERENCES = ("dpg_off_tuned", "dpg_off")  # the `x dpg_off` columns' reference: the first with runs at the |D|
EXACT_COLUMNS = (("kl_p_pi", "KL(p\\|\\|pi)"), ("kl_pi_p", "KL(pi\\|\\|p)"), ("tv_p_pi", "TV(p, pi)"),
                 ("learned_log_z_error", "learned log Z - log Z"))  # the last: the methods that learn log Z (else -)


def run_results(run: RunRecord) -> dict:
    try:
        loaded = json.loads((run.path / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def reached(results: dict) -> dict | None:
    value = (results.get("t2_reached_target") or results.get("dpg_reached_target")
             or results.get("distill_reached_target"))
    return value if isinstance(value, dict) else None


def target_line(results: dict) -> float | None:
    """The run's target line (1 + margin) CE(V, p_lambda), or None (no line: a target other than p_lambda)."""
    for key in ("t2_target_ce_valid", "dpg_target_ce_valid", "distill_target_ce_valid"):  # new, then older runs
        if results.get(key) is not None:
            return results[key]
    return None


def method_values(results: dict) -> dict[str, float | None]:
    """The figures of one run that the methods table averages."""
    hit = reached(results)
    samples = results.get("samples") if isinstance(results.get("samples"), dict) else {}
    timings = results.get("timings") if isinstance(results.get("timings"), dict) else {}
    exact = results.get("exact") if isinstance(results.get("exact"), dict) else {}
    # a target line to reach: not for the true target (dpg_true), nor in distillation runs older than the table
    line = target_line(results) is not None
    motif = as_float(results.get("motif_freq_pi"))
    values = {"reached": (1.0 if hit else 0.0) if line else None,
              # on the line with pi's motif frequency at Table 1's bar (no samples of pi: not)
              "reached_motif_bar": (1.0 if hit and motif is not None and motif >= MOTIF_BAR else 0.0) if line else None,
              "draws_to_target": as_float(hit.get("samples")) if hit else None,
              "seconds_to_target": as_float(hit.get("seconds")) if hit else None,
              "t2_draws": as_float(samples.get("training2")), "t2_seconds": as_float(timings.get("training2")),
              "ce_test_pi": as_float(results.get("ce_test_pi")),
              "motif_freq_pi": motif}
    if hit and values["seconds_to_target"] is None:  # distillation: its whole Training-2
        values["seconds_to_target"] = values["t2_seconds"]
    values.update({key: as_float(exact.get(key)) for key, _ in EXACT_COLUMNS})
    return values


def methods_rows(data: ProfileData) -> list[dict]:
    """One row per (|D|, method): counts and means over the ok runs."""
    rows = []
    for size in data.sizes:
        by_method: dict[str, list[dict]] = {}
        for cell in data.cells_of_size(size):
            for method, run in data.cells[cell].items():
                if run.ok:
                    by_method.setdefault(method, []).append(method_values(run_results(run)))
        reference = next((m for m in REFERENCES if by_method.get(m)), None)
        ref_draws = _column_mean(by_method.get(reference, []), "draws_to_target")
        ref_seconds = _column_mean(by_method.get(reference, []), "seconds_to_target")
        for method in data.methods:
            runs = by_method.get(method)
            if not runs:
                continue
            known = [r["reached"] for r in runs if r["reached"] is not None]
            row = {"size": size, "method": method, "runs": len(runs), "recorded": len(known),
                   "reached": int(sum(known)),
                   "reached_motif_bar": int(sum(r["reached_motif_bar"] for r in runs
                                                if r["reached_motif_bar"] is not None)),
                   "dpg_off_reference": reference if ref_draws else None}
            for key in ("draws_to_target", "seconds_to_target", "t2_draws", "t2_seconds", "ce_test_pi",
                        "motif_freq_pi", *(k for k, _ in EXACT_COLUMNS)):
                row[key] = _column_mean(runs, key)
            # the spread over the runs (cells, and Training-2 seeds where a cell has several): sample s.d.
            row["draws_to_target_sd"] = _column_sd(runs, "draws_to_target")
            # mean draws (seconds) to the line over the reference's mean at this |D|
            row["x_dpg_off"] = (row["draws_to_target"] / ref_draws if row["draws_to_target"] is not None
                                and ref_draws else None)
            row["x_dpg_off_seconds"] = (row["seconds_to_target"] / ref_seconds if row["seconds_to_target"] is not None
                                        and ref_seconds else None)
            rows.append(row)
    return rows


def _column_mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])]
    return statistics.fmean(values) if values else None


def _column_sd(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])]
    return statistics.stdev(values) if len(values) > 1 else None


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def methods_md(rows: list[dict]) -> list[str]:
    if not rows:
        return ["no ok run"]
    exact = any(row[k] is not None for row in rows for k, _ in EXACT_COLUMNS)
    header = ["\\|D\\|", "method", "reached", f"on the line, mtf >= {MOTIF_BAR}", "draws to target (± s.d. over runs)",
              "x dpg_off", "x dpg_off s", "s to target",
              "T2 draws", "T2 s", "CE(T,pi)", "mtf pi"] + ([label for _, label in EXACT_COLUMNS] if exact else [])
    table = []
    for row in rows:
        reached = f"{row['reached']}/{row['recorded']}" + (f" ({row['runs'] - row['recorded']} without a line)"
                                                            if row["recorded"] < row["runs"] else "")
        draws = _count(row["draws_to_target"]) + ("" if row["draws_to_target_sd"] is None
                                                    else f" ± {_count(row['draws_to_target_sd'])}")
        line = [str(row["size"]), row["method"], reached, f"{row['reached_motif_bar']}/{row['recorded']}", draws,
                fmt(row["x_dpg_off"], 3), fmt(row["x_dpg_off_seconds"], 3), _count(row["seconds_to_target"]),
                _count(row["t2_draws"]), _count(row["t2_seconds"]), fmt(row["ce_test_pi"]),
                fmt(row["motif_freq_pi"], 3)]
        table.append(line + ([fmt(row[k]) for k, _ in EXACT_COLUMNS] if exact else []))
    references = sorted({(row["size"], row["dpg_off_reference"]) for row in rows if row["dpg_off_reference"]})
    notes = [f"- x dpg_off, x dpg_off s at \\|D\\| = {size}: against {ref}'s means" for size, ref in references]
    return md_table(header, table) + ([""] + notes if notes else [])


def write_methods_csv(path: Path, profiles: dict[str, ProfileData]) -> None:
    keys = ["profile", "size", "method", "runs", "recorded", "reached", "reached_motif_bar", "draws_to_target",
            "draws_to_target_sd", "x_dpg_off", "x_dpg_off_seconds", "dpg_off_reference",
            "seconds_to_target", "t2_draws", "t2_seconds", "ce_test_pi", "motif_freq_pi",
            *(k for k, _ in EXACT_COLUMNS)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for name, data in profiles.items():
            for row in methods_rows(data):
                writer.writerow([name] + ["" if row[k] is None else row[k] for k in keys[1:]])


# ---- curves -------------------------------------------------------------------------------------

# eval.exact: one panel per divergence, (metrics.csv name, results' exact key of pi, of r, axis label)
EXACT_CURVES = {"exact_kl_p_pi": ("kl_p_pi", "kl_p_r", "exact KL(p_lambda || pi) (nats)"),
                "exact_kl_pi_p": ("kl_pi_p", "kl_r_p", "exact KL(pi || p_lambda) (nats)"),
                "exact_tv_p_pi": ("tv_p_pi", "tv_p_r", "exact TV(p_lambda, pi)")}


def curve(run: RunRecord) -> list[dict[str, float]]:
    """The DPG family's checks from metrics.csv: draws, val_ce_pi and (eval.exact) the exact divergences per step."""
    checks: dict[int, dict[str, float]] = {}
    try:
        with open(run.path / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("stage") == "dpg" and row.get("name") in ("draws", "val_ce_pi", *EXACT_CURVES):
                    value = as_float(row.get("value"))
                    if value is not None:
                        checks.setdefault(int(float(row["step"])), {})[row["name"]] = value
    except (OSError, ValueError, KeyError):
        return []
    return [checks[step] for step in sorted(checks) if "draws" in checks[step]]


def methods_figure(data: ProfileData, path: Path) -> str | None:
    import matplotlib.pyplot as plt

    runs = [(cell, method, run) for cell, by_method in sorted(data.cells.items())
            for method, run in sorted(by_method.items()) if run.ok]
    if not runs:
        return "no ok run"
    results = {run.path: run_results(run) for _, _, run in runs}
    exact = all(isinstance(results[run.path].get("exact"), dict) for _, _, run in runs)
    keys = list(EXACT_CURVES) if exact else ["val_ce_pi"]
    panels = [(size, key) for size in data.sizes for key in keys]  # exact: KL both ways and TV per |D|
    fig, axes = new_figure(6.5, 4.2 * len(panels), rows=len(panels))
    methods = data.methods
    for ax, (size, key) in zip(axes, panels, strict=True):
        final_key, r_key, ylabel = EXACT_CURVES[key] if exact else (None, None, "CE(V, pi) (nats per symbol)")
        plotted: list[float] = []
        for cell, method, run in runs:
            if cell[2] != size:
                continue
            res = results[run.path]
            k = methods.index(method)  # colour, marker and dash per method: identical curves stay visible
            # tab10 then Dark2: 18 methods without a repeated colour (the methods preset has 13)
            colour = f"C{k}" if k < 10 else plt.get_cmap("Dark2")((k - 10) % 8)
            marker, dash = MARKERS[k % len(MARKERS)], ("-", "--", "-.", ":")[k % 4]
            points = curve(run)
            xs = [p["draws"] for p in points if key in p]
            ys = [p[key] for p in points if key in p]
            if not xs:  # distillation: one point at its proposals
                # CE(V, pi) on V alone (older distillation runs: their reached record has it, ce_valid_pi mixed)
                final = (res.get("exact") or {}).get(final_key) if exact else (
                    (res.get("distill_reached_target") or {}).get("ce_valid_pi") or res.get("ce_valid_pi"))
                draws = as_float((res.get("samples") or {}).get("training2"))
                if draws and as_float(final) is not None:
                    xs, ys = [draws], [as_float(final)]
            ax.plot(xs, ys, color=colour, marker=marker, markersize=4, linewidth=1.2, linestyle=dash, label=method)
            plotted += ys
        targets = [target_line(results[run.path]) for cell, _, run in runs if cell[2] == size]
        line = [v for v in map(as_float, targets) if v is not None]
        if line and not exact:
            ax.axhline(line[0], color="black", linestyle="--", linewidth=0.8, label="target: 1.01 CE(V, p_lambda)")
        starts = [as_float((results[run.path].get("exact") or {}).get(r_key) if exact
                           else results[run.path].get("ce_valid_r")) for cell, _, run in runs if cell[2] == size]
        starts = [v for v in starts if v is not None]
        if starts:  # every method starts from r (or a fresh LSTM): where r stands
            r_level = sum(starts) / len(starts)
            ax.axhline(r_level, color="gray", linestyle=":", linewidth=1.0, label="r")
            if not exact and plotted and max(plotted) > 1.5 * r_level:
                # a collapse (pg: CE 18) would flatten every other curve: clip the axis and say so
                low = min(plotted + line)
                ax.set_ylim(low - 0.1 * (1.5 * r_level - low), 1.5 * r_level)
                ax.text(0.01, 0.99, "axis clipped at 1.5 x r's CE(V): curves above it leave the plot",
                        transform=ax.transAxes, fontsize=7, va="top")
        if plotted:  # a log axis needs a point (runs without metrics.csv and without draws have none)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
            if exact:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no check to draw (no metrics.csv)", transform=ax.transAxes, ha="center")
        ax.set_xlabel("draws of Training-2 (proposals)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Training-2 methods, |D| = {size} (profile {data.profile})")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    return None
