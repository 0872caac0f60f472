"""Training-1: fit lambda so that E_{p_lambda}[phi] matches mean_D phi, with r frozen.

The log-likelihood of D under p_lambda = r exp(lambda . phi) / Z has gradient
|D| (mean_D phi - E_{p_lambda} phi) in lambda, so each step moves

    lambda += lr_e (mean_D phi - E_hat_{p_lambda} phi),    lr_e = lr / epoch,

with ceil(|D| / chunk) steps per epoch (the paper's one step per 500-string chunk; the data
moment is always the mean over all of D, paper.md section 5). E_hat comes from samples of r:
  snis_r: E_hat = sum_i w_i phi_i / sum_i w_i, w_i = exp(lambda . phi_i) = P_lambda(x_i) / r(x_i);
          each step adds `samples_per_step` fresh r-samples to a buffer of the last `buffer`,
          re-weighted with the current lambda (valid because r does not change): within the
          epoch (reuse=epoch, the reference) or across epochs too (reuse=run).
  rs:     E_hat = mean phi over the buffer samples accepted with probability
          exp(lambda . phi - log beta), i.e. exact samples of p_lambda.
  snis_mix: SNIS as snis_r, from the defensive mixture q = a r + (1 - a) pi of r and the pi.pt of an
          earlier run (`proposal`, a = `mix_r`; proposals.py): w_i = r(x_i) exp(lambda . phi_i) / q(x_i),
          bounded by exp(lambda . phi) / a. Where r writes the motif once in ~800 draws and pi mostly
          does, the buffer's effective size grows from ~|buffer| / 800 towards (1 - a) |buffer|. The
          held-out set is drawn from the same q; each draw keeps log r - log q, so a new lambda only
          re-weights it.

Selection and stopping use an estimate the steps never saw: `heldout` samples of q (r, or snis_mix's
mixture) drawn once, re-weighted by SNIS at the end of every epoch. Its L1 mismatch |mean_D phi - E_held phi|_1
feeds the plateau rule (patience, best lambda kept). `converged` says whether every feature's
held-out gap is within its noise at CONVERGED_LEVEL (estimators.moments_within_noise: max_k
|z_k| against a threshold that an exact lambda passes 95% of the time, on an effective sample
size of at least MIN_HELDOUT_ESS); with `stop_within_noise` the fit also stops at the first
epoch that passes and is the best so far (so the lambda tested is the lambda kept): what is
left is noise, and more epochs would only fit it. The step
buffer's own estimate, which lambda was fitted to, would flatter the kept lambda; the pipeline
reports a third, independent estimate (the Z stage's fresh draw) beside the held-out one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.estimators import EstimatorError, MomentEstimate, moments_within_noise, rejection_moments, snis_moments
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Tilt
from gam_rl.progress import Progress
from gam_rl.stages.common import Plateau

log = logging.getLogger("gam_rl")

REUSE = ("epoch", "run")
MIN_HELDOUT_ESS = 100.0  # fewer effective held-out samples: their standard errors are not trusted to stop on
# converged within noise: every feature's held-out gap passes moments_within_noise at this level, i.e.
# an exact lambda (whose held-out gaps are pure noise) is called converged 95% of the time
CONVERGED_LEVEL = 0.95
MIX_R_DEFAULT = 0.1  # snis_mix: r's share of the proposal, fixed before any measurement (docs/measurements.md)


def _snis_step(phi: torch.Tensor, log_w_r: torch.Tensor | None, lam: torch.Tensor, features: Features, max_len: int,
               generator):
    return snis_moments(_log_weights(phi, log_w_r, lam), phi)


def _rs_step(phi: torch.Tensor, log_w_r: torch.Tensor | None, lam: torch.Tensor, features: Features, max_len: int,
             generator):
    log_bound = Tilt(features, lam).log_upper_bound(max_len)  # P_lambda / r <= beta
    return rejection_moments(phi @ lam, phi, log_bound, generator)


def _log_weights(phi: torch.Tensor, log_w_r: torch.Tensor | None, lam: torch.Tensor) -> torch.Tensor:
    """log P_lambda(x) / q(x) = lambda . phi(x) + log r(x) / q(x) (that last term absent when q is r)."""
    return phi @ lam if log_w_r is None else (phi @ lam).double() + log_w_r


ESTIMATORS = {"snis_r": _snis_step, "rs": _rs_step, "snis_mix": _snis_step}


@dataclass
class MomentMatchingConfig:
    """`training1` section (paper.md section 5: lr 10, chunks of 500, 1000 fresh samples per
    step, a buffer of 10000 within the epoch, patience 8)."""

    estimator: str = setting("snis_r", choices=ESTIMATORS)
    # snis_mix: the run folder whose pi.pt, mixed with r, is the proposal (of the Z stage's draws too)
    proposal: str | None = setting(None)
    mix_r: float = setting(MIX_R_DEFAULT, gt=0, lt=1)  # snis_mix: r's share a of the mixture q = a r + (1 - a) pi
    lr: float = setting(10.0, gt=0)  # lr_e = lr / epoch
    chunk: int = setting(500, ge=1)  # one lambda step per `chunk` strings of D
    samples_per_step: int = setting(1000, ge=1)  # fresh samples of q (r, or snis_mix's mixture) per step
    buffer: int = setting(10000, ge=1)  # the last samples reused, re-weighted with the current lambda
    reuse: str = setting("epoch", choices=REUSE)  # epoch: buffer emptied each epoch (the paper) | run: kept
    heldout: int = setting(10000, ge=1)  # samples of q drawn once, never stepped on: selection and stopping
    max_epochs: int = setting(100, ge=1)
    patience: int = setting(8, ge=1)  # on the held-out L1 mismatch
    stop_within_noise: bool = False  # also stop at the first best epoch whose held-out gaps are within noise


class SampledMoments:
    """E_hat_{p_lambda}[phi] from samples of a proposal q (the frozen r, or a DefensiveMixture of r):
    the steps' buffer, and the held-out set. Each draw is kept as phi(x) and, when q is not r,
    log r(x) - log q(x): the weight under any lambda without scoring x again."""

    def __init__(self, r: LSTMPolicy, features: Features, cfg: MomentMatchingConfig, max_len: int,
                 generator: torch.Generator, proposal=None):
        self.r, self.features, self.cfg, self.max_len, self.generator = r, features, cfg, max_len, generator
        self.proposal = r if proposal is None else proposal
        self.step_estimate = ESTIMATORS[cfg.estimator]
        self.buffer = torch.empty(0, len(features), device=r.device)
        self.buffer_log_w_r = None if self.proposal is r else torch.empty(0, dtype=torch.float64, device=r.device)
        self.samples = 0
        self.heldout_phi, self.heldout_log_w_r = self._draw(cfg.heldout)

    def _draw(self, num: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        samples = self.proposal.sample(num, self.max_len, self.generator)
        self.samples += num
        log_w_r = None if self.proposal is self.r else samples.log_base - samples.log_prob  # log r - log q
        return self.features(samples.tokens), log_w_r

    def new_epoch(self) -> None:
        if self.cfg.reuse == "epoch":  # the reference keeps samples within an epoch only
            self.buffer = self.buffer[:0]
            if self.buffer_log_w_r is not None:
                self.buffer_log_w_r = self.buffer_log_w_r[:0]

    def step(self, lam: torch.Tensor) -> MomentEstimate | None:
        """Fresh samples into the buffer, then the estimate on the buffer (None: rs accepted nothing)."""
        phi, log_w_r = self._draw(self.cfg.samples_per_step)
        self.buffer = torch.cat([self.buffer, phi])[-self.cfg.buffer:]
        if log_w_r is not None:
            self.buffer_log_w_r = torch.cat([self.buffer_log_w_r, log_w_r])[-self.cfg.buffer:]
        return self.step_estimate(self.buffer, self.buffer_log_w_r, lam, self.features, self.max_len, self.generator)

    def heldout(self, lam: torch.Tensor) -> MomentEstimate:
        return snis_moments(_log_weights(self.heldout_phi, self.heldout_log_w_r, lam), self.heldout_phi)


@dataclass
class MomentMatchingResult:
    lam: list[float]
    moments_data: list[float]
    best_mismatch: float  # held-out L1 mismatch of the kept lambda (the estimate it was selected on)
    best_mismatch_se: float  # its standard error (sqrt of the summed per-feature variances)
    best_max_z: float  # max_k |mean_D phi_k - E_held phi_k| / se_k of the kept lambda
    best_epoch: int  # 1-based
    epochs: int
    converged: bool  # best_max_z <= best_max_z_threshold, on a held-out ESS >= MIN_HELDOUT_ESS
    samples: int
    best_max_z_threshold: float | None = None  # the max |z| an exact lambda stays below w.p. converged_level
    converged_level: float = CONVERGED_LEVEL

    def results(self) -> dict:
        return {"lambda": self.lam, "moments_data": self.moments_data, "t1_best_mismatch": self.best_mismatch,
                "t1_best_mismatch_se": self.best_mismatch_se, "t1_best_max_z": self.best_max_z,
                "t1_best_max_z_threshold": self.best_max_z_threshold, "t1_converged_level": self.converged_level,
                "t1_best_epoch": self.best_epoch, "t1_epochs": self.epochs, "t1_converged": self.converged}


def fit_lambda(moments_data: torch.Tensor, estimator, cfg: MomentMatchingConfig, steps_per_epoch: int, *,
               names: list[str], logger=None) -> MomentMatchingResult:
    """The moment-matching loop over any estimator with new_epoch(), step(lam) and heldout(lam)."""
    lam = torch.zeros(len(moments_data), device=moments_data.device)
    plateau = Plateau(cfg.patience)
    best = None  # (lam, estimate) at the best held-out mismatch
    progress = Progress("training1", cfg.max_epochs * steps_per_epoch, "steps", upper_bound=True)
    for epoch in range(1, cfg.max_epochs + 1):
        estimator.new_epoch()
        lr = cfg.lr / epoch  # lr_e = lr / epoch
        step_ess = math.nan
        for step in range(steps_per_epoch):
            progress.update((epoch - 1) * steps_per_epoch + step)
            moments = estimator.step(lam)
            if moments is None:  # rs accepted nothing in this step: no information, no move
                continue
            lam = lam + lr * (moments_data - moments.moments)  # the log-likelihood gradient / |D|
            step_ess = moments.ess
        held = estimator.heldout(lam)
        diff = moments_data - held.moments
        mismatch, mismatch_se = float(diff.abs().sum()), float(held.se.pow(2).sum().sqrt())
        # the L1 mismatch and its s.e. are reported and drive the plateau; `converged` is the calibrated test
        noise = moments_within_noise(diff, held.se, CONVERGED_LEVEL)
        max_z = noise.max_z
        converged = held.ess >= MIN_HELDOUT_ESS and noise.passed
        action = plateau.update(mismatch, epoch)
        if action == Plateau.BEST:
            best = (lam.clone(), mismatch, mismatch_se, max_z, converged, noise.threshold)
        if logger is not None:
            logger.log("t1", epoch - 1, mismatch=mismatch, mismatch_se=mismatch_se, max_z=max_z,
                       heldout_ess=held.ess, step_ess=step_ess,
                       **{f"lambda_{n}": v for n, v in zip(names, lam.tolist(), strict=True)})
        progress.update(epoch * steps_per_epoch, f"epoch {epoch}: held-out mismatch {mismatch:.4f} +- {mismatch_se:.4f}"
                        f" (ESS {held.ess:.0f}); best {plateau.best:.4f} at epoch {plateau.best_epoch}")
        # the stop within noise only at a new best: the lambda it tested is the lambda returned (selection is on the
        # L1 mismatch, the test on max |z|: an epoch can pass the test without being the best so far)
        if (cfg.stop_within_noise and converged and action == Plateau.BEST) or action == Plateau.STOP:
            break
    progress.close()
    log.info("[training1] stopped after epoch %d of %d: best held-out mismatch %.4f +- %.4f at epoch %d%s", epoch,
             cfg.max_epochs, plateau.best, best[2] if best else math.nan, plateau.best_epoch,
             " (within its noise)" if best and best[4] else "")
    if best is None:
        raise EstimatorError("Training-1: no epoch gave a finite held-out moment mismatch")
    lam_best, mismatch, mismatch_se, max_z, converged, threshold = best
    return MomentMatchingResult(lam_best.tolist(), moments_data.tolist(), mismatch, mismatch_se, max_z,
                                plateau.best_epoch, epoch, converged, getattr(estimator, "samples", 0),
                                best_max_z_threshold=threshold, converged_level=CONVERGED_LEVEL)


def moment_matching(r: LSTMPolicy, features: Features, train_tokens: torch.Tensor, cfg: MomentMatchingConfig, *,
                    max_len: int, seed: int, logger=None, proposal=None) -> MomentMatchingResult:
    """Training-1 on samples of r (or of `proposal`, for snis_mix): lambda for P_lambda = r exp(lambda . phi)."""
    with torch.no_grad():
        moments_data = features(train_tokens).mean(0)  # mean_D phi, the target of every step
        generator = torch.Generator(device=r.device).manual_seed(seed)
        estimator = SampledMoments(r.eval(), features, cfg, max_len, generator, proposal)
        steps = math.ceil(len(train_tokens) / cfg.chunk)
        return fit_lambda(moments_data, estimator, cfg, steps, names=features.names, logger=logger)
