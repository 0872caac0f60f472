"""Training-2 by distillation: exact samples of p = P / Z by rejection sampling from the proposal
r, plus D, into pi by maximum likelihood (validated on more exact samples plus V).

Rejection sampling accepts x ~ r with probability P(x) / (beta r(x)); for P_lambda that is
exp(lambda . phi(x) - log beta), beta bounding exp(lambda . phi) over r's outputs. Each exact
sample costs 1 / acceptance rate proposals (about 1e3 at |D| = 500, where r rarely writes the
motif and p_lambda almost always does).

sampler=qrs replaces it by quasi-rejection sampling (Eikema et al. 2022): accept with probability
min(1, P(x) / (beta r(x))) for a beta chosen on a pilot batch of r (method.beta, target_acceptance
or max_tv), trading a known, estimated distance between p_beta and p (TV, KL) for fewer proposals.
The pilot's own estimates at the beta it chose are not a measurement (under max_tv its TV is
max_tv by construction); after the samples are drawn, a second, independent batch of r
(method.diagnostic_draws) estimates a(beta), TV and KL at that beta, with standard errors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.estimators import (
    QRSDiagnostics,
    QRSEstimate,
    choose_log_beta,
    qrs_estimate,
    quasi_rejection_sample,
    rejection_sample,
)
from gam_rl.exact import qrs_divergences
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.loop import MethodConfig
from gam_rl.methods.registry import Method, register
from gam_rl.metrics import policy_cross_entropy
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Potential
from gam_rl.stages.mle import MLEConfig, train_mle
from gam_rl.tokens import pad_cat

log = logging.getLogger("gam_rl")

SAMPLERS = ("rs", "qrs")  # rs: exact rejection sampling (the paper) | qrs: quasi-rejection at a chosen beta
BETA_KEYS = ("beta", "target_acceptance", "max_tv")  # how sampler=qrs chooses beta: exactly one of them


@dataclass
class DistillConfig(MethodConfig):
    """`method` section of distillation (conf/method/distill.yaml, distill_qrs). The paper: 20000 exact
    samples plus D for training, 2000 plus V for validation, a fresh LSTM by MLE (init=r: from r)."""

    algorithm: str = setting("distill", choices=("distill",))
    size: int = setting(20000, ge=1)  # exact samples for training (plus D)
    valid_size: int = setting(2000, ge=1)  # exact samples for validation (plus V)
    proposal_batch: int = setting(10000, ge=1)  # r-samples per rejection round
    max_proposals: float = setting(2.0e9, gt=0)  # give up (with an error) past this many proposals
    mle: MLEConfig = setting(factory=MLEConfig)
    sampler: str = setting("rs", choices=SAMPLERS)
    beta: float | None = setting(None, gt=0)  # qrs: this beta
    target_acceptance: float | None = setting(None, gt=0, le=1)  # qrs: the beta of this estimated acceptance
    max_tv: float | None = setting(None, gt=0, lt=1)  # qrs: the smallest beta of estimated TV(p, p_beta) <= this
    pilot: int = setting(100000, ge=1)  # qrs: r-samples that choose beta (counted in proposals)
    # qrs: fresh r-samples, drawn after the samples, that estimate a(beta), TV and KL at the chosen beta
    # (counted in proposals); None: as many as the pilot, 0: none (then only the pilot's biased numbers)
    diagnostic_draws: int | None = setting(None, ge=0)

    def diagnostic_count(self) -> int:
        return self.pilot if self.diagnostic_draws is None else self.diagnostic_draws

    def problems(self) -> list[str]:
        """Values that are fine alone but not together."""
        given = [f"method.{k}={getattr(self, k)}" for k in BETA_KEYS if getattr(self, k) is not None]
        out = super().problems()
        if self.sampler == "qrs" and len(given) != 1:
            out.append(f"method.sampler='qrs' with {', '.join(given) if given else 'no beta setting'}: quasi-rejection "
                       "needs exactly one of method.beta, method.target_acceptance, method.max_tv (set the others "
                       "to null)")
        if self.sampler == "rs" and given:
            out.append(f"method.sampler='rs' with {', '.join(given)}: rejection sampling uses the exact bound on P/r "
                       "as beta; set method.sampler=qrs to choose beta, or set these to null")
        if self.sampler == "qrs" and self.pilot + self.diagnostic_count() >= self.max_proposals:
            out.append(f"method.pilot={self.pilot} with {self.diagnostic_count()} diagnostic draws "
                       f"(method.diagnostic_draws={self.diagnostic_draws}): both batches count in "
                       f"method.max_proposals ({self.max_proposals:g}) and leave none for sampling; lower "
                       "method.pilot or method.diagnostic_draws, or raise method.max_proposals")
        return out


@dataclass
class DistillResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    proposals: int  # including the qrs pilot and diagnostic draws
    acceptance_rate: float  # of the sampling alone
    decay_epochs: list[int]
    sampler: str = "rs"
    log_beta: float | None = None  # rs: the bound on log P/r; qrs: the chosen log beta
    pilot: QRSDiagnostics | None = None  # qrs: the pilot's estimates at the beta it chose (not a measurement)
    fresh: QRSEstimate | None = None  # qrs: the diagnostic draws' estimates at that beta, with s.e.

    def results(self) -> dict:
        # best_val_ce: distillation's own validation (its samples plus V), not CE(V, pi) on V alone
        fresh, pilot = self.fresh, self.pilot
        return {"distill_ce_valid_mixed": self.best_val_ce, "t2_epochs": self.epochs,
                "t2_best_epoch": self.best_epoch + 1,  # epochs count from 1 (0: the start, kept)
                "distill_acceptance_rate": self.acceptance_rate, "distill_proposals": self.proposals,
                "t2_lr_decay_epochs": [e + 1 for e in self.decay_epochs], "distill_sampler": self.sampler,
                "distill_log_beta": self.log_beta,
                # the diagnostic draws' estimates at the chosen beta (null under rs, or without diagnostic draws)
                **{f"distill_qrs_{key}": None if fresh is None else getattr(fresh, attr) for key, attr in (
                    ("tv", "tv"), ("tv_se", "tv_se"), ("kl", "kl"), ("kl_se", "kl_se"),
                    ("acceptance_est", "acceptance"), ("acceptance_est_se", "acceptance_se"))},
                "distill_qrs_diagnostic_draws": None if fresh is None else fresh.draws,
                # the pilot's own estimates at the beta it chose: biased (TV <= max_tv by construction)
                **{f"distill_qrs_{key}_pilot": None if pilot is None else getattr(pilot, attr) for key, attr in (
                    ("tv", "tv"), ("kl", "kl"), ("acceptance_est", "acceptance"))}}


def pilot_log_weights(proposal, target, num: int, max_len: int, batch_size: int,
                      generator: torch.Generator | None) -> torch.Tensor:
    """log P(x) - log q(x) of `num` fresh draws of the proposal, in chunks of `batch_size`."""
    out, drawn = [], 0
    while drawn < num:
        samples = proposal.sample(min(batch_size, num - drawn), max_len, generator)
        out.append(target.log_weight(proposal, samples).double())
        drawn += len(samples)
    return torch.cat(out)


def distill(pi: LSTMPolicy, proposal: LSTMPolicy, target: Potential, train_extra: torch.Tensor,
            valid_extra: torch.Tensor, cfg: DistillConfig, *, max_len: int, symbols_per_seq: int, seed: int = 0,
            logger=None, accelerator: str = "cpu") -> DistillResult:
    """Fit `pi` in place on size + valid_size draws of P / Z (of p_beta under qrs) and the extra data.

    qrs, from one generator: the pilot, then the samples, then the diagnostic draws, so that the
    diagnostics change neither beta nor the samples (nor the proposals they cost)."""
    generator = torch.Generator(device=proposal.device).manual_seed(seed)
    num = cfg.size + cfg.valid_size
    if cfg.sampler == "qrs":
        pilot = pilot_log_weights(proposal, target, cfg.pilot, max_len, cfg.proposal_batch, generator)
        chosen = choose_log_beta(pilot, **{k: getattr(cfg, k) for k in BETA_KEYS if getattr(cfg, k) is not None})
        bound = target.log_weight_bound(proposal, max_len)
        log.info("[distill] QRS log beta %.4g (%s; exact rejection bound %s): estimated acceptance %.3e, "
                 "TV(p, p_beta) %.3e, KL(p || p_beta) %.3e on a pilot of %d", chosen.log_beta,
                 ", ".join(f"{k}={getattr(cfg, k)}" for k in BETA_KEYS if getattr(cfg, k) is not None),
                 "none" if bound is None else f"{bound:.4g}", chosen.acceptance, chosen.tv, chosen.kl, cfg.pilot)
        fresh_count = cfg.diagnostic_count()
        draws = quasi_rejection_sample(proposal, target, num, max_len, cfg.proposal_batch,
                                       int(cfg.max_proposals) - cfg.pilot - fresh_count, chosen.log_beta, generator,
                                       progress="distill-qrs")
        fresh = None
        if fresh_count:
            fresh = qrs_estimate(pilot_log_weights(proposal, target, fresh_count, max_len, cfg.proposal_batch,
                                                   generator), chosen.log_beta)
            log.info("[distill] QRS at log beta %.4g on %d fresh draws of r: acceptance %.3e +- %.1e, "
                     "TV(p, p_beta) %.3e +- %.1e, KL(p || p_beta) %.3e +- %.1e", fresh.log_beta, fresh.draws,
                     fresh.acceptance, fresh.acceptance_se, fresh.tv, fresh.tv_se, fresh.kl, fresh.kl_se)
        qrs = dict(log_beta=chosen.log_beta, pilot=chosen, fresh=fresh)
        proposals = cfg.pilot + draws.proposals + fresh_count
    else:
        draws = rejection_sample(proposal, target, num, max_len, cfg.proposal_batch, int(cfg.max_proposals),
                                 generator, progress="distill-rs")
        qrs = dict(log_beta=target.log_weight_bound(proposal, max_len))
        proposals = draws.proposals
    log.info("[distill] %s acceptance rate %.3e (%d proposals for %d samples)", cfg.sampler, draws.acceptance_rate,
             proposals, len(draws.tokens))
    train = pad_cat([draws.tokens[: cfg.size], train_extra])
    valid = pad_cat([draws.tokens[cfg.size :], valid_extra])
    fit = train_mle(pi, train, valid, cfg.mle, symbols_per_seq=symbols_per_seq, prefix="distill", logger=logger,
                    accelerator=accelerator, seed=seed + 1)
    return DistillResult(fit.best_val_ce, fit.epochs, fit.best_epoch, proposals, draws.acceptance_rate,
                         fit.decay_epochs, cfg.sampler, **qrs)


def qrs_exact(target, log_r: torch.Tensor, log_beta: float, fresh: QRSEstimate | None) -> dict:
    """results.json `exact` for sampler=qrs: qrs_acceptance, qrs_tv, qrs_kl, the exact a(beta),
    TV(p, p_beta) and KL(p || p_beta) of the sampler's p_beta at the chosen beta (exact.qrs_divergences;
    estimated as distill_qrs_acceptance_est, distill_qrs_tv, distill_qrs_kl), and the error of each
    estimate from the diagnostic draws in its own standard errors (qrs_*_error_se, as z_hat_error_se)."""
    out = qrs_divergences(target, log_r, log_beta)
    if fresh is not None:
        for name, attr in (("acceptance", "acceptance"), ("tv", "tv"), ("kl", "kl")):
            se = getattr(fresh, f"{attr}_se")
            if se > 0:
                out[f"qrs_{name}_error_se"] = (getattr(fresh, attr) - out[f"qrs_{name}"]) / se
    return out


def train_distill(cfg: DistillConfig, inputs: Training2Inputs) -> Training2Result:
    """Distillation under the common contract: its Training-2 has no checks, so the target line is
    judged once, on V alone, at the end (draws: every proposal of its sampler, the qrs pilot and
    diagnostic draws included)."""
    started = time.perf_counter()
    fit = distill(inputs.pi, inputs.r, inputs.p_lambda, inputs.train, inputs.valid, cfg, max_len=inputs.max_len,
                  symbols_per_seq=inputs.symbols, seed=inputs.seed, logger=inputs.logger,
                  accelerator=inputs.accelerator)
    seconds = round(time.perf_counter() - started, 3)
    ce_valid = policy_cross_entropy(inputs.pi, inputs.valid, inputs.symbols)
    line = inputs.target_ce_valid(cfg.target_margin)
    reached = ({"samples": fit.proposals, "seconds": seconds, "ce_valid_pi": ce_valid}
               if line is not None and ce_valid <= line else None)
    exact_extras = None
    if fit.sampler == "qrs":  # the exact divergences of the sampler's p_beta, beside its estimates
        r, log_beta, fresh = inputs.r, fit.log_beta, fit.fresh

        def exact_extras(target) -> dict:
            return qrs_exact(target, target.space.log_prob(r), log_beta, fresh)
    return Training2Result(pi=inputs.pi, draws=fit.proposals, seconds=seconds, ce_valid_pi=ce_valid,
                           target_ce_valid=line, reached_target=reached,
                           curve=[{"draws": fit.proposals, "ce_valid_pi": ce_valid}],
                           results=fit.results(), exact_extras=exact_extras)


register(Method("distill", DistillConfig, train_distill,
                "distillation: exact (rs) or quasi-rejection (qrs) samples of p_lambda into pi by MLE"))
