"""`gam-rl`: the Hydra application. One run, or a sweep with -m.

Before Hydra starts anything, the command line is checked as a whole (`preflight`): every job
of a sweep is composed and checked against the schema (gam_rl/schema.py), and any problem
(unknown key, with or without +; wrong type; value out of range; unknown group option) is
printed once, all together, and the command exits 2 with no folder written.

Exit codes: 0 ok; 1 a run (or a job of a sweep) failed; 2 a configuration error;
128 + signal when interrupted (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from importlib import resources
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gam_rl import schema, tuning
from gam_rl.cpu import flush_denormals
from gam_rl.files import atomic_write_json, unwritable
from gam_rl.launcher import JobLost, register
from gam_rl.memory import retain_freed_memory
from gam_rl.run_io import PER_FEATURE_KEYS, RunLogger, by_feature
from gam_rl.schema import ConfigError
from gam_rl.sweep import (
    SweepSummary,
    complete_results,
    folder_conflict,
    record_folder_conflict,
    remove_stale_files,
    sweep_summary,
)

log = logging.getLogger("gam_rl")

AXES = {"motif": "pattern", "features": "name", "dataset_size": "size"}  # group -> the value its files set


# ---- the command line -------------------------------------------------------------------------------

def axis_options(axis: str) -> set[str]:
    """The files of one Table 1 axis group (conf/<axis>/*.yaml), by name."""
    folder = resources.files("gam_rl.conf") / axis
    return {p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")}


def rewrite_axes(args: list[str]) -> list[str]:
    """motif=, features= and dataset_size= name files (conf/<axis>/<value>.yaml): quote their values,
    so that Hydra does not read 1001111 or 5000 as numbers, and turn an off-grid value into
    <axis>=custom <axis>.<key>=<value> (dataset_size=750 -> dataset_size=custom dataset_size.size=750)."""
    out = []
    for arg in args:
        match = re.fullmatch(r"(motif|features|dataset_size)=([^'\"\[\](){}$=]+)", arg)
        if not match:
            out.append(arg)
            continue
        axis, values = match[1], match[2].split(",")
        known = axis_options(axis)
        on_grid = [v in known for v in values]
        if all(on_grid):
            out.append(f"{axis}=" + ",".join(f"'{v}'" for v in values))
        elif not any(on_grid):
            quoted = values if axis == "dataset_size" else [f"'{v}'" for v in values]
            out += [f"{axis}=custom", f"{axis}.{AXES[axis]}=" + ",".join(quoted)]
        else:
            raise ConfigError([f"{arg}: mixes files of conf/{axis}/ ({[v for v in values if v in known]}) with "
                               f"other values; sweep {axis}=custom {axis}.{AXES[axis]}={match[2]} instead"])
    return out


def _is_group(override, groups: set[str]) -> bool:
    key = override.key_or_group.split("@")[0]
    return key in groups or key.startswith("hydra")


def apply_override(container: dict, override) -> str | None:
    """Set (or delete) one value override in a plain config; a problem, or None."""
    *parents, leaf = override.key_or_group.split(".")
    node = container
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return f"{'.'.join(parents[:i + 1])}: not a section, so {override.key_or_group} cannot be set"
    if override.is_delete():
        node.pop(leaf, None)
    else:
        node[leaf] = override.value()
    return None


_COMPOSED: dict[tuple, DictConfig] = {}  # the package's config files do not change while a process runs


class Preflight:
    """Composes each job's configuration the way Hydra will, and checks it."""

    def __init__(self):
        self.parser = OverridesParser.create()
        base = self.compose(())
        self.groups = {k.split("@")[0] for k in base.hydra.runtime.choices}

    @staticmethod
    def compose(group_overrides: tuple) -> DictConfig:
        if group_overrides not in _COMPOSED:
            _COMPOSED[group_overrides] = compose("config", overrides=list(group_overrides), return_hydra_config=True)
        return _COMPOSED[group_overrides]

    def jobs(self, overrides: list[str], multirun: bool) -> list[list[str]]:
        """Every job's overrides: one job, or a sweep's product (the preset's params, then the command line).
        A tuning sweep (hparams_search) is checked at the corners of its search space (tuning.corner_jobs):
        `self.labels` then names each job's searched values."""
        self.labels = None
        parsed = self.parser.parse_overrides(overrides)
        plain = tuple(o.input_line for o in parsed if _is_group(o, self.groups) and not o.is_sweep_override())
        composed = self.compose(plain) if multirun or any(o.key_or_group == "hparams_search" for o in parsed) else None
        if composed is not None and tuning.is_tuning(composed):
            space = dict(composed.hydra.sweeper.params or {})
            space.update({o.key_or_group.removeprefix("hydra.sweeper.params."): o.input_line.split("=", 1)[1]
                          for o in parsed if o.is_sweep_override()})
            values, self.space_problems = tuning.search_space(space)
            self.space = space
            rest = [o.input_line for o in parsed if not o.is_sweep_override()]
            jobs = tuning.corner_jobs(values, rest)
            self.labels = [" ".join(job[:len(values)]) for job in jobs]
            return jobs
        if not multirun:
            return [overrides]
        params = [f"{k}={v}" for k, v in (composed.hydra.sweeper.params or {}).items()]
        [batch] = BasicSweeper.split_arguments(self.parser.parse_overrides(params + overrides), None)
        return batch

    def problems(self, job: list[str]) -> list[str]:
        parsed = self.parser.parse_overrides(job)
        try:
            cfg = self.compose(tuple(o.input_line for o in parsed if _is_group(o, self.groups)))
        except (HydraException, ValueError) as err:
            return [describe_hydra_error(err)]
        container = OmegaConf.to_container(cfg, resolve=False)
        container.pop("hydra")
        found = [p for o in parsed if not _is_group(o, self.groups) for p in [apply_override(container, o)] if p]
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in the job
        try:
            resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
        except OmegaConfBaseException as err:
            return found + [f"{getattr(err, 'full_key', '') or 'interpolation'}: {str(err).splitlines()[0]}"]
        finally:
            HydraConfig.instance().cfg = previous
        if tuning.is_tuning(cfg):
            found += tuning.tuning_problems(cfg, resolved)
        return found + schema.problems(resolved)


def describe_hydra_error(err: Exception) -> str:
    """A composition error in one line, with a did-you-mean for an unknown group option."""
    text = str(err)
    match = re.search(r"Could not find '([^/']+)/([^']*)'", text)
    options = re.search(r"Available options in '[^']*':\s*\n((?:[ \t]+\S+\n?)+)", text)
    if match and options:
        group, value = match[1], match[2]
        choices = [line.strip() for line in options[1].splitlines() if line.strip()]
        close = difflib.get_close_matches(value, choices, n=1)
        return (f"{group}={value}: no such option; choose one of {choices}"
                + (f"; did you mean {group}={close[0]}?" if close else ""))
    return " ".join(text.split())


def check_command_line(args: list[str]) -> tuple[list[str], list[str]]:
    """The command line as Hydra will get it (rewrite_axes), and every problem of every job it
    would run ([] for --help and friends)."""
    try:
        args = rewrite_axes(args)
        return args, preflight(args)
    except ConfigError as err:
        return args, err.problems


def output_dir_problem(overrides: list[str], multirun: bool) -> str | None:
    """Whether the run's folder (hydra.run.dir) or the sweep's (hydra.sweep.dir) can be made, before any work:
    the part of the path before its first interpolation (${now:...}) is tried by making and removing a
    temporary folder in its nearest existing ancestor (a permission check alone passes root everywhere,
    /proc included). None: it can."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+~") == key]
    value = given[-1] if given else ("multirun/" if multirun else "outputs/")  # conf/config.yaml's, relative
    folder = Path(value.split("${", 1)[0] or ".").expanduser()
    problem = unwritable(folder if folder.is_absolute() else Path.cwd() / folder)
    if problem is None:
        return None
    shown = f"{key}={value}" if given else f"{key} (its default under {Path.cwd()})"
    if problem.endswith("is a file, not a folder"):
        return f"{shown}: {problem}: no run folder can be made below it"
    return f"{shown}: {problem}; choose a writable place"


def preflight(args: list[str]) -> list[str]:
    """Every problem of every job of a (rewritten) command line."""
    ns = get_args_parser().parse_args(args)
    if ns.help or ns.hydra_help or ns.info or ns.shell_completion:
        return []
    if ns.cfg is None:  # a run (not --cfg): its output folder must be possible
        problem = output_dir_problem(ns.overrides, ns.multirun)
        if problem:
            return [problem]
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        try:
            check = Preflight()
            jobs = check.jobs(ns.overrides, ns.multirun)
        except HydraException as err:
            return [describe_hydra_error(err)]
        found: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            for problem in check.problems(job):
                found.setdefault(problem, []).append(index)
    if check.labels is not None:  # a tuning sweep: the search space's own problems, then each corner's
        return check.space_problems + [p if len(idx) == len(jobs) else f"{p} (with {check.labels[idx[0]]})"
                                       for p, idx in found.items()]
    if len(jobs) == 1:
        return list(found)
    return [p if len(idx) == len(jobs) else f"{p} (jobs {', '.join(f'#{i}' for i in idx[:5])}"
            f"{', ...' if len(idx) > 5 else ''})" for p, idx in found.items()]


# ---- one run ---------------------------------------------------------------------------------------

def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RunFailed(RuntimeError):
    """A job of a multirun failed (its results.json says why). Raised out of the task function
    instead of sys.exit: Hydra's launchers (basic, joblib, submitit) record an Exception as that
    job's failure and run the other jobs, and the sweep exits 1 once they are done. (A job whose
    process dies is recorded by the joblib launcher: gam_rl.launcher.JobLost.)"""


class FolderConflict(RuntimeError):
    """Two jobs of one sweep map to the same folder (see gam_rl.sweep.folder_conflict)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the run records itself as failed and the process exits 128 + signal.
    Not an Exception, so that no launcher takes it for one failed job among others: a serial
    sweep stops."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.name = signum, signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _signals_raise():
    """Turn SIGINT and SIGTERM into Interrupted; returns the function restoring the old handlers.
    (Lightning chains its own SIGTERM handler in front of this one during fit.)"""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _start_wandb(cfg: schema.Config, recorded: dict, run_dir: Path, sweep_name: str | None = None):
    if cfg.logger.kind != "wandb" or cfg.logger.mode == "disabled":
        return None
    import wandb

    cell = f"{cfg.motif.pattern}_{cfg.features.name}_D{cfg.dataset_size.size}"
    tags = [f"profile:{cfg.profile}", f"seed:{cfg.seed}", f"features:{cfg.features.name}",
            f"D:{cfg.dataset_size.size}"] + ([f"sweep:{sweep_name}"] if sweep_name else [])
    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=str(run_dir),
                      group=cell, job_type=cfg.method.name, name=run_dir.name, tags=tags, config=recorded,
                      reinit="finish_previous", settings=wandb.Settings(silent=not cfg.logger.verbose))


def wandb_summary(results: dict) -> dict:
    """The final metrics as flat W&B summary keys: every scalar of results.json, lambda and the
    moments per feature name, timings/samples per stage, the exact section (eval.exact), and where
    Training-1 came from."""
    summary = {k: v for k, v in results.items()
               if isinstance(v, (bool, int, float, str)) and k not in ("traceback", "run_dir", "data_dir")}
    for key in PER_FEATURE_KEYS:
        if results.get(key) is not None:
            summary.update({f"{key}/{name}": value for name, value in by_feature(results, key).items()})
    for key in ("timings", "samples", "exact"):
        summary.update({f"{key}/{stage}": value for stage, value in (results.get(key) or {}).items()})
    # Table 1's within-run ratios (CE pi/r, CE pi/H, mtf pi/r), per run
    for name, num, den in (("ce_pi_over_r", "ce_test_pi", "ce_test_r"), ("ce_pi_over_h", "ce_test_pi", "entropy_true"),
                           ("mtf_pi_over_r", "motif_freq_pi", "motif_freq_r")):
        a, b = results.get(num), results.get(den)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            summary[f"ratio/{name}"] = a / b
    cache = results.get("training1_cache") or {}
    if cache:
        summary.update({"training1_cache/hit": bool(cache.get("hit")), "training1_cache/key": cache.get("key")})
    return {k: v for k, v in summary.items() if v is not None}


def run_summary(results: dict, run_dir: Path) -> str:
    """What a finished run printed last: the cell, the headline numbers, the time, the files."""
    def num(key: str, digits: int = 4) -> str:
        value = results.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    timings = results.get("timings") or {}
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if v >= 0.5)
    wall = results.get("wall_time_s") or sum(timings.values())
    cached = (results.get("training1_cache") or {}).get("hit")
    # under a minute in seconds; the stages that took half a second or more, else say none did
    stages = stages or "every stage under 0.5 s"
    if cached:
        stages += "; Training-1 from the cache"
    return "\n".join([
        f"\n=== gam_rl: {results.get('motif')} / {results.get('features')} / |D| {results.get('dataset_size')} / "
        f"seed {results.get('seed')} / {results.get('method')} / profile {results.get('profile')}: "
        f"{results.get('status')} ===",
        f"  H(p_true)        {num('entropy_true')}   nats per symbol over {results.get('symbols', 31)} symbols",
        f"  CE(T, r)         {num('ce_test_r')}   motif frequency of r  {num('motif_freq_r', 3)}",
        f"  CE(T, p_lambda)  {num('ce_test_p_lambda')} +- {num('ce_test_p_lambda_se')}",
        f"  CE(T, pi)        {num('ce_test_pi')}   motif frequency of pi {num('motif_freq_pi', 3)}",
        f"  wall time        {f'{wall / 60:.1f} min' if wall >= 60 else f'{wall:.1f} s'} ({stages})",
        f"  files            {run_dir}/ (results.json, metrics.csv, config.yaml, r.pt, pi.pt"
        + (", twist.pt)" if (run_dir / "twist.pt").is_file() else ")"),
    ])


def execute(cfg: DictConfig | dict, run_dir: Path, sweep_dir: Path | None = None) -> dict:
    """Check, run, and write the artefacts of one run; returns results (raises on failure).

    A folder that already holds a complete run of this configuration is skipped (resume=true):
    its files are left untouched and its results returned with "skipped": true. In a sweep
    (sweep_dir given), a folder another job of the same sweep has written is never touched.
    """
    from gam_rl.pipeline import Run, run_pipeline

    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    container = {k: v for k, v in container.items() if k != "hydra"}
    typed = schema.load(container)
    recorded = schema.record(typed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if typed.resume:
        previous = complete_results(run_dir, recorded)
        if previous is not None:
            log.info("skipping %s: its results are complete (status ok, same configuration)", run_dir)
            return {**previous, "skipped": True}
    conflict = folder_conflict(run_dir, recorded, sweep_dir) if sweep_dir is not None else None
    if conflict:  # recorded in the sweep folder, so that the sweep counts this job as failed
        hydra_cfg = HydraConfig.instance().cfg  # None when execute runs outside a Hydra job
        num = int(hydra_cfg.hydra.job.num) if hydra_cfg is not None else -1
        overrides = list(hydra_cfg.hydra.overrides.task) if hydra_cfg is not None else []
        record_folder_conflict(sweep_dir, run_dir, num, overrides, f"folder conflict: {conflict}", recorded)
        raise FolderConflict(conflict)
    remove_stale_files(run_dir)
    OmegaConf.save(OmegaConf.create(recorded), run_dir / "config.yaml")
    if typed.threads:
        torch.set_num_threads(typed.threads)
    run = Run(typed)
    run.results["run_dir"] = str(run_dir)
    results_path = run_dir / "results.json"
    atomic_write_json(results_path, run.results)  # status "running" until the end: a killed run never looks done
    started = time.time()
    wandb_run = logger = None
    restore_signals = _signals_raise()
    try:
        wandb_run = _start_wandb(typed, recorded, run_dir, sweep_dir.name if sweep_dir is not None else None)
        logger = RunLogger(run_dir, wandb_run)
        results = run_pipeline(typed, run, logger, run_dir)
        results["status"] = "ok"
    except BaseException as err:
        if isinstance(err, SIGTERMException):  # Lightning's own SIGTERM handler got there first
            err = Interrupted(signal.SIGTERM)
        stage = run.stage_now
        message = (f"interrupted ({err.name}) during {stage or 'set-up'}" if isinstance(err, Interrupted)
                   else f"{type(err).__name__}: {err}")
        run.results.update(status="failed", error=message, stage=stage, traceback=traceback.format_exc())
        if err is not sys.exc_info()[1]:
            raise err from None
        raise
    finally:
        restore_signals()
        run.results["wall_time_s"] = round(time.time() - started, 3)
        atomic_write_json(results_path, run.results)
        if logger is not None:
            logger.close()
        if wandb_run is not None:
            try:
                wandb_run.summary.update(wandb_summary(run.results))
            finally:
                wandb_run.finish(exit_code=0 if run.results["status"] == "ok" else 1)
    return results


@hydra.main(config_path="pkg://gam_rl.conf", config_name="config", version_base="1.3")
def hydra_app(cfg: DictConfig) -> float | None:
    _quiet_lightning()
    retain_freed_memory()  # here, not in main(): a parallel launcher's jobs run in worker processes
    flush_denormals()  # before the job's first parallel op, so that its OpenMP threads flush too (gam_rl/cpu.py)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:  # every log line of a sweep's job says whose it is (parallel jobs share the console)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[%(asctime)s][{run_dir.name}] %(message)s", "%H:%M:%S"))
    try:
        results = execute(cfg, run_dir, Path(hydra_cfg.sweep.dir) if multirun else None)
    except Interrupted as err:  # the whole process was asked to stop: a serial sweep ends here
        log.error("%s; %s records the run as failed", err.name, run_dir / "results.json")
        raise
    except ConfigError:
        raise  # checked by preflight already; here only when the configuration was composed elsewhere
    except Exception as err:
        log.error("run failed: %s\n%s", err, traceback.format_exc())
        message = f"run failed ({type(err).__name__}: {err})"
        if not isinstance(err, FolderConflict):  # a conflicting job leaves the folder to its owner
            message += f"; see {run_dir}/results.json"
        if multirun:  # the other jobs of the sweep go on; the sweep exits 1 at the end
            raise RunFailed(message) from None
        print(f"gam-rl: {message}", file=sys.stderr)
        sys.exit(1)
    if results.get("skipped"):
        print(f"skipped (complete): {run_dir / 'results.json'}")
    else:
        print(run_summary(results, run_dir))
    # the job's return value: a tuning sweep's objective (gam_rl/tuning.py); other sweepers ignore it
    return tuning.objective(results, cfg.tune.budget_draws, cfg.tune.min_motif_freq)


def dry_run(args: list[str]) -> str:
    """`--dry-run`: every job a (checked, rewritten) command line would run, with its folder, one per line.
    ${now:...} in the folders resolves to this moment; the real run resolves it when it starts."""
    ns = get_args_parser().parse_args(args)
    lines = []
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        check = Preflight()
        jobs = check.jobs(ns.overrides, ns.multirun)
        if check.labels is not None:  # a tuning study: its trials are chosen as it runs
            return tuning_plan(jobs[0], check.space)
        previous = HydraConfig.instance().cfg
        try:
            for index, job in enumerate(jobs):
                cfg = compose("config", overrides=list(job), return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)  # ${hydra:...} and the method's name resolve as in the job
                folder = (Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir) if ns.multirun
                          else Path(str(cfg.hydra.run.dir)))
                lines.append(f"  #{index} {folder}  {' '.join(job) or '(the defaults)'}")
        finally:
            HydraConfig.instance().cfg = previous
    head = f"gam-rl --dry-run: {len(jobs)} job{'s' if len(jobs) != 1 else ''}, nothing run or written"
    return "\n".join([head, *lines])


def tuning_plan(job: list[str], space: dict[str, str]) -> str:
    """--dry-run of a tuning sweep: the study, its folder, cell, budget and search space."""
    cfg = compose("config", overrides=list(job), return_hydra_config=True)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        sweeper, folder = cfg.hydra.sweeper, Path(str(cfg.hydra.sweep.dir))
        lines = [f"gam-rl --dry-run: a tuning study of method={cfg.tune.method}, nothing run or written",
                 f"  folder   {folder}: study.db, trial_<k>/, trials.csv, best/method/{cfg.tune.method}_best.yaml",
                 f"  trials   {sweeper.n_trials} in all (a resumed study runs the missing ones), "
                 f"{sweeper.n_jobs} handed out at a time; sampler {sweeper.sampler._target_.rsplit('.', 1)[-1]}",
                 f"  cell     motif={cfg.motif.pattern} features={cfg.features.name} seed={cfg.seed} "
                 f"dataset_size={cfg.dataset_size.size} profile={cfg.profile}",
                 f"  budget   {cfg.tune.budget_draws:g} draws per trial",
                 *(f"  search   {k}={v}" for k, v in space.items())]
    finally:
        HydraConfig.instance().cfg = previous
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else list(argv)
    register()  # the joblib launcher's plugin, also where Hydra's own search cannot find it (editable installs)
    listing = "--dry-run" in raw  # gam-rl's own flag, not Hydra's
    args, problems = check_command_line([a for a in raw if a != "--dry-run"])
    if problems:
        print("gam-rl: invalid configuration:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    if listing:
        print(dry_run(args))
        return
    sys.argv = [sys.argv[0], *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # errors come back here, printed once, with our exit codes
    try:
        hydra_app()
    except Interrupted as err:
        sys.exit(err.exit_code)
    except (RunFailed, JobLost) as err:  # the first failed or lost job of a sweep (each one's results.json says why)
        print(f"gam-rl: {err}", file=sys.stderr)
        if SweepSummary.current:
            print(sweep_summary(*SweepSummary.current))
        sys.exit(1)
    except ConfigError as err:
        print(f"gam-rl: {err}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"gam-rl: invalid configuration: {describe_hydra_error(err)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:  # Hydra's own command-line checks (e.g. -m with --cfg)
        print(f"gam-rl: {err}", file=sys.stderr)
        sys.exit(2)
    if SweepSummary.current:
        print(sweep_summary(*SweepSummary.current))


if __name__ == "__main__":
    main()
