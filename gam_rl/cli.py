"""`gam-rl`: the Hydra application. One run, or a sweep with -m."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gam_rl.config import ConfigError, validate
from gam_rl.run_io import RunLogger, atomic_write_json
from gam_rl.sweep import complete_results, folder_conflict, remove_stale_files, sweep_key_problems

log = logging.getLogger("gam_rl")

SUMMARY_KEYS = ("entropy_true", "ce_test_r", "motif_freq_r", "avg_len_r", "ce_test_p_lambda",
                "ce_test_pi", "motif_freq_pi", "avg_len_pi")


def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RunFailed(RuntimeError):
    """A job of a multirun failed (its results.json says why). Raised out of the task function
    instead of sys.exit: Hydra's launchers (basic, joblib, submitit) record an Exception as that
    job's failure and run the other jobs, and the sweep exits 1 once they are done; a SystemExit
    would stop a serial sweep at the failing job."""


def _start_wandb(cfg: DictConfig, run_dir: Path, sweep_name: str | None = None):
    if cfg.logger.kind != "wandb" or cfg.logger.mode == "disabled":
        return None
    import wandb

    tags = [f"profile:{cfg.profile}", f"seed:{cfg.seed}", f"features:{cfg.features}", f"D:{cfg.dataset_size}"]
    if sweep_name:
        tags.append(f"sweep:{sweep_name}")
    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=str(run_dir),
        group=f"{cfg.motif}_{cfg.features}_D{cfg.dataset_size}", job_type=cfg.method.name,
        name=run_dir.name, tags=tags,
        config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
    )


def wandb_summary(results: dict) -> dict:
    """The final metrics as flat W&B summary keys: every scalar of results.json, lambda and the
    moments per feature name, timings/samples per stage, and where Training-1 came from."""
    summary = {k: v for k, v in results.items()
               if isinstance(v, (bool, int, float, str)) and k not in ("traceback", "run_dir", "data_dir")}
    names = results.get("feature_names") or []
    for key in ("lambda", "moments_data", "moments_model"):
        values = results.get(key)
        if isinstance(values, list) and len(values) == len(names):
            summary.update({f"{key}/{name}": value for name, value in zip(names, values, strict=True)})
    for key in ("timings", "samples"):
        summary.update({f"{key}/{stage}": value for stage, value in (results.get(key) or {}).items()})
    # Table 1's within-run ratios (CE pi/r, CE pi/H, mtf pi/r): a W&B runs table grouped by
    # dataset_size and job_type averages them into the paper's columns for each method
    for name, num, den in (("ce_pi_over_r", "ce_test_pi", "ce_test_r"), ("ce_pi_over_h", "ce_test_pi", "entropy_true"),
                           ("mtf_pi_over_r", "motif_freq_pi", "motif_freq_r")):
        a, b = results.get(num), results.get(den)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            summary[f"ratio/{name}"] = a / b
    cache = results.get("training1_cache") or {}
    if cache:
        summary.update({"training1_cache/hit": bool(cache.get("hit")), "training1_cache/key": cache.get("key")})
    return {k: v for k, v in summary.items() if v is not None}


def print_summary(results: dict) -> None:
    print("\n=== gam_rl run summary ===")
    for key in SUMMARY_KEYS:
        value = results.get(key)
        if value is not None:
            print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    print(f"{'timings (s)':>18}: {results.get('timings')}")
    print(f"{'status':>18}: {results.get('status')}")


def check(cfg: DictConfig) -> DictConfig:
    """validate() plus the sweep and cache keys; every problem reported at once."""
    problems: list[str] = []
    try:
        validate(cfg)
    except ConfigError as err:
        problems += err.problems
    problems += sweep_key_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


class FolderConflict(RuntimeError):
    """Two jobs of one sweep map to the same folder (see gam_rl.sweep.folder_conflict)."""


class Terminated(SystemExit):
    """SIGTERM received: the run records itself as failed and the process exits with 143
    (128 + SIGTERM). A SystemExit, like Lightning's own SIGTERMException, so that it is not
    caught as one failed job: a serial sweep stops instead of going on to the next job."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _sigterm_raises():
    """Turn SIGTERM into an exception (so results.json says failed, with the reason) and
    return the function that restores the previous handler. Lightning installs its own
    handler during fit, which likewise raises; outside fit this one applies."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def execute(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> dict:
    """Validate, run, and write the artefacts of one run; returns results (raises on failure).

    A folder that already holds a complete run of this configuration is skipped (resume=true):
    its files are left untouched and its results returned with "skipped": true. In a sweep
    (sweep_dir given), a folder another job of the same sweep has written is never touched.
    """
    from gam_rl.pipeline import Run, run_pipeline

    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    try:
        check(cfg)
    except ConfigError as err:
        atomic_write_json(results_path, {"status": "failed", "error": str(err), "stage": "config"})
        raise
    if cfg.resume:
        previous = complete_results(run_dir, cfg)
        if previous is not None:
            log.info("skipping %s: its results are complete (status ok, same configuration)", run_dir)
            return {**previous, "skipped": True}
    conflict = folder_conflict(run_dir, cfg, sweep_dir) if sweep_dir is not None else None
    if conflict:
        raise FolderConflict(conflict)
    remove_stale_files(run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    run.results["run_dir"] = str(run_dir)
    atomic_write_json(results_path, run.results)  # status "running" until the end: a killed run never looks done
    started = time.time()
    wandb_run = logger = None
    restore_sigterm = _sigterm_raises()
    try:
        wandb_run = _start_wandb(cfg, run_dir, sweep_dir.name if sweep_dir is not None else None)
        logger = RunLogger(run_dir, wandb_run)
        results = run_pipeline(cfg, run, logger, run_dir)
        results["status"] = "ok"
    except BaseException as err:
        run.results.update(status="failed", error=f"{type(err).__name__}: {err}",
                           traceback=traceback.format_exc())
        raise
    finally:
        restore_sigterm()
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
def main(cfg: DictConfig) -> None:
    _quiet_lightning()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        results = execute(cfg, run_dir, Path(hydra_cfg.sweep.dir) if multirun else None)
    except (Terminated, SIGTERMException):
        # not one failed job among others: the whole process was asked to stop (a serial sweep ends here)
        log.error("stopped by SIGTERM; %s records the run as failed", run_dir / "results.json")
        sys.exit(143)
    except ConfigError as err:
        log.error("%s", err)
        if multirun:
            raise RunFailed(f"{run_dir}: {err}") from None
        print(f"gam-rl: {err}", file=sys.stderr)
        sys.exit(2)
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
        return
    print_summary(results)
    print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
