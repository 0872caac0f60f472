"""Table 1 and the other tables of `gam-rl-report`: Markdown, CSV and LaTeX.

Table 1 (the paper's seven columns), one row per |D|, computed as the paper computes them:
ratios of per-method means over the runs of that |D|. dpg = the `dpg_off` runs, dis = the
`distill` runs, <x> = the mean of x over those runs, CE = CE(T, pi) (`ce_test_pi`), mtf =
motif frequency of pi (`motif_freq_pi`), r = the same runs' `ce_test_r` / `motif_freq_r`, H =
the same runs' own `entropy_true` (never one motif's H for all runs: paper.md sections 8, 9):

    CE dpg/dis   = <CE_pi(dpg)> / <CE_pi(dis)>
    mtf dpg/dis  = (<mtf_pi(dpg)> / <mtf_r(dpg)>) / (<mtf_pi(dis)> / <mtf_r(dis)>)
    CE dpg/r     = <CE_pi(dpg)> / <CE_r(dpg)>       CE dpg/H  = <CE_pi(dpg)> / <H(dpg)>
    mtf dpg/r    = <mtf_pi(dpg)> / <mtf_r(dpg)>     CE dis/r  = <CE_pi(dis)> / <CE_r(dis)>
    mtf dis/r    = <mtf_pi(dis)> / <mtf_r(dis)>

(the paper's mtf dpg/dis at |D| = 500 is 281.51 / 224.94 = 1.252). A column over both methods
averages over the cells where both runs are `ok`; a column of one method over its `ok` runs.
A second table gives, as an extra, the mean +- std over cells of the per-cell ratios (a
ratio that is not finite there, e.g. mtf r = 0, is excluded and counted in a footnote).
Only `profile=paper` runs are set against the paper's numbers; the other profiles use other
network sizes and schedules, and their tables say so instead.

Failed, missing and running runs, and cells without a dpg_off or distill run (including
combinations absent from the grid of motifs x features x |D| x seeds that was found), are
listed under "Missing or failed"; they never enter a mean. Runs of the other methods
(dpg_on, pg, dpg_true) appear in the per-cell tables and in the raw-means table.
"""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from gam_rl.report.model import (
    METRICS,
    ProfileData,
    RunRecord,
    Stat,
    cell_name,
    fmt,
    md_table,
    method_sort_key,
    one_line,
)

PAPER_METHODS = ("dpg_off", "distill")
PAPER_PROFILE = "paper"  # the only profile compared with the paper's Table 1
SHORT = {"entropy_true": "H", "ce_test_r": "CE r", "ce_test_pi": "CE pi", "motif_freq_r": "mtf r",
         "motif_freq_pi": "mtf pi"}


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    num: tuple[str, str]  # (method, results.json field) of the per-cell ratio
    den: tuple[str, str]
    # Table 1's value: prod <num> / prod <den> over per-method means; default: the per-cell ratio's num / den
    num_means: tuple[tuple[str, str], ...] = ()
    den_means: tuple[tuple[str, str], ...] = ()

    @property
    def numerator(self) -> tuple[tuple[str, str], ...]:
        return self.num_means or (self.num,)

    @property
    def denominator(self) -> tuple[tuple[str, str], ...]:
        return self.den_means or (self.den,)

    @property
    def methods(self) -> set[str]:
        return {m for m, _ in (*self.numerator, *self.denominator)}


