"""One run: data -> r -> (lambda -> pi) -> evaluation, with every artefact written.

Each stage receives what it needs as arguments; the pipeline only composes them and
records timings, sample counts and metrics into `results`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from gam_rl.config import resolve_device
from gam_rl.data import load_splits
from gam_rl.metrics import policy_cross_entropy, sample_statistics
from gam_rl.policy import LSTMPolicy
from gam_rl.process import MotifProcess
from gam_rl.run_io import RESULT_KEYS, RunLogger
from gam_rl.stages.mle import train_mle

log = logging.getLogger("gam_rl")


class Run:
    """Mutable record of one run: results plus per-stage timings and sample counts."""

    def __init__(self, cfg: DictConfig):
        self.results: dict = {key: None for key in RESULT_KEYS}
        self.results.update(status="running", motif=cfg.motif, features=cfg.features,
                            dataset_size=cfg.dataset_size, seed=cfg.seed, method=cfg.method.name,
                            profile=cfg.profile, timings={}, samples={})

    @contextlib.contextmanager
    def stage(self, name: str):
        log.info("[%s] starting", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.results["timings"][name] = round(elapsed, 3)
            log.info("[%s] done in %.1f s", name, elapsed)

    def count_samples(self, name: str, count: int) -> None:
        self.results["samples"][name] = self.results["samples"].get(name, 0) + int(count)


def run_pipeline(cfg: DictConfig, run: Run, logger: RunLogger, run_dir: Path) -> dict:
    device = resolve_device(cfg.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    res = run.results
    res["device"] = str(device)
    symbols = cfg.n + 1  # every CE is in nats per symbol over n bits + EOS

    with run.stage("data"):
        process = MotifProcess(cfg.motif, cfg.n)
        splits = load_splits(cfg.motif, cfg.n, cfg.dataset_size, cfg.data.valid_size,
                             dict(cfg.data.pools), cfg.data.cache_dir, device)
        res.update(data_dir=str(splits.data_dir), valid_size=len(splits.valid), test_size=len(splits.test),
                   entropy_true=process.entropy_per_symbol, num_motif_strings=process.num_strings)
        log.info("H(p_true) = %.4f nats/symbol (%d strings of length %d contain %s)",
                 process.entropy_per_symbol, process.num_strings, cfg.n, cfg.motif)

    with run.stage("r"):
        r = LSTMPolicy(**cfg.model).to(device)
        fit = train_mle(r, splits.train, splits.valid, symbols_per_seq=symbols, lr=cfg.r.lr,
                        batch_size=cfg.r.batch_size or min(cfg.dataset_size, 500),
                        max_epochs=cfg.r.max_epochs, patience=cfg.r.patience, clip=cfg.r.clip,
                        prefix="r", logger=logger, accelerator=accelerator, seed=cfg.seed,
                        log_every=cfg.log_every)
        torch.save({"config": r.config(), "state_dict": r.state_dict()}, run_dir / "r.pt")
        res.update(ce_valid_r=fit.best_val_ce, r_epochs=fit.epochs, r_best_epoch=fit.best_epoch)

    with run.stage("eval_r"):
        res["ce_test_r"] = policy_cross_entropy(r, splits.test, symbols)
        stats = sample_statistics(r, process.contains_motif, cfg.eval.samples, cfg.eval.max_len,
                                  cfg.eval.batch_size)
        run.count_samples("eval_r", cfg.eval.samples)
        res.update(motif_freq_r=stats["motif_freq"], avg_len_r=stats["avg_len"],
                   truncated_frac_r=stats["truncated_frac"])
        logger.log("eval", 0, ce_test_r=res["ce_test_r"], motif_freq_r=stats["motif_freq"])
    return res
