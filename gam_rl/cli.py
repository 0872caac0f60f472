"""`gam-rl`: the Hydra application. One run, or a sweep with -m."""

from __future__ import annotations

import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gam_rl.config import ConfigError, validate
from gam_rl.run_io import RunLogger, atomic_write_json

log = logging.getLogger("gam_rl")

SUMMARY_KEYS = ("entropy_true", "ce_test_r", "motif_freq_r", "avg_len_r", "ce_test_p_lambda",
                "ce_test_pi", "motif_freq_pi", "avg_len_pi")


def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _start_wandb(cfg: DictConfig, run_dir: Path):
    if cfg.logger.kind != "wandb" or cfg.logger.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=str(run_dir),
        group=f"{cfg.motif}_{cfg.features}_D{cfg.dataset_size}", job_type=cfg.method.name,
        name=run_dir.name, tags=[f"profile:{cfg.profile}", f"seed:{cfg.seed}"],
        config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
    )


def print_summary(results: dict) -> None:
    print("\n=== gam_rl run summary ===")
    for key in SUMMARY_KEYS:
        value = results.get(key)
        if value is not None:
            print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    print(f"{'timings (s)':>18}: {results.get('timings')}")
    print(f"{'status':>18}: {results.get('status')}")


def execute(cfg: DictConfig, run_dir: Path) -> dict:
    """Validate, run, and write the artefacts of one run; returns results (raises on failure)."""
    from gam_rl.pipeline import Run, run_pipeline

    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    try:
        validate(cfg)
    except ConfigError as err:
        atomic_write_json(results_path, {"status": "failed", "error": str(err), "stage": "config"})
        raise
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    run.results["run_dir"] = str(run_dir)
    started = time.time()
    wandb_run = _start_wandb(cfg, run_dir)
    logger = RunLogger(run_dir, wandb_run)
    try:
        results = run_pipeline(cfg, run, logger, run_dir)
        results["status"] = "ok"
    except BaseException as err:
        run.results.update(status="failed", error=f"{type(err).__name__}: {err}",
                           traceback=traceback.format_exc())
        raise
    finally:
        run.results["wall_time_s"] = round(time.time() - started, 3)
        atomic_write_json(results_path, run.results)
        logger.close()
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in run.results.items()
                                      if isinstance(v, (int, float, str)) and k != "traceback"})
            wandb_run.finish(exit_code=0 if run.results["status"] == "ok" else 1)
    return results


@hydra.main(config_path="pkg://gam_rl.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    _quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = execute(cfg, run_dir)
    except ConfigError as err:
        log.error("%s", err)
        print(f"gam-rl: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        log.error("run failed: %s\n%s", err, traceback.format_exc())
        print(f"gam-rl: run failed ({type(err).__name__}: {err}); see {run_dir}/results.json", file=sys.stderr)
        sys.exit(1)
    print_summary(results)
    print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