COLUMNS = (
    Column("ce_dpg_dis", "CE dpg/dis", ("dpg_off", "ce_test_pi"), ("distill", "ce_test_pi")),
    Column("mtf_dpg_dis", "mtf dpg/dis", ("dpg_off", "motif_freq_pi"), ("distill", "motif_freq_pi"),
           num_means=(("dpg_off", "motif_freq_pi"), ("distill", "motif_freq_r")),
           den_means=(("dpg_off", "motif_freq_r"), ("distill", "motif_freq_pi"))),
    Column("ce_dpg_r", "CE dpg/r", ("dpg_off", "ce_test_pi"), ("dpg_off", "ce_test_r")),
    Column("ce_dpg_h", "CE dpg/H", ("dpg_off", "ce_test_pi"), ("dpg_off", "entropy_true")),
    Column("mtf_dpg_r", "mtf dpg/r", ("dpg_off", "motif_freq_pi"), ("dpg_off", "motif_freq_r")),
    Column("ce_dis_r", "CE dis/r", ("distill", "ce_test_pi"), ("distill", "ce_test_r")),
    Column("mtf_dis_r", "mtf dis/r", ("distill", "motif_freq_pi"), ("distill", "motif_freq_r")),
)


# The paper's Table 1 (means over 3 motifs x {1001111, Mv1001111} x seeds {1234, 4444}), copied
# from /work/shared/design/paper.md section 8; values in the order of COLUMNS.
PAPER_TABLE1 = {
    500: (1.008, 1.252, 0.76, 1.18, 281.51, 0.758, 224.94),
    1000: (1.014, 1.102, 0.762, 1.178, 240.40, 0.76, 218.24),
    5000: (1.019, 1.21, 0.865, 1.059, 34.73, 0.847, 28.69),
    10000: (1.014, 1.067, 0.968, 1.023, 2.17, 0.963, 2.04),
    20000: (1.004, 1.023, 1.0, 1.006, 1.03, 1.002, 1.01),
}


RAW_FIELDS = (("entropy_true", "H"), ("ce_test_r", "CE(T,r)"), ("ce_test_p_lambda", "CE(T,p_lambda)"),
              ("ce_test_pi", "CE(T,pi)"), ("motif_freq_r", "mtf r"), ("motif_freq_pi", "mtf pi"),
              ("avg_len_r", "len r"), ("avg_len_pi", "len pi"),
              # the cell's Training-1 (shared through the cache) apart from the job's own time
              ("t1_s", "T1 s (cell)"), ("own_s", "own s"))


# ---- statistics ---------------------------------------------------------------------------------

def cell_ratio(runs: dict[str, RunRecord], column: Column) -> tuple[float | None, str | None] | None:
    """The column's ratio for one cell: None when a run it needs is not ok (the cell does not
    count), else (ratio, None) or (None, reason) when the ratio is not finite."""
    (num_method, num_key), (den_method, den_key) = column.num, column.den
    if not all(m in runs and runs[m].ok for m in (num_method, den_method)):
        return None
    num, den = runs[num_method].values.get(num_key), runs[den_method].values.get(den_key)
    den_name = f"{SHORT.get(den_key, den_key)} ({den_method})"
    num_name = f"{SHORT.get(num_key, num_key)} ({num_method})"
    for value, name in ((num, num_name), (den, den_name)):
        if value is None:
            return None, f"no value for {name}"
        if not math.isfinite(value):
            return None, f"{name} = {value}"
    if den == 0:
        return None, f"{den_name} = 0 ({'undefined ratio 0/0' if num == 0 else 'infinite ratio'})"
    return num / den, None


@dataclass
class RatioOfMeans:
    """A Table 1 entry: a ratio of per-method means over n runs (or matched cells)."""
    value: float | None
    n: int
    note: str | None = None  # why there is no value


