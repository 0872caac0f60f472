"""Training-2 by distillation: exact samples of p = P / Z by rejection sampling from the proposal
r, plus D, into pi by maximum likelihood (validated on more exact samples plus V).

Rejection sampling accepts x ~ r with probability P(x) / (beta r(x)); for P_lambda that is
exp(lambda . phi(x) - log beta), beta bounding exp(lambda . phi) over r's outputs. Each exact
sample costs 1 / acceptance rate proposals (about 1e3 at |D| = 500, where r rarely writes the
motif and p_lambda almost always does).

sampler=qrs replaces it by quasi-rejection sampling (Eikema et al. 2022): accept with probability
min(1, P(x) / (beta r(x))) for a beta chosen on a pilot batch of r (method.beta, target_acceptance
or max_tv), trading a known, estimated distance between p_beta and p (TV, KL) for fewer proposals."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.estimators import choose_log_beta, quasi_rejection_sample, rejection_sample
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
    pilot: int = setting(100000, ge=1)  # qrs: r-samples that choose beta and estimate TV, KL (counted in proposals)

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
        if self.sampler == "qrs" and self.pilot >= self.max_proposals:
            out.append(f"method.pilot={self.pilot}: the pilot batch counts in method.max_proposals "
                       f"({self.max_proposals:g}) and leaves none for sampling; lower method.pilot or raise "
                       "method.max_proposals")
        return out


@dataclass
class DistillResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    proposals: int  # including the qrs pilot
    acceptance_rate: float
    decay_epochs: list[int]
    sampler: str = "rs"
    log_beta: float | None = None  # rs: the bound on log P/r; qrs: the chosen log beta
    qrs_tv: float | None = None  # qrs: the pilot's estimates at that beta
    qrs_kl: float | None = None
    qrs_acceptance_est: float | None = None

    def results(self) -> dict:
        # best_val_ce: distillation's own validation (its samples plus V), not CE(V, pi) on V alone
        return {"distill_ce_valid_mixed": self.best_val_ce, "t2_epochs": self.epochs, "t2_best_epoch": self.best_epoch,
                "distill_acceptance_rate": self.acceptance_rate, "distill_proposals": self.proposals,
                "t2_lr_decay_epochs": self.decay_epochs, "distill_sampler": self.sampler,
                "distill_log_beta": self.log_beta, "distill_qrs_tv": self.qrs_tv, "distill_qrs_kl": self.qrs_kl,
                "distill_qrs_acceptance_est": self.qrs_acceptance_est}


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
    """Fit `pi` in place on size + valid_size draws of P / Z (of p_beta under qrs) and the extra data."""
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
        draws = quasi_rejection_sample(proposal, target, num, max_len, cfg.proposal_batch,
                                       int(cfg.max_proposals) - cfg.pilot, chosen.log_beta, generator,
                                       progress="distill-qrs")
        qrs = dict(log_beta=chosen.log_beta, qrs_tv=chosen.tv, qrs_kl=chosen.kl, qrs_acceptance_est=chosen.acceptance)
        proposals = cfg.pilot + draws.proposals
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


def train_distill(cfg: DistillConfig, inputs: Training2Inputs) -> Training2Result:
    """Distillation under the common contract: its Training-2 has no checks, so the target line is
    judged once, on V alone, at the end (draws: every proposal of its sampler, the pilot included)."""
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
        r, log_beta = inputs.r, fit.log_beta
        exact_extras = lambda target: qrs_divergences(target, target.space.log_prob(r), log_beta)  # noqa: E731
    return Training2Result(pi=inputs.pi, draws=fit.proposals, seconds=seconds, ce_valid_pi=ce_valid,
                           target_ce_valid=line, reached_target=reached,
                           curve=[{"draws": fit.proposals, "ce_valid_pi": ce_valid}],
                           results=fit.results(), exact_extras=exact_extras)


register(Method("distill", DistillConfig, train_distill,
                "distillation: exact (rs) or quasi-rejection (qrs) samples of p_lambda into pi by MLE"))
