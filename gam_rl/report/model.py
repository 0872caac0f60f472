"""The report's data model: run folders, each run's identity, the run chosen per (profile, cell,
method), the runs of one profile, and the formatting every table shares.

A *run folder* is any folder under the given folders that holds `results.json` or
`.hydra/config.yaml` (a folder with only the latter is a run that never finished: "missing").
A job that a sweep's launcher lost before its folder could say so (a sweep folder's
lost_jobs.json, gam_rl.sweep.LOST_JOBS: its folder could not be made) is a failed run, identified
by the configuration recorded there.
A *cell* is (motif, features, |D|, seed, Training-2 seed) within one profile; each cell has one run per
method. The Training-2 seed is None for a run that did not name one (`training2_seed`: seed + 3), so two
Training-2 seeds of one Table 1 cell are two cells of the report, and every mean and spread over cells
counts both.
A run's profile, cell and method come from results.json, else from its config. A run whose
`target` (results.json's, else the config's method.target) is set and is not `gam` is reported as
a method of its own, `<method>@target=<target>`, whatever its method (e.g. method=dpg_off
method.target=true: dpg_off@target=true, never averaged with dpg_off), except where the method's
name already ends in `_<target>` (dpg_true, whose config sets target "true", stays dpg_true); a
run on a P_lambda fitted by another Training-1 estimator than snis_r gets `@estimator=<estimator>`.

When several folders hold the same (profile, cell, method), an ok run is used before any
other and the newest before older ones; the others are named in table1.md.

This module imports no other module of the report (gam_rl.sweep reads lost_jobs.json): tables,
figures and methods build on it, and cli on all of them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gam_rl.config_fields import flatten
from gam_rl.sweep import FOLDER_CONFLICTS, LOST_JOBS, unrecorded_jobs

METHOD_ORDER = ("dpg_off", "distill", "dpg_on", "pg", "dpg_true")
METRICS = ("entropy_true", "ce_test_r", "ce_test_p_lambda", "ce_test_pi", "motif_freq_r", "motif_freq_pi",
           "avg_len_r", "avg_len_pi", "z_hat", "log_z_hat", "log_z_lower", "log_z_upper", "wall_time_s")
# Training-1's stages in results.json's timings (gam_rl.training1_cache.STAGES, named here without importing torch)
TRAINING1_STAGES = ("r", "eval_r", "training1", "z")


class ReportError(Exception):
    """A problem with the command line or the folders: exit code 2."""


# ---- reading runs -------------------------------------------------------------------------------

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
    training2_seed: int | None = None  # the run's own Training-2 seed (`training2_seed`), None: seed + 3
    values: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    mtime: float = 0.0
    config: dict = field(default_factory=dict)  # the run's composed configuration, flattened (`a.b.c` keys)

    @property
    def identified(self) -> bool:
        return None not in (self.profile, self.motif, self.features, self.dataset_size, self.seed, self.method)

    @property
    def cell(self) -> tuple:
        # the Training-2 seed as a sortable tag: '' (none named) or 't<seed>'
        return (self.motif, self.features, self.dataset_size, self.seed,
                "" if self.training2_seed is None else f"t{self.training2_seed}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def cell_name(cell: tuple) -> str:
    motif, features, size, seed, training2 = cell
    return f"{motif}/{features}/D{size}/s{seed}" + (f"/{training2}" if training2 else "")


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


def add_lost_runs(roots: list[Path], records: list[RunRecord]) -> list[RunRecord]:
    """The records, with the jobs in the lost_jobs.json of any sweep folder under the roots: a job whose
    folder is not a run folder (its reason is there only) as a failed run, identified by the
    configuration recorded there, which also identifies a lost job's run folder that cannot say whose it
    is (no results.json of its own, and .hydra/config.yaml unresolved: `${method_name:distill}`)."""
    by_path, added = {r.path: r for r in records}, []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if LOST_JOBS in filenames or FOLDER_CONFLICTS in filenames:
                for key, entry in unrecorded_jobs(Path(dirpath)).items():
                    folder = Path(key) if Path(key).is_absolute() else Path(dirpath) / key
                    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
                    record = by_path.get(folder.resolve())
                    if record is None:
                        added.append(RunRecord(folder, "failed", error=str(entry.get("error") or "lost"),
                                               mtime=as_float(entry.get("time")) or 0.0, **_identity({}, config),
                                               config=flatten(config)))
                    elif config:  # what the folder lacks, or has only unresolved (.hydra/config.yaml)
                        for name, value in _identity({}, config).items():
                            current = getattr(record, name)
                            if current is None or (isinstance(current, str) and "${" in current):
                                setattr(record, name, value)
                        record.config = record.config or flatten(config)
            dirnames[:] = [d for d in dirnames if d not in (".hydra", "wandb")]
    return records + added


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
    if method and target not in (None, "gam") and not method.endswith(f"_{target}"):
        # e.g. method=dpg_off method.target=true: not the paper's dpg_off (nor its own cell's), so its own method;
        # a method named for its target (dpg_true, target "true") is that method already
        method = f"{method}@target={target}"
    training1 = config.get("training1") if isinstance(config.get("training1"), dict) else {}
    estimator = results.get("training1_estimator") or training1.get("estimator")
    if method and estimator not in (None, "snis_r"):  # e.g. distill on a P_lambda fitted by rs (Figure 3)
        method = f"{method}@estimator={estimator}"
    return {"profile": _as_bits(pick["profile"]), "motif": _as_bits(pick["motif"]),
            "features": _as_bits(pick["features"]), "dataset_size": _as_int(pick["dataset_size"]),
            "seed": _as_int(pick["seed"]), "method": method,
            # only a run that named its own: results.json records seed + 3 for the others too
            "training2_seed": _as_int(config.get("training2_seed"))}


def load_run(run_dir: Path) -> RunRecord:
    results_path = run_dir / "results.json"
    config = _read_config(run_dir)
    if not results_path.is_file():
        return RunRecord(run_dir, "missing", error="no results.json (job killed or still running?)",
                         mtime=_mtime(run_dir / ".hydra" / "config.yaml"), **_identity({}, config),
                         config=flatten(config))
    try:
        results = json.loads(results_path.read_text())
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return RunRecord(run_dir, "unreadable", error=f"results.json unreadable: {err}",
                         mtime=_mtime(results_path), **_identity({}, config), config=flatten(config))
    status = str(results.get("status") or "unknown")
    error = results.get("error")
    if error and results.get("stage"):
        error = f"[{results['stage']}] {error}"
    values = {**{key: as_float(results.get(key)) for key in METRICS}, **seconds(results)}
    return RunRecord(run_dir, status, values=values,
                     error=str(error) if error else None, mtime=_mtime(results_path),
                     **_identity(results, config), config=flatten(config))


def seconds(results: dict) -> dict:
    """A run's time split so that a cell's shared Training-1 is never charged to whichever job computed it:
    `t1_s`, the cell's Training-1 (this job's own stages, or on a cache hit the stages of the job that
    computed the entry), and `own_s`, the job's wall time without the Training-1 it computed itself or
    waited for (another job of the cell computing the cache entry)."""
    timings = results.get("timings") or {}
    cache = results.get("training1_cache") or {}
    own_t1 = sum(as_float(timings.get(s)) or 0.0 for s in TRAINING1_STAGES)
    source = cache.get("source_timings") if cache.get("hit") else timings
    t1 = sum(as_float((source or {}).get(s)) or 0.0 for s in TRAINING1_STAGES) if source else None
    wall = as_float(results.get("wall_time_s"))
    waited = as_float(cache.get("wait_s")) or 0.0  # blocked while another job of the cell computed the entry
    return {"t1_s": t1, "own_s": None if wall is None else wall - own_t1 - waited}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def collect(roots: list[Path], profile: str | None) -> tuple[list[RunRecord], list[RunRecord]]:
    """(identified runs, unidentified runs) under the roots; ReportError when there is nothing."""
    for root in roots:
        if not root.is_dir():
            raise ReportError(f"no such folder: {root}")
    run_dirs = find_run_dirs(roots)
    records = add_lost_runs(roots, [load_run(d) for d in run_dirs])
    if not records:
        raise ReportError("no run folder (results.json or .hydra/config.yaml) under: " + ", ".join(map(str, roots)))
    identified = [r for r in records if r.identified]
    if profile is not None:
        found = sorted({r.profile for r in identified})
        identified = [r for r in identified if r.profile == profile]
        if not identified:
            raise ReportError(f"no run of profile {profile!r} (profiles found: {', '.join(found) or 'none'})")
    return identified, [r for r in records if not r.identified]


# keys that say where and how a run ran, not what it computed: never a reason to report two runs apart
INCIDENTAL = ("hydra.", "cache.", "logger.", "data.cache_dir", "resume", "threads", "device")


def differing_keys(group: list[RunRecord]) -> list[str]:
    """The configuration keys whose values differ between runs of the same (profile, cell, method); none
    when a run has no configuration to compare (it cannot be told apart, so it counts as a re-run)."""
    if not all(r.config for r in group):
        return []
    keys = set.intersection(*(set(r.config) for r in group))
    return sorted(k for k in keys if not k.startswith(INCIDENTAL)
                  and len({repr(r.config[k]) for r in group}) > 1)


def choose_runs(records: list[RunRecord]) -> tuple[dict[tuple, RunRecord], dict[str, list[str]]]:
    """One run per (profile, cell, method). Runs of one cell and method whose configurations differ (a sweep
    over method.max_proposals, say) are different methods of the report: each is named after the keys that
    differ (`distill@method.max_proposals=100`). Runs that are the same configuration (re-runs): an ok run
    over any other, then the newest; every run set aside is named, per profile, with the reason."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for record in records:
        if record.identified:
            groups[(record.profile, record.cell, record.method)].append(record)
    for key, group in list(groups.items()):
        keys = differing_keys(group) if len(group) > 1 else []
        if keys:
            del groups[key]
            for record in group:
                record.method = f"{record.method}@" + ",".join(f"{k}={record.config.get(k)}" for k in keys)
                groups[(record.profile, record.cell, record.method)].append(record)
    chosen, notes = {}, defaultdict(list)
    for key, group in groups.items():
        group.sort(key=lambda r: (r.ok, r.mtime), reverse=True)
        chosen[key] = group[0]
        for other in group[1:]:
            notes[key[0]].append(f"{cell_name(key[1])} {key[2]}: not counted ({other.status}), a re-run of the same "
                                 f"configuration as {group[0].path} ({group[0].status}), which is: {other.path}")
    return chosen, dict(notes)


# ---- runs by profile and cell -------------------------------------------------------------------

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


# ---- formatting ---------------------------------------------------------------------------------

def one_line(text: str | None, limit: int = 160) -> str:
    """An error message on one line (a config error lists its problems on several), shortened."""
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
