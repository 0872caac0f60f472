"""`gam-rl-report SWEEP_DIR... [--out DIR] [--profile P]`: aggregate gam-rl runs into Table 1.

A *run folder* is any folder under the given folders that holds `results.json` or
`.hydra/config.yaml` (a folder with only the latter is a run that never finished: "missing").
A *cell* is (motif, features, |D|, seed) within one profile; each cell has one run per method.

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

When several folders hold the same (profile, cell, method), an ok run is used before any
other and the newest before older ones; the others are named in table1.md.

Runs of different profiles are never mixed: every table and figure is per profile
(`--profile P` keeps one). With one profile the figures are `figure2.png` and
`dpg_vs_distill.png`; with several, `figure2_<profile>.png` and `dpg_vs_distill_<profile>.png`.

Files written to --out (default `<first SWEEP_DIR>/report`): table1.md (all tables, the
missing list, the Training-2 methods table of report_methods.py, footnotes), table1.csv (one
row per profile and |D|: `<col>_mean, _std, _n, _excluded, _paper, _ours_over_paper` for each
column), table1.tex, raw_means.csv, methods.csv, cells.md, cells.csv, and the PNG figures.
Exit code 0 when written (failed cells are listed), 2 when a
folder does not exist or no run folder is found.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PAPER_METHODS = ("dpg_off", "distill")
PAPER_PROFILE = "paper"  # the only profile compared with the paper's Table 1
GAM_TARGET_METHODS = ("distill", "dpg_off", "dpg_on", "pg", "distill_qrs", "fdpg_kl", "fdpg_rkl", "fdpg_js", "fdpg_tv",
                      "kl_control", "pcl", "ac_dpg_head", "ac_dpg_separate", "ppo_dpg")  # methods targeting P_lambda
METHOD_ORDER = ("dpg_off", "distill", "dpg_on", "pg", "dpg_true")
METRICS = ("entropy_true", "ce_test_r", "ce_test_p_lambda", "ce_test_pi", "motif_freq_r", "motif_freq_pi",
           "avg_len_r", "avg_len_pi", "z_hat", "wall_time_s")
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
              ("avg_len_r", "len r"), ("avg_len_pi", "len pi"), ("wall_time_s", "wall s"))


class ReportError(Exception):
    """A problem with the command line or the folders: exit code 2."""


# ---- reading runs ------------------------------------------------------------------------------

@dataclass
class RunRecord:
    path: Path
    status: str  # ok | failed | running | missing (no results.json) | unreadable
    profile: str | None = None
    motif: str | None = None
    features: str | None = None
    dataset_size: int | None = None
    seed: int | None = None
    method: str | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    mtime: float = 0.0

    @property
    def identified(self) -> bool:
        return None not in (self.profile, self.motif, self.features, self.dataset_size, self.seed, self.method)

    @property
    def cell(self) -> tuple:
        return (self.motif, self.features, self.dataset_size, self.seed)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def cell_name(cell: tuple) -> str:
    motif, features, size, seed = cell
    return f"{motif}/{features}/D{size}/s{seed}"


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every folder under the roots holding results.json or .hydra/config.yaml (deduplicated)."""
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if "results.json" in filenames or (here / ".hydra" / "config.yaml").is_file():
                found.add(here.resolve())
            dirnames[:] = [d for d in dirnames if d not in (".hydra", "wandb")]
    return sorted(found)


