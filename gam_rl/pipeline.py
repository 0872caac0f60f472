"""One run: data -> r -> (lambda -> pi) -> evaluation, with every artefact written.

Each stage receives what it needs as arguments; the pipeline only composes them and
records timings, sample counts and metrics into `results`.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from gam_rl import cache as training1_cache
from gam_rl.config import resolve_device
from gam_rl.data import Splits, load_splits
from gam_rl.estimators import (
    ExpectedAccepts,
    cross_entropy_p_lambda,
    importance_z,
    rejection_log_bound,
    snis_moments,
)
from gam_rl.features import Features
from gam_rl.metrics import batched_log_prob, eval_mode, policy_cross_entropy, sample_statistics
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import GAMPotential, TrueProcessPotential
from gam_rl.process import MotifProcess
from gam_rl.run_io import RESULT_KEYS, RunLogger
from gam_rl.stages.mle import train_mle
from gam_rl.stages.training1 import fit_lambda
from gam_rl.stages.training2 import DPGOptions, train_distill, train_dpg

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

    process, splits = load_data(cfg, run, device)
    features = Features(cfg.features, cfg.motif, cfg.feature_max_len)
    res["feature_names"] = features.names
    # r, lambda, Z: computed here, or taken from the Training-1 cache (another method of the same cell)
    r, lam = training1_cache.training1_stages(
        cfg, run, logger, run_dir, device,
        compute=lambda stage_logger: stages_before_training2(cfg, run, process, splits, features, stage_logger,
                                                             run_dir, device, accelerator),
        build_r=lambda: LSTMPolicy(**cfg.model).to(device))
    gam = GAMPotential(r, features, lam)
    _injected_failure(run_dir)

    with run.stage("training2"):
        pi = training2(cfg, run, r, gam, process, splits, logger, accelerator)
        torch.save({"config": pi.config(), "state_dict": pi.state_dict()}, run_dir / "pi.pt")
    evaluate_policy(cfg, run, pi, "pi", splits.test, process, logger)
    return res


def load_data(cfg: DictConfig, run: Run, device: torch.device) -> tuple[MotifProcess, Splits]:
    with run.stage("data"):
        process = MotifProcess(cfg.motif, cfg.n)
        splits = load_splits(cfg.motif, cfg.n, cfg.dataset_size, cfg.data.valid_size,
                             dict(cfg.data.pools), cfg.data.cache_dir, device)
        run.results.update(data_dir=str(splits.data_dir), valid_size=len(splits.valid), test_size=len(splits.test),
                           entropy_true=process.entropy_per_symbol, num_motif_strings=process.num_strings)
        log.info("H(p_true) = %.4f nats/symbol (%d strings of length %d contain %s)",
                 process.entropy_per_symbol, process.num_strings, cfg.n, cfg.motif)
    return process, splits


def stages_before_training2(cfg: DictConfig, run: Run, process: MotifProcess, splits: Splits, features: Features,
                            logger, run_dir: Path, device: torch.device,
                            accelerator: str) -> tuple[LSTMPolicy, torch.Tensor]:
    """r = MLE(D), its test CE and sample statistics, lambda (Training-1), Z and CE(T, p_lambda).

    Everything here is determined by the keys of gam_rl.cache.key_config (never by the method),
    which is what lets the Training-1 cache hand the same (r, lambda) to every method of a cell.
    Writes run_dir/r.pt; returns (r, lambda).
    """
    res, symbols = run.results, cfg.n + 1  # every CE is in nats per symbol over n bits + EOS
    with run.stage("r"):
        r = LSTMPolicy(**cfg.model).to(device)
        fit = train_mle(r, splits.train, splits.valid, symbols_per_seq=symbols, lr=cfg.r.lr,
                        batch_size=r_batch_size(cfg),
                        max_epochs=cfg.r.max_epochs, patience=cfg.r.patience, clip=cfg.r.clip,
                        prefix="r", logger=logger, accelerator=accelerator, seed=cfg.seed,
                        log_every=cfg.log_every, lr_decays=cfg.r.lr_decays, lr_decay_factor=cfg.r.lr_decay_factor)
        torch.save({"config": r.config(), "state_dict": r.state_dict()}, run_dir / "r.pt")
        res.update(ce_valid_r=fit.best_val_ce, r_epochs=fit.epochs, r_best_epoch=fit.best_epoch,
                   r_lr_decay_epochs=fit.decay_epochs)

    evaluate_policy(cfg, run, r, "r", splits.test, process, logger)
    gam = training1(cfg, run, r, features, splits, logger, accelerator)
    with run.stage("z"):
        estimate_z_and_ce(cfg, run, r, gam, splits.test, splits.valid, logger)
    return r, gam.lam


def _injected_failure(run_dir: Path) -> None:
    """Test hook: fail a run on purpose between Training-1 and Training-2 when its folder name
    matches one of the comma-separated glob patterns in $GAM_RL_TEST_FAIL_RUNS (how the sweep
    tests make exactly one job of a sweep fail after validation, with the others untouched)."""
    patterns = [p for p in os.environ.get("GAM_RL_TEST_FAIL_RUNS", "").split(",") if p]
    if any(fnmatch.fnmatch(run_dir.name, p) for p in patterns):
        raise RuntimeError(f"failure injected before Training-2 (GAM_RL_TEST_FAIL_RUNS matches {run_dir.name})")


def evaluate_policy(cfg: DictConfig, run: Run, policy: LSTMPolicy, name: str, test: torch.Tensor,
                    process: MotifProcess, logger: RunLogger) -> None:
    """CE(T, policy), and motif frequency / average length over eval.samples of its samples."""
    with run.stage(f"eval_{name}"):
        ce = policy_cross_entropy(policy, test, cfg.n + 1)
        stats = sample_statistics(policy, process.contains_motif, cfg.eval.samples, cfg.eval.max_len,
                                  cfg.eval.batch_size)
        run.count_samples(f"eval_{name}", cfg.eval.samples)
        run.results.update({f"ce_test_{name}": ce, f"motif_freq_{name}": stats["motif_freq"],
                            f"avg_len_{name}": stats["avg_len"], f"truncated_frac_{name}": stats["truncated_frac"]})
        logger.log("eval", 0, **{f"ce_test_{name}": ce, f"motif_freq_{name}": stats["motif_freq"]})


def r_batch_size(cfg: DictConfig) -> int:
    """r's MLE batch: r.batch_size, or the paper's min(|D|, 500); then at most
    ceil(|D| / r.min_batches), so that a small D still gets several updates per epoch."""
    batch = cfg.r.batch_size or min(cfg.dataset_size, 500)
    return max(1, min(batch, math.ceil(cfg.dataset_size / cfg.r.min_batches)))


def sampling_max_len(cfg: DictConfig, value) -> int:
    """null -> 2n + 1 symbols, the reference's limit for SNIS, RS and Z."""
    return int(value) if value else 2 * cfg.n + 1