def ratio_of_means(data: ProfileData, size: int, column: Column) -> RatioOfMeans:
    """Column value at |D| = size as the paper computes it (prod of <num> / prod of <den>)."""
    fields = (*column.numerator, *column.denominator)
    cells = []
    for cell in data.cells_of_size(size):
        runs = data.cells[cell]
        if all(m in runs and runs[m].ok for m in column.methods) and all(
                _finite(runs[m].values.get(f)) for m, f in fields):
            cells.append(cell)
    if not cells:
        return RatioOfMeans(None, 0, "no run with every value it needs")
    means = {mf: statistics.fmean(data.cells[c][mf[0]].values[mf[1]] for c in cells) for mf in fields}
    num, den = math.prod(means[mf] for mf in column.numerator), math.prod(means[mf] for mf in column.denominator)
    if den == 0:
        zero = [f"<{SHORT.get(f, f)} ({m})>" for m, f in column.denominator if means[(m, f)] == 0]
        return RatioOfMeans(None, len(cells), f"{', '.join(zero)} = 0")
    return RatioOfMeans(num / den, len(cells))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def table1_values(data: ProfileData) -> dict[int, dict[str, RatioOfMeans]]:
    """{|D|: {column key: RatioOfMeans}}: Table 1."""
    return {size: {c.key: ratio_of_means(data, size, c) for c in COLUMNS} for size in data.sizes}


def table1_stats(data: ProfileData) -> dict[int, dict[str, Stat]]:
    """{|D|: {column key: Stat of the per-cell ratios over the cells of that |D|}} (an extra)."""
    table = {}
    for size in data.sizes:
        row = {column.key: Stat() for column in COLUMNS}
        for cell in data.cells_of_size(size):
            for column in COLUMNS:
                result = cell_ratio(data.cells[cell], column)
                if result is None:
                    continue
                ratio, reason = result
                if reason is None:
                    row[column.key].values.append(ratio)
                else:
                    row[column.key].excluded.append((cell_name(cell), reason))
        table[size] = row
    return table


def raw_stats(data: ProfileData) -> dict[tuple[int, str], tuple[int, dict[str, Stat]]]:
    """{(|D|, method): (number of ok runs, {field: Stat over the ok runs})}."""
    table = {}
    for size in data.sizes:
        for method in data.methods:
            runs = [data.cells[c][method] for c in data.cells_of_size(size) if method in data.cells[c]]
            ok = [r for r in runs if r.ok]
            if not runs:
                continue
            stats = {key: Stat() for key, _ in RAW_FIELDS}
            for run in ok:
                for key, label in RAW_FIELDS:
                    stats[key].add(run.values.get(key), cell_name(run.cell), label)
            table[(size, method)] = (len(ok), stats)
    return table


def problems(data: ProfileData) -> list[str]:
    """Runs that are not ok, and paper-method runs absent from the grid that was found."""
    lines = []
    for cell in sorted(data.cells):
        for method, run in sorted(data.cells[cell].items(), key=lambda kv: method_sort_key(kv[0])):
            if not run.ok:
                detail = f": {one_line(run.error)}" if run.error else ""
                lines.append(f"{cell_name(cell)} {method}: {run.status}{detail} ({run.path})")
    ran = [m for m in PAPER_METHODS if m in data.methods]  # a sweep narrowed to one method misses no other
    if ran:
        axes = [sorted({cell[i] for cell in data.cells}) for i in range(5)]  # the Training-2 seeds too
        for cell in itertools.product(*axes):
            for method in ran:
                if method not in data.cells.get(cell, {}):
                    lines.append(f"{cell_name(cell)} {method}: absent (no run folder found)")
    return lines


# ---- Markdown -----------------------------------------------------------------------------------

def fmt_stat(stat: Stat) -> str:
    if stat.n == 0:
        text = "-"
    else:
        text = fmt(stat.mean) + (f" ± {fmt(stat.std, 2)}" if stat.std is not None else "")
    extra = f", {len(stat.excluded)} excl.*" if stat.excluded else ""
    return f"{text} (n={stat.n}{extra})"


def paper_value(size: int, column: Column) -> float | None:
    row = PAPER_TABLE1.get(size)
    return row[COLUMNS.index(column)] if row else None


def ours_over_paper(value: float | None, paper: float | None) -> float | None:
    return value / paper if value is not None and paper else None


def compared_with_paper(data: ProfileData) -> bool:
    return data.profile == PAPER_PROFILE