def as_float(value) -> float | None:
    """Numbers and the strings "inf"/"nan" (how run_io writes non-finite floats) as floats."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _as_int(value) -> int | None:
    number = as_float(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _as_bits(value) -> str | None:
    """Hydra parses 1001111 typed on a command line as an int; bit strings come back as str."""
    if value is None or isinstance(value, bool):
        return None
    return str(value)


def _read_config(run_dir: Path) -> dict:
    """The composed config: Hydra's .hydra/config.yaml, else the run's own config.yaml."""
    for path in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(loaded, dict):
                return loaded
    return {}


# where the config holds each identity key: a section's value key (conf/motif/*.yaml sets motif.pattern)
CONFIG_VALUE = {"motif": "pattern", "features": "name", "dataset_size": "size"}


def _config_value(config: dict, key: str):
    value = config.get(key)
    return value.get(CONFIG_VALUE[key]) if isinstance(value, dict) and key in CONFIG_VALUE else value


def _identity(results: dict, config: dict) -> dict:
    """Cell and method of a run, from results.json, falling back to the config."""
    method_cfg = config.get("method")
    method_name = method_cfg.get("name") if isinstance(method_cfg, dict) else method_cfg
    pick = {key: results.get(key) if results.get(key) is not None else _config_value(config, key)
            for key in ("profile", "motif", "features", "dataset_size", "seed")}
    method = _as_bits(results.get("method") or method_name)
    target = results.get("target") or (method_cfg.get("target") if isinstance(method_cfg, dict) else None)
    if method in GAM_TARGET_METHODS and target not in (None, "gam"):
        # e.g. method=dpg_off method.target=true: not the paper's dpg_off (nor its own cell's), so its own method
        method = f"{method}@target={target}"
    training1 = config.get("training1") if isinstance(config.get("training1"), dict) else {}
    estimator = results.get("training1_estimator") or training1.get("estimator")
    if method and estimator not in (None, "snis_r"):  # e.g. distill on a P_lambda fitted by rs (Figure 3)
        method = f"{method}@estimator={estimator}"
    return {"profile": _as_bits(pick["profile"]), "motif": _as_bits(pick["motif"]),
            "features": _as_bits(pick["features"]), "dataset_size": _as_int(pick["dataset_size"]),
            "seed": _as_int(pick["seed"]), "method": method}


def load_run(run_dir: Path) -> RunRecord:
    results_path = run_dir / "results.json"
    config = _read_config(run_dir)
    if not results_path.is_file():
        return RunRecord(run_dir, "missing", error="no results.json (job killed or still running?)",
                         mtime=_mtime(run_dir / ".hydra" / "config.yaml"), **_identity({}, config))
    try:
        results = json.loads(results_path.read_text())
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return RunRecord(run_dir, "unreadable", error=f"results.json unreadable: {err}",
                         mtime=_mtime(results_path), **_identity({}, config))
    status = str(results.get("status") or "unknown")
    error = results.get("error")
    if error and results.get("stage"):
        error = f"[{results['stage']}] {error}"
    return RunRecord(run_dir, status, values={key: as_float(results.get(key)) for key in METRICS},
                     error=str(error) if error else None, mtime=_mtime(results_path),
                     **_identity(results, config))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def choose_runs(records: list[RunRecord]) -> tuple[dict[tuple, RunRecord], list[str]]:
    """One run per (profile, cell, method): an ok run over any other, then the newest.
    Returns the chosen runs and a note for every run that was set aside."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in records:
        if record.identified:
            groups[(record.profile, record.cell, record.method)].append(record)
    chosen, notes = {}, []
    for key, group in groups.items():
        group.sort(key=lambda r: (r.ok, r.mtime), reverse=True)
        chosen[key] = group[0]
        for other in group[1:]:
            notes.append(f"duplicate {cell_name(key[1])} {key[2]}: used {group[0].path} ({group[0].status}), "
                         f"ignored {other.path} ({other.status})")
    return chosen, notes


# ---- statistics ----------------------------------------------------------------------------------

@dataclass
class Stat:
    """Finite values that enter a mean, and the (cell, reason) pairs that were kept out."""
    values: list[float] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def add(self, value: float | None, cell: str, what: str) -> None:
        if value is None:
            self.excluded.append((cell, f"no value for {what}"))
        elif not math.isfinite(value):
            self.excluded.append((cell, f"{what} = {value}"))
        else:
            self.values.append(value)


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
class ProfileData:
    """All chosen runs of one profile, by cell and method."""
    profile: str
    cells: dict[tuple, dict[str, RunRecord]]

    @property
    def sizes(self) -> list[int]:
        return sorted({cell[2] for cell in self.cells})

    def cells_of_size(self, size: int) -> list[tuple]:
        return sorted(cell for cell in self.cells if cell[2] == size)

    @property
    def methods(self) -> list[str]:
        found = {m for runs in self.cells.values() for m in runs}
        return sorted(found, key=method_sort_key)


