"""`gam-rl-report SWEEP_DIR... [--out DIR] [--profile P]`: aggregate gam-rl runs into Table 1.

Reads every run folder under the given folders (model.py), writes the tables (tables.py), the
figures (figures.py) and the Training-2 methods table and figure (methods.py).

Runs of different profiles are never mixed: every table and figure is per profile
(`--profile P` keeps one). With one profile the figures are `figure2.png` and
`dpg_vs_distill.png`; with several, `figure2_<profile>.png` and `dpg_vs_distill_<profile>.png`.

Files written to --out (default `<first SWEEP_DIR>/report`): table1.md (all tables, the
missing list, the Training-2 methods table of methods.py, footnotes), table1.csv (one
row per profile and |D|: `<col>_mean, _std, _n, _excluded, _paper, _ours_over_paper` for each
column), table1.tex, raw_means.csv, methods.csv, cells.md, cells.csv, and the PNG figures.
Exit code 0 when written (failed cells are listed), 2 when a
folder does not exist or no run folder is found.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gam_rl.report.figures import FIGURES
from gam_rl.report.methods import methods_figure, methods_md, methods_rows, write_methods_csv
from gam_rl.report.model import ProfileData, ReportError, RunRecord, choose_runs, collect, group_by_profile, one_line
from gam_rl.report.tables import (
    cell_ratios_md,
    compared_with_paper,
    problems,
    raw_md,
    raw_stats,
    table1_md,
    table1_stats,
    table1_tex,
    table1_values,
    write_cells,
    write_raw_csv,
    write_table1_csv,
)

# every figure of the report, in the order they are drawn and listed
REPORT_FIGURES: dict[str, Callable[[ProfileData, Path], str | None]] = {**FIGURES, "methods": methods_figure}


def report_md(profiles: dict[str, ProfileData], values: dict, tables: dict, raws: dict, notes: dict[str, list[str]],
              unidentified: list[RunRecord], figures: dict[str, list[str]], skipped: dict[str, list[str]],
              roots: list[Path]) -> str:
    lines = ["# gam-rl report: Table 1", "",
             "Runs under: " + ", ".join(f"`{r}`" for r in roots) + ".",
             "Table 1 entries are ratios of per-method means over the runs of a \\|D\\| (n = runs, or cells "
             "where both methods ran), as the paper computes them; H is each run's own entropy_true.", ""]
    for name, data in profiles.items():
        title = "Table 1 (ours vs the paper)" if compared_with_paper(data) else "Table 1"
        lines += [f"## Profile `{name}`", "", f"### {title}", "", *table1_md(data, values[name]), "",
                  "### Per-cell ratios (an extra: mean ± std over cells of each cell's ratio)", "",
                  *cell_ratios_md(tables[name]), "",
                  "### Raw means per \\|D\\| and method (ok runs; mean ± std)", "", *raw_md(raws[name]), "",
                  "### Missing or failed", ""]
        lines += [f"- {line}" for line in [*problems(data), *notes.get(name, [])]] or ["none"]
        lines += ["", "### Training-2 methods (gam_rl/report/methods.py: draws to CE(V, pi) <= 1.01 CE(V, p_lambda), "
                  "final CE(T, pi); exact divergences with eval.exact)", "", *methods_md(methods_rows(data))]
        lines += ["", "Figures: " + (", ".join(f"`{f}`" for f in figures[name]) or "none"), ""]
        lines += [f"- not drawn: {reason}" for reason in skipped[name]]
        lines += [""] if skipped[name] else []
    if unidentified:
        lines += ["## Other run folders", ""]
        lines += [f"- unidentified (no cell/method in results.json or config): {r.path}: {r.status}"
                  f"{': ' + one_line(r.error) if r.error else ''}" for r in unidentified]
        lines.append("")
    return "\n".join(lines)


def figure_file(figure: str, profile: str, several: bool) -> str:
    """figure2.png, or figure2_<profile>.png when the report has several profiles."""
    return f"{figure}_{profile}.png" if several else f"{figure}.png"


def write_report(roots: list[Path], out: Path, profile: str | None = None) -> str:
    """Read the runs under the roots, write every file into out; returns the Markdown report."""
    identified, unidentified = collect(roots, profile)
    chosen, notes = choose_runs(identified)
    profiles = group_by_profile(chosen)
    values = {name: table1_values(data) for name, data in profiles.items()}
    tables = {name: table1_stats(data) for name, data in profiles.items()}
    raws = {name: raw_stats(data) for name, data in profiles.items()}
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, list[str]] = {name: [] for name in profiles}
    skipped: dict[str, list[str]] = {name: [] for name in profiles}
    for name, data in profiles.items():
        for figure, draw in REPORT_FIGURES.items():
            file = figure_file(figure, name, len(profiles) > 1)
            reason = draw(data, out / file)
            if reason is None:
                drawn[name].append(file)
            else:
                skipped[name].append(f"{file}: {reason}")
                print(f"gam-rl-report: {name}: not drawn: {file}: {reason}", file=sys.stderr)
    write_table1_csv(out / "table1.csv", profiles, values, tables)
    write_raw_csv(out / "raw_means.csv", raws)
    write_methods_csv(out / "methods.csv", profiles)
    (out / "table1.tex").write_text(table1_tex(profiles, values))
    write_cells(out, profiles)
    text = report_md(profiles, values, tables, raws, notes, unidentified, drawn, skipped, roots)
    (out / "table1.md").write_text(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gam-rl-report",
        description="Aggregate gam-rl runs (folders with results.json or .hydra/config.yaml) into the paper's "
                    "Table 1 (Markdown, CSV, LaTeX), per-cell tables and figures.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR",
                        help="folders searched recursively for run folders")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first SWEEP_DIR>/report)")
    parser.add_argument("--profile", default=None,
                        help="keep only runs of this profile (default: one table per profile found)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out if args.out is not None else args.sweep_dirs[0] / "report"
    try:
        text = write_report(args.sweep_dirs, out, args.profile)
    except ReportError as err:
        print(f"gam-rl-report: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)
    print(f"gam-rl-report: wrote {out}/table1.md, table1.csv, table1.tex, raw_means.csv, methods.csv, cells.md, "
          "cells.csv "
          "and the figures it had runs for")
    return 0