def training1(cfg: DictConfig, run: Run, r: LSTMPolicy, features: Features, splits: Splits,
              logger: RunLogger, accelerator: str) -> GAMPotential:
    """lambda by moment matching; returns P_lambda = r * exp(lambda . phi)."""
    t1 = cfg.training1
    with run.stage("training1"):
        fit = fit_lambda(r, features, splits.train, estimator=t1.estimator, lr=t1.lr, chunk=t1.chunk,
                         samples_per_step=t1.samples_per_step, buffer=t1.buffer,
                         max_len=sampling_max_len(cfg, t1.max_len), max_epochs=t1.max_epochs,
                         patience=t1.patience, seed=cfg.seed + 1, reuse=t1.reuse, logger=logger,
                         accelerator=accelerator, log_every=cfg.log_every)
    run.count_samples("training1", fit.samples)
    run.results.update(**{"lambda": fit.lam.tolist(), "moments_data": fit.moments_data.tolist(),
                          "t1_best_mismatch": fit.best_mismatch, "t1_epochs": fit.epochs})
    log.info("lambda = %s", dict(zip(features.names, [round(v, 3) for v in fit.lam.tolist()], strict=True)))
    return GAMPotential(r, features, fit.lam)


def estimate_z_and_ce(cfg: DictConfig, run: Run, r: LSTMPolicy, gam: GAMPotential, test: torch.Tensor,
                      valid: torch.Tensor, logger: RunLogger) -> None:
    """Z = E_r[exp(lambda . phi)] by importance sampling from r; the same samples give the
    SNIS model moments E_{p_lambda}[phi] reported after Training-1."""
    zc = cfg.z
    max_len = sampling_max_len(cfg, zc.max_len)
    generator = torch.Generator(device=r.device).manual_seed(cfg.seed + 2)
    phis, log_ws = [], []
    # the tolerance stop also waits for the heavy weights (estimators.ExpectedAccepts): before r has
    # written the rare strings that carry p_lambda's mass (the motif, at small |D|), Z-hat is far
    # too low while rel_se looks small
    accepts = ExpectedAccepts(rejection_log_bound(gam.lam), zc.tail_hits)

    def draw(k):
        samples = r.sample(k, max_len, generator)
        phis.append(gam.features(samples.tokens))
        log_ws.append(phis[-1] @ gam.lam)  # P_lambda(x) / r(x) = exp(lambda . phi(x))
        accepts.add(log_ws[-1])
        return samples, log_ws[-1]

    z = importance_z(draw, zc.samples, zc.batch_size, rel_tol=zc.rel_tol, min_samples=zc.min_samples,
                     tail_seen=accepts)
    run.count_samples("z", z.num)
    moments_model = snis_moments(torch.cat(log_ws), torch.cat(phis)).moments
    with eval_mode(r):
        log_p_test = batched_log_prob(gam.log_potential, test.to(r.device))
        log_p_valid = batched_log_prob(gam.log_potential, valid.to(r.device))
    ce, ce_se = cross_entropy_p_lambda(log_p_test, z, cfg.n + 1)
    ce_valid, _ = cross_entropy_p_lambda(log_p_valid, z, cfg.n + 1)  # the DPG runs' target line
    res = run.results
    res.update(z_hat=z.z, z_samples=z.num, log_z_hat=z.log_z, z_rel_se=z.rel_se, z_ess=z.ess, ce_test_p_lambda=ce,
               ce_test_p_lambda_se=ce_se, ce_valid_p_lambda=ce_valid, moments_model=moments_model.tolist())
    res["moment_mismatch_l1"] = float(sum(abs(a - b) for a, b in zip(res["moments_data"], res["moments_model"],
                                                                      strict=True)))
    logger.log("z", 0, log_z=z.log_z, rel_se=z.rel_se, ess=z.ess, ce_test_p_lambda=ce)
    log.info("Z-hat = %.4g (rel. s.e. %.3g, ESS %.0f of %d); CE(T, p_lambda) = %.4f +- %.4f", z.z, z.rel_se,
             z.ess, z.num, ce, ce_se)