def method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def group_by_profile(chosen: dict[tuple, RunRecord]) -> dict[str, ProfileData]:
    grouped: dict[str, dict[tuple, dict[str, RunRecord]]] = defaultdict(lambda: defaultdict(dict))
    for (profile, cell, method), record in chosen.items():
        grouped[profile][cell][method] = record
    return {p: ProfileData(p, dict(cells)) for p, cells in sorted(grouped.items())}


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
    if any(m in PAPER_METHODS for m in data.methods):
        axes = [sorted({cell[i] for cell in data.cells}) for i in range(4)]
        for cell in itertools.product(*axes):
            for method in PAPER_METHODS:
                if method not in data.cells.get(cell, {}):
                    lines.append(f"{cell_name(cell)} {method}: absent (no run folder found)")
    return lines


def one_line(text: str | None, limit: int = 160) -> str:
    """An error message on one line (a config error lists its problems on several), shortened."""
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---- formatting ----------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


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


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


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


def report_md(profiles: dict[str, ProfileData], values: dict, tables: dict, raws: dict, notes: list[str],
              unidentified: list[RunRecord], figures: dict[str, list[str]], skipped: dict[str, list[str]],
              roots: list[Path]) -> str:
    from gam_rl.report_methods import methods_md, methods_rows

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
        lines += [f"- {line}" for line in problems(data)] or ["none"]
        lines += ["", "### Training-2 methods (gam_rl/report_methods.py: draws to CE(V, pi) <= 1.01 CE(V, p_lambda), "
                  "final CE(T, pi); exact divergences with eval.exact)", "", *methods_md(methods_rows(data))]
        lines += ["", "Figures: " + (", ".join(f"`{f}`" for f in figures[name]) or "none"), ""]
        lines += [f"- not drawn: {reason}" for reason in skipped[name]]
        lines += [""] if skipped[name] else []
    if unidentified or notes:
        lines += ["## Other run folders", ""]
        lines += [f"- unidentified (no cell/method in results.json or config): {r.path}: {r.status}"
                  f"{': ' + one_line(r.error) if r.error else ''}" for r in unidentified]
        lines += [f"- {note}" for note in notes]
        lines.append("")
    return "\n".join(lines)


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


CELL_HEADER = ["profile", "motif", "features", "dataset_size", "seed", "method", "status", *METRICS,
               "ce_pi_over_h", "error", "run_dir"]


def cell_rows(profiles: dict[str, ProfileData]) -> list[list]:
    rows = []
    for name, data in profiles.items():
        for cell in sorted(data.cells):
            for method, run in sorted(data.cells[cell].items(), key=lambda kv: method_sort_key(kv[0])):
                h, ce = run.values.get("entropy_true"), run.values.get("ce_test_pi")
                ratio = ce / h if h and ce is not None and math.isfinite(h) else None
                rows.append([name, *cell, method, run.status, *(run.values.get(k) for k in METRICS), ratio,
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


# ---- driver --------------------------------------------------------------------------------------

def figure_file(figure: str, profile: str, several: bool) -> str:
    """figure2.png, or figure2_<profile>.png when the report has several profiles."""
    return f"{figure}_{profile}.png" if several else f"{figure}.png"


def collect(roots: list[Path], profile: str | None) -> tuple[list[RunRecord], list[RunRecord]]:
    """(identified runs, unidentified runs) under the roots; ReportError when there is nothing."""
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"no such folder: {root}")
    run_dirs = find_run_dirs(roots)
    if not run_dirs:
        raise ReportError("no run folder (results.json or .hydra/config.yaml) under: " + ", ".join(map(str, roots)))
    records = [load_run(d) for d in run_dirs]
    identified = [r for r in records if r.identified]
    if profile is not None:
        found = sorted({r.profile for r in identified})
        identified = [r for r in identified if r.profile == profile]
        if not identified:
            raise ReportError(f"no run of profile {profile!r} (profiles found: {', '.join(found) or 'none'})")
    return identified, [r for r in records if not r.identified]


def write_report(roots: list[Path], out: Path, profile: str | None = None) -> str:
    """Read the runs under the roots, write every file into out; returns the Markdown report."""
    from gam_rl.report_figures import FIGURES
    from gam_rl.report_methods import write_methods_csv

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
        for figure, draw in FIGURES.items():
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


if __name__ == "__main__":
    sys.exit(main())
