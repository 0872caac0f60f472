"""Z = sum_x P_lambda(x) by importance sampling from r, and what it gives: CE(T, p_lambda) and,
on the same draws, an estimate of the model moments E_{p_lambda}[phi] independent of Training-1."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.estimators import cross_entropy_p_lambda, importance_z, snis_moments
from gam_rl.features import Features
from gam_rl.metrics import batched_log_prob
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Potential
from gam_rl.progress import Progress

log = logging.getLogger("gam_rl")


@dataclass
class ZConfig:
    """`z` section. The reference: about 1M r-samples."""

    samples: int = setting(1_000_000, ge=1)  # with rel_tol: the cap
    batch_size: int = setting(10000, ge=1)
    rel_tol: float | None = setting(None, gt=0)  # stop once the relative s.e. of Z-hat is <= rel_tol (None: all)
    min_samples: int = setting(10000, ge=1)  # with rel_tol: never stop before this many
    tail_hits: float = setting(10.0, gt=0)  # with rel_tol: nor before n Z-hat / beta (expected RS accepts) reaches it


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

    def results(self) -> dict:
        return dict(vars(self))


def estimate_partition(r: LSTMPolicy, target: Potential, features: Features, moments_data: list[float],
                       test: torch.Tensor, valid: torch.Tensor, cfg: ZConfig, *, max_len: int, symbols_per_seq: int,
                       seed: int, logger=None) -> PartitionResult:
    """Z = E_r[P(x)/r(x)] (for P_lambda = r exp(lambda . phi): E_r[exp(lambda . phi(x))])."""
    generator = torch.Generator(device=r.device).manual_seed(seed)
    phis, log_ws = [], []
    progress = Progress("z", cfg.samples, "samples", upper_bound=cfg.rel_tol is not None)

    def observe(samples, log_w):
        phis.append(features(samples.tokens))
        log_ws.append(log_w)
        progress.update(progress.done + len(samples))

    z = importance_z(r, target, cfg.samples, cfg.batch_size, max_len, generator, rel_tol=cfg.rel_tol,
                     min_samples=cfg.min_samples, tail_hits=cfg.tail_hits, observe=observe)
    progress.close()
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
    return PartitionResult(z.z, z.log_z, z.rel_se, z.ess, z.num, ce, ce_se, ce_valid, moments.tolist(), mismatch)