NOT_COMPARED = ("Profile `{}` is not set against the paper's Table 1: it uses another network size and other "
                "schedules than the paper's (only `profile=paper` runs are).")


def table1_md(data: ProfileData, values: dict[int, dict[str, RatioOfMeans]]) -> list[str]:
    """Table 1: ratios of per-method means, beside the paper's values for profile paper."""
    compare, rows, notes = compared_with_paper(data), [], []
    for size, row in values.items():
        cells = []
        for column in COLUMNS:
            entry, paper = row[column.key], paper_value(size, column)
            text = f"{fmt(entry.value)} (n={entry.n})"
            if compare and paper is not None:
                text += f" · paper {fmt(paper)} · ×{fmt(ours_over_paper(entry.value, paper), 3)}"
            if entry.note:
                notes.append(f"- {column.label}, \\|D\\| = {size}: no value ({entry.note})")
            cells.append(text)
        rows.append([str(size), *cells])
    lines = md_table(["\\|D\\|", *(c.label for c in COLUMNS)], rows) + [""] + notes
    return lines + ([] if compare else [NOT_COMPARED.format(data.profile)])


def cell_ratios_md(table: dict[int, dict[str, Stat]]) -> list[str]:
    """The extra table: mean +- std over cells of each column's per-cell ratio."""
    rows = [[str(size), *(fmt_stat(row[column.key]) for column in COLUMNS)] for size, row in table.items()]
    lines = md_table(["\\|D\\|", *(c.label for c in COLUMNS)], rows)
    notes = [f"- {column.label}, \\|D\\| = {size}: {len(row[column.key].excluded)} cell(s) excluded from the mean: "
             + "; ".join(f"{cell} ({reason})" for cell, reason in row[column.key].excluded)
             for size, row in table.items() for column in COLUMNS if row[column.key].excluded]
    if notes:
        lines += ["", "\\* Excluded (ratio not finite, counted here instead of averaged):", *notes]
    return lines


def raw_md(raw: dict[tuple[int, str], tuple[int, dict[str, Stat]]]) -> list[str]:
    rows, notes = [], []
    for (size, method), (n_ok, stats) in raw.items():
        cells = []
        for key, label in RAW_FIELDS:
            stat = stats[key]
            text = "-" if stat.n == 0 else fmt(stat.mean) + (f" ± {fmt(stat.std, 2)}" if stat.std is not None else "")
            if stat.excluded:
                text += f" ({len(stat.excluded)} excl.*)"
                notes.append(f"- {label}, \\|D\\| = {size}, {method}: "
                             + "; ".join(f"{cell} ({reason})" for cell, reason in stat.excluded))
            cells.append(text)
        rows.append([str(size), method, str(n_ok), *cells])
    lines = md_table(["\\|D\\|", "method", "runs ok", *(label for _, label in RAW_FIELDS)], rows)
    if notes:
        lines += ["", "\\* Excluded (missing or non-finite values):", *notes]
    return lines


# ---- CSV and LaTeX ------------------------------------------------------------------------------

def _csv_num(value: float | None) -> str:
    return "" if value is None else repr(value)


