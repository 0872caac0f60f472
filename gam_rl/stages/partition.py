"""Z = sum_x P_lambda(x) by importance sampling from r (or from Training-1's defensive mixture of r and a
policy, with training1.estimator=snis_mix; or by SMC runs from r), and what it gives:
CE(T, p_lambda) and, on the same draws, an estimate of the model moments E_{p_lambda}[phi]
independent of Training-1; optionally bounds on log Z (gam_rl/smc.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.estimators import (
    ZEstimate,
    cross_entropy_p_lambda,
    effective_sample_size,
    importance_z,
    rejection_sample,
    snis_moments,
)
from gam_rl.features import Features
from gam_rl.metrics import batched_log_prob
from gam_rl.policy import LSTMPolicy, Samples
from gam_rl.potentials import Potential
from gam_rl.progress import Progress
from gam_rl.smc import log_z_bounds, pooled_log_z, smc_runs
from gam_rl.tokens import EOS

log = logging.getLogger("gam_rl")


@dataclass
class ZConfig:
    """`z` section. The reference: about 1M r-samples."""

    samples: int = setting(1_000_000, ge=1)  # with rel_tol: the cap
    batch_size: int = setting(10000, ge=1)
    rel_tol: float | None = setting(None, gt=0)  # stop once the relative s.e. of Z-hat is <= rel_tol (None: all)
    min_samples: int = setting(10000, ge=1)  # with rel_tol: never stop before this many
    tail_hits: float = setting(10.0, gt=0)  # with rel_tol: nor before n Z-hat / beta (expected RS accepts) reaches it
    # is: importance sampling from r (from Training-1's mixture under snis_mix) | smc: runs of `particles` SMC
    # particles from r, as many sequences in all;
    # Z-hat the mean of the runs' Z-hats (rel_tol and min_samples apply; tail_hits is IS's)
    estimator: str = setting("is", choices=("is", "smc"))
    particles: int = setting(1000, ge=2)  # smc: particles per run
    ess_threshold: float = setting(0.5, ge=0, le=1)  # smc: resample when ESS < ess_threshold x particles
    bounds: bool = False  # also bound log Z: SMC (lower) and conditional SMC on exact samples of p_lambda (upper)
    bound_runs: int = setting(20, ge=2)  # bounds: runs each way, of `particles` particles


@dataclass
class PartitionResult:
    z_hat: float
    log_z_hat: float
    z_rel_se: float
    z_ess: float
    z_samples: int
    ce_test_p_lambda: float
    ce_test_p_lambda_se: float
    ce_valid_p_lambda: float
    moments_model: list[float]
    moment_mismatch_l1: float  # |mean_D phi - E_hat phi|_1 on these fresh draws: independent of Training-1
    z_estimator: str = "is"
    # z.bounds: E[log Z-hat] <= log Z <= E_CSMC[log Z-hat], each the mean over bound_runs runs, with its s.e.
    log_z_lower: float | None = None
    log_z_lower_se: float | None = None
    log_z_upper: float | None = None
    log_z_upper_se: float | None = None

    def results(self) -> dict:
        return dict(vars(self))


def estimate_partition(r: LSTMPolicy, target: Potential, features: Features, moments_data: list[float],
                       test: torch.Tensor, valid: torch.Tensor, cfg: ZConfig, *, max_len: int, symbols_per_seq: int,
                       seed: int, logger=None, proposal=None) -> PartitionResult:
    """Z = E_r[P(x)/r(x)] (for P_lambda = r exp(lambda . phi): E_r[exp(lambda . phi(x))]), or E_q[P(x)/q(x)]
    for another `proposal` q (Training-1's defensive mixture, proposals.py; estimator `is` only)."""
    if proposal is not None and cfg.estimator != "is":
        raise ValueError("a proposal other than r needs z.estimator=is")
    generator = torch.Generator(device=r.device).manual_seed(seed)
    phis, log_ws = [], []
    progress = Progress("z", cfg.samples, "samples", upper_bound=cfg.rel_tol is not None)

    def observe(samples, log_w):
        phis.append(features(samples.tokens))
        log_ws.append(log_w)
        progress.update(progress.done + len(samples))

    if cfg.estimator == "smc":
        z = smc_z(r, target, cfg, max_len, generator, observe)
    else:
        q = r if proposal is None else proposal
        z = importance_z(q, target, cfg.samples, cfg.batch_size, max_len, generator, rel_tol=cfg.rel_tol,
                         min_samples=cfg.min_samples, tail_hits=cfg.tail_hits, observe=observe)
    progress.close()
    bounds = {}
    if cfg.bounds:  # exact samples of p_lambda by rejection from r seed the upper bound's conditional SMC
        exact = rejection_sample(r, target, cfg.bound_runs, max_len, cfg.batch_size, 10**9, generator,
                                 progress="z bounds: exact samples").tokens
        found = log_z_bounds(target, r, r, cfg.particles, max_len, cfg.bound_runs, exact_samples=exact,
                             ess_threshold=cfg.ess_threshold, generator=generator)
        bounds = {"log_z_lower": found.lower, "log_z_lower_se": found.lower_se, "log_z_upper": found.upper,
                  "log_z_upper_se": found.upper_se}
        log.info("log Z in [%.4f +- %.4f, %.4f +- %.4f] (%d SMC and conditional SMC runs of %d particles)",
                 found.lower, found.lower_se, found.upper, found.upper_se, cfg.bound_runs, cfg.particles)
    moments = snis_moments(torch.cat(log_ws), torch.cat(phis)).moments
    log_p_test = batched_log_prob(target.log_potential, test.to(r.device))
    log_p_valid = batched_log_prob(target.log_potential, valid.to(r.device))
    ce, ce_se = cross_entropy_p_lambda(log_p_test, z, symbols_per_seq)
    ce_valid, _ = cross_entropy_p_lambda(log_p_valid, z, symbols_per_seq)  # the DPG runs' target line
    mismatch = float((torch.tensor(moments_data) - moments.cpu()).abs().sum())
    if logger is not None:
        logger.log("z", 0, log_z=z.log_z, rel_se=z.rel_se, ess=z.ess, ce_test_p_lambda=ce, moment_mismatch=mismatch)
    log.info("Z-hat = %.4g (rel. s.e. %.3g, ESS %.0f of %d); CE(T, p_lambda) = %.4f +- %.4f; "
             "moment mismatch on these draws %.4f", z.z, z.rel_se, z.ess, z.num, ce, ce_se, mismatch)
    return PartitionResult(z.z, z.log_z, z.rel_se, z.ess, z.num, ce, ce_se, ce_valid, moments.tolist(), mismatch,
                           cfg.estimator, **bounds)


def smc_z(r: LSTMPolicy, target: Potential, cfg: ZConfig, max_len: int, generator: torch.Generator,
          observe) -> ZEstimate:
    """Z-hat as the mean of independent SMC runs' unbiased Z-hats (untwisted, from r), with the relative
    s.e. of that mean from their spread; observe(particles, log W) sees every batch of runs (their
    weighted particles target p_lambda like importance-weighted draws)."""
    runs_per_batch = max(1, cfg.batch_size // cfg.particles)
    log_zs, drawn = [], 0
    while drawn < cfg.samples:
        count = min(runs_per_batch, math.ceil((cfg.samples - drawn) / cfg.particles))
        result = smc_runs(target, r, r, cfg.particles, max_len, count, ess_threshold=cfg.ess_threshold,
                          generator=generator)
        tokens = result.tokens.reshape(-1, result.tokens.shape[-1])
        observe(Samples(tokens, result.log_q.reshape(-1), tokens.eq(EOS).any(1)), result.log_weights.reshape(-1))
        log_zs.append(result.log_z)
        drawn += count * cfg.particles
        estimate = _pooled(torch.cat(log_zs), drawn)
        if cfg.rel_tol is not None and drawn >= cfg.min_samples and estimate.rel_se <= cfg.rel_tol:
            break
    return estimate


def _pooled(log_z_runs: torch.Tensor, drawn: int) -> ZEstimate:
    """Z-hat = mean of the runs' Z-hats with its relative s.e. (smc.pooled_log_z); ESS: of the runs' Z-hats as
    weights, times the particles behind each."""
    log_z, rel_se = pooled_log_z(log_z_runs)
    return ZEstimate(log_z, math.exp(log_z), rel_se, effective_sample_size(log_z_runs) * drawn / len(log_z_runs),
                     drawn)
