"""Sweeps that survive: which runs are complete (and skipped on a re-run), and the status of a
sweep folder.

A run folder is *complete* when its results.json says status ok and its config.yaml (the
resolved configuration it ran with) equals the current one, apart from RESUME_IGNORED keys,
which say how a run is executed, not what it computes. Anything else (failed, missing,
killed, or run with another configuration) is recomputed.

A sweep's jobs are its job folders (.hydra/ or results.json) and the jobs its launcher lost before
they could leave a result of their own (LOST_JOBS, written by gam_rl.launcher: a process killed,
or Hydra's set-up of the job failed, e.g. its folder could not be made).

`python -m gam_rl.sweep SWEEP_DIR...` prints one line per job that is not ok and a count, and exits
1 when any job is not ok (the multirun_scripts use it after the report).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gam_rl.config_fields import flatten

log = logging.getLogger("gam_rl")

# execution-only keys: a run is not redone because the launcher gave it another thread count, because the
# Training-1 cache lives elsewhere, or because a tuning study judges it (`tune`: its objective's settings)
RESUME_IGNORED = ("threads", "resume", "cache", "tune")
# what a redo removes first, so that a redo killed halfway never shows the previous attempt's files
STALE_FILES = ("results.json", "metrics.csv", "r.pt", "pi.pt", "twist.pt")
# in a sweep folder: {job folder: {"job", "overrides", "error", "config", "time"}} for each job that ended
# without a result of its own (gam_rl.launcher writes it; an entry goes when its job ends with a result)
LOST_JOBS = "lost_jobs.json"
# in a sweep folder: the jobs that found their folder taken by another job of the sweep (folder_conflict)
FOLDER_CONFLICTS = "folder_conflicts.json"


def _comparable(container: dict) -> dict:
    return {k: v for k, v in container.items() if k not in RESUME_IGNORED}


def differing_keys(a: dict, b: dict) -> list[str]:
    """The dotted keys whose values differ between two configurations (method.max_proposals, not method)."""
    a, b = flatten(a), flatten(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def complete_results(run_dir: Path, recorded: dict) -> dict | None:
    """The folder's results when it already holds a complete run of the recorded configuration
    (gam_rl.schema.record), else None."""
    results_path, config_path = run_dir / "results.json", run_dir / "config.yaml"
    if not results_path.is_file() or not config_path.is_file():
        return None
    try:
        results = json.loads(results_path.read_text())
        saved = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    except Exception as err:  # unreadable files: not complete, recompute
        log.warning("cannot read the previous run in %s (%s): recomputing it", run_dir, err)
        return None
    if results.get("status") != "ok":
        log.info("previous run in %s has status %r: recomputing it", run_dir, results.get("status"))
        return None
    current = recorded
    if _comparable(saved) != _comparable(current):
        changed = differing_keys(_comparable(saved), _comparable(current))
        log.info("previous run in %s used another configuration (%s differ): recomputing it", run_dir,
                 ", ".join(changed))
        return None
    return results


def folder_conflict(run_dir: Path, recorded: dict, sweep_dir: Path) -> str | None:
    """Why this job must not use run_dir, or None.

    hydra.sweep.subdir names a job folder by the cell and the method only. A sweep over any
    other key (method.lr=0.01,0.001) would send several jobs to one folder, each overwriting the
    last: a folder whose config.yaml differs from this job's and was written after the sweep
    started (after the sweep's multirun.yaml) belongs to another job of this very sweep.
    """
    config_path, marker = run_dir / "config.yaml", sweep_dir / "multirun.yaml"
    if not config_path.is_file() or not marker.is_file():
        return None
    if config_path.stat().st_mtime_ns < marker.stat().st_mtime_ns:
        return None  # left by an earlier sweep: a re-run may redo it
    try:
        saved = _comparable(OmegaConf.to_container(OmegaConf.load(config_path), resolve=True))
    except Exception:
        return None
    current = _comparable(recorded)
    if saved == current:
        return None
    changed = differing_keys(saved, current)
    # the swept keys, added to the folder name Hydra gives a job
    suffix = "".join(f"_{key.rsplit('.', 1)[-1]}${{{key}}}" for key in changed)
    return (f"another job of this sweep already uses {run_dir} with another configuration ({', '.join(changed)} "
            f"differ{'s' if len(changed) == 1 else ''}): hydra.sweep.subdir does not tell the jobs apart; add the "
            "swept key to it, e.g. hydra.sweep.subdir='${motif.pattern}_${features.name}_D${dataset_size.size}_s${seed}"
            f"${{t2_tag:${{training2_seed}}}}_${{method.name}}{suffix}'")


def remove_stale_files(run_dir: Path) -> None:
    for name in STALE_FILES:
        (run_dir / name).unlink(missing_ok=True)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: those Hydra set up (.hydra/) or that hold a results.json."""
    found = {p.parent.parent for p in sweep_dir.glob("**/.hydra/config.yaml")}
    found |= {p.parent for p in sweep_dir.glob("**/results.json")}
    return sorted(found)


def lost_jobs(sweep_dir: Path, file: str = LOST_JOBS) -> dict[str, dict]:
    """The launcher's record of a sweep's lost jobs, by job folder ({} when there is none); with
    file=FOLDER_CONFLICTS, the jobs that found their folder taken by another job of the sweep."""
    try:
        data = json.loads((Path(sweep_dir) / file).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def unrecorded_jobs(sweep_dir: Path) -> dict[str, dict]:
    """Every job of a sweep that has no results.json of its own: the lost ones and the folder conflicts."""
    return {**lost_jobs(sweep_dir), **lost_jobs(sweep_dir, FOLDER_CONFLICTS)}


def record_folder_conflict(sweep_dir: Path, run_dir: Path, job: int, overrides: list[str], error: str,
                           config: dict) -> None:
    """A job of this sweep refused to share `run_dir` with another (folder_conflict): it has no folder of
    its own, so FOLDER_CONFLICTS counts it (keyed `<folder>#job<N>`), under a lock: jobs end in parallel."""
    from filelock import FileLock

    from gam_rl.files import atomic_write_json

    with FileLock(str(Path(sweep_dir) / f".{FOLDER_CONFLICTS}.lock")):
        entries = lost_jobs(sweep_dir, FOLDER_CONFLICTS)
        entries[f"{run_dir.name}#job{job}"] = {"job": job, "overrides": overrides, "error": error, "config": config,
                                              "time": time.time()}
        atomic_write_json(Path(sweep_dir) / FOLDER_CONFLICTS, entries)


def sweep_jobs(sweep_dir: Path) -> list[tuple[Path, str, str]]:
    """(job folder, status, error) for every job of a sweep: its job folders, and each lost job whose
    folder holds no record of its own (no results.json, no .hydra/: it may not even be a folder)."""
    found = {folder.resolve(): folder for folder in job_dirs(sweep_dir)}
    jobs = [(folder, *job_status(folder)) for folder in found.values()]
    for key, entry in unrecorded_jobs(sweep_dir).items():
        folder = Path(key) if Path(key).is_absolute() else Path(sweep_dir) / key
        if folder.resolve() not in found:
            jobs.append((folder, "failed", str(entry.get("error") or "lost")))
    return sorted(jobs)


def job_status(job_dir: Path) -> tuple[str, str]:
    path = job_dir / "results.json"
    if not path.exists():
        return "missing", "no results.json (killed, or still running)"
    try:
        results = json.loads(path.read_text())
    except ValueError as err:
        return "unreadable", str(err)
    return str(results.get("status")), str(results.get("error") or "")


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml): remembers a sweep's folder and start, so that gam-rl can
    end a sweep with its count of jobs and the report command, whatever the launcher. (It lives
    here, not in gam_rl.cli, which runs as __main__ under `python -m gam_rl.cli`: a second copy.)"""

    current: tuple[Path, float] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        SweepSummary.current = (Path(config.hydra.sweep.dir), time.time())
        # a folder conflict is between two jobs of one sweep run: a re-run (with a mended subdir) starts clean
        (Path(config.hydra.sweep.dir) / FOLDER_CONFLICTS).unlink(missing_ok=True)


def sweep_summary(sweep_dir: Path, started: float) -> str:
    # a tuning study's folder (gam_rl/tuning.py) holds the trials of its earlier starts, which were not re-run
    earlier = "from earlier starts" if (sweep_dir / "study.db").exists() else "skipped (complete)"
    counts = {"ok": 0, earlier: 0, "failed": 0, "missing": 0}
    for job, status, _ in sweep_jobs(sweep_dir):
        if status == "ok" and (job / "results.json").stat().st_mtime < started:
            status = earlier
        counts[status if status in counts else "failed"] += 1
    jobs = sum(counts.values())
    counted = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"sweep {sweep_dir}: {jobs} job{'' if jobs == 1 else 's'}: {counted}\nreport: gam-rl-report {sweep_dir}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a.startswith("-") for a in args):
        print("usage: python -m gam_rl.sweep SWEEP_DIR...  (status of every job; exit 1 if any is not ok)",
              file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for sweep_dir in map(Path, args):
        jobs = sweep_jobs(sweep_dir)
        if not jobs:
            print(f"{sweep_dir}: no job folders", file=sys.stderr)
            counts["missing"] = counts.get("missing", 0) + 1
        for job, status, error in jobs:
            counts[status] = counts.get(status, 0) + 1
            if status != "ok":
                print(f"{status:>10}  {job}" + (f"  ({error.splitlines()[0]})" if error else ""))
    total = sum(counts.values())
    print(f"jobs: {total}; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0 if counts.get("ok", 0) == total else 1


if __name__ == "__main__":
    sys.exit(main())