def training2(cfg: DictConfig, run: Run, r: LSTMPolicy, gam: GAMPotential, process: MotifProcess,
              splits: Splits, logger: RunLogger, accelerator: str) -> LSTMPolicy:
    method, symbols, res = cfg.method, cfg.n + 1, run.results
    res["target"] = method.target
    init = cfg.distill.init if method.algorithm == "distill" else cfg.dpg.init
    pi = copy.deepcopy(r) if init == "r" else LSTMPolicy(**cfg.model).to(r.device)  # fresh: the paper
    pi.train()
    if method.algorithm == "distill":
        d = cfg.distill
        fit = train_distill(pi, gam, splits.train, splits.valid, size=d.size, valid_size=d.valid_size,
                            max_len=sampling_max_len(cfg, d.max_len), proposal_batch=d.proposal_batch,
                            max_proposals=int(d.max_proposals), lr=d.lr, batch_size=d.batch_size,
                            max_epochs=d.max_epochs, patience=d.patience, clip=d.clip, symbols_per_seq=symbols,
                            seed=cfg.seed + 3, logger=logger, accelerator=accelerator, log_every=cfg.log_every,
                            lr_decays=d.lr_decays, lr_decay_factor=d.lr_decay_factor)
        run.count_samples("training2", fit.proposals)
        res.update(ce_valid_pi=fit.best_val_ce, t2_epochs=fit.epochs, t2_best_epoch=fit.best_epoch,
                   distill_acceptance_rate=fit.acceptance_rate, distill_proposals=fit.proposals,
                   t2_lr_decay_epochs=fit.decay_epochs)
        return pi
    potential = TrueProcessPotential(process) if method.target == "true" else gam
    options = dpg_options(cfg)
    fit = train_dpg(pi, r, potential, splits.valid, options, symbols_per_seq=symbols,
                    ce_valid_proposal=res["ce_valid_r"], seed=cfg.seed + 3,  # r's best CE(V), from its training
                    target_ce_valid=target_ce_valid(cfg, res), logger=logger, accelerator=accelerator,
                    log_every=cfg.log_every)
    run.count_samples("training2", fit.samples)
    res.update(ce_valid_pi=fit.best_val_ce, t2_epochs=fit.epochs, t2_best_epoch=fit.best_epoch,
               t2_updates=fit.updates, swaps=fit.swaps, swap_count=len(fit.swaps), dpg_log_z_running=fit.log_z_running,
               dpg_target_ce_valid=target_ce_valid(cfg, res), dpg_reached_target=fit.reached_target)
    return pi


def target_ce_valid(cfg: DictConfig, res: dict) -> float | None:
    """(1 + dpg.target_margin) CE(V, p_lambda): the line whose first crossing by CE(V, pi)
    DPG records (samples, seconds), to compare schedules on the same P_lambda."""
    ce = res.get("ce_valid_p_lambda")
    return None if ce is None or cfg.method.target != "gam" else (1.0 + cfg.dpg.target_margin) * ce


def dpg_options(cfg: DictConfig) -> DPGOptions:
    """The DPG schedule of cfg.dpg for cfg.method's algorithm."""
    d = cfg.dpg
    return DPGOptions(algorithm=cfg.method.algorithm, lr=d.lr, minibatch=d.minibatch,
                      updates_per_epoch=d.updates_per_epoch, max_epochs=d.max_epochs, patience=d.patience,
                      clip=d.clip, max_len=d.max_len, proposal_batch=d.proposal_batch, keep_per_draw=d.keep_per_draw,
                      replay=d.replay, steps_per_draw=d.steps_per_draw, normalise=d.normalise,
                      baseline=bool(d.baseline), swap_gate=d.swap_gate)