def write_table1_csv(path: Path, profiles: dict[str, ProfileData], values: dict, tables: dict) -> None:
    """One row per (profile, |D|): per column the Table 1 value (ratio of means) and n, the paper's
    value and ours/paper (profile paper only), and the per-cell ratios' mean, std, n, excluded."""
    header = ["profile", "dataset_size"]
    for column in COLUMNS:
        header += [column.key] + [f"{column.key}_{s}" for s in ("n", "paper", "ours_over_paper", "cell_mean",
                                                                  "cell_std", "cell_n", "cell_excluded")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name, data in profiles.items():
            for size, row in values[name].items():
                out = [name, size]
                for column in COLUMNS:
                    entry, stat = row[column.key], tables[name][size][column.key]
                    paper = paper_value(size, column) if compared_with_paper(data) else None
                    out += [_csv_num(entry.value), entry.n, _csv_num(paper),
                            _csv_num(ours_over_paper(entry.value, paper)), _csv_num(stat.mean), _csv_num(stat.std),
                            stat.n, len(stat.excluded)]
                writer.writerow(out)


def write_raw_csv(path: Path, raws: dict) -> None:
    header = ["profile", "dataset_size", "method", "runs_ok"]
    for key, _ in RAW_FIELDS:
        header += [f"{key}_mean", f"{key}_std", f"{key}_n", f"{key}_excluded"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name, raw in raws.items():
            for (size, method), (n_ok, stats) in raw.items():
                out = [name, size, method, n_ok]
                for key, _ in RAW_FIELDS:
                    out += [_csv_num(stats[key].mean), _csv_num(stats[key].std), stats[key].n,
                            len(stats[key].excluded)]
                writer.writerow(out)


CELL_VALUES = (*METRICS, "t1_s", "own_s")  # results.json's metrics, then the time split of model.seconds
CELL_HEADER = ["profile", "motif", "features", "dataset_size", "seed", "training2", "method", "status", *CELL_VALUES,
               "ce_pi_over_h", "error", "run_dir"]


def cell_rows(profiles: dict[str, ProfileData]) -> list[list]:
    rows = []
    for name, data in profiles.items():
        for cell in sorted(data.cells):
            for method, run in sorted(data.cells[cell].items(), key=lambda kv: method_sort_key(kv[0])):
                h, ce = run.values.get("entropy_true"), run.values.get("ce_test_pi")
                ratio = ce / h if h and ce is not None and math.isfinite(h) else None
                rows.append([name, *cell, method, run.status, *(run.values.get(k) for k in CELL_VALUES), ratio,
                             one_line(run.error, 400), str(run.path)])
    return rows


def write_cells(out: Path, profiles: dict[str, ProfileData]) -> None:
    rows = cell_rows(profiles)
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CELL_HEADER)
        writer.writerows([v if not isinstance(v, float) else repr(v) for v in row] for row in rows)
    md_rows = [[str(v) if not isinstance(v, float) else fmt(v) for v in row[:-2]] + [one_line(row[-2], 80), row[-1]]
               for row in rows]
    md_rows = [["-" if v == "None" else v.replace("|", "\\|") for v in row] for row in md_rows]
    text = "\n".join(["# gam-rl report: one row per (cell, method)", "", *md_table(CELL_HEADER, md_rows), ""])
    (out / "cells.md").write_text(text)


def _tex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def table1_tex(profiles: dict[str, ProfileData], values: dict) -> str:
    """One booktabs table per profile: the ratios of means, with the paper's value in parentheses
    for profile paper."""
    parts = ["% gam-rl-report: Table 1, needs \\usepackage{booktabs}; per-entry counts are in table1.csv"]
    for name in profiles:
        parts += [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{r" + "c" * len(COLUMNS) + "}",
                  r"\toprule", "$|D|$ & " + " & ".join(_tex_escape(c.label) for c in COLUMNS) + r" \\",
                  r"\midrule"]
        compare = compared_with_paper(profiles[name])
        for size, row in values[name].items():
            cells = []
            for column in COLUMNS:
                entry, paper = row[column.key], paper_value(size, column)
                ours = "--" if entry.value is None else fmt(entry.value)
                cells.append(f"{ours} ({fmt(paper)})" if compare and paper is not None else ours)
            parts.append(f"{size} & " + " & ".join(cells) + r" \\")
        paper_note = "the paper's value in parentheses" if compare else "not comparable with the paper's values"
        parts += [r"\bottomrule", r"\end{tabular}",
                  rf"\caption{{Profile {_tex_escape(name)}: ratios of per-method means over the runs of each $|D|$; "
                  rf"{paper_note}. H is each run's own $H(p_{{\mathrm{{true}}}})$.}}",
                  r"\end{table}", ""]
    return "\n".join(parts)
